"""The coordinator's case directory: read a case, audit the view, queue the reply, at once.

Every view runs in one transaction that (1) reads what is shown, (2) queues the reply in
the outbox, (3) appends the audit row and (4) marks the Telegram update handled. A crash
anywhere rolls all four back, so nothing is ever shown without being audited, and a
replayed update (already marked) shows and audits nothing a second time.

"Open" buttons are signed: HMAC-SHA256 under a secret derived from the master key (see
`button_secret`), truncated to 16 hex digits, checked in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
from collections.abc import Mapping

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from adapters import audit
from adapters.keyring import KeyRing
from adapters.store import SqlStore, SqlTransaction
from adapters.tables import CaseRow, FileRow, ItemRow
from core.checklist import Checklist, ChecklistItem
from core.coordination import (
    LIST_LIMIT,
    SIGNATURE_HEX,
    CaseList,
    CaseSummary,
    CaseView,
    FileSummary,
    ItemView,
    Viewer,
    case_reply,
    cases_reply,
    is_case_id,
    not_found_reply,
    states_for,
    usage_reply,
)
from core.replies import Reply

log = logging.getLogger(__name__)


def button_secret(master: bytes) -> bytes:
    """The key that signs coordinator buttons, derived from the master key.

    Stable across restarts (buttons in old messages keep working); after a master key
    rotation old buttons stop working, which is harmless: /cases shows fresh ones.
    """
    return HKDF(
        algorithm=hashes.SHA256(), length=32, salt=None, info=b"care-companion buttons v1"
    ).derive(master)


class CaseDirectory:
    """Implements `core.coordination.CoordinatorDesk` on the SQL store."""

    def __init__(
        self,
        store: SqlStore,
        keyring: KeyRing,
        signer_secret: bytes,
        *,
        checklists: Mapping[str, Checklist] | None = None,
        locale: str = "en",
    ) -> None:
        if len(signer_secret) < 16:
            raise ValueError("the button signing secret must be at least 16 bytes")
        self._store = store
        # Nothing shown here needs decrypting today; the keyring is where later views
        # (extracted summaries kept in the encrypted verdicts) will read from.
        self._keys = keyring
        self._secret = signer_secret
        self._checklists = dict(checklists or {})
        self._locale = locale

    # -- signatures ------------------------------------------------------------------

    def sign(self, case_id: str) -> str:
        digest = hmac.new(self._secret, f"open:{case_id}".encode(), hashlib.sha256)
        return digest.hexdigest()[:SIGNATURE_HEX]

    def verify(self, case_id: str, signature: str) -> bool:
        return hmac.compare_digest(self.sign(case_id), signature)

    # -- audited views ---------------------------------------------------------------

    async def list_cases(
        self, filter_name: str | None, *, viewer: Viewer, update_id: int | None = None
    ) -> CaseList | None:
        """Cases matching the filter, most recent first (at most LIST_LIMIT), shown to the
        viewer's chat and audited as `cases.list`; None for a replayed update."""
        states = states_for(filter_name)  # KeyError for an unknown filter: checked by caller
        async with self._store.transaction() as tx:
            if await self._seen(tx, update_id):
                return None
            listing = await self._read_list(tx.session, filter_name, states)
            await self._show(tx, viewer, cases_reply(listing))
            detail = f"filter={filter_name or 'all'} shown={len(listing.cases)}"
            await audit.append(tx.session, viewer.actor, "cases.list", None, detail)
            await self._done(tx, viewer, update_id)
        log.info("coordinator listed cases user=%s n=%d", viewer.user_id, len(listing.cases))
        return listing

    async def case_view(
        self, case_id: str, *, viewer: Viewer, update_id: int | None = None, via: str = "command"
    ) -> CaseView | None:
        """One case with its items and files, shown and audited as `case.view`.

        None for a replayed update, and for an unknown or erased case (the viewer is told
        it was not found; nothing was shown, so nothing is audited)."""
        async with self._store.transaction() as tx:
            if await self._seen(tx, update_id):
                return None
            view = await self._read_case(tx.session, case_id) if is_case_id(case_id) else None
            if view is None:
                await self._show(tx, viewer, not_found_reply())
                await self._done(tx, viewer, update_id)
                log.info("coordinator asked for no such case user=%s", viewer.user_id)
                return None
            await self._show(tx, viewer, case_reply(view))
            await audit.append(tx.session, viewer.actor, "case.view", view.case_id, f"via={via}")
            await self._done(tx, viewer, update_id)
        log.info("coordinator viewed case=%s user=%s", view.case_id, viewer.user_id)
        return view

    async def usage(self, *, viewer: Viewer, update_id: int | None = None) -> None:
        """How to use /cases and /case (a mistyped filter or a missing case id)."""
        async with self._store.transaction() as tx:
            if await self._seen(tx, update_id):
                return
            await self._show(tx, viewer, usage_reply())
            await self._done(tx, viewer, update_id)

    # -- internals -------------------------------------------------------------------

    @staticmethod
    async def _seen(tx: SqlTransaction, update_id: int | None) -> bool:
        return update_id is not None and await tx.update_seen(update_id)

    async def _show(self, tx: SqlTransaction, viewer: Viewer, message: Reply) -> None:
        await tx.enqueue(viewer.chat_id, self._locale, message)

    @staticmethod
    async def _done(tx: SqlTransaction, viewer: Viewer, update_id: int | None) -> None:
        if update_id is not None:
            await tx.mark_update(update_id, viewer.chat_id)

    def _checklist(self, key: str | None) -> Checklist | None:
        return self._checklists.get(key) if key else None

    async def _read_list(
        self, session: AsyncSession, filter_name: str | None, states: frozenset[str]
    ) -> CaseList:
        query = (
            select(CaseRow)
            .where(col(CaseRow.state).in_(sorted(states)))
            .order_by(col(CaseRow.updated_at).desc(), col(CaseRow.id))
            .limit(LIST_LIMIT + 1)
        )
        rows = (await session.exec(query)).all()
        summaries = []
        for row in rows[:LIST_LIMIT]:
            checklist = self._checklist(row.checklist_key)
            summaries.append(
                CaseSummary(
                    case_id=row.id,
                    state=row.state,
                    procedure=row.checklist_key,
                    procedure_title=checklist.title if checklist else None,
                    updated_at=row.updated_at,
                    signature=self.sign(row.id),
                )
            )
        return CaseList(filter_name, tuple(summaries), more=len(rows) > LIST_LIMIT)

    async def _read_case(self, session: AsyncSession, case_id: str) -> CaseView | None:
        case = await session.get(CaseRow, case_id)
        if case is None or case.state == "erased" or not case.wrapped_key:
            return None
        items = {
            row.item_key: row
            for row in (await session.exec(select(ItemRow).where(ItemRow.case_id == case_id))).all()
        }
        files = (
            await session.exec(
                select(FileRow)
                .where(FileRow.case_id == case_id)
                .order_by(col(FileRow.created_at), col(FileRow.id))
            )
        ).all()
        checklist = self._checklist(case.checklist_key)
        order = list(checklist.item_keys) if checklist else []
        order += sorted(set(items) - set(order))  # items of a checklist changed since
        counted = {ref["file_id"] for row in items.values() for ref in json.loads(row.files_json)}
        views = []
        for key in order:
            row = items.get(key)
            definition = _item(checklist, key)
            views.append(
                ItemView(
                    key=key,
                    title=definition.title if definition else None,
                    required=definition.required if definition else None,
                    status=row.status if row else "pending",
                    has_answer=bool(row and row.answer_enc),
                    files=tuple(
                        FileSummary(f.kind, f.status, f.id in counted)
                        for f in files
                        if f.item_key == key
                    ),
                )
            )
        current = _item(checklist, case.current_item) if case.current_item else None
        return CaseView(
            case_id=case.id,
            state=case.state,
            procedure=case.checklist_key,
            procedure_title=checklist.title if checklist else None,
            hospital=checklist.hospital if checklist else None,
            current_item=case.current_item,
            current_title=current.title if current else None,
            completions=case.completions,
            items=tuple(views),
        )


def _item(checklist: Checklist | None, key: str) -> ChecklistItem | None:
    if checklist is None or key not in checklist.item_keys:
        return None
    return checklist.item(key)
