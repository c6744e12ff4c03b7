"""CD contents: a ZIP (or a folder's worth of files) read safely and summarised as studies.

The central directory is inventoried before anything is inflated: entry count, declared sizes,
ratio, overlapping entries (CPython before 3.11.8 misses them), path escapes and links. Members
are then sniffed by content: DICOM (with or without extension) goes through the structural walk,
one instance per series is decoded; documents and photos get their own checks; viewer programs,
autorun files and HTML are skipped and counted. A DICOMDIR's references are checked present.
"""

from __future__ import annotations

import itertools
import posixpath
import stat
import struct
import unicodedata
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from intake import dicom, limits
from intake.office import ZIP_ERRORS
from intake.sniff import HEAD_SIZE, sniff_head
from intake.verdict import Finding, Kind, Severity, Verdict, verdict_from

MAX_MEMBERS_LISTED = 200
HOSTILE_ZIP_CODES = frozenset(
    {
        "zip_nested_too_deep",
        "zip_ratio_exceeded",
        "zip_overlapping_entries",
        "zip_path_escape",
        "zip_symlink",
        "zip_too_large",
        "zip_too_many_entries",
    }
)


class ZipRejected(Exception):
    def __init__(self, code: str, **params: Any) -> None:
        super().__init__(code)
        self.code = code
        self.params = params


def normalise_name(name: str) -> str:
    """Patient names compared across files: '^' to space, no case, no diacritics."""
    text = unicodedata.normalize("NFKD", name.replace("^", " "))
    text = "".join(c for c in text if not unicodedata.combining(c))
    return " ".join(text.lower().split())


