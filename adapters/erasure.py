"""Finishing erasures: remove the blobs, hand-off bundles and rows of crypto-erased cases;
retention.

The erasure itself (key destroyed, tombstone written) commits in the patient's own
transaction (`SqlTransaction.erase_case`). What is left here is idempotent and safe to
repeat after a kill at any point: blobs and bundles first, then their rows, then the case row.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import ColumnElement, and_, func, or_
from sqlmodel import col, select

from adapters.bundle import bundles_of
from adapters.durable import fsync_dir
from adapters.store import SqlStore
from adapters.tables import CaseRow, FileMemberRow, FileRow
from adapters.vault import Vault

log = logging.getLogger(__name__)


class Eraser:
    def __init__(self, store: SqlStore, vault: Vault, exports_dir: Path | None = None) -> None:
        self._store = store
        self._vault = vault
        self._exports = exports_dir  # where the bot writes hand-off bundles (None: nowhere)

    async def finish(self, case_id: str) -> None:
        files = select(FileRow).where(FileRow.case_id == case_id)
        members = select(FileMemberRow).where(FileMemberRow.case_id == case_id)
        async with self._store.reader() as session:
            blob_ids = [row.blob_id for row in (await session.exec(files)).all()]
            blob_ids += [row.blob_id for row in (await session.exec(members)).all()]
        for blob_id in blob_ids:
            await asyncio.to_thread(self._vault.delete, blob_id)
        bundles = await asyncio.to_thread(self._drop_bundles, case_id)
        async with self._store.session() as session:
            for member in (await session.exec(members)).all():
                await session.delete(member)
            await session.flush()
            for file in (await session.exec(files)).all():
                await session.delete(file)
            await session.flush()
            case = await session.get(CaseRow, case_id)
            if case is not None and case.state == "erased":
                await session.delete(case)
        log.info("erasure finished case=%s blobs=%d bundles=%d", case_id, len(blob_ids), bundles)

    def _drop_bundles(self, case_id: str) -> int:
        """Delete the case's hand-off bundles: encrypted, but with a password the
        coordinators were given, so the records would outlive the erasure in them. Returns
        how many."""
        if self._exports is None or not self._exports.is_dir():
            return 0
        bundles = bundles_of(self._exports, case_id)
        for path in bundles:
            path.unlink(missing_ok=True)
        if bundles:
            fsync_dir(self._exports)
        return len(bundles)

    async def finish_pending(self) -> int:
        """Complete every erasure a crash interrupted (run at start)."""
        async with self._store.reader() as session:
            pending = list(
                (await session.exec(select(CaseRow.id).where(CaseRow.state == "erased"))).all()
            )
        for case_id in pending:
            await self.finish(case_id)
        return len(pending)

    async def expired_cases(
        self, retention_days: int, notice_days: int, now: datetime
    ) -> list[tuple[str, int]]:
        """(case id, chat id) of the cases the retention rule erases: complete ones closed
        more than `retention_days` ago, and ones never completed whose last step (the
        patient's or a coordinator's; for a case older than that record, its last change)
        is as old, once their patient was told at least `notice_days` ago (and has not
        stepped since): an intake given up must not keep its records for ever, nor lose
        them unannounced."""
        cutoff = now - timedelta(days=retention_days)
        closed = and_(col(CaseRow.state) == "complete", col(CaseRow.completed_at) < cutoff)
        noticed = and_(
            col(CaseRow.retention_notice_at) >= _last_step,
            col(CaseRow.retention_notice_at) < now - timedelta(days=notice_days),
        )
        given_up = and_(_never_completed, _last_step < cutoff, noticed)
        return await self._cases(or_(closed, given_up))

    async def cases_to_notify(
        self, retention_days: int, notice_days: int, now: datetime
    ) -> list[tuple[str, int]]:
        """(case id, chat id) of the cases given up whose patient is to be told now that
        the retention rule will erase them in `notice_days`: not yet told since their last
        step."""
        due = _last_step < now - timedelta(days=retention_days - notice_days)
        untold = or_(
            col(CaseRow.retention_notice_at).is_(None),
            col(CaseRow.retention_notice_at) < _last_step,
        )
        return await self._cases(and_(_never_completed, due, untold))

    async def _cases(self, where: ColumnElement[bool]) -> list[tuple[str, int]]:
        async with self._store.reader() as session:
            rows = await session.exec(select(CaseRow.id, CaseRow.chat_id).where(where))
            return [(case_id, chat_id) for case_id, chat_id in rows.all()]


# A case's last step: the patient's or a coordinator's, or for a case from before steps were
# timed, its last change. Never completed (nor already erased): given up, if that is old.
_last_step = func.coalesce(CaseRow.active_at, CaseRow.updated_at)
_never_completed = col(CaseRow.state).not_in(("complete", "erased"))
