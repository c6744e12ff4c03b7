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
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from adapters import audit
from adapters.bundle import Bundle, ExportError
from adapters.keyring import KeyRing
from adapters.media import bundle_request, preview_request
from adapters.store import SqlStore, SqlTransaction, file_from_json, utcnow
from adapters.tables import CaseRow, CoordinatorPromptRow, FileRow, InboxRow, ItemRow
from core import engine, review
from core.alerts import needs_translation
from core.checklist import Checklist, ChecklistItem
from core.coordination import (
    LIST_LIMIT,
    NEEDS_TRANSLATION,
    CaseList,
    CaseSummary,
    CaseView,
    FileDetail,
    FileSummary,
    ItemView,
    Viewer,
    ask_extra_reply,
    ask_reason_reply,
    ask_translation_reply,
    cannot_review_reply,
    case_reply,
    cases_reply,
    decided_reply,
    export_failed_reply,
    export_password_reply,
    export_ready_reply,
    extra_requested_reply,
    is_case_id,
    item_review_reply,
    not_found_reply,
    preview_caption,
    preview_groups,
    states_for,
    translation_attached_reply,
    translation_ordered_reply,
    usage_reply,
)
from core.engine import Context
from core.events import Event, EventKind
from core.model import Case
from core.ports import FileIngest, FileSource, IncomingFile
from core.replies import Reply, Text, Verbatim, reply
from core.review import SIGNATURE_HEX
from core.service import merge_replies, queue_card

log = logging.getLogger(__name__)

# Builds a case's bundle for an actor ("coordinator:<id>"): adapters.export.build_bundle with
# the app's store, vault, checklists and the coordinator's language bound in.
Exporter = Callable[[str, str], Awaitable[Bundle]]

