"""What the outbox sends besides text: previews for coordinators, made when they are sent.

A preview shows that a file is readable (a DICOM study's contact sheet, a PDF's first page,
a photo's thumbnail); it is never stored: the outbox row names the case and the files, and
the sender asks this module for the picture at send time. The picture is made from the
vault in a limited worker process (intake.preview through intake.runner), so a hostile file
costs its own preview, never the bot, and no plaintext ever touches the disk.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlmodel import col, select

from adapters.ingest import BlobOpener
from adapters.store import SqlStore
from adapters.tables import CaseRow, FileMemberRow, FileRow
from adapters.vault import Vault
from intake import runner

log = logging.getLogger(__name__)

MAX_DICOM_INSTANCES = 2000  # a contact sheet reads every header; more would take too long
PREVIEW_TIMEOUT_S = 60
CLOUD_SEND_LIMIT = 50 * 1024 * 1024  # Telegram's cloud Bot API: documents up to 50 MB
LOCAL_SEND_LIMIT = 2000 * 1024 * 1024  # a local Bot API server: up to 2000 MB


class PreviewUnavailable(Exception):
    """No picture for these files: `code` says why (a finding code, or the worker's)."""

    def __init__(self, code: str) -> None:
        super().__init__(code)
        self.code = code


@dataclass(frozen=True)
class Picture:
    mime: str
    data: bytes


def preview_request(case_id: str, kind: str, file_ids: list[str]) -> dict[str, Any]:
    """The outbox's description of a preview (ids only, nothing personal)."""
    return {"type": "preview", "case_id": case_id, "kind": kind, "files": file_ids}


def bundle_request(path: Path) -> dict[str, Any]:
    """The outbox's description of a hand-off archive: its file name in the exports folder."""
    return {"type": "export", "file": path.name}


class CaseMedia:
    def __init__(
        self,
        store: SqlStore,
        vault: Vault,
        exports_dir: Path | None = None,
        send_limit: int = CLOUD_SEND_LIMIT,
    ) -> None:
        self._store = store
        self._vault = vault
        self._exports = exports_dir
        self.send_limit = send_limit  # the Bot API's upload limit for a document

    def bundle_path(self, request: dict[str, Any]) -> Path | None:
        """The archive an outbox row names: only a plain file name inside the exports folder
        (never a path from the row), and only while it exists."""
        name = str(request.get("file", ""))
        if self._exports is None or not name or Path(name).name != name:
            return None
        path = self._exports / name
        return path if path.is_file() else None

    async def picture(self, request: dict[str, Any]) -> Picture:
        """The picture an outbox row asks for; PreviewUnavailable when it cannot be made."""
        if request.get("type") != "preview":
            raise PreviewUnavailable("unknown_media")
        kind, case_id = str(request["kind"]), str(request["case_id"])
        openers, password = await self._openers(case_id, kind, list(request["files"]))
        if not openers:
            raise PreviewUnavailable("file_gone")
        # Imported at the first preview, not at start: the bot only names the function for
        # the worker, which runs it; its imaging libraries (NumPy, Pillow, pdfium) would add
        # a quarter of a second to every start.
        from intake import preview

        try:
            made = await asyncio.to_thread(
                runner.call_in_worker,
                preview.preview,
                kind,
                *openers,
                password=password,
                timeout_s=PREVIEW_TIMEOUT_S,
                cpu_s=PREVIEW_TIMEOUT_S,
            )
        except runner.WorkerFailed as failure:
            log.info("no preview case=%s reason=%s", case_id, failure.reason)
            raise PreviewUnavailable(failure.code or failure.reason) from None
        if made is None:
            raise PreviewUnavailable("no_preview_for_kind")
        mime, data = made
        return Picture(mime, data)

    async def _openers(
        self, case_id: str, kind: str, file_ids: list[str]
    ) -> tuple[list[BlobOpener], str | None]:
        """Openers of the files' blobs (a CD's DICOM members in place of its ZIP), and the
        password of a protected PDF."""
        async with self._store.reader() as session:
            case = await session.get(CaseRow, case_id)
            if case is None or not case.wrapped_key:
                return [], None  # erased
            key = self._store.keys.case_key(case_id, case.wrapped_key)
            files = (
                await session.exec(
                    select(FileRow).where(FileRow.case_id == case_id, col(FileRow.id).in_(file_ids))
                )
            ).all()
            members = (
                await session.exec(
                    select(FileMemberRow)
                    .where(col(FileMemberRow.file_id).in_([f.id for f in files]))
                    .where(FileMemberRow.kind == "dicom")
                    .order_by(col(FileMemberRow.id))
                )
            ).all()
        root = self._vault.root
        blobs = [f.blob_id for f in files if f.kind != "zip"] + [m.blob_id for m in members]
        password = None
        for file in files:
            if file.password_enc is not None:
                password = self._store.keys.decrypt_field(
                    case_id, case.wrapped_key, file.password_enc, "password"
                )
        if kind == "dicom":
            blobs = blobs[:MAX_DICOM_INSTANCES]
        return [BlobOpener(root, blob_id, key) for blob_id in blobs], password
