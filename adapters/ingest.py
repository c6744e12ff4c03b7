"""File ingest: stream a channel's file into the vault, encrypted from the first byte, then
check it through a decrypting reader (no plaintext copy ever touches the disk)."""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from sqlmodel import select

from adapters import metrics
from adapters.keyring import KeyRing
from adapters.members import extract_members
from adapters.store import SqlStore, new_id
from adapters.tables import CaseRow, FileRow
from adapters.vault import Vault
from core.identity import check_identity
from core.model import FileRef, Identity
from core.ports import FileSource, IncomingFile, StoredFile, StoredMember
from core.replies import Text
from intake import Kind, Severity, Verdict, runner
from intake.verdict import LEGIBILITY_ERRORS

log = logging.getLogger(__name__)

# (open_stream, declared name, declared MIME, sent as a compressed photo, PDF password)
Checker = Callable[[Callable[[], BinaryIO], str | None, str | None, bool, str | None], Verdict]


@dataclass(frozen=True)
class BlobOpener:
    """Picklable recipe for a decrypting reader, so a worker process can open the blob."""

    vault_root: Path
    blob_id: str
    key: bytes

    def __call__(self) -> BinaryIO:
        return Vault(self.vault_root).reader(self.blob_id, self.key)  # type: ignore[return-value]  # BlobReader is a RawIOBase: a binary stream


def check_in_worker(
    open_stream: Callable[[], BinaryIO],
    name: str | None,
    mime: str | None,
    compressed: bool,
    password: str | None,
) -> Verdict:
    """Checks run in a worker process with memory, CPU and time limits: a hostile file
    fails its own check, never the bot."""
    return runner.check_in_worker(
        open_stream, name, mime, compressed_photo=compressed, password=password
    )


def blob_id_for(case_id: str, unique_id: str) -> str:
    """Deterministic per case and file, so a retried update overwrites its own orphan."""
    return hashlib.sha256(f"{case_id}\0{unique_id}".encode()).hexdigest()[:40]


# Rejections a better photo can fix (the photo check's own list, and a PDF whose scanned
# pages failed it); after two of them the next file is taken with a warning for the
# coordinator (see core.engine.REJECTIONS_BEFORE_LENIENCY).
LEGIBILITY_CODES = frozenset(LEGIBILITY_ERRORS) | {"pdf_pages_illegible"}


def retakeable(verdict: Verdict) -> bool:
    errors = [f.code for f in verdict.findings if f.severity is Severity.ERROR]
    return bool(errors) and all(code in LEGIBILITY_CODES for code in errors)


# Information the patient should hear too: what the scans on a CD are, what was skipped.
PATIENT_INFO_CODES = frozenset({"study_summary", "zip_skipped_files"})


def patient_notes(verdict: Verdict) -> tuple[Text, ...]:
    """What the patient hears about a file: its notes and errors, and the plain summary of
    a CD's studies; never what is meant for the coordinator only."""
    return tuple(
        Text(f"finding.{finding.code}", dict(finding.params))
        for finding in verdict.findings
        if finding.severity in (Severity.NOTE, Severity.ERROR) or finding.code in PATIENT_INFO_CODES
    )


# Findings the coordinator must see at a glance (flags on the case-ready alert).
ACTIVE_CONTENT = {
    "pdf_javascript": "active_content",
    "pdf_embedded_files": "active_content",
    "office_macros": "active_content",
}


IDENTITY_MISMATCH = "identity_mismatch"


def identity_flags(verdict: Verdict, identity: Identity | None) -> tuple[str, ...]:
    """("identity_mismatch",) when a name or birth date inside the record differs from the
    patient's: DICOM headers (a file, or a CD's patients) and a PDF's text."""
    if identity is None:
        return ()
    meta = verdict.metadata
    headers: list[dict[str, Any]] = []
    if verdict.kind is Kind.DICOM:
        headers = [meta]
    elif verdict.kind is Kind.ZIP:
        headers = [{"patient_name": name} for name in meta.get("patient_names", ())]
        headers += [{"patient_birth_date": born} for born in meta.get("patient_birth_dates", ())]
    texts = [meta.get("text_sample")] if verdict.kind is Kind.PDF else []
    found = check_identity(identity.name, identity.birth_date, headers, texts)
    return (IDENTITY_MISMATCH,) if found else ()