# A "type the reason" question waits this long for the coordinator's answer; after that
# their next message is ordinary again (they press the button anew).
PROMPT_TTL = timedelta(minutes=30)
MAX_EXTRA_LENGTH = 300  # a description of a record, not a letter


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
        reminders_total: int = 3,
        ingest: FileIngest | None = None,
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
        self._reminders_total = reminders_total  # "stalled": every reminder sent, no answer
        self._ingest = ingest  # stores a translation a coordinator sends, as patients' files

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
            details = {
                item.key: await self._details(tx.session, view.case_id, item.key)
                for item in view.items
                if item.files
            }
            await self._show(tx, viewer, case_reply(view, self.sign, details))
            await audit.append(tx.session, viewer.actor, "case.view", view.case_id, f"via={via}")
            await self._done(tx, viewer, update_id)
        log.info("coordinator viewed case=%s user=%s", view.case_id, viewer.user_id)
        return view

    async def review_item(
        self, case_id: str, index: int, *, viewer: Viewer, update_id: int | None = None
    ) -> None:
        """One item up for review, with the decision buttons and previews of its files
        (made when sent, see adapters.media); audited as `item.view`."""

        async def show(tx: SqlTransaction, view: CaseView) -> None:
            details = await self._details(tx.session, case_id, view.items[index].key)
            await self._show(tx, viewer, item_review_reply(view, index, self.sign, details))
            groups = preview_groups(view.items[index])
            for n, (kind, file_ids) in enumerate(groups, start=1):
                caption = preview_caption(view, index, kind, n, len(groups))
                request = preview_request(case_id, kind, file_ids)
                await tx.enqueue_media(viewer.chat_id, self._locale, request, caption)
            detail = f"item={view.items[index].key}"
            await audit.append(tx.session, viewer.actor, "item.view", case_id, detail)

        await self._on_item(case_id, index, viewer, update_id, show)

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

        async def act(tx: SqlTransaction, view: CaseView) -> None:
            if code == review.TYPED and typed is None:
                await self._ask(tx, viewer, case_id, view.items[index].key)
                await self._show(tx, viewer, ask_reason_reply(view, index))
            else:
                await self._apply_decision(tx, view, index, code, viewer, typed)

        await self._on_item(case_id, index, viewer, update_id, act)

    async def request_extra(
        self, case_id: str, *, viewer: Viewer, update_id: int | None = None
    ) -> None:
        """ "Ask for another record": the coordinator's next message describes it."""
        async with self._store.transaction() as tx:
            if await self._seen(tx, update_id):
                return
            view = await self._read_case(tx.session, case_id) if is_case_id(case_id) else None
            if view is None or view.state not in ("collecting", "complete"):
                await self._show(tx, viewer, cannot_review_reply())
            else:
                await self._ask(tx, viewer, case_id, review.EXTRA_PROMPT)
                await self._show(tx, viewer, ask_extra_reply(view))
            await self._done(tx, viewer, update_id)

    async def order_translation(
        self, case_id: str, index: int, *, viewer: Viewer, update_id: int | None = None
    ) -> None:
        """The item's translation is ordered: the patient is told which document is being
        translated (nothing is asked of them), and the coordinator can attach it later."""

        async def act(tx: SqlTransaction, view: CaseView) -> None:
            key = view.items[index].key
            case = await self._load(tx, case_id)
            case.progress(key).translation = review.ORDERED
            await tx.save_case(case)
            await tx.enqueue(case.chat_id, case.locale, self._translating(case, key))
            await audit.append(tx.session, viewer.actor, "item.translation", case_id, f"item={key}")
            await self._show(tx, viewer, translation_ordered_reply(view, index, self.sign))

        def needs(item: ItemView) -> bool:
            return NEEDS_TRANSLATION in item.flags

        await self._on_item(case_id, index, viewer, update_id, act, needs)

    async def attach_translation(
        self, case_id: str, index: int, *, viewer: Viewer, update_id: int | None = None
    ) -> None:
        """ "Attach the translation": the next file this coordinator sends here is it."""

        async def act(tx: SqlTransaction, view: CaseView) -> None:
            prompt = f"{review.TRANSLATION_PROMPT}{view.items[index].key}"
            await self._ask(tx, viewer, case_id, prompt)
            await self._show(tx, viewer, ask_translation_reply(view, index))

        def ordered(item: ItemView) -> bool:
            return item.translation is not None

        await self._on_item(case_id, index, viewer, update_id, act, ordered)

    async def translation_file(
        self, incoming: IncomingFile, source: FileSource, *, viewer: Viewer, update_id: int
    ) -> None:
        """The translated file: stored encrypted beside the item's originals (not counted
        toward the item), checked like any upload, and in the hospital bundle."""
        pending = await self.pending_prompt(viewer)
        if pending is None or not pending[1].startswith(review.TRANSLATION_PROMPT):
            return
        case_id, key = pending[0], pending[1].removeprefix(review.TRANSLATION_PROMPT)
        assert self._ingest is not None, "attaching a translation needs the ingest"
        stored = await self._ingest.ingest(case_id, incoming, source)
        async with self._store.transaction() as tx:
            if await self._seen(tx, update_id):
                await self._ingest.discard(stored)
                return
            prompt = await tx.session.get(CoordinatorPromptRow, viewer.user_id)
            if prompt is not None:
                await tx.session.delete(prompt)
            view = await self._read_case(tx.session, case_id)
            accepted = stored.ref.status != "rejected"
            if view is None or key not in [item.key for item in view.items]:
                await self._ingest.discard(stored)
                await self._show(tx, viewer, cannot_review_reply())
            elif not accepted:
                await self._ingest.discard(stored)
                await self._show(
                    tx, viewer, translation_attached_reply(view, key, False, self.sign)
                )
            else:
                case = await self._load(tx, case_id)
                await tx.add_file(case, key, incoming, stored, role="translation")
                case.progress(key).translation = review.ATTACHED
                await tx.save_case(case)
                detail = f"item={key} file={stored.ref.file_id}"
                await audit.append(tx.session, viewer.actor, "item.translated", case_id, detail)
                await self._show(tx, viewer, translation_attached_reply(view, key, True, self.sign))
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
            if prompt is not None and view is not None and prompt.item_key == review.EXTRA_PROMPT:
                await self._apply_extra(tx, view, viewer, text)
            elif view is None or prompt is None or prompt.item_key not in keys or not text.strip():
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

    async def _on_item(
        self,
        case_id: str,
        index: int,
        viewer: Viewer,
        update_id: int | None,
        act: Callable[[SqlTransaction, CaseView], Awaitable[None]],
        wanted: Callable[[ItemView], bool] = lambda item: True,
    ) -> None:
        """One coordinator step on an item, in one transaction with the update's handled
        mark: nothing on a replay; "cannot" when the item is not reviewable (or not
        `wanted`) any more; otherwise `act`."""
        async with self._store.transaction() as tx:
            if await self._seen(tx, update_id):
                return
            view = await self._reviewable(tx.session, case_id, index)
            if view is None or not wanted(view.items[index]):
                await self._show(tx, viewer, cannot_review_reply())
            else:
                await act(tx, view)
            await self._done(tx, viewer, update_id)

    async def _details(
        self, session: AsyncSession, case_id: str, key: str
    ) -> tuple[FileDetail, ...]:
        """What the checks found in each of the item's files (their verdicts, decrypted)."""
        case = await session.get(CaseRow, case_id)
        assert case is not None
        rows = await session.exec(
            select(FileRow)
            .where(FileRow.case_id == case_id, FileRow.item_key == key)
            .where(col(FileRow.role).is_(None))
            .order_by(col(FileRow.created_at), col(FileRow.id))
        )
        return tuple(
            file_detail(row.kind, row.status, self._field(case, row.verdict_enc, "verdict"))
            for row in rows.all()
        )

    @staticmethod
    async def _ask(tx: SqlTransaction, viewer: Viewer, case_id: str, key: str) -> None:
        """Remember what this coordinator's next message answers (a reason, a description,
        a translated file): the prompt row survives a restart in between."""
        prompt = CoordinatorPromptRow(
            user_id=viewer.user_id,
            chat_id=viewer.chat_id,
            case_id=case_id,
            item_key=key,
            created_at=utcnow(),
        )
        await tx.session.merge(prompt)

    async def _load(self, tx: SqlTransaction, case_id: str) -> Case:
        row = await tx.session.get(CaseRow, case_id)
        case = await tx.load_case(row.chat_id) if row is not None else None
        assert case is not None, "a case that was just read"
        return case

    def _translating(self, case: Case, key: str) -> Reply:
        """What the patient reads: this document is being translated for the hospital."""
        assert self._context is not None and case.checklist_key is not None
        ctx = self._context()
        checklist = engine.case_checklist(case, ctx)
        languages = tuple(
            Verbatim(ctx.language_names.get(code, code)) for code in checklist.working_languages
        )
        title = checklist.item(key).label
        return reply(Text("translation.ordered", {"title": title, "languages": languages}))

    async def _apply_extra(
        self, tx: SqlTransaction, view: CaseView, viewer: Viewer, text: str
    ) -> None:
        """The typed description becomes a new required item, asked of the patient now."""
        description = " ".join(text.split())[:MAX_EXTRA_LENGTH]
        row = await tx.session.get(CaseRow, view.case_id)
        case = await tx.load_case(row.chat_id) if row is not None else None
        if case is None or not description or view.state not in ("collecting", "complete"):
            await self._show(tx, viewer, cannot_review_reply())
            return
        assert self._context is not None, "an extra record needs the engine context"
        before = engine.card_state(case)
        event = Event(EventKind.EXTRA_REQUESTED, description)
        outcome = engine.handle(case, event, self._context())
        for message in merge_replies(outcome.replies):
            await tx.enqueue(case.chat_id, case.locale, message)
        await tx.save_case(case)
        await queue_card(tx, case, self._context(), before)
        detail = f"item={case.current_item}"
        await audit.append(tx.session, viewer.actor, "item.request_extra", view.case_id, detail)
        await self._show(tx, viewer, extra_requested_reply(view, description, self.sign))

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
        before = engine.card_state(case)
        if code != review.ACCEPT:
            reason = review.reason_for_patient(code, typed)
            outcome = engine.handle(
                case, Event(EventKind.SENT_BACK, key, reason=reason), self._context()
            )
            for message in merge_replies(outcome.replies):
                await tx.enqueue(case.chat_id, case.locale, message)
        case.progress(key).review = review.review_value(code)
        await tx.save_case(case)
        await queue_card(tx, case, self._context(), before)
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
        elif filter_name == "stalled":
            query = query.where(col(CaseRow.reminders_sent) >= self._reminders_total)
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
        extras = json.loads(self._field(case, case.extras_enc, "extras") or "{}")
        checklist = self._checklist(case.checklist_key)
        if checklist is not None:
            checklist = checklist.with_extras(extras)
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
                    typed_title=definition.typed_title if definition else False,
                    required=definition.required if definition else None,
                    status=row.status if row else "pending",
                    has_answer=bool(row and row.answer_enc),
                    review=row.review if row else None,
                    translation=row.translation if row else None,
                    flags=_flags(checklist, definition, files_of.get(key, [])),
                    files=tuple(
                        FileSummary(f.kind, f.status, f.id in counted, f.id)
                        for f in files
                        if f.item_key == key and f.role is None
                    ),
                )
            )
        return CaseView(
            case_id=case.id,
            state=case.state,
            procedure=case.checklist_key,
            procedure_title=checklist.title if checklist else None,
            hospital=checklist.hospital if checklist else None,
            current_item=case.current_item,
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


def file_detail(kind: str, status: str, verdict_json: str | None) -> FileDetail:
    """The review card's facts about a file: pages and language of a document, the studies of
    a scan or a CD, and what the checks noted (the study summaries are shown as studies)."""
    verdict = json.loads(verdict_json or "{}")
    meta = verdict.get("metadata") or {}
    studies = tuple(
        {
            "modality": study.get("modality") or "?",
            "date": study.get("date") or "?",
            "series": study.get("series_count", 0),
            "images": study.get("image_count", 0),
        }
        for study in meta.get("studies") or ()
    )
    if kind == "dicom" and meta.get("modality"):
        date = _iso(str(meta.get("study_date") or "?"))
        studies = ({"modality": meta["modality"], "date": date, "series": 1, "images": 1},)
    findings = tuple(
        (finding["code"], dict(finding.get("params") or {}))
        for finding in verdict.get("findings") or ()
        if finding.get("code") != "study_summary"
    )
    return FileDetail(kind, status, meta.get("page_count"), meta.get("language"), studies, findings)


def _iso(dicom_date: str) -> str:
    """A DICOM date (20240503) as ISO (2024-05-03), which messages show in the reader's form."""
    if len(dicom_date) == 8 and dicom_date.isdigit():
        return f"{dicom_date[:4]}-{dicom_date[4:6]}-{dicom_date[6:]}"
    return dicom_date


def _flags(
    checklist: Checklist | None, definition: ChecklistItem | None, refs: list[dict[str, Any]]
) -> tuple[str, ...]:
    """What the item's files are flagged with, and whether one needs translating."""
    flags = {flag for ref in refs for flag in ref.get("flags", ())}
    if (
        checklist is not None
        and definition is not None
        and any(needs_translation(definition, file_from_json(ref), checklist) for ref in refs)
    ):
        flags.add(NEEDS_TRANSLATION)
    return tuple(sorted(flags))


def _item(checklist: Checklist | None, key: str) -> ChecklistItem | None:
    if checklist is None or key not in checklist.item_keys:
        return None
    return checklist.item(key)
