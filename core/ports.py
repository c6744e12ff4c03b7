"""What the core needs from the outside world, as protocols the adapters implement."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Protocol

from core.model import Case, FileRef
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


@dataclass(frozen=True)
class StoredFile:
    """A file after it was streamed into the vault and checked."""

    ref: FileRef
    blob_id: str
    sha256: str
    size: int
    verdict: dict[str, object]  # intake.Verdict.to_dict(), kept for the coordinator


class Transaction(Protocol):
    """One atomic unit of work. Write transactions serialise per case."""

    async def update_seen(self, update_id: int) -> bool: ...
    async def mark_update(self, update_id: int, chat_id: int | None) -> None: ...
    async def load_case(self, chat_id: int) -> Case | None: ...
    async def create_case(self, patient: Patient, locale: str) -> Case: ...
    async def save_case(self, case: Case) -> None: ...
    async def find_file(self, case_id: str, unique_id: str, sha256: str | None) -> str | None: ...
    async def add_file(
        self, case: Case, item_key: str, incoming: IncomingFile, stored: StoredFile
    ) -> None: ...
    async def take_invite(self, code: str, case_id: str) -> str | None: ...
    async def enqueue(
        self, chat_id: int, locale: str, reply: Reply, dedup_key: str | None = None
    ) -> None: ...


class Store(Protocol):
    def transaction(self) -> AbstractAsyncContextManager[Transaction]: ...


class FileIngest(Protocol):
    """Streams a file into the vault under the case's key and checks it."""

    async def ingest(
        self, case_id: str, incoming: IncomingFile, source: FileSource
    ) -> StoredFile: ...

    async def discard(self, stored: StoredFile) -> None:
        """Remove a blob that turned out to duplicate one already recorded."""


class FileSource(Protocol):
    """Yields the bytes of an incoming file in chunks, never all at once."""

    def chunks(self, incoming: IncomingFile) -> AsyncIterator[bytes]: ...
