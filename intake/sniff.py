"""Content sniffing: what a file is, from its first bytes.

Order matters: a Part 10 DICOM file may carry a TIFF header in its 128-byte preamble, so
`DICM` at offset 128 is tested before any image magic (libmagic gets this wrong).
"""

from __future__ import annotations

import zipfile
from typing import BinaryIO

from intake.verdict import Kind

HEAD_SIZE = 4096

_IMAGE_MAGIC = (
    b"\xff\xd8\xff",  # JPEG
    b"\x89PNG\r\n\x1a\n",
    b"II*\x00",  # TIFF little endian
    b"MM\x00*",  # TIFF big endian
    b"GIF87a",
    b"GIF89a",
)
_HEIF_BRANDS = {b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1", b"avif"}
_OLE_MAGIC = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"
_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")
_OFFICE_MARKERS = ("[Content_Types].xml", "mimetype")

_OTHER_MAGIC = (
    (b"MZ", "program"),
    (b"\x7fELF", "program"),
    (b"\xca\xfe\xba\xbe", "program"),
    (b"\xcf\xfa\xed\xfe", "program"),
    (b"#!", "script"),
    (b"ID3", "audio"),
    (b"fLaC", "audio"),
    (b"OggS", "audio"),
    (b"\x1aE\xdf\xa3", "video"),
    (b"Rar!", "archive"),
    (b"7z\xbc\xaf", "archive"),
    (b"\x1f\x8b", "archive"),
    (b"BZh", "archive"),
    (b"\xfd7zXZ", "archive"),
    (b"{\\rtf", "document"),
)


def sniff_head(head: bytes) -> Kind:
    """Kind from the first bytes alone; ZIP containers need `sniff` to tell office files."""
    if len(head) >= 132 and head[128:132] == b"DICM":
        return Kind.DICOM
    if b"%PDF-" in head[:1024]:
        return Kind.PDF
    if head.startswith(_IMAGE_MAGIC):
        return Kind.IMAGE
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return Kind.IMAGE
    if head[4:8] == b"ftyp" and head[8:12] in _HEIF_BRANDS:
        return Kind.IMAGE
    if head.startswith(_ZIP_MAGIC):
        return Kind.ZIP
    if head.startswith(_OLE_MAGIC):
        return Kind.OFFICE
    from intake.dicom import looks_like_raw_dataset

    if looks_like_raw_dataset(head):
        return Kind.DICOM
    return Kind.OTHER


def describe_other(head: bytes) -> str:
    """A coarse label for an unsupported file, so the message can say what it looks like."""
    for magic, label in _OTHER_MAGIC:
        if head.startswith(magic):
            return label
    if head[4:8] == b"ftyp":
        return "video"
    if head[:4] == b"RIFF":
        return "audio" if head[8:12] == b"WAVE" else "video"
    text = head[:1024].lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if text.startswith(b"<?xml") or text.startswith(b"<svg") or b"<svg" in text:
        return "svg" if b"<svg" in head.lower() else "xml"
    if text.startswith((b"<!doctype html", b"<html")) or b"<html" in text:
        return "html"
    if not head:
        return "empty"
    printable = sum(1 for b in head[:1024] if 32 <= b < 127 or b in (9, 10, 13))
    return "text" if printable > 0.95 * min(len(head), 1024) else "unknown"


def sniff(stream: BinaryIO) -> Kind:
    """Kind of a seekable binary stream; leaves the stream at offset 0."""
    stream.seek(0)
    head = stream.read(HEAD_SIZE)
    stream.seek(0)
    kind = sniff_head(head)
    if kind is Kind.ZIP and _is_office_container(stream):
        kind = Kind.OFFICE
    stream.seek(0)
    return kind


def _is_office_container(stream: BinaryIO) -> bool:
    try:
        with zipfile.ZipFile(stream) as archive:
            names = set(archive.namelist()[:64])
    except (zipfile.BadZipFile, ValueError, IndexError, OSError, EOFError):
        # No readable central directory (a truncated file): the first local header still names
        # the package's first part, which is how office files begin.
        stream.seek(0)
        head = stream.read(30 + 64)
        name_len = int.from_bytes(head[26:28], "little") if len(head) >= 30 else 0
        first = head[30 : 30 + name_len].decode("latin-1")
        return first in _OFFICE_MARKERS or first.startswith(("word/", "xl/", "ppt/", "docProps/"))
    return any(marker in names for marker in _OFFICE_MARKERS)
