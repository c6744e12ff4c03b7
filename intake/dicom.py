"""DICOM checks.

A structural walk (`scan`) runs first, over the element headers only: it checks every declared
length against the bytes actually there, bounds nesting and element count, inflates a deflated
dataset under a size and ratio cap, and collects the few values the summary needs, without
allocating anything the size of a declared length. Only a file that passes the walk is given to
pydicom (metadata with the right character set, and one frame decoded with the installed codecs).
"""

from __future__ import annotations

import contextlib
import io
import struct
import zlib
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from intake import limits
from intake.verdict import Finding, Kind, Severity, Verdict, verdict_from

UNDEFINED = 0xFFFFFFFF
ITEM, ITEM_END, SEQ_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
PIXEL_TAGS = {0x7FE00010, 0x7FE00008, 0x7FE00009}
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UN", b"UR", b"UT"}
_ALL_VRS = _LONG_VRS | {
    b"AE",
    b"AS",
    b"AT",
    b"CS",
    b"DA",
    b"DS",
    b"DT",
    b"FL",
    b"FD",
    b"IS",
    b"LO",
    b"LT",
    b"PN",
    b"SH",
    b"SL",
    b"SS",
    b"ST",
    b"SV",
    b"TM",
    b"UI",
    b"UL",
    b"US",
    b"UV",
}
IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
EXPLICIT_BE = "1.2.840.10008.1.2.2"
DEFLATED = {"1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.8.1"}
NATIVE = {IMPLICIT_LE, EXPLICIT_LE, EXPLICIT_BE, *DEFLATED}

WANTED = {
    0x00080005: "charset",
    0x00080016: "sop_class_uid",
    0x00080018: "sop_instance_uid",
    0x00080020: "study_date",
    0x00080060: "modality",
    0x00081030: "study_description",
    0x0008103E: "series_description",
    0x00100010: "patient_name",
    0x00100030: "patient_birth_date",
    0x00180015: "body_part",
    0x0020000D: "study_uid",
    0x0020000E: "series_uid",
    0x00280002: "samples",
    0x00280004: "photometric",
    0x00280008: "frames",
    0x00280010: "rows",
    0x00280011: "columns",
    0x00280100: "bits_allocated",
    0x00041130: "fileset_id",  # DICOMDIR
    0x00041220: "directory_records",
}
_US = {"samples", "rows", "columns", "bits_allocated"}
REQUIRED = ("sop_class_uid", "sop_instance_uid", "study_uid", "series_uid", "modality")
DICOMDIR_CLASS = "1.2.840.10008.1.3.10"


class DicomError(Exception):
    def __init__(self, code: str, **params: Any) -> None:
        super().__init__(code)
        self.code = code
        self.params = params


@dataclass
class ScanResult:
    part10: bool = False
    transfer_syntax: str = IMPLICIT_LE
    values: dict[str, Any] = field(default_factory=dict)
    pixel_length: int | None = None  # None: no pixel data; -1: encapsulated
    pixel_tag: int = 0
    elements: int = 0
    preamble_executable: bool = False
    inflated: bytes | None = None


class _Source:
    """Random access with a read-ahead window: element headers cost a slice, not a read()."""

    WINDOW = 64 * 1024

    def __init__(self, stream: BinaryIO, size: int) -> None:
        self.stream = stream
        self.size = size
        self.start = 0
        self.buf = b""

    def get(self, pos: int, n: int) -> bytes:
        end = pos + n
        if pos >= self.start and end <= self.start + len(self.buf):
            return self.buf[pos - self.start : end - self.start]
        if end > self.size:
            raise DicomError("dicom_truncated")
        self.stream.seek(pos)
        self.buf = self.stream.read(max(n, self.WINDOW))
        self.start = pos
        if len(self.buf) < n:
            raise DicomError("dicom_truncated")
        return self.buf[:n]


