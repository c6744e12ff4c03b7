"""The SQL implementation of the core's `Store` and `Transaction` ports."""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

from sqlalchemy import delete, or_
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from adapters import audit
from adapters.database import POOL_CONNECTIONS, Gate
from adapters.keyring import KeyRing
from adapters.tables import (
    CardRow,
    CaseRow,
    ErasureRow,
    FileMemberRow,
    FileRow,
    InboxRow,
    InviteRow,
    ItemRow,
    OutboxRow,
    UploadSessionRow,
)
from core.model import Case, FileRef, ItemProgress, ItemStatus, State
from core.ports import IncomingFile, Patient, StoredFile
from core.replies import Reply, Text

CARD_PREFIX = '{"card"'  # how an outbox row holding the checklist card begins
CARD_QUIET_S = 2.0  # a card waits for this much quiet in its chat (see enqueue_card)
MARKED_KEPT = 4096  # see SqlStore._marked: far more than the updates in work at once
# Handled updates and finished messages are kept this long, then deleted (prune_handled):
# a done inbox row is what makes an update Telegram delivers again a no-op, and Telegram
# keeps an unconfirmed update for 24 hours at most; a sent or failed outbox row (its text
# scrubbed already) is what an operator may ask about, and what a restart's rate windows
# read for the last minute. Without this both tables grew by every update and message.
INBOX_KEEP = timedelta(days=7)
OUTBOX_KEEP = timedelta(days=30)
PRUNE_BATCH = 5000  # rows per transaction: the write lock is held for one batch at a time


def utcnow() -> datetime:
    return datetime.now(UTC)


def aware(moment: datetime) -> datetime:
    """SQLite hands datetimes back without a zone; they were written in UTC."""
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def token_hash(token: str) -> str:
    """How an upload link's token is stored: only its hash (a database leak opens nothing)."""
    return hashlib.sha256(token.encode()).hexdigest()


def new_id() -> str:
    """Random, unguessable id (128 bits) for cases and files."""
    return secrets.token_hex(16)


def _date(value: str | None) -> date | None:
    return None if value is None else date.fromisoformat(value)


def _file_to_json(ref: FileRef) -> dict[str, Any]:
    return {
        "file_id": ref.file_id,
        "kind": ref.kind,
        "status": ref.status,
        "notes": [n.to_dict() for n in ref.notes],
        "retakeable": ref.retakeable,
        "language": ref.language,
        "flags": list(ref.flags),
    }


def _extras_json(extras: dict[str, Any]) -> str | None:
    return json.dumps(extras, ensure_ascii=False) if extras else None


def file_from_json(data: dict[str, Any]) -> FileRef:
    return FileRef(
        data["file_id"],
        data["kind"],
        data["status"],
        tuple(Text.from_dict(n) for n in data.get("notes", ())),
        data.get("retakeable", False),
        language=data.get("language"),
        flags=tuple(data.get("flags", ())),
    )


@dataclass
class _Loaded:
    """A case as read in this transaction: its item rows, and the plaintext of its sealed
    fields, so that saving it rewrites only what changed (sealing a field again gives new
    ciphertext, hence a row update, even when its value is the same)."""

    items: dict[str, ItemRow] | None  # None: not read yet
    plain: dict[str, str | None]  # "patient-name", "birth-date", "extras", "answer/<item>"


