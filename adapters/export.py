"""The hand-off bundle: one AES-256 ZIP of a case's records that a hospital opens with 7-Zip.

Layout of the archive::

    00 Manifest.pdf                      every document: item, kind, date, pages or images,
                                         language, translation, verdict, path in the archive
    01 Referral letter/referral-1.pdf    one folder per checklist item, numbered in checklist
    02 Scans/DICOM/DICOMDIR              order; all DICOM files of the case sit under the
    02 Scans/DICOM/PT000000/ST000000/... first item holding any, indexed by one DICOMDIR

What goes in: the files the case counts (listed in `case_items.files_json`, which is how the
coordinator view decides `counted`), never rejected ones. An uploaded ZIP (a CD copy) is not
put in whole: its members, kept as their own blobs, are; the CD's own DICOMDIR is left out,
since a new one indexes every scan of the case.

Every record's bytes in the archive are exactly the bytes the patient sent (checked against
the recorded SHA-256 while copying). DICOM files are never rewritten: the DICOMDIR is built
with pydicom's `FileSet` from headers read in memory (`stop_before_pixels`), and each
original is streamed in under the File ID the file set gave it.

No plaintext touches the disk outside the encrypted archive: blobs are decrypted chunk by
chunk straight into the archive's AES stream; the DICOMDIR and the manifest are built in
memory. The archive is written 0600 under a temporary name, fsynced, audited, and only then
renamed into place, so a half-written or unaudited bundle never carries the real name.

Every human-readable word of the manifest comes from the caller's `render(key, params)`
(`MESSAGE_KEYS`, plus `coordinator.kind.<kind>`); item and procedure titles go through it
too, since they are catalog msgids. The case state is not changed here.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import logging
import os
import re
import secrets
import unicodedata
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path, PurePosixPath
from typing import Any
from xml.sax.saxutils import escape

import arabic_reshaper
import pyzipper
from bidi import get_display
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.filebase import DicomFileLike
from pydicom.fileset import FileInstance, FileSet
from pyzipper.zipfile_aes import AESZipInfo
from reportlab.lib import colors
from reportlab.lib.enums import TA_RIGHT
from reportlab.lib.pagesizes import A4, landscape
from reportlab.lib.styles import ParagraphStyle
from reportlab.lib.units import mm
from reportlab.lib.utils import simpleSplit
from reportlab.pdfbase import pdfmetrics
from reportlab.pdfbase.cidfonts import UnicodeCIDFont
from reportlab.pdfbase.ttfonts import TTFError, TTFont
from reportlab.platypus import Flowable, Paragraph, SimpleDocTemplate, Spacer, Table, TableStyle
from sqlmodel import col, select

from adapters import audit
from adapters.bundle import Bundle, ExportError, ManifestEntry, bundle_name
from adapters.durable import fsync_dir
from adapters.store import SqlStore, utcnow
from adapters.tables import CaseRow, FileMemberRow, FileRow, ItemRow
from adapters.vault import Vault
from core.checklist import Checklist
from core.coordination import is_case_id

log = logging.getLogger(__name__)

Render = Callable[[str, dict[str, object]], str]

__all__ = [
    "MESSAGE_KEYS",
    "Bundle",
    "ExportError",
    "ManifestEntry",
    "build_bundle",
    "new_password",
    "safe_component",
]

# Every key the manifest renders besides `coordinator.kind.<kind>` (already in the catalogs)
# and the checklist's own titles; kept here so a catalog test can check them all.
MESSAGE_KEYS = (
    "export.manifest.title",
    "export.manifest.procedure",
    "export.manifest.prepared",
    "export.manifest.summary",
    "export.manifest.dicomdir",
    "export.manifest.empty",
    "export.manifest.col.item",
    "export.manifest.col.kind",
    "export.manifest.col.date",
    "export.manifest.col.extent",
    "export.manifest.col.language",
    "export.manifest.col.translation",
    "export.manifest.col.verdict",
    "export.manifest.col.path",
    "export.manifest.date.study",
    "export.manifest.date.received",
    "export.manifest.pages",
    "export.manifest.images",
    "export.manifest.unknown",
    "export.manifest.verdict.accepted",
    "export.manifest.verdict.noted",
    "export.manifest.note.not_indexed",
    "export.manifest.note.duplicate",
    "export.manifest.note.from_cd",
    "export.manifest.note.password",
    "export.manifest.note.sent_as",
    "export.manifest.answers",
    "export.manifest.translated",
    "export.manifest.is_translation",
)

MANIFEST_NAME = "00 Manifest.pdf"
DICOM_FOLDER = "DICOM"
PIECE = 1 << 20  # the vault's chunk size: one decrypted chunk in memory at a time
# 20 characters from 56 that cannot be misread (no 0/O, no 1/l/I): about 116 bits, so the
# WinZip AES key derivation (PBKDF2 with a fixed 1000 rounds) is not the weak point.
UNAMBIGUOUS_CHARS = "ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz23456789"
CODE_GROUPS, CODE_GROUP_SIZE = 4, 5
_MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"  # the SOP class of a DICOMDIR
# Names Windows refuses whatever the extension: "con.pdf" is as bad as "CON".
_WINDOWS_RESERVED = frozenset(
    {"CON", "PRN", "AUX", "NUL"}
    | {f"COM{n}" for n in range(1, 10)}
    | {f"LPT{n}" for n in range(1, 10)}
)
_UNSAFE_CHARS = re.compile(r'[<>:"/\\|?*]')
_NAME_BYTES = 200  # below the 255-byte name limit of common file systems, in UTF-8
_IMAGE_EXTENSIONS = {"jpeg": "jpg", "tiff": "tif", "heif": "heic"}
_OFFICE_EXTENSIONS = frozenset({"doc", "xls", "docx", "xlsx", "pptx"})
_KIND_EXTENSIONS = {"pdf": "pdf", "dicom": "dcm", "zip": "zip"}


@dataclass(frozen=True)
class _Item:
    key: str
    title: str  # rendered
    folder: str


@dataclass
class _Source:
    """One record to copy into the archive, and where it goes."""

    file_id: str  # the case_files row (a ZIP's members share their ZIP's)
    item: _Item
    status: str  # accepted or noted
    received: datetime
    blob_id: str
    size: int
    sha256: str = ""
    kind: str = "other"
    name: str | None = None  # as the patient sent it: in the (encrypted) manifest only
    position: int = 0  # 1-based within the item, for names like referral-2.pdf
    is_translation: bool = False
    metadata: dict[str, Any] = field(default_factory=dict)
    password: str | None = None
    from_cd: str | None = None  # the uploaded ZIP's name, for its members
    path: str = ""
    study_dir: str | None = None  # set when the DICOMDIR indexes it
    series_uid: str | None = None
    study_date: str | None = None
    notes: list[str] = field(default_factory=list)


@dataclass
class _Case:
    case_id: str
    key: bytes
    checklist: Checklist | None
    sources: list[_Source]
    answers: list[tuple[str, str]]  # (item title, typed answer)
    translations: dict[str, str] = field(default_factory=dict)  # file id -> manifest note


# -- public -----------------------------------------------------------------------------


async def build_bundle(
    store: SqlStore,
    vault: Vault,
    checklists: Mapping[str, Checklist],
    case_id: str,
    out_dir: Path,
    *,
    render: Render,
    actor: str,
    translations: Mapping[str, str] | None = None,
) -> Bundle:
    """Write the case's encrypted bundle into `out_dir` and audit it as `case.export`.

    `actor` is who asked, as the audit log spells it ("operator" for the CLI,
    "coordinator:<id>" from Telegram). `translations` maps a case file id to what the
    manifest's translation column says for it. Raises ExportError for an unknown or erased
    case, or when a stored record no longer matches its recorded hash.
    """
    case = await _load_case(store, checklists, case_id, render)
    await asyncio.to_thread(out_dir.mkdir, parents=True, exist_ok=True, mode=0o700)
    final = await asyncio.to_thread(_free_name, out_dir, case_id)
    notes = {**case.translations, **(translations or {})}
    tmp, bundle = await asyncio.to_thread(
        _write_bundle, vault, case, final, new_password(), render, notes
    )
    try:
        # Audited before the archive takes its real name: nothing leaves unaudited.
        detail = f"files={bundle.file_count} bytes={bundle.total_bytes}"
        async with store.session() as session:
            await audit.append(session, actor, "case.export", case_id, detail)
            row = await session.get(CaseRow, case_id)
            if row is not None:  # handed off: /cases lists it under "handed_off"
                row.handed_off_at = utcnow()
                session.add(row)
        await asyncio.to_thread(_publish, tmp, final)
    except BaseException:
        await asyncio.to_thread(tmp.unlink, missing_ok=True)
        raise
    log.info("case exported case=%s files=%d", case_id, bundle.file_count)
    return bundle


def new_password() -> str:
    """A fresh random archive password such as `Hk7pQ-3xZmn-Rt9Wa-bC4de`: easy to read out."""
    groups = (
        "".join(secrets.choice(UNAMBIGUOUS_CHARS) for _ in range(CODE_GROUP_SIZE))
        for _ in range(CODE_GROUPS)
    )
    return "-".join(groups)


def safe_component(text: str, fallback: str, limit: int = 100) -> str:
    """`text` as one file or folder name that Windows, macOS and Linux all accept.

    No control or invisible formatting characters (a right-to-left override could disguise
    an extension), no slashes, colons or other reserved characters, no leading or trailing
    dots and spaces, no reserved Windows device name, at most `limit` characters and
    `_NAME_BYTES` bytes of UTF-8, the extension kept. `fallback` (plain ASCII, chosen by the
    caller) when nothing usable is left.
    """
    text = "".join(" " if ch.isspace() else ch for ch in unicodedata.normalize("NFC", text))
    text = "".join(ch for ch in text if unicodedata.category(ch)[0] != "C")
    text = " ".join(_UNSAFE_CHARS.sub("_", text).split()).strip(" .")
    if not any(ch.isalnum() for ch in text):  # only punctuation left: says nothing
        return fallback
    if text.split(".")[0].strip().upper() in _WINDOWS_RESERVED:
        text = f"_{text}"
    suffix = PurePosixPath(text).suffix
    if len(suffix) > 16:
        suffix = ""  # a "suffix" that long is part of the name, not a file type
    stem = text[: len(text) - len(suffix)]
    while stem and (len(stem) + len(suffix) > limit or len((stem + suffix).encode()) > _NAME_BYTES):
        stem = stem[:-1]
    stem = stem.rstrip(" .")
    return f"{stem}{suffix}" if stem else fallback


# -- reading the case -------------------------------------------------------------------


async def _load_case(
    store: SqlStore, checklists: Mapping[str, Checklist], case_id: str, render: Render
) -> _Case:
    if not is_case_id(case_id):
        raise ExportError(f"no case {case_id!r}")
    async with store.reader() as session:
        case = await session.get(CaseRow, case_id)
        if case is None or case.state == "erased" or not case.wrapped_key:
            raise ExportError(f"no case {case_id} (unknown or erased)")
        items = {
            row.item_key: row
            for row in (await session.exec(select(ItemRow).where(ItemRow.case_id == case_id))).all()
        }
        files = {
            row.id: row
            for row in (await session.exec(select(FileRow).where(FileRow.case_id == case_id))).all()
        }
        members: dict[str, list[FileMemberRow]] = {}
        query = select(FileMemberRow).where(FileMemberRow.case_id == case_id)
        for member in (await session.exec(query.order_by(col(FileMemberRow.id)))).all():
            members.setdefault(member.file_id, []).append(member)
    wrapped = case.wrapped_key

    def decrypt(token: str | None, name: str) -> str | None:
        return None if token is None else store.keys.decrypt_field(case_id, wrapped, token, name)

    checklist = checklists.get(case.checklist_key or "")
    if checklist is not None:  # and the records the coordinator asked for besides
        checklist = checklist.with_extras(json.loads(decrypt(case.extras_enc, "extras") or "{}"))
    order = list(checklist.item_keys) if checklist else []
    order += sorted(set(items) - set(order))  # items of a checklist changed since
    sources: list[_Source] = []
    answers: list[tuple[str, str]] = []
    notes: dict[str, str] = {}  # file id -> what the manifest's translation column says
    for number, key in enumerate(order, start=1):
        row = items.get(key)
        if row is None:
            continue
        definition = checklist.item(key) if checklist and key in checklist.item_keys else None
        title = key
        if definition is not None:
            title = definition.title if definition.typed_title else render(definition.title, {})
        item = _Item(key, title, f"{number:02d} {safe_component(title, key, limit=60)}")
        answer = decrypt(row.answer_enc, "answer")
        if answer:
            answers.append((title, answer))
        # What the case counts is what its item lists, in the order the patient sent it.
        for ref in json.loads(row.files_json):
            file = files.get(ref["file_id"])
            status = ref.get("status", "accepted")
            if file is None or status == "rejected":
                continue
            name = decrypt(file.name_enc, "file-name")
            parts = members.get(file.id, []) if file.kind == "zip" else []
            if not parts:  # a ZIP stored before members were kept goes in whole
                verdict = json.loads(decrypt(file.verdict_enc, "verdict") or "{}")
                source = _Source(file.id, item, status, file.created_at, file.blob_id, file.size)
                source.sha256, source.kind, source.name = file.sha256, file.kind, name
                source.metadata = dict(verdict.get("metadata") or {})
                source.password = decrypt(file.password_enc, "password")
                sources.append(source)
                continue
            named = [(decrypt(part.name_enc, "member-name") or "", part) for part in parts]
            for member_name, part in sorted(named, key=lambda pair: pair[0]):
                source = _Source(file.id, item, status, file.created_at, part.blob_id, part.size)
                source.sha256, source.kind = part.sha256, part.kind
                source.name = PurePosixPath(member_name).name or None
                source.from_cd = name or ""
                sources.append(source)
        # Translations the coordinator attached: beside the originals, noted in the manifest.
        attached = [f for f in files.values() if f.item_key == key and f.role == "translation"]
        for file in sorted(attached, key=lambda f: f.created_at):
            source = _Source(file.id, item, "accepted", file.created_at, file.blob_id, file.size)
            source.sha256, source.kind = file.sha256, file.kind
            source.name = decrypt(file.name_enc, "file-name")
            source.is_translation = True
            sources.append(source)
            notes[file.id] = render("export.manifest.is_translation", {})
        if attached:
            for source in sources:
                if source.item is item and source.file_id not in notes:
                    notes[source.file_id] = render("export.manifest.translated", {})
        for position, source in enumerate((s for s in sources if s.item is item), start=1):
            source.position = position
    key_ = store.keys.case_key(case_id, wrapped)
    return _Case(case_id, key_, checklist, sources, answers, notes)


# -- writing the archive (blocking: runs in a thread) ----------------------------------


def _write_bundle(
    vault: Vault,
    case: _Case,
    final: Path,
    password: str,
    render: Render,
    translations: dict[str, str],
) -> tuple[Path, Bundle]:
    """The archive under a temporary name next to `final`, fsynced, and what it holds."""
    sources, dicomdir = _index_dicom(vault, case, render)
    dicom_root = dicomdir[0].rsplit("/", 1)[0] if dicomdir else None
    _name_files(sources)
    entries = _entries(sources, render, translations)
    manifest = _manifest_pdf(case, entries, dicom_root, render)
    tmp = final.with_name(f".{final.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "wb") as handle:
            total = _write_zip(handle, vault, case.key, password, sources, manifest, dicomdir)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp, Bundle(final, password, len(sources), total, tuple(entries))


def _write_zip(
    handle: io.BufferedWriter,
    vault: Vault,
    key: bytes,
    password: str,
    sources: list[_Source],
    manifest: bytes,
    dicomdir: tuple[str, bytes] | None,
) -> int:
    """Every entry AES-256 encrypted (WinZip AE-2); returns the records' byte count."""
    now = datetime.now(UTC)
    total = 0
    with pyzipper.AESZipFile(
        handle, "w", compression=pyzipper.ZIP_DEFLATED, encryption=pyzipper.WZ_AES
    ) as archive:
        archive.setpassword(password.encode("ascii"))
        archive.setencryption(pyzipper.WZ_AES, nbits=256)
        for name, data in [(MANIFEST_NAME, manifest), *([dicomdir] if dicomdir else [])]:
            with archive.open(_zip_info(name, now, len(data)), "w") as sink:
                sink.write(data)
        for source in sources:
            digest = hashlib.sha256()
            info = _zip_info(source.path, source.received, source.size)
            with vault.reader(source.blob_id, key) as reader, archive.open(info, "w") as sink:
                while piece := reader.read(PIECE):
                    digest.update(piece)
                    sink.write(piece)
                    total += len(piece)
            if digest.hexdigest() != source.sha256:
                raise ExportError(f"stored file {source.blob_id} does not match its record")
    return total