def _stream_size(stream: BinaryIO) -> int:
    stream.seek(0, io.SEEK_END)
    size = stream.tell()
    stream.seek(0)
    return size


_SQ_CACHE: dict[int, bool] = {}


def _is_sq(tag: int) -> bool:
    known = _SQ_CACHE.get(tag)
    if known is None:
        from pydicom.datadict import dictionary_VR

        try:
            known = dictionary_VR(tag) == "SQ"
        except KeyError:
            known = False
        _SQ_CACHE[tag] = known
    return known


class _Walker:
    def __init__(self, src: _Source, explicit: bool, little: bool, result: ScanResult) -> None:
        self.src = src
        self.explicit = explicit
        self.e = "<" if little else ">"
        self.result = result

    def header(self, pos: int) -> tuple[int, bytes | None, int, int]:
        """(tag, VR, length, header size) at pos."""
        raw = self.src.get(pos, 8)
        group, elem = struct.unpack(self.e + "HH", raw[:4])
        tag = (group << 16) | elem
        if group == 0xFFFE:  # items and delimiters: always tag + 4-byte length
            return tag, None, struct.unpack(self.e + "I", raw[4:8])[0], 8
        if self.explicit:
            vr = raw[4:6]
            if vr in _LONG_VRS:
                length = struct.unpack(self.e + "I", self.src.get(pos + 8, 4))[0]
                return tag, vr, length, 12
            if vr in _ALL_VRS:
                return tag, vr, struct.unpack(self.e + "H", raw[6:8])[0], 8
            # Some writers switch to implicit VR mid-file; treat this element as implicit.
        return tag, None, struct.unpack(self.e + "I", raw[4:8])[0], 8

    def dataset(self, pos: int, end: int, depth: int, top: bool) -> int:
        """Walk elements from pos to end (or an item delimiter); return the position after."""
        if depth > limits.MAX_DICOM_DEPTH:
            raise DicomError("dicom_nesting_too_deep", max_depth=limits.MAX_DICOM_DEPTH)
        result = self.result
        while pos < end:
            if end - pos < 8:
                if top and all(b == 0 for b in self.src.get(pos, end - pos)):
                    return end  # trailing padding
                raise DicomError("dicom_truncated")
            tag, vr, length, hsize = self.header(pos)
            result.elements += 1
            if result.elements > limits.MAX_DICOM_ELEMENTS:
                raise DicomError("dicom_too_many_elements")
            vpos = pos + hsize
            if tag == ITEM_END:
                if top:
                    raise DicomError("dicom_corrupt")
                return vpos
            if top and tag in PIXEL_TAGS:
                return self.pixel_data(tag, vpos, length, end)
            if length == UNDEFINED:
                if vr == b"SQ" or vr == b"UN" or vr is None:
                    if top and tag == 0x00041220:
                        result.values["directory_records"] = True
                    pos = self.sequence(vpos, end, depth + 1, undefined=True)
                    continue
                raise DicomError("dicom_length_invalid")
            vend = vpos + length
            if vend > end:
                raise DicomError("dicom_length_invalid", declared=length, available=end - vpos)
            if vr == b"SQ" or (vr is None and _is_sq(tag) and length):
                if top and tag == 0x00041220:
                    result.values["directory_records"] = True
                self.sequence(vpos, vend, depth + 1)
            elif top:
                name = WANTED.get(tag)
                if name and length <= 1024:
                    result.values[name] = self.value(name, self.src.get(vpos, length))
            pos = vend
        return pos

    def value(self, name: str, raw: bytes) -> Any:
        if name in _US:
            return struct.unpack(self.e + "H", raw[:2])[0] if len(raw) >= 2 else None
        text = raw.rstrip(b"\x00 ").decode("latin-1").strip()
        if name == "frames":
            with contextlib.suppress(ValueError):
                return int(text or "1")
            return 1
        return text

    def sequence(self, pos: int, end: int, depth: int, undefined: bool = False) -> int:
        """Items of a sequence from pos, up to end (defined) or its delimiter (undefined)."""
        if depth > limits.MAX_DICOM_DEPTH:
            raise DicomError("dicom_nesting_too_deep", max_depth=limits.MAX_DICOM_DEPTH)
        while pos < end:
            tag, _, length, hsize = self.header(pos)
            self.result.elements += 1
            if self.result.elements > limits.MAX_DICOM_ELEMENTS:
                raise DicomError("dicom_too_many_elements")
            pos += hsize
            if tag == SEQ_END:
                return pos
            if tag != ITEM:
                raise DicomError("dicom_corrupt")
            if length == UNDEFINED:
                pos = self.dataset(pos, end, depth + 1, top=False)
            else:
                if pos + length > end:
                    raise DicomError("dicom_length_invalid", declared=length, available=end - pos)
                self.dataset(pos, pos + length, depth + 1, top=False)
                pos += length
        if undefined:
            # An undefined-length sequence that runs to the end of the file was cut short.
            raise DicomError("dicom_truncated")
        return pos

    def pixel_data(self, tag: int, pos: int, length: int, end: int) -> int:
        result = self.result
        result.pixel_tag = tag
        if length != UNDEFINED:
            result.pixel_length = length
            if pos + length > end:
                raise DicomError("dicom_pixel_data_truncated", declared=length, available=end - pos)
            return pos + length
        result.pixel_length = -1
        fragments = 0
        while True:
            if pos + 8 > end:
                raise DicomError("dicom_pixel_data_truncated")
            tag, _, flen, _ = self.header(pos)
            pos += 8
            if tag == SEQ_END:
                return pos
            if tag != ITEM or flen == UNDEFINED:
                raise DicomError("dicom_corrupt")
            if pos + flen > end:
                raise DicomError("dicom_pixel_data_truncated", declared=flen, available=end - pos)
            pos += flen
            fragments += 1
            if fragments > limits.MAX_DICOM_ELEMENTS:
                raise DicomError("dicom_too_many_elements")


