"""The coordinator's case directory: read a case, audit the view, queue the reply, at once.

Every view runs in one transaction that (1) reads what is shown, (2) queues the reply in
the outbox, (3) appends the audit row and (4) marks the Telegram update handled. A crash
anywhere rolls all four back, so nothing is ever shown without being audited, and a
replayed update (already marked) shows and audits nothing a second time.

Buttons are signed (see `core.review`): HMAC-SHA256 under a secret derived from the master
key (see `button_secret`), truncated to 16 hex digits, checked in constant time.

Review decisions run the same way: the case is loaded, the engine applies the send-back
(the patient's message is queued in their language), the review is saved and audited,
all in the one transaction that also marks the coordinator's update handled.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from datetime import timedelta

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from adapters import audit
from adapters.export import Bundle, ExportError
from adapters.keyring import KeyRing
from adapters.media import bundle_request, preview_request
from adapters.store import SqlStore, SqlTransaction, utcnow
from adapters.tables import CaseRow, CoordinatorPromptRow, FileRow, InboxRow, ItemRow
from core import engine, review
from core.checklist import Checklist, ChecklistItem
from core.coordination import (
    LIST_LIMIT,
    CaseList,
    CaseSummary,
    CaseView,
    FileSummary,
    ItemView,
    Viewer,
    ask_reason_reply,
    cannot_review_reply,
    case_reply,
    cases_reply,
    decided_reply,
    export_failed_reply,
    export_password_reply,
    export_ready_reply,
    is_case_id,
    item_review_reply,
    not_found_reply,
    preview_caption,
    preview_groups,
    states_for,
    usage_reply,
)
from core.engine import Context
from core.events import Event, EventKind
from core.replies import Reply
from core.review import SIGNATURE_HEX
from core.service import merge_replies

log = logging.getLogger(__name__)

# Builds a case's bundle for an actor ("coordinator:<id>"): adapters.export.build_bundle with
# the app's store, vault, checklists and the coordinator's language bound in.
Exporter = Callable[[str, str], Awaitable[Bundle]]

# A "type the reason" question waits this long for the coordinator's answer; after that
# their next message is ordinary again (they press the button anew).
PROMPT_TTL = timedelta(minutes=30)


def button_secret(master: bytes) -> bytes:
    """The key that signs coordinator buttons, derived from the master key.

    Stable across restarts (buttons in old messages keep working); after a master key
    rotation old buttons stop working, which is harmless: /cases shows fresh ones.
    """
    return HKDF(
        algorithm=hashes.SHA256(), length=32, salt=None, info=b"care-companion buttons v1"
    ).derive(master)


def sign_button(secret: bytes, unsigned: str) -> str:
    """The signature of a button's callback data (everything before the signature)."""
    digest = hmac.new(secret, f"button:{unsigned}".encode(), hashlib.sha256)
    return digest.hexdigest()[:SIGNATURE_HEX]


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
        context: Callable[[], Context] | None = None,
        exporter: Exporter | None = None,
    ) -> None:
        if len(signer_secret) < 16:
            raise ValueError("the button signing secret must be at least 16 bytes")
        self._store = store
        self._keys = keyring  # the patient's name and birth date, shown to coordinators
        self._secret = signer_secret
        self._checklists = dict(checklists or {})
        self._locale = locale
        self._context = context  # the engine's context, for send-backs
        self._exporter = exporter  # builds the hand-off bundle (adapters.export)

    # -- signatures ------------------------------------------------------------------

    def sign(self, unsigned: str) -> str:
        return sign_button(self._secret, unsigned)

    def verify(self, unsigned: str, signature: str) -> bool:
        return hmac.compare_digest(self.sign(unsigned), signature)

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
            await self._show(tx, viewer, cases_reply(listing, self.sign))
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
            await self._show(tx, viewer, case_reply(view, self.sign))
            await audit.append(tx.session, viewer.actor, "case.view", view.case_id, f"via={via}")
            await self._done(tx, viewer, update_id)
        log.info("coordinator viewed case=%s user=%s", view.case_id, viewer.user_id)
        return view

    async def review_item(
        self, case_id: str, index: int, *, viewer: Viewer, update_id: int | None = None
    ) -> None:
        """One item up for review, with the decision buttons; audited as `item.view`."""
        async with self._store.transaction() as tx:
            if await self._seen(tx, update_id):
                return
            view = await self._reviewable(tx.session, case_id, index)
            if view is None:
                await self._show(tx, viewer, cannot_review_reply())
            else:
                await self._show(tx, viewer, item_review_reply(view, index, self.sign))
                groups = preview_groups(view.items[index])
                for n, (kind, file_ids) in enumerate(groups, start=1):
                    caption = preview_caption(view, index, kind, n, len(groups))
                    request = preview_request(case_id, kind, file_ids)
                    await tx.enqueue_media(viewer.chat_id, self._locale, request, caption)
                detail = f"item={view.items[index].key}"
                await audit.append(tx.session, viewer.actor, "item.view", case_id, detail)
            await self._done(tx, viewer, update_id)

    async def decide(
        self,
        case_id: str,
        index: int,
        code: str,
        *,
        viewer: Viewer,
        update_id: int | None = None,
        typed: str | None = None,
    ) -> None:
        """Accept the item or send it back; "type a reason" first asks for the text."""
        async with self._store.transaction() as tx:
            if await self._seen(tx, update_id):
                return
            view = await self._reviewable(tx.session, case_id, index)
            if view is None:
                await self._show(tx, viewer, cannot_review_reply())
            elif code == review.TYPED and typed is None:
                await tx.session.merge(
                    CoordinatorPromptRow(
                        user_id=viewer.user_id,
                        chat_id=viewer.chat_id,
                        case_id=case_id,
                        item_key=view.items[index].key,
                        created_at=utcnow(),
                    )
                )
                await self._show(tx, viewer, ask_reason_reply(view, index))
            else:
                await self._apply_decision(tx, view, index, code, viewer, typed)
            await self._done(tx, viewer, update_id)

    async def pending_prompt(self, viewer: Viewer) -> tuple[str, str] | None:
        """(case id, item key) when this coordinator was asked to type a reason here."""
        async with self._store.reader() as session:
            prompt = await session.get(CoordinatorPromptRow, viewer.user_id)
            if prompt is None or prompt.chat_id != viewer.chat_id:
                return None
            if prompt.created_at < utcnow() - PROMPT_TTL:
                return None
            return prompt.case_id, prompt.item_key

    async def typed_reason(self, text: str, *, viewer: Viewer, update_id: int) -> None:
        """The coordinator's typed reason: the item goes back to the patient with it."""
        async with self._store.transaction() as tx:
            if await self._seen(tx, update_id):
                return
            prompt = await tx.session.get(CoordinatorPromptRow, viewer.user_id)
            if prompt is not None:
                await tx.session.delete(prompt)
            view = await self._read_case(tx.session, prompt.case_id) if prompt else None
            keys = [item.key for item in view.items] if view else []
            if view is None or prompt is None or prompt.item_key not in keys or not text.strip():
                await self._show(tx, viewer, cannot_review_reply())
            else:
                index = keys.index(prompt.item_key)
                await self._apply_decision(tx, view, index, review.TYPED, viewer, text)
            await self._done(tx, viewer, update_id)

    async def export(self, case_id: str, *, viewer: Viewer, update_id: int | None = None) -> None:
        """Build the hospital bundle of a complete case and send it to the viewer's chat:
        the archive, then its password in a separate message. The bundle is audited and
        the case marked handed off by the exporter; a replayed update builds nothing."""
        async with self._store.reader() as session:
            inbox = await session.get(InboxRow, update_id) if update_id is not None else None
            if inbox is not None and inbox.status == "done":
                return  # a replay: the bundle was built and sent before
            view = await self._read_case(session, case_id) if is_case_id(case_id) else None
        bundle = None
        if view is not None and view.state == "complete" and self._exporter is not None:
            try:
                bundle = await self._exporter(case_id, viewer.actor)
            except ExportError:
                log.exception("export failed case=%s", case_id)
        async with self._store.transaction() as tx:
            if await self._seen(tx, update_id):
                return
            if bundle is None:
                await self._show(tx, viewer, export_failed_reply())
            else:
                ready = export_ready_reply(case_id, bundle.file_count)
                await tx.enqueue_media(
                    viewer.chat_id, self._locale, bundle_request(bundle.path), ready
                )
                password = export_password_reply(case_id, bundle.password)
                await tx.enqueue(viewer.chat_id, self._locale, password, sealed=True)
            await self._done(tx, viewer, update_id)

    async def usage(self, *, viewer: Viewer, update_id: int | None = None) -> None:
        """How to use /cases and /case (a mistyped filter or a missing case id)."""
        async with self._store.transaction() as tx:
            if await self._seen(tx, update_id):
                return
            await self._show(tx, viewer, usage_reply())
            await self._done(tx, viewer, update_id)

    # -- internals -------------------------------------------------------------------

    async def _reviewable(self, session: AsyncSession, case_id: str, index: int) -> CaseView | None:
        """The case, when its item at `index` can be reviewed now; None otherwise."""
        view = await self._read_case(session, case_id) if is_case_id(case_id) else None
        item = view.item_at(index) if view is not None else None
        if view is None or item is None or view.state not in ("collecting", "complete"):
            return None
        return view if item.reviewable else None

    async def _apply_decision(
        self,
        tx: SqlTransaction,
        view: CaseView,
        index: int,
        code: str,
        viewer: Viewer,
        typed: str | None,
    ) -> None:
        row = await tx.session.get(CaseRow, view.case_id)
        case = await tx.load_case(row.chat_id) if row is not None else None
        assert case is not None and self._context is not None, "review needs the engine context"
        key = view.items[index].key
        if code != review.ACCEPT:
            reason = review.reason_for_patient(code, typed)
            outcome = engine.handle(
                case, Event(EventKind.SENT_BACK, key, reason=reason), self._context()
            )
            for message in merge_replies(outcome.replies):
                await tx.enqueue(case.chat_id, case.locale, message)
        case.progress(key).review = review.review_value(code)
        await tx.save_case(case)
        action = "item.accept" if code == review.ACCEPT else "item.send_back"
        detail = f"item={key} review={review.review_value(code)}"
        await audit.append(tx.session, viewer.actor, action, view.case_id, detail)
        await self._show(tx, viewer, decided_reply(view, index, code, self.sign))
        log.info(
            "coordinator %s case=%s item=%s user=%s", action, view.case_id, key, viewer.user_id
        )

    @staticmethod
    async def _seen(tx: SqlTransaction, update_id: int | None) -> bool:
        return update_id is not None and await tx.update_seen(update_id)

    async def _show(self, tx: SqlTransaction, viewer: Viewer, message: Reply) -> None:
        # Sealed: a view may name the patient; nothing of it stays readable in the outbox.
        await tx.enqueue(viewer.chat_id, self._locale, message, sealed=True)

    @staticmethod
    async def _done(tx: SqlTransaction, viewer: Viewer, update_id: int | None) -> None:
        if update_id is not None:
            await tx.mark_update(update_id, viewer.chat_id)

    def _checklist(self, key: str | None) -> Checklist | None:
        return self._checklists.get(key) if key else None

    async def _read_list(
        self, session: AsyncSession, filter_name: str | None, states: frozenset[str]
    ) -> CaseList:
        query = select(CaseRow).where(col(CaseRow.state).in_(sorted(states)))
        if filter_name == "handed_off":
            query = query.where(col(CaseRow.handed_off_at).is_not(None))
        elif filter_name == "ready":
            query = query.where(col(CaseRow.handed_off_at).is_(None))
        elif filter_name == "sent_back":
            sent_back = select(ItemRow.case_id).where(ItemRow.status == "sent_back")
            query = query.where(col(CaseRow.id).in_(sent_back))
        query = query.order_by(col(CaseRow.updated_at).desc(), col(CaseRow.id)).limit(
            LIST_LIMIT + 1
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
        files_of = {key: json.loads(row.files_json) for key, row in items.items()}
        counted = {ref["file_id"] for refs in files_of.values() for ref in refs}
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
                    review=row.review if row else None,
                    flags=tuple(
                        sorted(
                            {flag for ref in files_of.get(key, []) for flag in ref.get("flags", ())}
                        )
                    ),
                    files=tuple(
                        FileSummary(f.kind, f.status, f.id in counted, f.id)
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
            handed_off=case.handed_off_at is not None,
            patient_name=self._field(case, case.patient_name_enc, "patient-name"),
            birth_date=self._field(case, case.birth_date_enc, "birth-date"),
        )

    def _field(self, case: CaseRow, token: str | None, field: str) -> str | None:
        if token is None:
            return None
        return self._keys.decrypt_field(case.id, case.wrapped_key, token, field)


def _item(checklist: Checklist | None, key: str) -> ChecklistItem | None:
    if checklist is None or key not in checklist.item_keys:
        return None
    return checklist.item(key)