def _zip_info(name: str, when: datetime, size: int) -> AESZipInfo:
    stamp = when.astimezone(UTC) if when.tzinfo else when  # stored times are UTC
    info = AESZipInfo(name, date_time=stamp.timetuple()[:6])
    info.compress_type = pyzipper.ZIP_DEFLATED
    info.file_size = size  # known up front, so a record over 2 GiB gets ZIP64 headers
    return info


def _publish(tmp: Path, final: Path) -> None:
    os.replace(tmp, final)
    fsync_dir(final.parent)


def _free_name(out_dir: Path, case_id: str) -> Path:
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    path, counter = out_dir / bundle_name(case_id, stamp), 2
    while path.exists():  # a second export within the same second keeps the first
        path, counter = out_dir / bundle_name(case_id, stamp, counter), counter + 1
    return path


# -- DICOMDIR ---------------------------------------------------------------------------


class _HeaderOnly(Dataset):
    """A header that `FileSet.add` takes without saving a copy of it to a temporary folder."""

    @classmethod
    def of(cls, header: Dataset) -> _HeaderOnly:
        dataset = cls()
        dataset.update(header)
        dataset.file_meta = header.file_meta
        return dataset

    def save_as(self, *args: Any, **kwargs: Any) -> None:
        # FileSet.add stages every added dataset on disk for a later FileSet.write; a
        # header holds names and dates in plaintext, and _dicomdir_bytes needs no copy.
        return None