def looks_like_raw_dataset(head: bytes) -> bool:
    """A dataset without the Part 10 header: starts with a group 0002/0008 tag, LE or BE."""
    if len(head) < 8:
        return False
    for order in ("<", ">"):
        group, elem = struct.unpack(order + "HH", head[:4])
        if group not in (0x0002, 0x0008) or elem > 0x0100:
            continue
        if head[4:6] in _ALL_VRS:
            return True
        length = struct.unpack(order + "I", head[4:8])[0]
        if order == "<" and 0 < length < 1024:
            return True
    return False


def scan(stream: BinaryIO) -> ScanResult:
    """The structural walk; raises DicomError with the finding code."""
    size = _stream_size(stream)
    src = _Source(stream, size)
    result = ScanResult()
    if size < 8:
        raise DicomError("dicom_corrupt")
    head = src.get(0, min(size, 132))
    pos = 0
    if len(head) >= 132 and head[128:132] == b"DICM":
        result.part10 = True
        result.preamble_executable = head[:2] == b"MZ" or head[:4] == b"\x7fELF"
        pos = 132
        meta = _Walker(src, explicit=True, little=True, result=result)
        while pos + 8 <= size:
            raw = src.get(pos, 2)
            if struct.unpack("<H", raw)[0] != 0x0002:
                break
            tag, _, length, hsize = meta.header(pos)
            if length == UNDEFINED or pos + hsize + length > size:
                raise DicomError("dicom_length_invalid")
            if tag == 0x00020002 and length <= 64:
                result.values["media_sop_class"] = (
                    src.get(pos + hsize, length).rstrip(b"\x00 ").decode("latin-1")
                )
            if tag == 0x00020010 and length <= 64:
                result.transfer_syntax = (
                    src.get(pos + hsize, length).rstrip(b"\x00 ").decode("latin-1")
                )
            pos += hsize + length
            result.elements += 1
        explicit, little = _syntax(result.transfer_syntax, src, pos)
    else:
        if not looks_like_raw_dataset(head):
            raise DicomError("dicom_corrupt")
        explicit = head[4:6] in _ALL_VRS
        little = struct.unpack("<H", head[:2])[0] in (0x0002, 0x0008)
        result.transfer_syntax = (
            (EXPLICIT_LE if little else EXPLICIT_BE) if explicit else IMPLICIT_LE
        )
    if result.transfer_syntax in DEFLATED:
        data = _inflate(stream, pos, size)
        result.inflated = data
        src = _Source(io.BytesIO(data), len(data))
        pos, size = 0, len(data)
    walker = _Walker(src, explicit, little, result)
    walker.dataset(pos, size, 0, top=True)
    return result


