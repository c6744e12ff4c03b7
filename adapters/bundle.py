"""What a hand-off bundle is, apart from how adapters.export builds one: what the bot imports
at start (the coordinator desk's export button, its error) without loading the ZIP, DICOM and
PDF libraries the building needs, which are imported the first time a bundle is built."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


def bundles_of(out_dir: Path, case_id: str) -> list[Path]:
    """The case's bundles in `out_dir` (adapters.export names each one bundle_name gives)."""
    return sorted(out_dir.glob(f"case-{case_id}-*.zip"))


def bundle_name(case_id: str, stamp: str, counter: int = 1) -> str:
    """A bundle's file name: the case, when it was built, and which of that second's."""
    suffix = "" if counter == 1 else f"-{counter}"
    return f"case-{case_id}-{stamp}{suffix}.zip"


class ExportError(Exception):
    """The bundle cannot be built (unknown or erased case, a damaged record); one line."""


@dataclass(frozen=True)
class ManifestEntry:
    """One line of the manifest: a document, or one DICOM study of one item."""

    item_key: str
    item_title: str  # as rendered
    kind: str  # pdf, image, office, dicom, zip, other
    date: str  # ISO date: a scan's study date, else the day the file was received
    date_is_study: bool
    pages: int | None
    series: int | None
    instances: int | None
    language: str | None  # as the intake check detected it (a code such as "zh")
    translation: str | None
    status: str  # accepted or noted (rejected files never go in)
    path: str  # in the archive; a study folder for indexed DICOM
    notes: tuple[str, ...] = ()  # as rendered


@dataclass(frozen=True)
class Bundle:
    path: Path
    password: str  # deliver apart from the archive
    file_count: int  # records in the archive (the manifest and the DICOMDIR not counted)
    total_bytes: int  # their bytes
    entries: tuple[ManifestEntry, ...]