@dataclass
class SqlTransaction:
    session: AsyncSession
    keys: KeyRing
    for_update: bool
    _loaded: dict[str, _Loaded] = field(default_factory=dict)
    # Rows read here that are written again later in the transaction: the session's
    # identity map holds rows only weakly, and a row dropped from it is read again.
    _kept: list[Any] = field(default_factory=list)
    marked: list[int] = field(default_factory=list)  # updates this transaction marks done

    async def update_seen(self, update_id: int) -> bool:
        # Several instances (adapters.cluster): on PostgreSQL the inbox row is locked until
        # this transaction ends, so two instances applying the same update at once are
        # serialised here: the second waits, then reads the first's "done" and does nothing.
        # (SQLite's BEGIN IMMEDIATE already lets one writer in at a time.)
        row = await self.session.get(InboxRow, update_id, with_for_update=self.for_update)
        self._kept.append(row)  # mark_update writes it
        return row is not None and row.status == "done"

    async def mark_update(self, update_id: int, chat_id: int | None) -> None:
        row = await self.session.get(InboxRow, update_id)
        now = utcnow()
        if row is None:  # the shell and direct calls have no inbox row: record the id anyway
            row = InboxRow(update_id=update_id, chat_id=chat_id, received_at=now)
        row.status, row.done_at, row.payload_enc, row.error = "done", now, None, None
        self.session.add(row)
        self.marked.append(update_id)

    async def load_case(self, chat_id: int) -> Case | None:
        query = select(CaseRow).where(CaseRow.chat_id == chat_id)
        if self.for_update:
            query = query.with_for_update()
        row = (await self.session.exec(query)).first()
        if row is None:
            return None
        self._kept.append(row)  # save_case writes it
        items = (await self.session.exec(select(ItemRow).where(ItemRow.case_id == row.id))).all()
        case = Case(
            id=row.id,
            chat_id=row.chat_id,
            locale=row.locale,
            state=State(row.state),
            checklist_key=row.checklist_key,
            current_item=row.current_item,
            consent_version=row.consent_version,
            consent_at=row.consent_at,
            completed_at=row.completed_at,
            completions=row.completions,
            password_file=row.password_file,
            patient_name=self._decrypt(row, row.patient_name_enc, "patient-name"),
            birth_date=_date(self._decrypt(row, row.birth_date_enc, "birth-date")),
            active_at=row.active_at,
            reminders_sent=row.reminders_sent,
            reminders_paused=row.reminders_paused,
            extras=json.loads(self._decrypt(row, row.extras_enc, "extras") or "{}"),
        )
        loaded = _Loaded(
            {item.item_key: item for item in items},
            {
                "patient-name": case.patient_name,
                "birth-date": case.birth_date.isoformat() if case.birth_date else None,
                "extras": _extras_json(case.extras),
            },
        )
        self._loaded[row.id] = loaded
        for item in items:
            answer = None
            if item.answer_enc is not None:
                answer = self.keys.decrypt_field(row.id, row.wrapped_key, item.answer_enc, "answer")
            loaded.plain[f"answer/{item.item_key}"] = answer
            case.items[item.item_key] = ItemProgress(
                key=item.item_key,
                status=ItemStatus(item.status),
                files=[file_from_json(f) for f in json.loads(item.files_json)],
                answer=answer,
                rejected_uploads=item.rejected_uploads,
                review=item.review,
                translation=item.translation,
            )
        return case

    def _decrypt(self, row: CaseRow, token: str | None, field: str) -> str | None:
        return (
            None
            if token is None
            else self.keys.decrypt_field(row.id, row.wrapped_key, token, field)
        )

    def _encrypt(self, row: CaseRow, value: str | None, field: str) -> str | None:
        return (
            None
            if value is None
            else self.keys.encrypt_field(row.id, row.wrapped_key, value, field)
        )

    async def create_case(self, patient: Patient, locale: str) -> Case:
        now = utcnow()
        case_id = new_id()
        row = CaseRow(
            id=case_id,
            chat_id=patient.chat_id,
            user_id=patient.user_id,
            locale=locale,
            state=State.NEW.value,
            wrapped_key=self.keys.new_wrapped_key(case_id),
            created_at=now,
            updated_at=now,
        )
        self.session.add(row)
        await self.session.flush()
        return Case(id=case_id, chat_id=patient.chat_id, locale=locale)

    async def save_case(self, case: Case) -> None:
        row = await self.session.get(CaseRow, case.id)
        assert row is not None, "saving a case that was never created"
        loaded = self._loaded.setdefault(case.id, _Loaded(None, {}))
        if loaded.items is None:  # created in this transaction, or saved without being loaded
            query = select(ItemRow).where(ItemRow.case_id == case.id)
            loaded.items = {item.item_key: item for item in (await self.session.exec(query))}
        items = loaded.items

        def seal(token: str | None, value: str | None, slot: str, field: str) -> str | None:
            if slot in loaded.plain and loaded.plain[slot] == value:
                return token  # unchanged: keep the ciphertext, and the row as it is
            loaded.plain[slot] = value
            return self._encrypt(row, value, field)

        row.locale = case.locale
        row.state = case.state.value
        row.checklist_key = case.checklist_key
        row.current_item = case.current_item
        row.consent_version = case.consent_version
        row.consent_at = case.consent_at
        row.completed_at = case.completed_at
        row.completions = case.completions
        row.password_file = case.password_file
        row.patient_name_enc = seal(
            row.patient_name_enc, case.patient_name, "patient-name", "patient-name"
        )
        birth = case.birth_date.isoformat() if case.birth_date else None
        row.birth_date_enc = seal(row.birth_date_enc, birth, "birth-date", "birth-date")
        row.active_at = case.active_at
        row.reminders_sent = case.reminders_sent
        row.reminders_paused = case.reminders_paused
        row.extras_enc = seal(row.extras_enc, _extras_json(case.extras), "extras", "extras")
        row.updated_at = utcnow()
        self.session.add(row)
        for key in set(items) - set(case.items):
            await self.session.delete(items.pop(key))
        for key, progress in case.items.items():
            item = items.get(key)
            if item is None:
                item = items[key] = ItemRow(case_id=case.id, item_key=key, status="")
            item.status = progress.status.value
            item.files_json = json.dumps([_file_to_json(f) for f in progress.files])
            item.rejected_uploads = progress.rejected_uploads
            item.review = progress.review
            item.translation = progress.translation
            item.answer_enc = seal(item.answer_enc, progress.answer, f"answer/{key}", "answer")
            self.session.add(item)

    async def find_file(self, case_id: str, unique_id: str, sha256: str | None) -> str | None:
        match = col(FileRow.unique_id) == unique_id
        if sha256 is not None:
            match = or_(match, col(FileRow.sha256) == sha256)
        query = select(FileRow.id).where(FileRow.case_id == case_id, match)
        return (await self.session.exec(query)).first()

    async def add_file(
        self,
        case: Case,
        item_key: str,
        incoming: IncomingFile,
        stored: StoredFile,
        role: str | None = None,
    ) -> None:
        row = await self.session.get(CaseRow, case.id)
        assert row is not None
        name_enc = (
            self.keys.encrypt_field(case.id, row.wrapped_key, incoming.name, "file-name")
            if incoming.name
            else None
        )
        self.session.add(
            FileRow(
                id=stored.ref.file_id,
                case_id=case.id,
                item_key=item_key,
                unique_id=incoming.unique_id,
                sha256=stored.sha256,
                blob_id=stored.blob_id,
                size=stored.size,
                kind=stored.ref.kind,
                status=stored.ref.status,
                verdict_enc=self.keys.encrypt_field(
                    case.id, row.wrapped_key, json.dumps(stored.verdict), "verdict"
                ),
                name_enc=name_enc,
                mime=incoming.mime,
                created_at=utcnow(),
                role=role,
            )
        )
        await self.session.flush()  # the members point at the file row
        for member in stored.members:
            self.session.add(
                FileMemberRow(
                    id=member.member_id,
                    file_id=stored.ref.file_id,
                    case_id=case.id,
                    blob_id=member.blob_id,
                    kind=member.kind,
                    size=member.size,
                    sha256=member.sha256,
                    name_enc=self.keys.encrypt_field(
                        case.id, row.wrapped_key, member.name, "member-name"
                    ),
                )
            )

    async def unlock_file(self, case_id: str, stored: StoredFile, password: str) -> None:
        """Record that a typed password opens the file: new verdict, password kept encrypted."""
        case = await self.session.get(CaseRow, case_id)
        row = await self.session.get(FileRow, stored.ref.file_id)
        assert case is not None and row is not None and row.case_id == case_id
        row.status, row.kind = stored.ref.status, stored.ref.kind
        row.verdict_enc = self.keys.encrypt_field(
            case_id, case.wrapped_key, json.dumps(stored.verdict), "verdict"
        )
        row.password_enc = self.keys.encrypt_field(case_id, case.wrapped_key, password, "password")
        self.session.add(row)

    async def erased_before(self, chat_id: int, update_id: int) -> bool:
        """True when this update predates an erasure of the chat's case (a late duplicate)."""
        query = select(ErasureRow.chat_hash).where(
            ErasureRow.chat_hash == self.keys.chat_hash(chat_id),
            col(ErasureRow.up_to_update_id) >= update_id,
        )
        return (await self.session.exec(query)).first() is not None

    async def note_retention_notice(self, case_id: str, at: datetime) -> None:
        """The case's patient was told the retention rule will erase it (not a change of the
        case: its updated_at, which stands for the last step of a case from before steps
        were timed, stays)."""
        row = await self.session.get(CaseRow, case_id)
        assert row is not None, "a notice for a case that does not exist"
        row.retention_notice_at = at
        self.session.add(row)

    async def erase_case(
        self, case_id: str, up_to_update_id: int | None, *, operator: str = ""
    ) -> None:
        """Crypto-erase: destroy the case key and every readable field, leave a tombstone.

        After this commit nothing of the case can be decrypted; `adapters.erasure` then
        removes the blobs and the remaining rows (and resumes that after a crash).
        `operator`: an operator's tool erases it, for this reason (the audit's detail).
        """
        row = await self.session.get(CaseRow, case_id)
        if row is None:
            return
        row.wrapped_key, row.state = b"", "erased"
        row.checklist_key = row.current_item = row.password_file = None
        row.patient_name_enc = row.birth_date_enc = row.extras_enc = None
        self.session.add(row)
        card = await self.session.get(CardRow, row.chat_id)
        if card is not None:  # which message in the chat was the card: gone with the case
            await self.session.delete(card)
        for item in (
            await self.session.exec(select(ItemRow).where(ItemRow.case_id == case_id))
        ).all():
            await self.session.delete(item)
        for file in (
            await self.session.exec(select(FileRow).where(FileRow.case_id == case_id))
        ).all():
            file.name_enc = file.password_enc = None
            file.verdict_enc, file.unique_id, file.sha256 = "", file.id, ""
            self.session.add(file)
        members = select(FileMemberRow).where(FileMemberRow.case_id == case_id)
        for member in (await self.session.exec(members)).all():
            member.name_enc, member.sha256 = None, ""
            self.session.add(member)
        # The chat's updates given up on (parked, see bot.inbox) hold what the patient sent,
        # encrypted with the inbox's key, not the case's: they go now.
        await self.session.exec(
            delete(InboxRow).where(
                col(InboxRow.chat_id) == row.chat_id, col(InboxRow.status) == "parked"
            )
        )
        # One tombstone per chat and update: the chat's earlier case may have left this one
        # (erasures by the retention rule all stand "up to update 0"): it is renewed.
        chat_hash, up_to = self.keys.chat_hash(row.chat_id), up_to_update_id or 0
        now = utcnow()
        tombstone = await self.session.get(ErasureRow, (chat_hash, up_to)) or ErasureRow(
            chat_hash=chat_hash, up_to_update_id=up_to, erased_at=now
        )
        tombstone.erased_at = now
        self.session.add(tombstone)
        # The audit keeps only that an erasure happened, and who asked (the patient, the
        # retention rule, or an operator's tool, and why); nothing of what was erased.
        actor = "patient" if up_to_update_id is not None else "system"
        await audit.append(
            self.session, "operator" if operator else actor, "case.erase", case_id, operator
        )
        self.keys.forget(case_id)

    async def take_invite(self, code: str, case_id: str) -> str | None:
        """The invite's procedure, binding the invite to this case on first use only."""
        invite = await self.session.get(InviteRow, code[:64])
        if invite is None:
            return None
        if invite.case_id is None:
            invite.case_id, invite.used_at = case_id, utcnow()
            self.session.add(invite)
        elif invite.case_id != case_id:
            return None  # an invite binds once: someone else's link gives nothing
        return invite.procedure

    async def enqueue(
        self,
        chat_id: int,
        locale: str,
        reply: Reply,
        dedup_key: str | None = None,
        *,
        sealed: bool = False,
    ) -> None:
        """Queue a message; `sealed` keeps it encrypted until sent (and scrubbed after)."""
        if dedup_key is not None:
            taken = await self.session.exec(
                select(OutboxRow.id).where(OutboxRow.dedup_key == dedup_key)
            )
            if taken.first() is not None:
                return  # this event was already announced: never twice
        self.session.add(
            OutboxRow(
                chat_id=chat_id,
                locale=locale,
                payload=self._payload(reply, sealed),
                dedup_key=dedup_key,
                created_at=utcnow(),
            )
        )

    def _payload(self, reply: Reply, sealed: bool) -> str:
        text = json.dumps(reply.to_dict(), ensure_ascii=False)
        return json.dumps({"sealed": self.keys.seal_outgoing(text)}) if sealed else text

    async def open_upload(
        self, case_id: str, item_key: str, chat_id: int, ttl: timedelta
    ) -> str | None:
        """A web upload session for this case's item (adapters.uploads); the link's token,
        kept only hashed; None when the case is not this chat's or was erased."""
        case = await self.session.get(CaseRow, case_id)
        if case is None or case.chat_id != chat_id or not case.wrapped_key:
            return None
        token, now = secrets.token_urlsafe(32), utcnow()
        self.session.add(
            UploadSessionRow(
                id=new_id(),
                token_hash=token_hash(token),
                case_id=case_id,
                item_key=item_key,
                chat_id=chat_id,
                state="open",
                expires_at=now + ttl,
                created_at=now,
            )
        )
        return token

    async def enqueue_card(self, chat_id: int, locale: str, card: Reply) -> None:
        """One pending card per chat: a newer version replaces the one not yet sent.

        The card goes out once the chat has been quiet for CARD_QUIET_S (each newer version
        puts it off again): a patient answering step after step gets their replies at the
        chat's pace, and the card one edit when they pause, not one edit per step. The
        sender lets the chat's other messages pass a card that is not due yet.
        """
        payload = json.dumps({"card": card.to_dict()}, ensure_ascii=False)
        pending = await self.session.exec(
            select(OutboxRow).where(
                OutboxRow.chat_id == chat_id,
                OutboxRow.status == "pending",
                col(OutboxRow.payload).startswith(CARD_PREFIX),
            )
        )
        row = pending.first()
        now = utcnow()
        if row is None:
            row = OutboxRow(chat_id=chat_id, locale=locale, payload=payload, created_at=now)
        row.locale, row.payload = locale, payload
        row.next_attempt_at = now + timedelta(seconds=CARD_QUIET_S)
        self.session.add(row)

    async def enqueue_media(
        self, chat_id: int, locale: str, media: dict[str, Any], caption: Reply
    ) -> None:
        """Queue a picture made at send time (see adapters.media): only ids are stored."""
        payload = {"media": media, "caption": caption.to_dict()}
        self.session.add(
            OutboxRow(
                chat_id=chat_id,
                locale=locale,
                payload=json.dumps(payload, ensure_ascii=False),
                created_at=utcnow(),
            )
        )

    async def enqueue_deletion(self, chat_id: int, message_id: int) -> None:
        """Queue the removal of a chat message (a patient's upload, once stored and checked)."""
        self.session.add(
            OutboxRow(
                chat_id=chat_id,
                locale="",
                payload=json.dumps({"delete_message": message_id}),
                dedup_key=f"delete:{chat_id}:{message_id}",
                created_at=utcnow(),
            )
        )