def _syntax(uid: str, src: _Source, pos: int) -> tuple[bool, bool]:
    if uid == IMPLICIT_LE:
        return False, True
    if uid == EXPLICIT_BE:
        return True, False
    if not uid and pos + 6 <= src.size:  # missing transfer syntax: look at the first element
        return src.get(pos + 4, 2) in _ALL_VRS, True
    return True, True


def _inflate(stream: BinaryIO, pos: int, size: int) -> bytes:
    """Inflate a deflated dataset 1 MiB at a time, stopping at the size or ratio cap."""
    stream.seek(pos)
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    out = io.BytesIO()
    read = 0
    step = 1024 * 1024
    while True:
        chunk = stream.read(64 * 1024)
        if not chunk:
            break
        read += len(chunk)
        data = chunk
        while data:
            try:
                piece = inflater.decompress(data, step)
            except zlib.error as exc:
                raise DicomError("dicom_corrupt") from exc
            out.write(piece)
            written = out.tell()
            if written > limits.MAX_DEFLATED_SIZE or written > max(
                step, read * limits.MAX_DEFLATE_RATIO
            ):
                raise DicomError("dicom_deflate_bomb")
            data = inflater.unconsumed_tail
    return out.getvalue()


def expected_pixel_bytes(values: dict[str, Any], tag: int = 0x7FE00010) -> int | None:
    try:
        rows = int(values["rows"])
        cols = int(values["columns"])
        bits = int(values.get("bits_allocated") or 0)
        samples = int(values.get("samples") or 1)
        frames = int(values.get("frames") or 1)
    except (KeyError, TypeError, ValueError):
        return None
    if tag == 0x7FE00008:
        bits = 32
    elif tag == 0x7FE00009:
        bits = 64
    if not rows or not cols or not bits:
        return None
    if str(values.get("photometric", "")).startswith("YBR_FULL_422") and samples == 3:
        total_bits = rows * cols * frames * 2 * bits
    else:
        total_bits = rows * cols * frames * samples * bits
    return (total_bits + 7) // 8


def is_dicomdir(values: dict[str, Any]) -> bool:
    return bool(
        values.get("directory_records")
        or DICOMDIR_CLASS in (values.get("sop_class_uid"), values.get("media_sop_class"))
    )


def structural_findings(result: ScanResult) -> list[Finding]:
    """Findings that follow from a clean walk: identifiers, pixel length, preamble."""
    findings: list[Finding] = []
    values = result.values
    if result.preamble_executable:
        findings.append(Finding("dicom_executable_preamble", Severity.ERROR))
    if not result.part10:
        findings.append(Finding("dicom_no_file_header", Severity.INFO))
    if is_dicomdir(values):
        return findings
    missing = [name for name in REQUIRED if not values.get(name)]
    if missing:
        findings.append(
            Finding("dicom_missing_identifiers", Severity.ERROR, {"missing": ", ".join(missing)})
        )
    native = result.transfer_syntax in NATIVE
    if native and result.pixel_length is not None and result.pixel_length >= 0:
        expected = expected_pixel_bytes(values, result.pixel_tag)
        if expected is not None and result.pixel_length < expected:
            findings.append(
                Finding(
                    "dicom_pixel_data_truncated",
                    Severity.ERROR,
                    {"declared": result.pixel_length, "expected": expected},
                )
            )
    return findings


