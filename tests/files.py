"""Real files for the tests: generated PDFs and photos, pydicom's bundled DICOM files."""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont
from pydicom.data import get_testdata_file
from reportlab.lib.pagesizes import A4
from reportlab.pdfgen import canvas


def pdf_bytes(lines: list[str], pages: int = 1) -> bytes:
    """A real text PDF, as a clinic's letter would be."""
    buffer = io.BytesIO()
    pdf = canvas.Canvas(buffer, pagesize=A4)
    for page in range(pages):
        y = 780
        for line in lines:
            pdf.drawString(72, y, f"{line}")
            y -= 18
        pdf.drawString(72, 60, f"Page {page + 1} of {pages}")
        pdf.showPage()
    pdf.save()
    return buffer.getvalue()


def document_photo(
    text: str = "Passport of Test Patient", size: tuple[int, int] = (1600, 1200)
) -> bytes:
    """A sharp, well-lit JPEG of a page with large dark text."""
    image = Image.new("RGB", size, (245, 245, 240))
    draw = ImageDraw.Draw(image)
    try:
        font = ImageFont.load_default(size=48)
    except TypeError:  # Pillow before 10.1 has no sized default font
        font = ImageFont.load_default()
    for row in range(8):
        draw.text((80, 80 + row * 120), f"{text} line {row + 1}", fill=(20, 20, 20), font=font)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def dicom_path(name: str = "CT_small.dcm") -> Path:
    path = get_testdata_file(name)
    assert path is not None, f"pydicom test file {name} missing"
    return Path(str(path))