def _index_dicom(
    vault: Vault, case: _Case, render: Render
) -> tuple[list[_Source], tuple[str, bytes] | None]:
    """Index every DICOM file of the case in one DICOMDIR, built in memory.

    Returns the sources to archive (a CD's own DICOMDIR dropped), with the indexed ones'
    paths set, and the DICOMDIR's path and bytes. Files the file set cannot take (no file
    meta, a missing attribute, an instance already indexed) go in plain, with a note.
    """
    file_set = FileSet()
    indexed: list[tuple[_Source, FileInstance]] = []
    seen: set[str] = set()
    kept: list[_Source] = []
    for source in case.sources:
        header = _dicom_header(vault, case.key, source) if source.kind == "dicom" else None
        if header is not None and _is_dicomdir(header):
            continue  # the CD's own index points at the CD's layout, not at ours
        kept.append(source)
        if source.kind != "dicom":
            continue
        if header is None:
            source.notes.append(render("export.manifest.note.not_indexed", {}))
            continue
        source.study_date = str(header.get("StudyDate") or "") or None
        uid = str(header.get("SOPInstanceUID") or "")
        if uid in seen:
            source.notes.append(render("export.manifest.note.duplicate", {}))
            continue
        try:
            instance = file_set.add(_HeaderOnly.of(header))
        except Exception:  # a missing attribute: the file goes in plain, never dropped
            source.notes.append(render("export.manifest.note.not_indexed", {}))
            continue
        seen.add(uid)
        source.series_uid = str(header.get("SeriesInstanceUID") or "")
        indexed.append((source, instance))
    if not indexed:
        return kept, None
    try:
        data = _dicomdir_bytes(file_set)
    except Exception:  # no index rather than no bundle: the files still go in, plain
        log.warning("DICOMDIR not written case=%s", case.case_id, exc_info=True)
        for source, _ in indexed:
            source.notes.append(render("export.manifest.note.not_indexed", {}))
        return kept, None
    root = f"{indexed[0][0].item.folder}/{DICOM_FOLDER}"
    for source, instance in indexed:
        parts = Path(instance.FileID).parts  # PTxxxxxx/STxxxxxx/SExxxxxx/IMxxxxxx
        source.path = "/".join((root, *parts))
        source.study_dir = "/".join((root, *parts[:2]))
    return kept, (f"{root}/DICOMDIR", data)


