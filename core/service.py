"""The conversation service: one event in, state saved and replies queued, atomically.

Each call runs in one transaction that also marks the channel's update as handled, so a
replayed update changes nothing and a crash before commit leaves the update to be retried.
Replies go to the outbox in that same transaction; the channel sends them afterwards.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from core import engine
from core.engine import Context
from core.events import CaseCompleted, DomainEvent, Event, EventKind
from core.model import Case
from core.ports import FileIngest, FileSource, IncomingFile, Patient, Store, Transaction
from core.replies import Lines, Reply, Text, Verbatim, reply

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Coordinator:
    chat_id: int | None
    locale: str


class ConversationService:
    def __init__(
        self,
        store: Store,
        ingest: FileIngest,
        context: Callable[[], Context],
        coordinator: Coordinator,
        default_locale: str,
    ) -> None:
        self._store = store
        self._ingest = ingest
        self._context = context
        self._coordinator = coordinator
        self._default_locale = default_locale

    def _locale_for(self, patient: Patient, ctx: Context) -> str:
        code = (patient.language_code or "").split("-")[0].lower()
        return code if code in ctx.locales else self._default_locale

    async def _case(self, tx: Transaction, patient: Patient, ctx: Context) -> Case:
        case = await tx.load_case(patient.chat_id)
        if case is None:
            case = await tx.create_case(patient, self._locale_for(patient, ctx))
            log.info("case created case=%s", case.id)
        return case

    async def handle(self, patient: Patient, event: Event, update_id: int | None = None) -> None:
        """Apply an event for a patient's case; no-op when the update was handled before."""
        ctx = self._context()
        async with self._store.transaction() as tx:
            if update_id is not None and await tx.update_seen(update_id):
                return
            case = await self._case(tx, patient, ctx)
            if event.kind is EventKind.START and event.arg:
                event = Event(EventKind.START, await tx.take_invite(event.arg, case.id) or "")
            await self._apply(tx, case, event, ctx)
            if update_id is not None:
                await tx.mark_update(update_id, patient.chat_id)

    async def handle_file(
        self, patient: Patient, incoming: IncomingFile, source: FileSource, update_id: int | None
    ) -> None:
        """Store and check a file for the current item, then let the engine judge it.

        The file is streamed into the vault before the transaction that records it, so the
        row never points at a blob that is not durable; a crash in between leaves only a blob
        that the retried update overwrites under the same id.
        """
        ctx = self._context()
        async with self._store.transaction() as tx:
            if update_id is not None and await tx.update_seen(update_id):
                return
            case = await self._case(tx, patient, ctx)
            target = engine.upload_target(case, ctx)
            duplicate = target is not None and (
                await tx.find_file(case.id, incoming.unique_id, None) is not None
            )
            if target is None or duplicate:
                await self._apply(tx, case, Event(EventKind.FILE, duplicate=duplicate), ctx)
                if update_id is not None:
                    await tx.mark_update(update_id, patient.chat_id)
                return
            case_id, item_key = case.id, target.key
        stored = await self._ingest.ingest(case_id, incoming, source)
        recorded = False
        async with self._store.transaction() as tx:
            if update_id is not None and await tx.update_seen(update_id):
                return
            case = await self._case(tx, patient, ctx)
            same_content = await tx.find_file(case.id, incoming.unique_id, stored.sha256)
            if case.current_item != item_key or same_content is not None:
                await self._apply(tx, case, Event(EventKind.FILE, duplicate=True), ctx)
            else:
                await tx.add_file(case, item_key, incoming, stored)
                await self._apply(tx, case, Event(EventKind.FILE, file=stored.ref), ctx)
                recorded = True
            if update_id is not None:
                await tx.mark_update(update_id, patient.chat_id)
        if not recorded:  # the same bytes under another Telegram id: keep one copy only
            await self._ingest.discard(stored)

    async def _apply(self, tx: Transaction, case: Case, event: Event, ctx: Context) -> None:
        outcome = engine.handle(case, event, ctx)
        await tx.save_case(case)
        for message in merge_replies(outcome.replies):
            await tx.enqueue(case.chat_id, case.locale, message)
        for domain_event in outcome.events:
            await self._notify(tx, case, domain_event, ctx)

    async def _notify(self, tx: Transaction, case: Case, event: DomainEvent, ctx: Context) -> None:
        log.info("event %s case=%s", type(event).__name__, case.id)
        if isinstance(event, CaseCompleted) and self._coordinator.chat_id is not None:
            await tx.enqueue(
                self._coordinator.chat_id,
                self._coordinator.locale,
                case_ready_alert(case, ctx),
                dedup_key=f"case-complete:{case.id}:{event.completion}",
            )


def merge_replies(replies: list[Reply]) -> list[Reply]:
    """Fold each reply without buttons into the next one: one message instead of two.

    An acknowledgement ("received") and the next step's question then arrive together,
    which reads better and keeps well inside Telegram's per-chat rate.
    """
    merged: list[Reply] = []
    pending: tuple[Text | Lines, ...] = ()
    for message in replies:
        if not message.buttons:
            pending += message.parts
            continue
        merged.append(Reply(pending + message.parts, message.buttons))
        pending = ()
    if pending:
        merged.append(Reply(pending))
    return merged


def case_ready_alert(case: Case, ctx: Context) -> Reply:
    """The coordinator's alert: which case, which procedure, what each item holds."""
    assert case.checklist_key is not None
    checklist = ctx.checklists[case.checklist_key]
    lines = tuple(
        Text(
            "coordinator.item_line",
            {
                "title": Text(item.title),
                "status": Text(f"item_status.{case.progress(item.key).status.value}"),
                "files": len(case.progress(item.key).files),
            },
        )
        for item in checklist.items
    )
    return reply(
        Text(
            "coordinator.case_complete",
            {
                "case_id": Verbatim(case.id),
                "procedure": Text(checklist.title),
                "hospital": Verbatim(checklist.hospital),
            },
        ),
        Lines(lines),
        Text("coordinator.case_show_hint", {"case_id": Verbatim(case.id)}),
    )
