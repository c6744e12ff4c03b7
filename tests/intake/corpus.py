"""Generators of hostile and ordinary test files (written on the fly, nothing checked in)."""

from __future__ import annotations

import io
import struct
import zipfile
import zlib
from pathlib import Path

import pydicom
from pydicom.data import get_testdata_file

CT_SMALL = get_testdata_file("CT_small.dcm")


def _meta(ts: str = "1.2.840.10008.1.2.1", preamble: bytes = b"\0" * 128) -> bytes:
    def el(tag_elem: int, vr: bytes, value: bytes) -> bytes:
        if len(value) % 2:
            value += b"\0"
        if vr in (b"OB",):
            return (
                struct.pack("<HH", 2, tag_elem)
                + vr
                + b"\0\0"
                + struct.pack("<I", len(value))
                + value
            )
        return struct.pack("<HH", 2, tag_elem) + vr + struct.pack("<H", len(value)) + value

    body = (
        el(0x0001, b"OB", b"\0\1")
        + el(0x0002, b"UI", b"1.2.840.10008.5.1.4.1.1.7")
        + el(0x0003, b"UI", b"1.2.3.4")
        + el(0x0010, b"UI", ts.encode())
    )
    group_len = struct.pack("<HH", 2, 0) + b"UL" + struct.pack("<HI", 4, len(body))
    return preamble + b"DICM" + group_len + body


def _ele(group: int, elem: int, vr: bytes, value: bytes) -> bytes:
    if len(value) % 2:
        value += b" "
    if vr in (b"OB", b"OW", b"SQ", b"UN", b"UT"):
        return (
            struct.pack("<HH", group, elem) + vr + b"\0\0" + struct.pack("<I", len(value)) + value
        )
    return struct.pack("<HH", group, elem) + vr + struct.pack("<H", len(value)) + value


def write_all(root: Path) -> dict[str, Path]:
    """Every hostile sample, by name."""
    root.mkdir(parents=True, exist_ok=True)
    out: dict[str, Path] = {}

    def put(name: str, data: bytes) -> None:
        path = root / name
        path.write_bytes(data)
        out[name] = path

    # --- ZIP ---
    buf = io.BytesIO()
    with (
        zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z,
        z.open("zeros.dcm", "w", force_zip64=True) as member,
    ):
        chunk = b"\0" * (1 << 20)
        for _ in range(64):
            member.write(chunk)
    put("zip_ratio.zip", buf.getvalue())

    inner = b"innermost"
    for level in range(5):
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as z:
            z.writestr(f"level{level}.zip" if level else "note.txt", inner)
        inner = buf.getvalue()
    put("zip_nested.zip", inner)

    put("zip_overlap.zip", _overlapping_zip())

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("../../etc/cron.d/evil", b"* * * * * root true\n")
    put("zip_slip.zip", buf.getvalue())

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        info = zipfile.ZipInfo("link")
        info.create_system = 3
        info.external_attr = 0o120777 << 16
        z.writestr(info, "/etc/passwd")
    put("zip_symlink.zip", buf.getvalue())

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        for i in range(20_000):
            z.writestr(f"f{i}", b"")
    put("zip_20000.zip", buf.getvalue())

    # --- images ---
    put("png_bomb.png", _png_bomb(12_000, 12_000))

    # --- DICOM ---
    ct = Path(CT_SMALL).read_bytes()
    put("dcm_truncated.dcm", ct[: len(ct) - 20_000])
    put("dcm_pe_preamble.dcm", b"MZ\x90\x00" + ct[4:])
    lie = _meta() + _ele(0x0008, 0x0016, b"UI", b"1.2.3") + struct.pack("<HH", 0x0010, 0x0010)
    lie += b"OB\0\0" + struct.pack("<I", 0xFFFFFFF0) + b"\0" * 16
    put("dcm_length_lie.dcm", lie)
    payload = _ele(0x0008, 0x0016, b"UI", b"1.2.3") + struct.pack("<HH", 0x0009, 0x1010)
    payload += b"OB\0\0" + struct.pack("<I", 300 * 1024 * 1024)
    deflater = zlib.compressobj(9, zlib.DEFLATED, -15)
    body = deflater.compress(payload)
    zeros = b"\0" * (1 << 20)
    body += b"".join(deflater.compress(zeros) for _ in range(300)) + deflater.flush()
    put("dcm_deflate_bomb.dcm", _meta("1.2.840.10008.1.2.1.99") + body)
    nest = b""
    for _ in range(5000):
        nest = (
            struct.pack("<HH", 0x0040, 0xA730)
            + b"SQ\0\0"
            + struct.pack("<I", 0xFFFFFFFF)
            + (
                struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF)
                + nest
                + struct.pack("<HHI", 0xFFFE, 0xE00D, 0)
                + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
            )
        )
    put("dcm_nested.dcm", _meta() + _ele(0x0008, 0x0016, b"UI", b"1.2.3") + nest)

    # --- PDF ---
    put("pdf_encrypted.pdf", encrypted_pdf("secret"))
    put("pdf_xref_loop.pdf", _xref_loop_pdf())
    put("pdf_flate_bomb.pdf", _flate_bomb_pdf(300))
    put("pdf_javascript.pdf", text_pdf("Patient discharge summary", javascript=True))

    # --- other ---
    put(
        "svg_entities.svg",
        b'<?xml version="1.0"?>\n<!DOCTYPE svg [<!ENTITY a "aaaaaaaaaa">'
        + b"".join(
            b'<!ENTITY a%d "&a%s;&a%s;&a%s;&a%s;">'
            % (
                i,
                b"" if i == 1 else b"%d" % (i - 1),
                b"" if i == 1 else b"%d" % (i - 1),
                b"" if i == 1 else b"%d" % (i - 1),
                b"" if i == 1 else b"%d" % (i - 1),
            )
            for i in range(1, 10)
        )
        + b']>\n<svg xmlns="http://www.w3.org/2000/svg"><text>&a9;</text></svg>\n',
    )
    put("program.exe", b"MZ\x90\x00" + b"\0" * 200)
    put("empty.pdf", b"")
    return out