def _dicom_header(vault: Vault, key: bytes, source: _Source) -> Dataset | None:
    """The dataset up to its pixels, read through the decrypting reader; None when pydicom
    cannot read it as a DICOM file (no preamble and file meta)."""
    with vault.reader(source.blob_id, key) as stream:
        try:
            return dcmread(stream, stop_before_pixels=True)
        except OSError:
            raise  # a damaged blob stops the export; it is not "not DICOM"
        except Exception:
            return None


def _is_dicomdir(header: Dataset) -> bool:
    meta = getattr(header, "file_meta", None)
    sop_class = meta.get("MediaStorageSOPClassUID") if meta is not None else None
    return str(sop_class or header.get("SOPClassUID") or "") == _MEDIA_STORAGE_DIRECTORY


def _dicomdir_bytes(file_set: FileSet) -> bytes:
    """The file set's DICOMDIR, encoded in memory.

    `FileSet.write` would also copy every instance to disk, from copies it staged there,
    which would put records in plaintext on disk and rewrite their bytes. So this does only
    its last two steps, as it does them: each record gets its File ID, then the DICOMDIR is
    encoded (`_write_dicomdir` is pydicom's own; pydicom is pinned below 4 and the tests
    read the result back with `FileSet`).
    """
    for instance in file_set:
        instance.node._record.ReferencedFileID = list(Path(instance.FileID).parts)
    buffer = io.BytesIO()
    file_set._write_dicomdir(DicomFileLike(buffer))
    return buffer.getvalue()