def _summary(values: dict[str, Any]) -> dict[str, Any]:
    keys = (
        "modality",
        "body_part",
        "study_date",
        "study_description",
        "series_description",
        "patient_name",
        "patient_birth_date",
        "study_uid",
        "series_uid",
        "sop_instance_uid",
        "sop_class_uid",
        "rows",
        "columns",
        "frames",
    )
    return {k: values[k] for k in keys if values.get(k) not in (None, "")}


def _pydicom_details(stream: BinaryIO, result: ScanResult, decode: bool) -> list[Finding]:
    """Metadata with the proper character set, and one frame decoded; fills result.values."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    findings: list[Finding] = []
    stream.seek(0)
    try:
        ds = pydicom.dcmread(stream, stop_before_pixels=True, force=True, defer_size=4096)
    except (InvalidDicomError, ValueError, KeyError, TypeError, EOFError, OSError, struct.error):
        return [Finding("dicom_corrupt", Severity.ERROR)]
    for name, keyword in (
        ("patient_name", "PatientName"),
        ("study_description", "StudyDescription"),
        ("series_description", "SeriesDescription"),
        ("body_part", "BodyPartExamined"),
    ):
        with contextlib.suppress(Exception):
            value = ds.get(keyword)
            if value not in (None, ""):
                result.values[name] = str(value).replace("^", " ").strip()
    if not decode or result.pixel_length is None:
        return findings
    expected = expected_pixel_bytes(result.values, result.pixel_tag) or 0
    frames = int(result.values.get("frames") or 1) or 1
    if expected // frames > limits.MAX_FRAME_BYTES:
        findings.append(Finding("dicom_frame_too_large", Severity.INFO))
        return findings
    stream.seek(0)
    try:
        from pydicom.pixels import pixel_array

        if result.inflated is not None:
            stream.seek(0)
            arr = pydicom.dcmread(stream, force=True).pixel_array  # size bounded by the walk
        else:
            arr = pixel_array(stream, index=0 if frames > 1 else None)
        if arr.size == 0:
            raise ValueError("empty frame")
    except NotImplementedError:
        findings.append(
            Finding("dicom_codec_unavailable", Severity.INFO, {"syntax": result.transfer_syntax})
        )
    except MemoryError:
        raise
    except Exception:  # any decoder failure means the pixels cannot be shown
        if result.transfer_syntax in NATIVE:
            findings.append(Finding("dicom_pixel_data_corrupt", Severity.ERROR))
        else:
            findings.append(
                Finding(
                    "dicom_pixel_decode_failed", Severity.ERROR, {"syntax": result.transfer_syntax}
                )
            )
    return findings


def check_dicom(stream: BinaryIO, *, decode: bool = True) -> Verdict:
    try:
        result = scan(stream)
    except DicomError as exc:
        return verdict_from(Kind.DICOM, [Finding(exc.code, Severity.ERROR, exc.params)])
    except RecursionError:
        return verdict_from(Kind.DICOM, [Finding("dicom_nesting_too_deep", Severity.ERROR)])
    findings = structural_findings(result)
    metadata: dict[str, Any] = {"transfer_syntax": result.transfer_syntax}
    if is_dicomdir(result.values):
        metadata["dicomdir"] = True
        findings.append(Finding("dicom_dicomdir_alone", Severity.ERROR))
        return verdict_from(Kind.DICOM, findings, metadata)
    if not any(f.severity is Severity.ERROR for f in findings):
        findings += _pydicom_details(stream, result, decode)
    if result.pixel_length is None:
        findings.append(Finding("dicom_no_pixel_data", Severity.INFO))
    metadata.update(_summary(result.values))
    metadata["series_count"] = 1
    metadata["instance_count"] = 1
    return verdict_from(Kind.DICOM, findings, metadata)
