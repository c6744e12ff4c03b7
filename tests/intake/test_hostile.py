"""Hostile files are rejected with the right code, within 5 s and 256 MiB, in a worker."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from intake import Status
from intake.runner import OpenPath, check_in_worker

EXPECTED = {
    "zip_ratio.zip": "zip_ratio_exceeded",
    "zip_nested.zip": "zip_nested_too_deep",
    "zip_overlap.zip": "zip_overlapping_entries",
    "zip_slip.zip": "zip_path_escape",
    "zip_symlink.zip": "zip_symlink",
    "zip_20000.zip": "zip_too_many_entries",
    "png_bomb.png": "image_too_many_pixels",
    "dcm_truncated.dcm": "dicom_pixel_data_truncated",
    "dcm_pe_preamble.dcm": "dicom_executable_preamble",
    "dcm_length_lie.dcm": "dicom_length_invalid",
    "dcm_deflate_bomb.dcm": "dicom_deflate_bomb",
    "dcm_nested.dcm": "dicom_nesting_too_deep",
    "pdf_encrypted.pdf": "pdf_password_required",
    "pdf_xref_loop.pdf": "pdf_corrupt",
    # PDFium aborts when its allocation fails under the cap: the worker dies, the bot does not.
    "pdf_flate_bomb.pdf": "check_failed",
    "svg_entities.svg": "unsupported_type",
    "program.exe": "unsupported_type",
    "empty.pdf": "file_empty",
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_hostile_file_rejected_with_its_code(hostile: dict[str, Path], name: str) -> None:
    """Each hostile sample is rejected for the right reason, fast and in bounded memory."""
    started = time.monotonic()
    verdict = check_in_worker(
        OpenPath(str(hostile[name])), name, None, timeout_s=5, memory_mb=256, cpu_s=5
    )
    elapsed = time.monotonic() - started
    assert verdict.status is Status.REJECTED
    assert EXPECTED[name] in [f.code for f in verdict.findings], verdict
    assert elapsed < 5


def test_javascript_pdf_is_flagged_for_the_coordinator(hostile: dict[str, Path]) -> None:
    """Active content is an info finding, not a rejection: the document itself is fine."""
    verdict = check_in_worker(
        OpenPath(str(hostile["pdf_javascript.pdf"])), None, None, timeout_s=5, memory_mb=256
    )
    assert verdict.accepted
    assert "pdf_javascript" in [f.code for f in verdict.findings]