# -- names ------------------------------------------------------------------------------


def _name_files(sources: list[_Source]) -> None:
    """Give every source the DICOMDIR does not index a neutral name in its item folder
    (referral-2.pdf, referral-3-translation.pdf). Not the name the patient sent: AES-ZIP
    encrypts contents, but every entry's name stays readable to anyone holding the file,
    and names like "Zhang Wei CT report.pdf" are common. The manifest, encrypted, gives
    each file's original name."""
    for source in sources:
        if source.path:
            continue
        role = "-translation" if source.is_translation else ""
        name = f"{source.item.key}-{source.position}{role}.{_extension(source)}"
        # Item keys and positions are unique per folder, so no two names can meet.
        source.path = f"{source.item.folder}/{name}"


def _extension(source: _Source) -> str:
    if source.kind == "image":
        found = str(source.metadata.get("format") or "jpeg").lower()
        return _IMAGE_EXTENSIONS.get(found, found)
    if source.kind == "office":
        found = str(source.metadata.get("format") or "")
        return found if found in _OFFICE_EXTENSIONS else "bin"
    return _KIND_EXTENSIONS.get(source.kind, "bin")


# -- the manifest -----------------------------------------------------------------------


def _entries(
    sources: list[_Source], render: Render, translations: dict[str, str]
) -> list[ManifestEntry]:
    """One entry per document, and one per DICOM study of an item (not one per image)."""
    groups: list[list[_Source]] = []
    studies: dict[tuple[str, str], list[_Source]] = {}
    for source in sources:
        if source.study_dir is None:
            groups.append([source])
            continue
        study = studies.get((source.item.key, source.study_dir))
        if study is None:
            study = studies[(source.item.key, source.study_dir)] = []
            groups.append(study)
        study.append(source)
    return [_entry(group, render, translations) for group in groups]


