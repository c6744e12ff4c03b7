"""Ordinary files through `check`: PDFs, photos, office files, ZIPs of a study, the CLI."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import corpus
import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

from intake import Kind, Status, check
from intake.cli import main as cli_main
from intake.language import detect
from intake.pdf import pdf_opens_with_password

# Photo and scanned-page verdicts rest on OCR: judged without its wall-clock limits.
pytestmark = pytest.mark.usefixtures("unhurried_ocr")


def _codes(verdict) -> list[str]:
    return [f.code for f in verdict.findings]


def test_text_pdf_accepted_with_pages_and_language() -> None:
    """A plain text PDF: accepted, page count and English detected."""
    verdict = check(io.BytesIO(corpus.text_pdf("Discharge summary", pages=3)))
    assert verdict.status is Status.ACCEPTED, verdict
    assert verdict.metadata["page_count"] == 3
    assert verdict.metadata["language"] == "en"


def test_password_flow() -> None:
    """The right password opens the PDF, a wrong one does not."""
    data = corpus.encrypted_pdf("s3cret")
    assert _codes(check(io.BytesIO(data))) == ["pdf_password_required"]
    assert pdf_opens_with_password(io.BytesIO(data), "s3cret")
    assert not pdf_opens_with_password(io.BytesIO(data), "wrong")


def test_truncated_pdf_is_corrupt_or_opens() -> None:
    """A PDF cut in half never raises; PDFium either repairs it or it is pdf_corrupt."""
    data = corpus.text_pdf("Report", pages=2)
    verdict = check(io.BytesIO(data[: len(data) // 3]))
    assert verdict.kind is Kind.PDF


def test_blank_pdf_rejected() -> None:
    """A PDF of empty pages is not a record."""
    from reportlab.pdfgen import canvas

    buf = io.BytesIO()
    c = canvas.Canvas(buf)
    c.showPage()
    c.save()
    assert "pdf_blank" in _codes(check(io.BytesIO(buf.getvalue())))


def test_language_scripts() -> None:
    """Script and stop-word guesses for the languages the product serves."""
    assert detect("Пациент поступил в отделение и был осмотрен врачом по месту жительства") == "ru"
    assert detect("El paciente fue atendido en la clínica y se le dio el alta con la fecha") == "es"
    assert detect("ผู้ป่วยเข้ารับการรักษาที่โรงพยาบาลและได้รับการตรวจจากแพทย์เรียบร้อยแล้ว") == "th"
    assert detect("患者于本院就诊，经检查后诊断明确，给予相应治疗后出院，嘱定期复查随访。") == "zh"
    assert (
        detect(
            "Pasien datang ke rumah sakit dan dirawat di bangsal untuk pemeriksaan dengan dokter"
        )
        == "id"
    )


def _page_photo(blur: float = 0, dark: float = 1.0, size=(1600, 2200)) -> bytes:
    img = Image.new("L", size, 235)
    draw = ImageDraw.Draw(img)
    for row in range(60):
        draw.text(
            (80, 80 + row * 34), "Blood test results 12.3 mmol/L patient name date " * 2, fill=20
        )
    if blur:
        img = img.filter(ImageFilter.GaussianBlur(blur))
    arr = np.asarray(img, dtype=np.float32) * dark
    rng = np.random.default_rng(1)
    arr = np.clip(arr + rng.normal(0, 2, arr.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).convert("RGB").save(buf, "JPEG", quality=90)
    return buf.getvalue()


def test_sharp_photo_accepted_blurred_and_dark_rejected() -> None:
    """Focus and exposure measures tell a readable page from a blurred or dark one."""
    assert check(io.BytesIO(_page_photo())).accepted
    assert "photo_blurred" in _codes(check(io.BytesIO(_page_photo(blur=4))))
    assert "photo_too_dark" in _codes(check(io.BytesIO(_page_photo(dark=0.15))))


def test_compressed_marginal_photo_nudged_to_send_as_file() -> None:
    """A Telegram photo that is not clearly sharp gets the send-as-File note."""
    verdict = check(io.BytesIO(_page_photo(blur=4)), compressed_photo=True)
    assert "photo_send_as_file" in _codes(verdict)


def test_screenshot_noted() -> None:
    """A lossless picture at a phone's screen size without camera EXIF is a screenshot."""
    img = Image.new("RGB", (1170, 2532), "white")
    draw = ImageDraw.Draw(img)
    for row in range(40):
        draw.text(
            (40, 100 + row * 50), "Portal: your results are ready, download PDF", fill="black"
        )
    buf = io.BytesIO()
    img.save(buf, "PNG")
    assert "photo_screenshot" in _codes(check(io.BytesIO(buf.getvalue())))


def test_truncated_jpeg_rejected() -> None:
    """A JPEG cut short is rejected, not half-judged."""
    data = _page_photo()
    verdict = check(io.BytesIO(data[: len(data) // 2]))
    assert verdict.status is Status.REJECTED


def _docx(macros: bool = False) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("[Content_Types].xml", "<Types/>")
        z.writestr("word/document.xml", "<w:document/>")
        if macros:
            z.writestr("word/vbaProject.bin", b"\0" * 10)
    return buf.getvalue()


def test_docx_noted_and_macros_flagged() -> None:
    """DOCX is accepted with a note asking for a PDF; macros are flagged for the coordinator."""
    verdict = check(io.BytesIO(_docx()))
    assert verdict.kind is Kind.OFFICE and verdict.status is Status.NOTED
    assert "office_macros" in _codes(check(io.BytesIO(_docx(macros=True))))
    assert "office_corrupt" in _codes(check(io.BytesIO(_docx()[:-30])))


def test_study_zip_summary(tmp_path: Path) -> None:
    """A ZIP of a CD: DICOM found without extensions, viewer skipped, summary per study."""
    paths = corpus.dicom_study(tmp_path / "study", 12, series=3)
    zpath = tmp_path / "cd.zip"
    with zipfile.ZipFile(zpath, "w", zipfile.ZIP_DEFLATED) as z:
        for p in paths:
            z.write(p, f"DICOM/{p.name}")
        z.writestr("viewer/viewer.exe", b"MZ" + b"\0" * 100)
        z.writestr("autorun.inf", b"[autorun]\nopen=viewer.exe\n")
        z.writestr("index.html", b"<html></html>")
    with open(zpath, "rb") as stream:
        verdict = check(stream)
    assert verdict.accepted, verdict
    (study,) = verdict.metadata["studies"]
    assert study == {
        "modality": "MR",
        "date": "2024-05-03",
        "description": study["description"],
        "body_part": study["body_part"],
        "series_count": 3,
        "image_count": 12,
    }
    assert verdict.metadata["skipped_count"] == 3


def test_cli_prints_json_for_files_and_folders(tmp_path: Path, capsys) -> None:
    """`check PATH... --json` prints one verdict per path; a folder is summarised."""
    corpus.dicom_study(tmp_path / "study", 4, series=1)
    note = tmp_path / "note.txt"
    note.write_text("hello")
    status = cli_main([str(tmp_path / "study"), str(note), "--json"])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert status == 1
    assert lines[0]["metadata"]["instance_count"] == 4
    assert lines[1]["findings"][0]["code"] == "unsupported_type"