@dataclass
class StudyAccumulator:
    """Everything a set of files says about studies, built one member at a time."""

    studies: dict[str, dict[str, Any]] = field(default_factory=dict)
    series_checked: set[str] = field(default_factory=set)
    instances: set[str] = field(default_factory=set)
    patients: dict[str, str] = field(default_factory=dict)
    birth_dates: set[str] = field(default_factory=set)
    skipped: int = 0
    skipped_kinds: dict[str, int] = field(default_factory=dict)
    documents: int = 0
    duplicates: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    members: list[dict[str, Any]] = field(default_factory=list)
    member_count: int = 0
    dicomdir_refs: list[str] = field(default_factory=list)
    dicomdir_unreadable: bool = False
    names_seen: set[str] = field(default_factory=set)

    def note_member(
        self, name: str, verdict: Verdict | None, kind: str, skipped: bool = False
    ) -> None:
        self.member_count += 1
        if len(self.members) < MAX_MEMBERS_LISTED:
            entry: dict[str, Any] = {"name": name, "kind": kind}
            if kind == "dicomdir":
                entry["status"] = "index"
            elif skipped:
                entry["status"] = "skipped"
            elif verdict is not None:
                entry["status"] = verdict.status.value
                entry["codes"] = [f.code for f in verdict.findings]
            self.members.append(entry)
        if verdict is not None and not verdict.accepted:
            for f in verdict.findings:
                if f.severity is Severity.ERROR:
                    self.rejected[f.code] = self.rejected.get(f.code, 0) + 1

    def add_dicom(self, stream: BinaryIO, name: str) -> None:
        """Walk one DICOM member; decode a frame only for the first instance of a series."""
        try:
            result = dicom.scan(stream)
        except dicom.DicomError as exc:
            self.note_member(
                name, verdict_from(Kind.DICOM, [Finding(exc.code, Severity.ERROR)]), "dicom"
            )
            return
        except RecursionError:
            self.note_member(
                name,
                verdict_from(Kind.DICOM, [Finding("dicom_nesting_too_deep", Severity.ERROR)]),
                "dicom",
            )
            return
        values = result.values
        if dicom.is_dicomdir(values):
            self.add_dicomdir(stream, name)
            self.note_member(name, None, "dicomdir")
            return
        findings = dicom.structural_findings(result)
        series = str(values.get("series_uid") or "")
        if (
            series
            and series not in self.series_checked
            and not any(f.severity is Severity.ERROR for f in findings)
        ):
            self.series_checked.add(series)
            findings += dicom._pydicom_details(stream, result, decode=True)
        verdict = verdict_from(Kind.DICOM, findings)
        self.note_member(name, verdict, "dicom")
        if not verdict.accepted:
            return
        sop = str(values.get("sop_instance_uid") or name)
        if sop in self.instances:
            self.duplicates += 1
            return
        self.instances.add(sop)
        study_uid = str(values.get("study_uid") or "")
        study = self.studies.setdefault(
            study_uid,
            {"modalities": set(), "date": "", "description": "", "series": {}, "body_parts": set()},
        )
        if values.get("modality"):
            study["modalities"].add(str(values["modality"]))
        if values.get("body_part"):
            study["body_parts"].add(str(values["body_part"]))
        study["date"] = study["date"] or _iso_date(str(values.get("study_date") or ""))
        study["description"] = study["description"] or str(values.get("study_description") or "")
        study["series"][series] = study["series"].get(series, 0) + 1
        pname = str(values.get("patient_name") or "").replace("^", " ").strip()
        if pname:
            self.patients.setdefault(normalise_name(pname), pname)
        if values.get("patient_birth_date"):
            self.birth_dates.add(_iso_date(str(values["patient_birth_date"])))

    def add_dicomdir(self, stream: BinaryIO, name: str) -> None:
        import pydicom

        base = posixpath.dirname(name)
        try:
            stream.seek(0)
            ds = pydicom.dcmread(stream, force=True)
            for record in ds.DirectoryRecordSequence:
                ref = record.get("ReferencedFileID")
                if ref is None:
                    continue
                parts = [ref] if isinstance(ref, str) else list(ref)
                self.dicomdir_refs.append(posixpath.join(base, *[str(p) for p in parts]))
        except Exception:  # a DICOMDIR pydicom cannot read: scan by magic instead
            self.dicomdir_unreadable = True

    def verdict(self, kind: Kind) -> Verdict:
        findings: list[Finding] = []
        present = {n.upper() for n in self.names_seen}
        missing = [r for r in self.dicomdir_refs if r.upper() not in present]
        studies = []
        for study in self.studies.values():
            studies.append(
                {
                    "modality": "/".join(sorted(study["modalities"])),
                    "date": study["date"],
                    "description": study["description"],
                    "body_part": "/".join(sorted(study["body_parts"])),
                    "series_count": len(study["series"]),
                    "image_count": sum(study["series"].values()),
                }
            )
        studies.sort(key=lambda s: (s["date"], s["modality"]))
        usable = len(self.instances) + self.documents
        unusable = sum(self.rejected.values())
        if usable == 0:
            code = "zip_no_usable_files" if unusable == 0 else "zip_all_files_unusable"
            findings.append(Finding(code, Severity.ERROR, {"count": unusable}))
        elif unusable:
            findings.append(
                Finding(
                    "zip_some_files_unusable", Severity.NOTE, {"count": unusable, "usable": usable}
                )
            )
        if missing:
            findings.append(
                Finding("zip_missing_references", Severity.NOTE, {"count": len(missing)})
            )
        if self.dicomdir_unreadable:
            findings.append(Finding("zip_dicomdir_unreadable", Severity.INFO))
        if self.skipped:
            findings.append(Finding("zip_skipped_files", Severity.INFO, {"count": self.skipped}))
        if len(self.patients) > 1:
            findings.append(
                Finding("dicom_multiple_patients", Severity.INFO, {"count": len(self.patients)})
            )
        for study in studies:
            findings.append(
                Finding(
                    "study_summary",
                    Severity.INFO,
                    {
                        "modality": study["modality"] or "?",
                        "date": study["date"] or "?",
                        "series": study["series_count"],
                        "images": study["image_count"],
                    },
                )
            )
        metadata: dict[str, Any] = {
            "studies": studies,
            "instance_count": len(self.instances),
            "series_count": sum(s["series_count"] for s in studies),
            "documents": self.documents,
            "skipped_count": self.skipped,
            "skipped_kinds": dict(self.skipped_kinds),
            "rejected_counts": dict(self.rejected),
            "duplicate_instances": self.duplicates,
            "missing_references": len(missing),
            "missing_reference_names": missing[:20],
            "patient_names": sorted(self.patients.values()),
            "patient_birth_dates": sorted(self.birth_dates),
            "member_count": self.member_count,
            "members": self.members,
        }
        return verdict_from(kind, findings, metadata)


def _iso_date(value: str) -> str:
    value = value.strip()
    if len(value) == 8 and value.isdigit():
        return f"{value[:4]}-{value[4:6]}-{value[6:]}"
    return value


def _add_member(
    acc: StudyAccumulator, name: str, open_member: Callable[[], BinaryIO], depth: int
) -> None:
    from intake.sniff import describe_other

    acc.names_seen.add(name)
    with open_member() as stream:
        head = stream.read(HEAD_SIZE)
        stream.seek(0)
        kind = sniff_head(head)
        if kind is Kind.DICOM:
            acc.add_dicom(stream, name)
            return
        if kind is Kind.OTHER:
            label = describe_other(head)
            acc.skipped += 1
            acc.skipped_kinds[label] = acc.skipped_kinds.get(label, 0) + 1
            acc.note_member(name, None, label, skipped=True)
            return
        from intake.check import check

        verdict = check(stream, _depth=depth + 1) if kind is Kind.ZIP else check(stream)
        if kind is Kind.ZIP:
            hostile = [f for f in verdict.findings if f.code in HOSTILE_ZIP_CODES]
            if hostile:  # a bomb inside the archive condemns the whole archive
                raise ZipRejected(hostile[0].code, **hostile[0].params)
        if kind is Kind.ZIP and verdict.accepted:
            # A ZIP inside the ZIP: count its content as ours.
            inner = verdict.metadata
            acc.documents += int(inner.get("documents", 0)) + int(inner.get("instance_count", 0))
        elif verdict.accepted:
            acc.documents += 1
        acc.note_member(name, verdict, verdict.kind.value)