def _entry(group: list[_Source], render: Render, translations: dict[str, str]) -> ManifestEntry:
    first = group[0]
    notes = [note for source in group for note in source.notes]
    if first.from_cd:
        notes.append(render("export.manifest.note.from_cd", {"name": first.from_cd}))
    if first.name and first.study_dir is None:  # an indexed study is named by its folder
        notes.append(render("export.manifest.note.sent_as", {"name": first.name}))
    if first.password:  # the file stays as sent, locked: the hospital needs its password
        notes.append(render("export.manifest.note.password", {"password": first.password}))
    pages = first.metadata.get("page_count") if first.kind == "pdf" else None
    language = first.metadata.get("language")
    found = [translations[s.file_id] for s in group if s.file_id in translations]
    return ManifestEntry(
        item_key=first.item.key,
        item_title=first.item.title,
        kind=first.kind,
        date=_iso_date(first.study_date) if first.study_date else first.received.date().isoformat(),
        date_is_study=first.study_date is not None,
        pages=pages if isinstance(pages, int) else None,
        series=len({s.series_uid for s in group}) if first.study_dir else None,
        instances=len(group) if first.kind == "dicom" else None,
        language=str(language) if language else None,
        translation="; ".join(dict.fromkeys(found)) or None,
        status="noted" if any(s.status == "noted" for s in group) else "accepted",
        path=first.study_dir or first.path,
        notes=tuple(dict.fromkeys(notes)),
    )


def _iso_date(value: str) -> str:
    value = value.strip()
    if len(value) == 8 and value.isdigit():
        return f"{value[:4]}-{value[4:6]}-{value[6:]}"
    return value


def _cells(entry: ManifestEntry, render: Render) -> list[str]:
    dash = render("export.manifest.unknown", {})
    date = "export.manifest.date.study" if entry.date_is_study else "export.manifest.date.received"
    if entry.pages is not None:
        extent = render("export.manifest.pages", {"count": entry.pages})
    elif entry.instances is not None:
        extent = render(
            "export.manifest.images", {"series": entry.series or 1, "images": entry.instances}
        )
    else:
        extent = dash
    return [
        entry.item_title,
        render(f"coordinator.kind.{entry.kind}", {}),
        render(date, {"date": entry.date}),
        extent,
        entry.language or dash,
        entry.translation or dash,
        render(f"export.manifest.verdict.{entry.status}", {}),
        "\n".join([entry.path, *entry.notes]),
    ]


