"""The conversation service: one event in, state saved and replies queued, atomically.

Each call runs in one transaction that also marks the channel's update as handled, so a
replayed update changes nothing and a crash before commit leaves the update to be retried.
Replies go to the outbox in that same transaction; the channel sends them afterwards.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta

from core import engine, reminders
from core.alerts import Signer, case_ready_alert
from core.engine import Context
from core.events import (
    CaseCompleted,
    DomainEvent,
    ErasureRequested,
    Event,
    EventKind,
    UploadLinkWanted,
)
from core.model import Case, Identity, State
from core.ports import (
    Erasure,
    FileIngest,
    FileSource,
    IncomingFile,
    Patient,
    Store,
    StoredFile,
    Transaction,
)
from core.reminders import ReminderPolicy
from core.replies import Button, Lines, Reply, Text, Verbatim, reply

log = logging.getLogger(__name__)

# Cases the retention rule erases in one transaction, named in one message to the coordinators.
ERASE_TOGETHER = 25
# How long before the retention rule erases a case given up its patient is told (at most half
# the retention period).
RETENTION_NOTICE_DAYS = 14


@dataclass(frozen=True)
class WebUploads:
    """The upload page for files too big for the chat (bot.upload), when it is served."""

    base_url: str  # WEB_BASE_URL
    link_ttl: timedelta

    def link(self, token: str) -> str:
        return f"{self.base_url}/upload/u/{token}"

    def mini_app(self, case_id: str) -> str | None:
        """Telegram opens Mini Apps from https addresses only."""
        if not self.base_url.startswith("https://"):
            return None
        return f"{self.base_url}/upload/app?case={case_id}"


@dataclass(frozen=True)
class Coordinator:
    chat_id: int | None
    locale: str
    sign: Signer | None = None  # signs the alert's buttons; None: the alert says how to look


class ConversationService:
    def __init__(
        self,
        store: Store,
        ingest: FileIngest,
        context: Callable[[], Context],
        coordinator: Coordinator,
        default_locale: str,
        erasure: Erasure,
        delete_uploads: bool = False,
        web_uploads: WebUploads | None = None,
    ) -> None:
        self._store = store
        self._ingest = ingest
        self._erasure = erasure
        # DELETE_UPLOAD_MESSAGES: remove the patient's message once its file is in the vault,
        # so the record does not linger in the Telegram chat.
        self._delete_uploads = delete_uploads
        self._context = context
        self._web = web_uploads
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
            if await self._already_handled(tx, patient, update_id):
                return
            case = await self._case(tx, patient, ctx)
            locked_file = engine.awaiting_password(case)
            if event.kind is EventKind.TEXT and locked_file is not None:
                # the text is tried as the PDF's password, outside this tx
                case_id, who = case.id, case.identity
            else:
                locked_file = None
                if event.kind is EventKind.START and event.arg:
                    invite = await tx.take_invite(event.arg, case.id)
                    event = Event(EventKind.START, invite or "")
                erased = await self._apply(tx, case, event, ctx, update_id)
                if update_id is not None:
                    await tx.mark_update(update_id, patient.chat_id)
        if locked_file is not None:
            await self._try_password(patient, case_id, locked_file, event.arg, update_id, who)
            return
        for erased_id in erased:  # the key is gone; now remove blobs and rows
            await self._erasure.finish(erased_id)

    async def _try_password(
        self,
        patient: Patient,
        case_id: str,
        file_id: str,
        password: str,
        update_id: int | None,
        who: Identity | None,
    ) -> None:
        """Open the protected PDF with the typed text (in a worker), then let the engine judge.

        The password is kept only encrypted with the case, beside the file it opens.
        """
        ctx = self._context()
        unlocked = await self._ingest.unlock(case_id, file_id, password.strip(), who)
        async with self._store.transaction() as tx:
            if await self._already_handled(tx, patient, update_id):
                return
            case = await self._case(tx, patient, ctx)
            if unlocked is not None:
                await tx.unlock_file(case.id, unlocked, password.strip())
            ref = unlocked.ref if unlocked is not None else None
            await self._apply(tx, case, Event(EventKind.UNLOCK_TRIED, file=ref), ctx)
            if update_id is not None:
                await tx.mark_update(update_id, patient.chat_id)

    async def send_reminders(self, policy: ReminderPolicy) -> int:
        """Queue the reminders due now (each at most once: its dedup key names the case, the
        reminder's number and the step it follows); returns how many."""
        ctx = self._context()
        sent = 0
        waiting = await self._store.waiting_cases(ctx.now - policy.earliest, len(policy.days))
        for chat_id in waiting:
            async with self._store.transaction() as tx:
                case = await tx.load_case(chat_id)
                if case is None or not reminders.due(case, policy, ctx.now):
                    continue
                assert case.active_at is not None
                case.reminders_sent += 1
                key = f"reminder:{case.id}:{case.reminders_sent}:{case.active_at.isoformat()}"
                await tx.enqueue(case.chat_id, case.locale, reminders.reminder(case, ctx), key)
                await tx.save_case(case)
                sent += 1
        return sent

    async def erase_expired(self, retention_days: int) -> int:
        """Erase, as /delete would, complete cases closed more than `retention_days` ago and
        cases never completed whose last step is that old, their patients told some days
        before (any step keeps the case); each patient is told why. Up to ERASE_TOGETHER
        cases a transaction, with one summary to the coordinators naming them: a message
        per case would flood their chat the day the rule first erases many (Telegram lets a
        group receive 20 a minute)."""
        ctx = self._context()
        cutoff = ctx.now - timedelta(days=retention_days)
        notice_days = min(RETENTION_NOTICE_DAYS, retention_days // 2)
        await self._announce_erasures(retention_days, notice_days, ctx)
        expired = await self._erasure.expired_cases(retention_days, notice_days, ctx.now)
        erased = 0
        for start in range(0, len(expired), ERASE_TOGETHER):
            done: list[str] = []
            async with self._store.transaction() as tx:
                for case_id, chat_id in expired[start : start + ERASE_TOGETHER]:
                    case = await tx.load_case(chat_id)
                    if case is None or case.id != case_id or case.state is State.ERASED:
                        continue
                    # Checked again: a step since the cases were listed keeps a case given
                    # up, and completing it starts the period of a closed case afresh.
                    if case.state is State.COMPLETE:
                        if case.completed_at is None or case.completed_at >= cutoff:
                            continue
                        told = Text("retention.erased")
                    elif case.active_at is None or case.active_at < cutoff:
                        told = Text("retention.erased_inactive")
                    else:
                        continue
                    await tx.erase_case(case.id, None)
                    await tx.enqueue(chat_id, case.locale, reply(told))
                    done.append(case.id)
                    log.info("retention erases case=%s", case.id)
                if done and self._coordinator.chat_id is not None:
                    summary = Text(
                        "coordinator.retention_erased",
                        {"count": len(done), "case_ids": Verbatim(", ".join(done))},
                    )
                    await tx.enqueue(
                        self._coordinator.chat_id,
                        self._coordinator.locale,
                        reply(summary),
                        dedup_key=f"retention-erased:{done[0]}",
                    )
            for case_id in done:  # the keys are gone; now remove blobs and rows
                await self._erasure.finish(case_id)
            erased += len(done)
        return erased

    async def _announce_erasures(self, retention_days: int, notice_days: int, ctx: Context) -> None:
        """Tell the patients of cases given up that theirs will be erased in `notice_days`
        unless they go on (once per last step: a step, then giving up again, is told anew)."""
        due_before = ctx.now - timedelta(days=retention_days - notice_days)
        for case_id, chat_id in await self._erasure.cases_to_notify(
            retention_days, notice_days, ctx.now
        ):
            async with self._store.transaction() as tx:
                case = await tx.load_case(chat_id)
                if case is None or case.id != case_id:
                    continue
                if case.state in (State.COMPLETE, State.ERASED):
                    continue
                if case.active_at is not None and case.active_at >= due_before:
                    continue  # a step since the cases were listed
                notice = Text("retention.notice_inactive", {"days": notice_days})
                await tx.enqueue(chat_id, case.locale, reply(notice))
                await tx.note_retention_notice(case.id, ctx.now)
                log.info("retention notice case=%s", case.id)

    async def handle_file(
        self,
        patient: Patient,
        incoming: IncomingFile,
        source: FileSource,
        update_id: int | None,
        item_key: str | None = None,
    ) -> None:
        """Store and check a file for the current item, then let the engine judge it.

        `item_key` binds the file to an item (a web upload opened for that item): if the item
        is still open it becomes the current one first. Without an update id (a web upload),
        the same `unique_id` twice is answered as a duplicate, so a retry changes nothing.

        The file is streamed into the vault before the transaction that records it, so the
        row never points at a blob that is not durable; a crash in between leaves only a blob
        that the retried update overwrites under the same id.
        """
        ctx = self._context()
        async with self._store.transaction() as tx:
            if await self._already_handled(tx, patient, update_id):
                return
            case = await self._case(tx, patient, ctx)
            engine.focus(case, item_key)
            target = engine.upload_target(case, ctx)
            duplicate = target is not None and (
                await tx.find_file(case.id, incoming.unique_id, None) is not None
            )
            if target is None or duplicate:
                await self._apply(tx, case, Event(EventKind.FILE, duplicate=duplicate), ctx)
                if update_id is not None:
                    await tx.mark_update(update_id, patient.chat_id)
                return
            case_id, item_key, who = case.id, target.key, case.identity
        stored = await self._ingest.ingest(case_id, incoming, source, who)
        recorded = False
        async with self._store.transaction() as tx:
            if await self._already_handled(tx, patient, update_id):
                return
            case = await self._case(tx, patient, ctx)
            engine.focus(case, item_key)
            same_content = await tx.find_file(case.id, incoming.unique_id, stored.sha256)
            if case.current_item != item_key or same_content is not None:
                await self._apply(tx, case, Event(EventKind.FILE, duplicate=True), ctx)
            else:
                await tx.add_file(case, item_key, incoming, stored)
                await self._apply(tx, case, Event(EventKind.FILE, file=stored.ref), ctx)
                recorded = True
                await self._forget_upload(tx, patient, incoming)
            if not recorded:  # the same bytes under another Telegram id: keep one copy only
                # Before the commit: a crash here leaves the update to retry, never an orphan.
                await self._ingest.discard(stored)
            if update_id is not None:
                await tx.mark_update(update_id, patient.chat_id)

    async def handle_album(
        self,
        patient: Patient,
        files: Sequence[tuple[IncomingFile, int | None]],
        source: FileSource,
    ) -> None:
        """Several files sent together (a Telegram album): stored and checked one by one,
        recorded in one transaction, answered with one message."""
        ctx = self._context()
        async with self._store.transaction() as tx:
            fresh = [
                (incoming, update_id)
                for incoming, update_id in files
                if not await self._already_handled(tx, patient, update_id)
            ]
            if not fresh:
                return
            case = await self._case(tx, patient, ctx)
            wanted = engine.upload_target(case, ctx) is not None
            case_id, who = case.id, case.identity
            known = {
                incoming.unique_id
                for incoming, _ in fresh
                if await tx.find_file(case.id, incoming.unique_id, None) is not None
            }
        stored: list[tuple[IncomingFile, StoredFile | None]] = []
        for incoming, _ in fresh:
            if not wanted or incoming.unique_id in known:
                stored.append((incoming, None))
            else:
                stored.append((incoming, await self._ingest.ingest(case_id, incoming, source, who)))
        discard: list[StoredFile] = []
        async with self._store.transaction() as tx:
            if await self._already_handled(tx, patient, fresh[0][1]):
                return
            case = await self._case(tx, patient, ctx)
            replies: list[Reply] = []
            events: list[DomainEvent] = []
            before = engine.card_state(case)
            for incoming, file in stored:
                target = engine.upload_target(case, ctx)
                duplicate = file is None and wanted
                if file is not None and (
                    target is None or await tx.find_file(case.id, incoming.unique_id, file.sha256)
                ):
                    discard.append(file)
                    file, duplicate = None, target is not None
                if file is not None and target is not None:
                    await tx.add_file(case, target.key, incoming, file)
                    await self._forget_upload(tx, patient, incoming)
                event = Event(EventKind.FILE, file=file.ref if file else None, duplicate=duplicate)
                outcome = engine.handle(case, event, ctx)
                replies += outcome.replies
                events += outcome.events
            await tx.save_case(case)
            await tx.enqueue(case.chat_id, case.locale, merge_album_replies(replies))
            await queue_card(tx, case, ctx, before)
            for domain_event in events:
                await self._notify(tx, case, domain_event, ctx)
            for _, update_id in fresh:
                if update_id is not None:
                    await tx.mark_update(update_id, patient.chat_id)
            for file in discard:  # before the commit, as in handle_file
                await self._ingest.discard(file)

    async def _offer_upload_page(
        self, tx: Transaction, case: Case, event: UploadLinkWanted, web: WebUploads
    ) -> None:
        """The one-time link to the upload page for the item, sealed in the outbox (the
        link opens the upload: it must not sit in the database in clear)."""
        token = await tx.open_upload(case.id, event.item_key, case.chat_id, web.link_ttl)
        if token is None:
            return
        buttons = [(Button(Text("button.open_upload_page"), "", link=web.link(token)),)]
        mini_app = web.mini_app(case.id)
        if mini_app is not None:
            label = Text("button.open_upload_in_telegram")
            buttons.append((Button(label, "", link=mini_app, mini_app=True),))
        hours = int(web.link_ttl.total_seconds() // 3600)
        why = Text("upload.too_big") if event.too_big else Text("upload.large_files")
        message = reply(why, Text("upload.how", {"hours": hours}), buttons=tuple(buttons))
        await tx.enqueue(case.chat_id, case.locale, message, sealed=True)

    async def _forget_upload(
        self, tx: Transaction, patient: Patient, incoming: IncomingFile
    ) -> None:
        if self._delete_uploads and incoming.message_id is not None:
            await tx.enqueue_deletion(patient.chat_id, incoming.message_id)

    async def _already_handled(
        self, tx: Transaction, patient: Patient, update_id: int | None
    ) -> bool:
        """A replayed update, or one from before the chat's case was erased: ignore it."""
        if update_id is None:
            return False
        if await tx.update_seen(update_id):
            return True
        if await tx.erased_before(patient.chat_id, update_id):
            await tx.mark_update(update_id, None)
            return True
        return False

    async def _apply(
        self, tx: Transaction, case: Case, event: Event, ctx: Context, update_id: int | None = None
    ) -> list[str]:
        """Apply the event; returns the ids of cases it crypto-erased (finished after commit)."""
        erased: list[str] = []
        before = engine.card_state(case)
        outcome = engine.handle(case, event, ctx)
        await tx.save_case(case)
        await queue_card(tx, case, ctx, before)
        for message in merge_replies(outcome.replies):
            await tx.enqueue(case.chat_id, case.locale, message)
        for domain_event in outcome.events:
            await self._notify(tx, case, domain_event, ctx)
            if isinstance(domain_event, ErasureRequested):
                await tx.erase_case(case.id, update_id)
                erased.append(case.id)
        return erased

    async def _notify(self, tx: Transaction, case: Case, event: DomainEvent, ctx: Context) -> None:
        log.info("event %s case=%s", type(event).__name__, case.id)
        if isinstance(event, UploadLinkWanted) and self._web is not None:
            await self._offer_upload_page(tx, case, event, self._web)
        if isinstance(event, ErasureRequested) and self._coordinator.chat_id is not None:
            await tx.enqueue(
                self._coordinator.chat_id,
                self._coordinator.locale,
                reply(Text("coordinator.case_erased", {"case_id": Verbatim(case.id)})),
                dedup_key=f"case-erased:{case.id}",
            )
        if isinstance(event, CaseCompleted) and self._coordinator.chat_id is not None:
            await tx.enqueue(
                self._coordinator.chat_id,
                self._coordinator.locale,
                case_ready_alert(case, ctx, self._coordinator.sign),
                dedup_key=f"case-complete:{case.id}:{event.completion}",
                sealed=True,  # it names the patient
            )


async def queue_card(tx: Transaction, case: Case, ctx: Context, before: tuple[object, ...]) -> None:
    """Edit the patient's checklist card when what it shows changed (queued after the
    replies of the step; the outbox keeps only the newest version of a card)."""
    if engine.shows_card(case) and engine.card_state(case) != before:
        await tx.enqueue_card(
            case.chat_id, case.locale, engine.status_reply(case, ctx, "card.header")
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


def merge_album_replies(replies: list[Reply]) -> Reply:
    """One answer for an album: every part once (repeated acknowledgements collapse to the
    last, which carries the final count), and the buttons of the last reply."""
    parts: list[Text | Lines] = []
    for message in replies:
        for part in message.parts:
            previous = parts[-1] if parts else None
            if isinstance(part, Text) and isinstance(previous, Text) and part.key == previous.key:
                parts[-1] = part
                continue
            parts.append(part)
    buttons = next((r.buttons for r in reversed(replies) if r.buttons), ())
    return Reply(tuple(parts), buttons)