def file_ref(file_id: str, verdict: Verdict, extra_flags: tuple[str, ...] = ()) -> FileRef:
    return FileRef(
        file_id=file_id,
        kind=verdict.kind.value,
        status=verdict.status.value,
        notes=patient_notes(verdict),
        retakeable=retakeable(verdict),
        needs_password=any(f.code == "pdf_password_required" for f in verdict.findings),
        language=verdict.metadata.get("language") or None,
        flags=tuple(
            sorted(
                {ACTIVE_CONTENT[f.code] for f in verdict.findings if f.code in ACTIVE_CONTENT}
                | set(extra_flags)
            )
        ),
    )


class VaultIngest:
    def __init__(self, vault: Vault, store: SqlStore, keys: KeyRing, checker: Checker) -> None:
        self._vault = vault
        self._store = store
        self._keys = keys
        self._checker = metrics.timed_check(checker)

    async def _case_key(self, case_id: str) -> bytes:
        async with self._store.reader() as session:
            wrapped = (
                await session.exec(select(CaseRow.wrapped_key).where(CaseRow.id == case_id))
            ).one()
        return self._keys.case_key(case_id, wrapped)

    async def ingest(
        self,
        case_id: str,
        incoming: IncomingFile,
        source: FileSource,
        identity: Identity | None = None,
    ) -> StoredFile:
        key = await self._case_key(case_id)
        blob_id = blob_id_for(case_id, incoming.unique_id)
        if await asyncio.to_thread(self._vault.exists, blob_id):
            await asyncio.to_thread(self._vault.delete, blob_id)  # left by a crash before commit
        info = await self._vault.write_stream(blob_id, key, source.chunks(incoming))
        opener = BlobOpener(self._vault.root, blob_id, key)
        verdict = await asyncio.to_thread(
            self._checker, opener, incoming.name, incoming.mime, incoming.compressed_photo, None
        )
        members: tuple[StoredMember, ...] = ()
        if verdict.kind is Kind.ZIP and verdict.accepted:
            members = tuple(await asyncio.to_thread(extract_members, self._vault, blob_id, key))
        log.info(
            "file stored case=%s blob=%s size=%d kind=%s status=%s members=%d",
            case_id,
            blob_id,
            info.size,
            verdict.kind.value,
            verdict.status.value,
            len(members),
        )
        flags = await asyncio.to_thread(identity_flags, verdict, identity)
        return StoredFile(
            file_ref(new_id(), verdict, flags),
            blob_id,
            info.sha256,
            info.size,
            verdict.to_dict(),
            members,
        )

    async def unlock(
        self, case_id: str, file_id: str, password: str, identity: Identity | None = None
    ) -> StoredFile | None:
        async with self._store.reader() as session:
            row = await session.get(FileRow, file_id)
        if row is None or row.case_id != case_id or not password:
            return None
        opener = BlobOpener(self._vault.root, row.blob_id, await self._case_key(case_id))
        verdict = await asyncio.to_thread(self._checker, opener, None, row.mime, False, password)
        if any(f.code == "pdf_password_wrong" for f in verdict.findings):
            return None
        flags = await asyncio.to_thread(identity_flags, verdict, identity)
        return StoredFile(
            file_ref(file_id, verdict, flags), row.blob_id, row.sha256, row.size, verdict.to_dict()
        )

    async def discard(self, stored: StoredFile) -> None:
        for blob_id in [stored.blob_id, *(m.blob_id for m in stored.members)]:
            await asyncio.to_thread(self._vault.delete, blob_id)