def _manifest_pdf(
    case: _Case, entries: list[ManifestEntry], dicom_root: str | None, render: Render
) -> bytes:
    fonts = _fonts()
    body = ParagraphStyle("body", fontName=fonts[0].name, fontSize=8, leading=10)
    head = ParagraphStyle("head", parent=body, textColor=colors.white)
    line = ParagraphStyle("line", fontName=fonts[0].name, fontSize=10, leading=14)
    title = ParagraphStyle("title", fontName=fonts[0].name, fontSize=15, leading=20)

    def para(text: str, style: ParagraphStyle, width: float) -> Paragraph:
        """`text` as a paragraph `width` points wide (its frame or cell, padding included)."""
        if (laid_out := _visual_lines(text, style, width - 2 * _PADDING)) is not None:
            text, rtl = laid_out
            if rtl:
                style = ParagraphStyle(f"{style.name}-rtl", parent=style, alignment=TA_RIGHT)
        return Paragraph(_markup(text, fonts), style)

    width = landscape(A4)[0] - 24 * mm
    heading = render("export.manifest.title", {"case_id": case.case_id})
    story: list[Flowable] = [para(heading, title, width)]
    if case.checklist is not None:
        procedure = render(case.checklist.title, {})
        params: dict[str, object] = {"procedure": procedure, "hospital": case.checklist.hospital}
        story.append(para(render("export.manifest.procedure", params), line, width))
    today = datetime.now(UTC).date().isoformat()
    story.append(para(render("export.manifest.prepared", {"date": today}), line, width))
    story.append(para(render("export.manifest.summary", {"count": len(entries)}), line, width))
    if dicom_root is not None:
        where: dict[str, object] = {"path": f"{dicom_root}/DICOMDIR"}
        story.append(para(render("export.manifest.dicomdir", where), line, width))
    story.append(Spacer(1, 4 * mm))
    if entries:
        columns = ("item", "kind", "date", "extent", "language", "translation", "verdict", "path")
        widths = [x * mm for x in (40, 22, 30, 26, 20, 28, 24)]
        widths.append(width - sum(widths))
        titles = [render(f"export.manifest.col.{column}", {}) for column in columns]
        rows = [[para(title, head, w) for title, w in zip(titles, widths, strict=True)]]
        rows += [
            [para(cell, body, w) for cell, w in zip(_cells(entry, render), widths, strict=True)]
            for entry in entries
        ]
        table = Table(rows, colWidths=widths, repeatRows=1)
        table.setStyle(
            TableStyle(
                [
                    ("BACKGROUND", (0, 0), (-1, 0), colors.HexColor("#3b4a5a")),
                    ("GRID", (0, 0), (-1, -1), 0.25, colors.grey),
                    ("VALIGN", (0, 0), (-1, -1), "TOP"),
                ]
            )
        )
        story.append(table)
    else:
        story.append(para(render("export.manifest.empty", {}), line, width))
    if case.answers:
        story += [Spacer(1, 6 * mm), para(render("export.manifest.answers", {}), line, width)]
        widths = [70 * mm, width - 70 * mm]
        answers = [
            [para(item, body, widths[0]), para(text, body, widths[1])]
            for item, text in case.answers
        ]
        story.append(Table(answers, colWidths=widths))
    buffer = io.BytesIO()
    margins = {f"{side}Margin": 12 * mm for side in ("left", "right", "top", "bottom")}
    SimpleDocTemplate(buffer, pagesize=landscape(A4), title=heading, **margins).build(story)
    return buffer.getvalue()


# -- right-to-left text (Arabic, Hebrew) --------------------------------------------------

# What a table cell and the page's frame keep clear on each side (reportlab's default 6 pt),
# plus a point for rounding: a line wrapped here must never be wrapped again by reportlab.
_PADDING = 7.0
_STRONG = ("L", "R", "AL")  # the bidirectional classes that set a paragraph's direction


