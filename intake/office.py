"""Office documents: DOCX/XLSX/PPTX and ODF packages (ZIP), legacy and encrypted OLE files."""

from __future__ import annotations

import zipfile
from typing import Any, BinaryIO

from intake import limits
from intake.verdict import Finding, Kind, Severity, Verdict, verdict_from

ZIP_ERRORS = (zipfile.BadZipFile, ValueError, IndexError, OSError, EOFError, NotImplementedError)
_OLE_NAMES = {
    "encrypted": "EncryptionInfo".encode("utf-16-le"),
    "word": "WordDocument".encode("utf-16-le"),
    "excel": "Workbook".encode("utf-16-le"),
    "vba": "_VBA_PROJECT".encode("utf-16-le"),
    "macros": "Macros".encode("utf-16-le"),
}


def check_office(stream: BinaryIO) -> Verdict:
    stream.seek(0)
    head = stream.read(8)
    stream.seek(0)
    if head.startswith(b"\xd0\xcf\x11\xe0"):
        return _check_ole(stream)
    return _check_package(stream)


def _check_ole(stream: BinaryIO) -> Verdict:
    """Legacy Word/Excel and encrypted OOXML are OLE compound files; the directory entries
    carry UTF-16 stream names, found here by a bounded streaming scan."""
    found: set[str] = set()
    tail = b""
    scanned = 0
    while scanned < 64 * 1024 * 1024:
        chunk = stream.read(1024 * 1024)
        if not chunk:
            break
        scanned += len(chunk)
        window = tail + chunk
        for key, needle in _OLE_NAMES.items():
            if needle in window:
                found.add(key)
        tail = chunk[-64:]
    metadata: dict[str, Any] = {"format": "ole"}
    if "encrypted" in found:
        return verdict_from(
            Kind.OFFICE, [Finding("office_password_protected", Severity.ERROR)], metadata
        )
    findings: list[Finding] = []
    if {"vba", "macros"} & found:
        findings.append(Finding("office_macros", Severity.INFO))
    if not {"word", "excel"} & found:
        findings.append(Finding("office_unsupported", Severity.ERROR))
        return verdict_from(Kind.OFFICE, findings, metadata)
    metadata["format"] = "doc" if "word" in found else "xls"
    findings.append(Finding("office_prefer_pdf", Severity.NOTE))
    return verdict_from(Kind.OFFICE, findings, metadata)


def _check_package(stream: BinaryIO) -> Verdict:
    try:
        archive = zipfile.ZipFile(stream)
    except ZIP_ERRORS:
        return verdict_from(Kind.OFFICE, [Finding("office_corrupt", Severity.ERROR)])
    with archive:
        infos = archive.infolist()
        if len(infos) > limits.MAX_OFFICE_ENTRIES or sum(i.file_size for i in infos) > (
            limits.MAX_OFFICE_TOTAL
        ):
            return verdict_from(Kind.OFFICE, [Finding("office_too_large", Severity.ERROR)])
        for info in infos:
            if info.file_size > limits.ZIP_RATIO_FLOOR and info.file_size > (
                max(info.compress_size, 1) * limits.MAX_ZIP_RATIO
            ):
                return verdict_from(Kind.OFFICE, [Finding("office_too_large", Severity.ERROR)])
        names = {i.filename for i in infos}
        metadata: dict[str, Any] = {}
        findings: list[Finding] = []
        try:
            if "mimetype" in names:
                mimetype = archive.read("mimetype")[:200].decode("ascii", "replace").strip()
                metadata["format"] = {
                    "application/vnd.oasis.opendocument.text": "odt",
                    "application/vnd.oasis.opendocument.spreadsheet": "ods",
                    "application/vnd.oasis.opendocument.presentation": "odp",
                }.get(mimetype, "odf")
                if "content.xml" not in names:
                    raise zipfile.BadZipFile("no content.xml")
                _test_members(archive, ["content.xml", "manifest.xml", "META-INF/manifest.xml"])
                if any(n.startswith(("Basic/", "Scripts/")) for n in names):
                    findings.append(Finding("office_macros", Severity.INFO))
                if "META-INF/manifest.xml" in names:
                    manifest = archive.read("META-INF/manifest.xml")[: 1024 * 1024]
                    if b"encryption-data" in manifest:
                        return verdict_from(
                            Kind.OFFICE,
                            [Finding("office_password_protected", Severity.ERROR)],
                            metadata,
                        )
            else:
                types = archive.read("[Content_Types].xml")[: 1024 * 1024]
                main = next(
                    (
                        n
                        for n in ("word/document.xml", "xl/workbook.xml", "ppt/presentation.xml")
                        if n in names
                    ),
                    None,
                )
                if main is None:
                    raise zipfile.BadZipFile("no main part")
                metadata["format"] = {"word": "docx", "xl": "xlsx", "ppt": "pptx"}[
                    main.split("/")[0]
                ]
                _test_members(archive, [main])
                if any(n.endswith("vbaProject.bin") for n in names) or b"macroEnabled" in types:
                    findings.append(Finding("office_macros", Severity.INFO))
        except (*ZIP_ERRORS, KeyError, RuntimeError):
            return verdict_from(Kind.OFFICE, [Finding("office_corrupt", Severity.ERROR)], metadata)
    findings.append(Finding("office_prefer_pdf", Severity.NOTE))
    return verdict_from(Kind.OFFICE, findings, metadata)


def _test_members(archive: zipfile.ZipFile, names: list[str]) -> None:
    """Read the main parts through (CRC checked); raises on a damaged member."""
    for name in names:
        try:
            info = archive.getinfo(name)
        except KeyError:
            continue
        with archive.open(info) as member:
            while member.read(1024 * 1024):
                pass