class SqlStore:
    def __init__(
        self, engine: AsyncEngine, keys: KeyRing, read_engine: AsyncEngine | None = None
    ) -> None:
        self.engine = engine
        self.keys = keys
        # Reads that change nothing (what is pending, a case key, a listing) use this one, so
        # on SQLite they do not queue behind writers for the write lock.
        self.read_engine = read_engine or engine
        self._postgres = engine.dialect.name == "postgresql"
        # SQLite has one writer at a time: the others queue in this process, not in the
        # busy handler. PostgreSQL: as many sessions as the pool has connections.
        self._read_gate = Gate(POOL_CONNECTIONS)
        self._write_gate = Gate(1) if engine.dialect.name == "sqlite" else self._read_gate
        # Updates that transactions of this process marked done, committed (the newest
        # MARKED_KEPT): the inbox asks here before it reads the database.
        self._marked: dict[int, None] = {}

    @asynccontextmanager
    async def session(self) -> AsyncIterator[AsyncSession]:
        """A session in one transaction, committed on success and rolled back on error."""
        async with (
            self._write_gate(),
            AsyncSession(self.engine, expire_on_commit=False) as session,
            session.begin(),
        ):
            yield session

    @asynccontextmanager
    async def reader(self) -> AsyncIterator[AsyncSession]:
        """A read-only session (a consistent snapshot); it must not write."""
        async with (
            self._read_gate(),
            AsyncSession(self.read_engine, expire_on_commit=False) as session,
            session.begin(),
        ):
            yield session

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[SqlTransaction]:
        async with self.session() as session:
            tx = SqlTransaction(session, self.keys, for_update=self._postgres)
            yield tx
        # Committed (an error would have left at the yield).
        for update_id in tx.marked:
            self._marked[update_id] = None
        while len(self._marked) > MARKED_KEPT:
            del self._marked[next(iter(self._marked))]

    def marked_here(self, update_ids: list[int]) -> bool:
        """Whether a committed transaction of this process marked all these updates done
        (forgetting them: each is asked about once). False means "not known here", not
        "not done": another instance, or a mark older than the newest MARKED_KEPT."""
        if not all(update_id in self._marked for update_id in update_ids):
            return False
        for update_id in update_ids:
            del self._marked[update_id]
        return True

    def outbox_payload(self, row: OutboxRow) -> dict[str, Any]:
        """An outbox row's message as queued (sealed ones decrypted)."""
        payload: dict[str, Any] = json.loads(row.payload)
        if "sealed" in payload:
            return dict(json.loads(self.keys.unseal_outgoing(payload["sealed"])))
        return payload

    async def waiting_cases(self, active_before: datetime, max_sent: int) -> list[int]:
        async with self.reader() as session:
            rows = await session.exec(
                select(CaseRow.chat_id)
                .where(CaseRow.state == "collecting")
                .where(col(CaseRow.reminders_paused).is_(False))
                .where(col(CaseRow.reminders_sent) < max_sent)
                .where(col(CaseRow.active_at) < active_before)
            )
            return list(rows.all())

    async def create_invite(self, procedure: str) -> str:
        code = secrets.token_urlsafe(18)
        async with self.session() as session:
            session.add(InviteRow(code=code, procedure=procedure, created_at=utcnow()))
        return code

    async def prune_handled(self, now: datetime | None = None) -> tuple[int, int]:
        """Delete inbox rows done more than INBOX_KEEP ago and outbox rows sent or given up
        more than OUTBOX_KEEP ago, PRUNE_BATCH at a time; parked updates and messages still
        to send stay. Returns how many (inbox rows, outbox rows) went."""
        now = now or utcnow()
        inbox = select(InboxRow.update_id).where(
            InboxRow.status == "done", col(InboxRow.done_at) < now - INBOX_KEEP
        )
        outbox = select(OutboxRow.id).where(
            col(OutboxRow.status).in_(("sent", "failed")),
            col(OutboxRow.sent_at) < now - OUTBOX_KEEP,
        )
        return (
            await self._delete_batches(InboxRow, col(InboxRow.update_id), inbox),
            await self._delete_batches(OutboxRow, col(OutboxRow.id), outbox),
        )

    async def _delete_batches(self, table: Any, key: Any, chosen: Any) -> int:
        deleted = 0
        while True:
            async with self.session() as session:
                connection = await session.connection()
                batch = chosen.limit(PRUNE_BATCH).scalar_subquery()
                result = await connection.execute(delete(table).where(key.in_(batch)))
            deleted += result.rowcount
            if result.rowcount < PRUNE_BATCH:
                return deleted

    async def store_updates(self, updates: list[tuple[int, int | None, str]]) -> int:
        """Keep a batch of updates (id, chat, payload) durably in one commit, before they are
        confirmed to Telegram; ones already known are skipped. Returns how many were new."""
        if not updates:
            return 0
        try:
            return await self._store_batch(updates)
        except IntegrityError:  # another instance stored one of them meanwhile: one by one
            return sum([await self.store_update(*update) for update in updates])

    async def _store_batch(self, updates: list[tuple[int, int | None, str]]) -> int:
        async with self.session() as session:
            ids = [update_id for update_id, _, _ in updates]
            known = set(
                (
                    await session.exec(
                        select(InboxRow.update_id).where(col(InboxRow.update_id).in_(ids))
                    )
                ).all()
            )
            now = utcnow()
            fresh = [u for u in updates if u[0] not in known]
            for update_id, chat_id, payload in fresh:
                session.add(
                    InboxRow(
                        update_id=update_id,
                        chat_id=chat_id,
                        payload_enc=self.keys.encrypt_inbox(update_id, payload),
                        received_at=now,
                    )
                )
        return len(fresh)

    async def store_update(self, update_id: int, chat_id: int | None, payload: str) -> bool:
        """Keep an update durably before it is confirmed to Telegram; False if already known."""
        try:
            async with self.session() as session:
                if await session.get(InboxRow, update_id) is not None:
                    return False
                session.add(
                    InboxRow(
                        update_id=update_id,
                        chat_id=chat_id,
                        payload_enc=self.keys.encrypt_inbox(update_id, payload),
                        received_at=utcnow(),
                    )
                )
        except IntegrityError:
            return False
        return True
