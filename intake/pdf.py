"""PDF checks with pypdfium2: opens, pages, password, blank and scanned pages, active content,
language of the text. The stream is read through PDFium's custom file access (random access,
never loaded whole).

The verdict keeps a bounded sample of the text (`text_sample`: the first pages, a few thousand
characters) for the identity check, which looks for the patient's name and birth date in it.
It is personal data: stored only in the encrypted verdict, never logged or printed."""

from __future__ import annotations

import contextlib
from typing import Any, BinaryIO

import numpy as np
import pypdfium2 as pdfium
import pypdfium2.raw as pdfium_c

from intake import image, language, limits
from intake.verdict import Finding, Kind, Severity, Verdict, verdict_from

_ERR_FORMAT, _ERR_PASSWORD, _ERR_SECURITY = 3, 4, 5
TEXT_SAMPLE_PAGES, TEXT_SAMPLE_CHARS = 2, 4000


class _Readinto:
    """Adds ``readinto`` to a stream that only has ``read`` (PDFium's stream access needs it)."""

    def __init__(self, stream: BinaryIO) -> None:
        self._s = stream

    def read(self, n: int = -1) -> bytes:
        return self._s.read(n)

    def readinto(self, buf: Any) -> int:
        data = self._s.read(len(buf))
        buf[: len(data)] = data
        return len(data)

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._s.seek(offset, whence)

    def tell(self) -> int:
        return self._s.tell()


def _as_pdfium_stream(stream: BinaryIO) -> Any:
    stream.seek(0)
    return stream if hasattr(stream, "readinto") else _Readinto(stream)


def _open(stream: BinaryIO, password: str | None = None) -> pdfium.PdfDocument:
    return pdfium.PdfDocument(_as_pdfium_stream(stream), password=password, autoclose=False)


def pdf_opens_with_password(stream: BinaryIO, password: str) -> bool:
    """True when the password opens the PDF (the password flow in the bot)."""
    try:
        doc = _open(stream, password)
    except pdfium.PdfiumError:
        return False
    except Exception:  # a broken file simply does not open
        return False
    with contextlib.suppress(Exception):
        doc.close()
    return True


def _page_kind(page: pdfium.PdfPage) -> tuple[str, str]:
    """('text' | 'scanned' | 'scanned_ocr' | 'blank' | 'outlined', sample of its text)."""
    width, height = page.get_size()
    area = max(width * height, 1.0)
    textpage = page.get_textpage()
    try:
        chars = textpage.count_chars()
        text = textpage.get_text_range(0, min(chars, 4000)) if chars else ""
    finally:
        textpage.close()
    letters = sum(1 for c in text if c.isalnum())
    covered = 0.0
    for obj in page.get_objects(filter=[pdfium_c.FPDF_PAGEOBJ_IMAGE], max_depth=2):
        left, bottom, right, top = obj.get_pos()
        covered += max(0.0, min(right, width) - max(left, 0.0)) * max(
            0.0, min(top, height) - max(bottom, 0.0)
        )
    coverage = covered / area
    scale = limits.PDF_RENDER_DPI / 72
    bitmap = page.render(scale=scale, grayscale=True)
    try:
        grey = np.asarray(bitmap.to_pil().convert("L"), dtype=np.uint8)
    finally:
        bitmap.close()
    ink = float((grey < 200).mean()) if grey.size else 0.0
    if coverage >= 0.5:
        return ("scanned_ocr" if letters >= 20 else "scanned"), text
    if letters >= 5:
        return "text", text
    if ink < 0.002:
        return "blank", text
    return "outlined", text


def _scan_legible(page: pdfium.PdfPage) -> bool:
    width, height = page.get_size()
    scale = limits.PDF_SCAN_DPI / 72
    if width * height * scale * scale > limits.MAX_PDF_PAGE_PIXELS:
        return True
    bitmap = page.render(scale=scale, grayscale=True)
    try:
        pil = bitmap.to_pil().convert("L")
    finally:
        bitmap.close()
    pil.thumbnail((limits.ANALYSIS_LONG_SIDE, limits.ANALYSIS_LONG_SIDE))
    grey = np.asarray(pil, dtype=np.float32)
    m = image.measure(grey)
    errors = [
        f
        for f in image.judge(m, 10_000, 10_000)
        if f.severity is Severity.ERROR and f.code != "image_blank"
    ]
    return not errors


