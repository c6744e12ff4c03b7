"""Every file of pydicom's bundled test set gets a verdict, and known-bad ones the right one."""

from __future__ import annotations

import os

import pytest
from pydicom.data import get_testdata_file, get_testdata_files

from intake import Kind, Status, check

FILES = sorted(f for f in get_testdata_files() if os.path.isfile(f))


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_every_bundled_file_gets_a_verdict() -> None:
    """No exception escapes `check` for any of pydicom's test files."""
    assert len(FILES) > 100
    for path in FILES:
        with open(path, "rb") as stream:
            verdict = check(stream, os.path.basename(path), None)
        assert verdict.status in Status


@pytest.mark.parametrize(
    ("name", "code"),
    [
        ("MR_truncated.dcm", "dicom_pixel_data_truncated"),
        ("rtplan_truncated.dcm", "dicom_length_invalid"),
    ],
)
def test_known_bad_files_rejected_for_the_right_reason(name: str, code: str) -> None:
    """Truncated files from the test set are rejected with the truncation code."""
    with open(get_testdata_file(name), "rb") as stream:
        verdict = check(stream)
    assert verdict.status is Status.REJECTED
    assert code in [f.code for f in verdict.findings]


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize(
    "name",
    [
        "CT_small.dcm",
        "MR_small_RLE.dcm",
        "MR_small_jp2klossless.dcm",
        "MR_small_jpeg_ls_lossless.dcm",
        "JPGExtended.dcm",
        "image_dfl.dcm",
        "ExplVR_BigEndNoMeta.dcm",
    ],
)
def test_good_files_accepted_with_a_summary(name: str) -> None:
    """Compressed syntaxes decode with the installed codecs; the summary has the modality."""
    with open(get_testdata_file(name), "rb") as stream:
        verdict = check(stream)
    assert verdict.kind is Kind.DICOM
    assert verdict.accepted, verdict
    assert verdict.metadata.get("modality")


def test_dicomdir_cd_folder_summary() -> None:
    """The dicomdirtests CD: studies summarised, three patients flagged, nothing missing."""
    from intake.archive import check_folder

    root = os.path.dirname(get_testdata_file("DICOMDIR"))
    paths = [os.path.join(d, n) for d, _, names in os.walk(root) for n in names]
    verdict = check_folder(sorted(paths), root=root)
    codes = [f.code for f in verdict.findings]
    assert "dicom_multiple_patients" in codes
    assert verdict.metadata["instance_count"] >= 70
    assert verdict.metadata["skipped_count"] >= 1