def _visual_lines(text: str, style: ParagraphStyle, width: float) -> tuple[str, bool] | None:
    """Text with right-to-left runs drawn as a reader expects: reportlab lays out glyphs
    left to right in the order given and knows neither Arabic's joined letter forms nor
    the bidirectional algorithm, so Arabic came out as separate letters, words reversed.
    The letters are shaped (presentation forms, which the fonts have), the text wrapped
    here to `width` in reading order, then each line put in display order (wrapping after
    reordering would put a paragraph's last line first). Returns the lines and whether the
    paragraph reads right to left (its first strong character: to align it right); None
    for text with nothing right-to-left in it (left as it is)."""
    strong = [kind for char in text if (kind := unicodedata.bidirectional(char)) in _STRONG]
    if "R" not in strong and "AL" not in strong:
        return None
    rtl = strong[0] != "L"
    lines = simpleSplit(arabic_reshaper.reshape(text), style.fontName, style.fontSize, width)
    base = "R" if rtl else "L"
    return "\n".join(get_display(line, base_dir=base) for line in lines), rtl


# -- fonts: Latin, Thai and Chinese in one document -----------------------------------

FONT_DIRS = (Path("/usr/share/fonts"), Path("/usr/local/share/fonts"), Path("/Library/Fonts"))
# TrueType outlines only: reportlab cannot embed CFF fonts (.otf, the Noto CJK .ttc).
FONT_CANDIDATES = {
    "latin": (
        "DejaVuSans.ttf",
        "NotoSans-Regular.ttf",
        "LiberationSans-Regular.ttf",
        "FreeSans.ttf",
    ),
    "thai": ("Loma.ttf", "Garuda.ttf", "NotoSansThai-Regular.ttf", "Sarabun-Regular.ttf"),
    "cjk": ("wqy-microhei.ttc", "wqy-zenhei.ttc", "DroidSansFallbackFull.ttf", "uming.ttc"),
}
# Built into reportlab but not embedded: the reader supplies the glyphs (Acrobat and PDFium
# do). Chinese falls back to it when no TrueType CJK font is installed.
_CID_CJK = "STSong-Light"


@dataclass(frozen=True)
class _Font:
    name: str
    covers: Callable[[int], bool]


def _is_cjk(code: int) -> bool:
    return (
        0x2E80 <= code <= 0x9FFF
        or 0xF900 <= code <= 0xFAFF
        or 0xFF00 <= code <= 0xFFEF
        or 0x20000 <= code <= 0x3FFFF
    )


@lru_cache(maxsize=1)
def _fonts() -> tuple[_Font, ...]:
    """The fonts found, best first, each with the characters it has; registered once."""
    wanted = {name for names in FONT_CANDIDATES.values() for name in names}
    found: dict[str, Path] = {}
    for directory in FONT_DIRS:
        with contextlib.suppress(OSError):
            for path in directory.rglob("*.tt[fc]"):
                if path.name in wanted:
                    found.setdefault(path.name, path)
    fonts: list[_Font] = []
    for script, names in FONT_CANDIDATES.items():
        for name in (n for n in names if n in found):
            try:
                font = TTFont(f"CareCompanion-{script}", str(found[name]), subfontIndex=0)
            except (TTFError, OSError):
                continue
            pdfmetrics.registerFont(font)
            fonts.append(_Font(font.fontName, frozenset(font.face.charToGlyph).__contains__))
            break
    with contextlib.suppress(Exception):  # a reportlab without its CID data: no fallback
        pdfmetrics.registerFont(UnicodeCIDFont(_CID_CJK))
        fonts.append(_Font(_CID_CJK, _is_cjk))
    helvetica = _Font("Helvetica", lambda code: code < 0x100)  # Latin-1, in every reader
    if fonts and fonts[0].name != _CID_CJK:
        return (*fonts, helvetica)
    return (helvetica, *fonts)


def _markup(text: str, fonts: tuple[_Font, ...]) -> str:
    """Paragraph markup with each run of text in the first font that has its characters
    (spaces stay in the run they are in, so a Latin word in Thai text is still Latin)."""
    runs: list[tuple[_Font, list[str]]] = []
    for char in text:
        if not (runs and char.isspace()):
            font = next((f for f in fonts if f.covers(ord(char))), fonts[0])  # else a blank box
            if not runs or runs[-1][0] is not font:
                runs.append((font, []))
        runs[-1][1].append(char)
    return "".join(
        f'<font face="{font.name}">{escape("".join(chars)).replace(chr(10), "<br/>")}</font>'
        for font, chars in runs
    )