def inventory(archive: zipfile.ZipFile, stream: BinaryIO) -> list[zipfile.ZipInfo]:
    """The central directory checked against every limit before anything is inflated."""
    infos = archive.infolist()
    if len(infos) > limits.MAX_ZIP_ENTRIES:
        raise ZipRejected("zip_too_many_entries", max_entries=limits.MAX_ZIP_ENTRIES)
    total = 0
    spans: list[tuple[int, int]] = []
    stream.seek(0, 2)
    size = stream.tell()
    for info in infos:
        name = info.filename
        if len(name) > limits.MAX_ZIP_NAME or _escapes(name):
            raise ZipRejected("zip_path_escape")
        mode = info.external_attr >> 16
        if info.create_system == 3 and stat.S_ISLNK(mode):
            raise ZipRejected("zip_symlink")
        if info.flag_bits & 0x1:
            raise ZipRejected("zip_encrypted")
        total += info.file_size
        if total > limits.MAX_ZIP_TOTAL:
            raise ZipRejected("zip_too_large", max_gb=limits.MAX_ZIP_TOTAL // 1024**3)
        if info.file_size > limits.MAX_ZIP_MEMBER:
            raise ZipRejected("zip_too_large", max_gb=limits.MAX_ZIP_TOTAL // 1024**3)
        if info.file_size > limits.ZIP_RATIO_FLOOR and info.file_size > (
            max(info.compress_size, 1) * limits.MAX_ZIP_RATIO
        ):
            raise ZipRejected("zip_ratio_exceeded", max_ratio=limits.MAX_ZIP_RATIO)
        offset = info.header_offset
        if offset < 0 or offset + 30 > size:
            raise ZipRejected("zip_corrupt")
        stream.seek(offset)
        local = stream.read(30)
        if len(local) < 30 or local[:4] != b"PK\x03\x04":
            raise ZipRejected("zip_corrupt")
        name_len, extra_len = struct.unpack("<HH", local[26:30])
        end = offset + 30 + name_len + extra_len + info.compress_size
        if end > size:
            raise ZipRejected("zip_corrupt")
        spans.append((offset, end))
    spans.sort()
    for (_, prev_end), (start, _) in itertools.pairwise(spans):
        if start < prev_end:
            raise ZipRejected("zip_overlapping_entries")
    return infos


def _escapes(name: str) -> bool:
    clean = name.replace("\\", "/")
    if clean.startswith("/") or (len(clean) > 1 and clean[1] == ":"):
        return True
    return any(part == ".." for part in clean.split("/")) or "\x00" in clean


def check_zip(stream: BinaryIO, *, depth: int = 0) -> Verdict:
    if depth > limits.MAX_ZIP_DEPTH:
        return verdict_from(Kind.ZIP, [Finding("zip_nested_too_deep", Severity.ERROR)])
    stream.seek(0)
    try:
        archive = zipfile.ZipFile(stream)
    except ZIP_ERRORS:
        return verdict_from(Kind.ZIP, [Finding("zip_corrupt", Severity.ERROR)])
    with archive:
        try:
            infos = inventory(archive, stream)
        except ZipRejected as exc:
            return verdict_from(Kind.ZIP, [Finding(exc.code, Severity.ERROR, exc.params)])
        acc = StudyAccumulator()
        for info in infos:
            if info.is_dir():
                continue
            opener = _member_opener(archive, info)
            try:
                _add_member(acc, info.filename, opener, depth)
            except ZipRejected as exc:
                return verdict_from(Kind.ZIP, [Finding(exc.code, Severity.ERROR, exc.params)])
            except (*ZIP_ERRORS, zipfile.LargeZipFile, RuntimeError) as exc:
                code = (
                    "zip_corrupt"
                    if not isinstance(exc, NotImplementedError)
                    else "zip_unsupported_compression"
                )
                return verdict_from(Kind.ZIP, [Finding(code, Severity.ERROR)])
    return acc.verdict(Kind.ZIP)


def _member_opener(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> Callable[[], Any]:
    return lambda: archive.open(info)


def check_folder(paths: Iterable[str], root: str | None = None) -> Verdict:
    """A folder's worth of files (or files sent one by one) judged and summarised together."""
    import os

    acc = StudyAccumulator()
    for path in paths:
        name = os.path.relpath(path, root).replace(os.sep, "/") if root else os.path.basename(path)
        try:
            _add_member(acc, name, _path_opener(path), 0)
        except ZipRejected as exc:
            verdict = verdict_from(Kind.ZIP, [Finding(exc.code, Severity.ERROR, exc.params)])
            acc.note_member(name, verdict, "zip")
        except OSError:
            acc.note_member(
                name, verdict_from(Kind.OTHER, [Finding("check_failed", Severity.ERROR)]), "other"
            )
    return acc.verdict(Kind.ZIP)


def _path_opener(path: str) -> Callable[[], Any]:
    return lambda: open(path, "rb")


__all__ = ["StudyAccumulator", "check_folder", "check_zip", "inventory", "normalise_name"]
