"""What the core needs from the outside world, as protocols the adapters implement."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol

from core.model import Case, FileRef, Identity
from core.replies import Reply


@dataclass(frozen=True)
class Patient:
    """Who is writing: a chat and a person, as the channel reports them."""

    chat_id: int
    user_id: int
    language_code: str | None = None


@dataclass(frozen=True)
class IncomingFile:
    """A file offered by the channel; `unique_id` is stable across re-sends of the same file."""

    unique_id: str
    source_ref: str  # how the channel fetches it (Telegram file_id, or a path in the shell)
    name: str | None
    mime: str | None
    size: int | None
    compressed_photo: bool = False
    message_id: int | None = None  # the chat message carrying it (deleted after intake if set)


@dataclass(frozen=True)
class StoredMember:
    """A usable file unpacked from an uploaded ZIP into its own blob."""

    member_id: str
    blob_id: str
    name: str
    kind: str
    size: int
    sha256: str


@dataclass(frozen=True)
class StoredFile:
    """A file after it was streamed into the vault and checked."""

    ref: FileRef
    blob_id: str
    sha256: str
    size: int
    verdict: dict[str, object]  # intake.Verdict.to_dict(), kept for the coordinator
    members: tuple[StoredMember, ...] = ()  # for a ZIP: its usable files, each its own blob


class Transaction(Protocol):
    """One atomic unit of work. Write transactions serialise per case."""

    async def update_seen(self, update_id: int) -> bool: ...
    async def mark_update(self, update_id: int, chat_id: int | None) -> None: ...
    async def load_case(self, chat_id: int) -> Case | None: ...
    async def create_case(self, patient: Patient, locale: str) -> Case: ...
    async def save_case(self, case: Case) -> None: ...
    async def find_file(self, case_id: str, unique_id: str, sha256: str | None) -> str | None: ...
    async def add_file(
        self,
        case: Case,
        item_key: str,
        incoming: IncomingFile,
        stored: StoredFile,
        role: str | None = None,
    ) -> None: ...
    async def take_invite(self, code: str, case_id: str) -> str | None: ...
    async def unlock_file(self, case_id: str, stored: StoredFile, password: str) -> None: ...
    async def erased_before(self, chat_id: int, update_id: int) -> bool: ...
    async def enqueue_deletion(self, chat_id: int, message_id: int) -> None: ...
    async def erase_case(self, case_id: str, up_to_update_id: int | None) -> None: ...
    async def note_retention_notice(self, case_id: str, at: datetime) -> None: ...
    async def open_upload(
        self, case_id: str, item_key: str, chat_id: int, ttl: timedelta
    ) -> str | None:
        """A one-time upload session for the item; its token, or None for a foreign case."""
        ...

    async def enqueue_card(self, chat_id: int, locale: str, card: Reply) -> None:
        """Queue the newest version of the patient's checklist card (replacing a queued one)."""
        ...

    async def enqueue(
        self,
        chat_id: int,
        locale: str,
        reply: Reply,
        dedup_key: str | None = None,
        *,
        sealed: bool = False,
    ) -> None:
        """Queue a message in this transaction; `sealed` keeps it encrypted until sent."""
        ...


class Store(Protocol):
    def transaction(self) -> AbstractAsyncContextManager[Transaction]: ...

    async def waiting_cases(self, active_before: datetime, max_sent: int) -> list[int]:
        """Chats of collecting cases, not paused, idle since before `active_before`, with
        fewer than `max_sent` reminders: the candidates for a reminder."""
        ...


class FileIngest(Protocol):
    """Streams a file into the vault under the case's key and checks it."""

    async def ingest(
        self,
        case_id: str,
        incoming: IncomingFile,
        source: FileSource,
        identity: Identity | None = None,
    ) -> StoredFile:
        """Stream into the vault and check; records of someone other than `identity` are
        flagged "identity_mismatch" on the file."""
        ...

    async def discard(self, stored: StoredFile) -> None:
        """Remove a blob that turned out to duplicate one already recorded."""

    async def unlock(
        self, case_id: str, file_id: str, password: str, identity: Identity | None = None
    ) -> StoredFile | None:
        """Check a protected PDF again with a typed password; None if it does not open."""


class Erasure(Protocol):
    """Removes what is left of a crypto-erased case (blobs, rows); idempotent."""

    async def finish(self, case_id: str) -> None: ...

    async def expired_cases(
        self, retention_days: int, notice_days: int, now: datetime
    ) -> list[tuple[str, int]]: ...
    async def cases_to_notify(
        self, retention_days: int, notice_days: int, now: datetime
    ) -> list[tuple[str, int]]: ...


class FileSource(Protocol):
    """Yields the bytes of an incoming file in chunks, never all at once."""

    def chunks(self, incoming: IncomingFile) -> AsyncIterator[bytes]: ...