def _active_content(doc: pdfium.PdfDocument) -> list[Finding]:
    findings: list[Finding] = []
    js = pdfium_c.FPDFDoc_GetJavaScriptActionCount(doc.raw)
    if js and js > 0:
        findings.append(Finding("pdf_javascript", Severity.INFO, {"count": int(js)}))
    files = pdfium_c.FPDFDoc_GetAttachmentCount(doc.raw)
    if files and files > 0:
        findings.append(Finding("pdf_embedded_files", Severity.INFO, {"count": int(files)}))
    return findings


def check_pdf(stream: BinaryIO, password: str | None = None) -> Verdict:
    """Check a PDF; with `password`, open it with the password the patient typed."""
    try:
        doc = _open(stream, password or None)
    except pdfium.PdfiumError as exc:
        code = getattr(exc, "err_code", None)
        if code == _ERR_PASSWORD:
            wrong = "pdf_password_wrong" if password else "pdf_password_required"
            return verdict_from(Kind.PDF, [Finding(wrong, Severity.ERROR)])
        if code == _ERR_SECURITY:
            return verdict_from(Kind.PDF, [Finding("pdf_unsupported_security", Severity.ERROR)])
        return verdict_from(Kind.PDF, [Finding("pdf_corrupt", Severity.ERROR)])
    try:
        verdict = _check_document(doc)
    finally:
        with contextlib.suppress(Exception):
            doc.close()
    if password:  # the coordinator needs to know the hospital will need it too
        kept = Finding("pdf_password_kept", Severity.INFO)
        return Verdict(verdict.kind, verdict.status, (*verdict.findings, kept), verdict.metadata)
    return verdict


def _check_document(doc: pdfium.PdfDocument) -> Verdict:
    pages = len(doc)
    metadata: dict[str, Any] = {"page_count": pages}
    findings = _active_content(doc)
    if pages == 0:
        return verdict_from(Kind.PDF, [*findings, Finding("pdf_corrupt", Severity.ERROR)], metadata)
    if pages > limits.MAX_PDF_PAGES:
        findings.append(
            Finding("pdf_too_many_pages", Severity.ERROR, {"max_pages": limits.MAX_PDF_PAGES})
        )
        return verdict_from(Kind.PDF, findings, metadata)
    kinds: dict[str, list[int]] = {}
    texts: list[str] = []
    sample: list[str] = []
    text_len = 0
    illegible: list[int] = []
    analysed = min(pages, limits.MAX_PAGES_ANALYSED)
    for index in range(analysed):
        try:
            page = doc[index]
        except pdfium.PdfiumError:
            return verdict_from(
                Kind.PDF, [*findings, Finding("pdf_corrupt", Severity.ERROR)], metadata
            )
        try:
            kind, text = _page_kind(page)
            if kind == "scanned" and not _scan_legible(page):
                illegible.append(index + 1)
        finally:
            page.close()
        kinds.setdefault(kind, []).append(index + 1)
        if text and index < TEXT_SAMPLE_PAGES:
            sample.append(text)
        if text and text_len < limits.MAX_TEXT_CHARS:
            texts.append(text)
            text_len += len(text)
    metadata["page_kinds"] = {k: len(v) for k, v in kinds.items()}
    metadata["pages_analysed"] = analysed
    lang = language.detect("\n".join(texts)[: limits.MAX_TEXT_CHARS])
    metadata["language"] = lang
    if sample:
        metadata["text_sample"] = "\n".join(sample)[:TEXT_SAMPLE_CHARS]
    blank = kinds.get("blank", [])
    if len(blank) == analysed:
        findings.append(Finding("pdf_blank", Severity.ERROR))
    elif blank:
        findings.append(
            Finding(
                "pdf_blank_pages", Severity.NOTE, {"pages": _pages_text(blank), "count": len(blank)}
            )
        )
    scanned = kinds.get("scanned", []) + kinds.get("scanned_ocr", [])
    if scanned:
        findings.append(Finding("pdf_scanned_pages", Severity.INFO, {"count": len(scanned)}))
    if illegible:
        severity = Severity.ERROR if len(illegible) == analysed else Severity.NOTE
        findings.append(
            Finding(
                "pdf_pages_illegible",
                severity,
                {"pages": _pages_text(illegible), "count": len(illegible)},
            )
        )
    return verdict_from(Kind.PDF, findings, metadata)


def _pages_text(pages: list[int]) -> str:
    shown = ", ".join(str(p) for p in pages[:10])
    return shown + (", …" if len(pages) > 10 else "")
