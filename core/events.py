"""What comes into the engine (events) and what it announces (domain events)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from core.model import FileRef
from core.replies import Text, Verbatim


class EventKind(StrEnum):
    START = "start"  # /start, optionally with the procedure of an invite
    CHOOSE_LANGUAGE = "choose_language"
    LANGUAGE_MENU = "language_menu"  # /language
    AGREE = "agree"  # consent to the privacy notice
    DECLINE = "decline"
    CHOOSE_PROCEDURE = "choose_procedure"
    FILE = "file"  # a file already stored and checked; the engine sees its verdict
    TEXT = "text"
    DONE = "done"  # "done with this item"
    SKIP = "skip"  # skip an optional item
    DONT_HAVE = "dont_have"  # "I don't have this"
    STATUS = "status"
    HELP = "help"
    PRIVACY = "privacy"
    UNSUPPORTED = "unsupported"  # a sticker, voice note, location...: nothing we can use
    # A typed password was tried on the protected PDF (the event's file is set if it opened).
    UNLOCK_TRIED = "unlock_tried"
    DELETE_REQUEST = "delete_request"  # /delete, or withdrawing consent
    DELETE_CONFIRM = "delete_confirm"
    DELETE_CANCEL = "delete_cancel"
    CONSENT_OUTDATED = "consent_outdated"  # the privacy notice changed since consent (see handle)
    # The coordinator sent an item back (arg: the item key, reason: what the patient reads).
    SENT_BACK = "sent_back"
    PAUSE_REMINDERS = "pause_reminders"  # a button on a reminder
    # The coordinator asked for a record beyond the checklist (arg: their description).
    EXTRA_REQUESTED = "extra_requested"
    # A file over the Bot API's download limit (arg: its size), or "send large files or a
    # whole CD" pressed: the patient gets the upload page for the item (adapters.uploads).
    LARGE_FILE = "large_file"
    UPLOAD_PAGE = "upload_page"


# Events a button may carry; anything else in callback data is ignored as forged or stale.
BUTTON_EVENTS = frozenset(
    {
        EventKind.START,  # "continue" on a reminder: the current step again
        EventKind.CHOOSE_LANGUAGE,
        EventKind.LANGUAGE_MENU,
        EventKind.AGREE,
        EventKind.DECLINE,
        EventKind.CHOOSE_PROCEDURE,
        EventKind.DONE,
        EventKind.SKIP,
        EventKind.DONT_HAVE,
        EventKind.STATUS,
        EventKind.DELETE_REQUEST,
        EventKind.DELETE_CONFIRM,
        EventKind.DELETE_CANCEL,
        EventKind.PAUSE_REMINDERS,
        EventKind.UPLOAD_PAGE,
    }
)


@dataclass(frozen=True)
class Event:
    kind: EventKind
    arg: str = ""  # language, procedure, item key of a button, typed text
    file: FileRef | None = None
    duplicate: bool = False  # the same file was already stored for this case
    reason: Text | Verbatim | None = None  # why the coordinator sent an item back


@dataclass(frozen=True)
class DomainEvent:
    case_id: str


@dataclass(frozen=True)
class ConsentGiven(DomainEvent):
    version: str


@dataclass(frozen=True)
class ItemResolved(DomainEvent):
    item_key: str
    status: str


@dataclass(frozen=True)
class FileRejected(DomainEvent):
    item_key: str
    file_id: str


@dataclass(frozen=True)
class ErasureRequested(DomainEvent):
    """The patient confirmed deletion: the service destroys the case key and every record."""


@dataclass(frozen=True)
class UploadLinkWanted(DomainEvent):
    """The patient needs the upload page for this item (the service issues the link)."""

    item_key: str
    too_big: bool  # a file they sent was over the chat's limit


@dataclass(frozen=True)
class CaseCompleted(DomainEvent):
    completion: int  # 1 for the first completion; a reopened case completes again with 2...