def _overlapping_zip() -> bytes:
    """Fifield-style: many central-directory entries share one local file and its data."""
    data = bytes(range(256)) * 2048  # 512 KiB, under the ratio floor: only the overlap is wrong
    comp = zlib.compressobj(9, zlib.DEFLATED, -15)
    packed = comp.compress(data) + comp.flush()
    crc = zlib.crc32(data)
    name = b"a.dcm"
    local = struct.pack(
        "<IHHHHHIIIHH", 0x04034B50, 20, 0, 8, 0, 0, crc, len(packed), len(data), len(name), 0
    )
    body = local + name + packed
    central = b""
    count = 200
    for i in range(count):
        cname = b"f%04d.dcm" % i
        central += (
            struct.pack(
                "<IHHHHHHIIIHHHHHII",
                0x02014B50,
                20,
                20,
                0,
                8,
                0,
                0,
                crc,
                len(packed),
                len(data),
                len(cname),
                0,
                0,
                0,
                0,
                0,
                0,
            )
            + cname
        )
    end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, count, count, len(central), len(body), 0)
    return body + central + end


def _png_bomb(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    comp = zlib.compressobj(9)
    row = b"\0" * (width + 1)
    idat = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def text_pdf(text: str, *, javascript: bool = False, pages: int = 1) -> bytes:
    from reportlab.pdfgen import canvas

    buf = io.BytesIO()
    c = canvas.Canvas(buf)
    for _ in range(pages):
        y = 780
        for line in range(30):
            c.drawString(
                72, y, f"{text} line {line}: the patient was seen at the clinic and the date"
            )
            y -= 20
        c.showPage()
    c.save()
    data = buf.getvalue()
    if javascript:
        data = _add_open_action_js(data)
    return data


def encrypted_pdf(password: str) -> bytes:
    from reportlab.lib.pdfencrypt import StandardEncryption
    from reportlab.pdfgen import canvas

    buf = io.BytesIO()
    c = canvas.Canvas(buf, encrypt=StandardEncryption(password, ownerPassword="owner-" + password))
    c.drawString(72, 720, "Laboratory results for the patient")
    c.showPage()
    c.save()
    return buf.getvalue()


def _pdf(objs: list[bytes], trailer_extra: bytes = b"", prev_self: bool = False) -> bytes:
    out = io.BytesIO()
    out.write(b"%PDF-1.4\n")
    offsets = []
    for i, obj in enumerate(objs, 1):
        offsets.append(out.tell())
        out.write(b"%d 0 obj\n" % i + obj + b"\nendobj\n")
    xref = out.tell()
    out.write(b"xref\n0 %d\n0000000000 65535 f \n" % (len(objs) + 1))
    for off in offsets:
        out.write(b"%010d 00000 n \n" % off)
    prev = b" /Prev %d" % xref if prev_self else b""
    out.write(
        b"trailer\n<< /Size %d /Root 1 0 R%s%s >>\nstartxref\n%d\n%%%%EOF\n"
        % (len(objs) + 1, prev, trailer_extra, xref)
    )
    return out.getvalue()


def _add_open_action_js(_: bytes) -> bytes:
    content = b"BT /F1 12 Tf 72 720 Td (Discharge summary for the patient and the date) Tj ET"
    return _pdf(
        [
            b"<< /Type /Catalog /Pages 2 0 R /Names << /JavaScript 6 0 R >> /OpenAction 7 0 R >>",
            b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
            b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R"
            b" /Resources << /Font << /F1 5 0 R >> >> >>",
            b"<< /Length %d >>\nstream\n" % len(content) + content + b"\nendstream",
            b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
            b"<< /Names [(a) 7 0 R] >>",
            b"<< /S /JavaScript /JS (app.alert('hi');) >>",
        ]
    )


def _xref_loop_pdf() -> bytes:
    """Two xref sections whose /Prev point at each other, and no page tree that resolves."""
    body = b"%PDF-1.4\n1 0 obj\n<< /Type /Catalog /Pages 2 0 R >>\nendobj\n"
    x1 = len(body)
    sec1 = b"xref\n0 2\n0000000000 65535 f \n%010d 00000 n \n" % 9
    x2 = x1 + len(sec1) + 60
    sec1 += b"trailer\n<< /Size 3 /Root 1 0 R /Prev %d >>\n" % x2
    sec1 = sec1.ljust(x2 - x1, b" ")
    sec2 = b"xref\n0 1\n0000000000 65535 f \ntrailer\n<< /Size 3 /Root 1 0 R /Prev %d >>\n" % x1
    return body + sec1 + sec2 + b"startxref\n%d\n%%%%EOF\n" % x2


def _flate_bomb_pdf(mb: int) -> bytes:
    comp = zlib.compressobj(9)
    chunk = b" " * (1 << 20)
    data = b"".join(comp.compress(chunk) for _ in range(mb)) + comp.flush()
    return _pdf(
        [
            b"<< /Type /Catalog /Pages 2 0 R >>",
            b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
            b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R >>",
            b"<< /Length %d /Filter /FlateDecode >>\nstream\n" % len(data) + data + b"\nendstream",
        ]
    )


def dicom_study(root: Path, instances: int, *, series: int = 2, rows: int = 64) -> list[Path]:
    """A generated CT study: `instances` files in `series` series, native pixels."""
    import numpy as np
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    root.mkdir(parents=True, exist_ok=True)
    base = pydicom.dcmread(CT_SMALL)
    study = generate_uid()
    series_uids = [generate_uid() for _ in range(series)]
    pixels = (np.arange(rows * rows, dtype=np.uint16) % 4096).reshape(rows, rows)
    paths = []
    for i in range(instances):
        ds = base.copy()
        ds.file_meta = FileMetaDataset(base.file_meta)
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        sop = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = sop
        ds.SOPInstanceUID = sop
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = series_uids[i % series]
        ds.StudyDate = "20240503"
        ds.Modality = "MR"
        ds.PatientName = "Doe^Jane"
        ds.Rows = ds.Columns = rows
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.PixelData = pixels.tobytes()
        path = root / f"IM{i:05d}"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
