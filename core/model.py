"""The case: one patient's collection of records against one checklist."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date, datetime
from enum import StrEnum

from core.replies import Text


class State(StrEnum):
    """Where the conversation stands. Transitions: `core.engine.TRANSITIONS`."""

    NEW = "new"
    CONSENT = "consent"
    PROCEDURE = "procedure"
    # Who the patient is, asked once so the coordinator can see records of someone else:
    NAME = "name"  # full name as on the passport
    BIRTH_DATE = "birth_date"
    COLLECTING = "collecting"
    COMPLETE = "complete"
    ERASED = "erased"  # the patient asked to delete everything; the service crypto-erases it


class ItemStatus(StrEnum):
    PENDING = "pending"  # nothing yet
    RECEIVED = "received"  # some files in, the patient may send more
    DONE = "done"  # accepted files or an answer
    SKIPPED = "skipped"  # optional item the patient skipped
    DONT_HAVE = "dont_have"  # the patient says they do not have it; the coordinator sees it
    SENT_BACK = "sent_back"  # the coordinator asked for it again; open until new files come

    @property
    def is_open(self) -> bool:
        return self in (ItemStatus.PENDING, ItemStatus.RECEIVED, ItemStatus.SENT_BACK)


@dataclass(frozen=True)
class Identity:
    """Who the patient says they are; records are checked against it (core.identity)."""

    name: str
    birth_date: date | None


@dataclass(frozen=True)
class FileRef:
    """A stored file as the core sees it: ids and the verdict, never the bytes."""

    file_id: str
    kind: str  # intake.Kind value, judged by content
    status: str  # intake.Status value: accepted, noted or rejected
    notes: tuple[Text, ...] = ()  # what the patient should hear about this file
    retakeable: bool = False  # rejected for legibility: a retake may fix it
    needs_password: bool = False  # a protected PDF: the patient may type its password
    language: str | None = None  # detected from the document's text (PDF, office)
    flags: tuple[str, ...] = ()  # what the coordinator must see, e.g. "active_content"


@dataclass
class ItemProgress:
    key: str
    status: ItemStatus = ItemStatus.PENDING
    files: list[FileRef] = field(default_factory=list)
    answer: str | None = None
    rejected_uploads: int = 0
    # The coordinator's review: "accepted", or the code of the reason it was sent back
    # (core.review.REASONS, or "other" for a typed reason). None until reviewed.
    review: str | None = None
    translation: str | None = None  # "ordered", then "attached" (core.review)


@dataclass
class Case:
    id: str
    chat_id: int
    locale: str
    state: State = State.NEW
    checklist_key: str | None = None
    current_item: str | None = None
    consent_version: str | None = None
    consent_at: datetime | None = None
    completed_at: datetime | None = None
    completions: int = 0  # how many times the case became complete (one alert each)
    password_file: str | None = None  # a protected PDF of the current item awaiting its password
    patient_name: str | None = None  # as the patient typed it; stored encrypted
    birth_date: date | None = None  # stored encrypted
    active_at: datetime | None = None  # the last step of the conversation (reminders count from it)
    reminders_sent: int = 0  # since active_at
    reminders_paused: bool = False  # the patient asked for no more reminders
    # Records the coordinator asked for beyond the checklist: item key -> their description.
    extras: dict[str, str] = field(default_factory=dict)
    items: dict[str, ItemProgress] = field(default_factory=dict)

    @property
    def identity(self) -> Identity | None:
        return Identity(self.patient_name, self.birth_date) if self.patient_name else None

    def progress(self, key: str) -> ItemProgress:
        return self.items.setdefault(key, ItemProgress(key))
