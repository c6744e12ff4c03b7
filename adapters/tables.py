"""Database tables (SQLModel). Schema changes go through Alembic (adapters/migrations).

Personal data never sits here in clear: answers, file names and raw updates are
encrypted with the case key or the inbox key (see adapters.keys).
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, Column, DateTime, LargeBinary, Text, UniqueConstraint
from sqlmodel import Field, SQLModel


class CaseRow(SQLModel, table=True):
    __tablename__ = "cases"

    id: str = Field(primary_key=True, max_length=32)
    chat_id: int = Field(sa_column=Column(BigInteger, nullable=False, unique=True, index=True))
    user_id: int = Field(sa_column=Column(BigInteger, nullable=False))
    locale: str = Field(max_length=16)
    state: str = Field(max_length=24, index=True)
    checklist_key: str | None = Field(default=None, max_length=64)
    current_item: str | None = Field(default=None, max_length=64)
    consent_version: str | None = Field(default=None, max_length=32)
    consent_at: datetime | None = None
    completed_at: datetime | None = None
    completions: int = 0
    password_file: str | None = Field(default=None, max_length=32)
    handed_off_at: datetime | None = None  # the hospital bundle was exported
    # Who the patient says they are (identity check), encrypted with the case key.
    patient_name_enc: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    birth_date_enc: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    # Reminders (core.reminders): the last step of the conversation, how many reminders
    # were sent since, and whether the patient asked to pause them.
    active_at: datetime | None = None
    # When the patient of a case given up was told the retention rule would erase it (its
    # notice, adapters.erasure): it is erased only that long after, if still given up.
    retention_notice_at: datetime | None = None
    reminders_sent: int = Field(default=0, sa_column_kwargs={"server_default": "0"})
    reminders_paused: bool = Field(default=False, sa_column_kwargs={"server_default": "0"})
    # Records the coordinator asked for beyond the checklist (JSON), encrypted: typed words.
    extras_enc: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    wrapped_key: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    created_at: datetime
    updated_at: datetime


class ItemRow(SQLModel, table=True):
    __tablename__ = "case_items"

    case_id: str = Field(primary_key=True, foreign_key="cases.id", max_length=32)
    item_key: str = Field(primary_key=True, max_length=64)
    status: str = Field(max_length=16)
    files_json: str = Field(default="[]", sa_column=Column(Text, nullable=False))
    answer_enc: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    rejected_uploads: int = 0
    review: str | None = Field(default=None, max_length=64)  # accepted, or a send-back reason
    translation: str | None = Field(default=None, max_length=16)  # ordered, attached


class FileRow(SQLModel, table=True):
    __tablename__ = "case_files"
    __table_args__ = (UniqueConstraint("case_id", "unique_id", name="uq_case_file_unique"),)

    id: str = Field(primary_key=True, max_length=32)
    case_id: str = Field(foreign_key="cases.id", index=True, max_length=32)
    item_key: str = Field(max_length=64)
    unique_id: str = Field(max_length=128)
    sha256: str = Field(max_length=64, index=True)
    blob_id: str = Field(max_length=128)
    size: int = Field(sa_column=Column(BigInteger, nullable=False))
    kind: str = Field(max_length=16)
    status: str = Field(max_length=16)
    verdict_enc: str = Field(sa_column=Column(Text, nullable=False))  # holds names from headers
    name_enc: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    mime: str | None = Field(default=None, max_length=128)
    password_enc: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    created_at: datetime
    # None: the patient's record. "translation": a translation the coordinator attached to
    # the item (kept beside the original, not counted toward the item, in the bundle).
    role: str | None = Field(default=None, max_length=16)


class FileMemberRow(SQLModel, table=True):
    """A usable file inside an uploaded ZIP (a CD copy), stored as its own encrypted blob."""

    __tablename__ = "case_file_members"

    id: str = Field(primary_key=True, max_length=40)
    file_id: str = Field(foreign_key="case_files.id", index=True, max_length=32)
    case_id: str = Field(foreign_key="cases.id", index=True, max_length=32)
    blob_id: str = Field(max_length=128)
    kind: str = Field(max_length=16)
    size: int = Field(sa_column=Column(BigInteger, nullable=False))
    sha256: str = Field(max_length=64)
    name_enc: str | None = Field(default=None, sa_column=Column(Text, nullable=True))


class CardRow(SQLModel, table=True):
    """The patient's live checklist card: the one message edited as the case changes."""

    __tablename__ = "cards"

    chat_id: int = Field(sa_column=Column(BigInteger, primary_key=True, autoincrement=False))
    message_id: int = Field(sa_column=Column(BigInteger, nullable=False))
    updated_at: datetime


class CoordinatorPromptRow(SQLModel, table=True):
    """A coordinator was asked to type something (a send-back reason): their next message
    in that chat is the answer. One per coordinator; kept in the database so a restart
    between the question and the answer loses nothing."""

    __tablename__ = "coordinator_prompts"

    user_id: int = Field(sa_column=Column(BigInteger, primary_key=True, autoincrement=False))
    chat_id: int = Field(sa_column=Column(BigInteger, nullable=False))
    case_id: str = Field(max_length=32)
    item_key: str = Field(max_length=64)
    created_at: datetime


class InviteRow(SQLModel, table=True):
    __tablename__ = "invites"

    code: str = Field(primary_key=True, max_length=64)
    procedure: str = Field(max_length=64)
    created_at: datetime
    case_id: str | None = Field(default=None, max_length=32)
    used_at: datetime | None = None


class ErasureRow(SQLModel, table=True):
    """Tombstone of an erased case: keyed hash of the chat, never the chat id itself.

    Updates of that chat up to `up_to_update_id` are ignored, so a late duplicate (Telegram
    redelivering, a retried download) cannot bring anything back; newer ones start afresh.
    """

    __tablename__ = "erasures"

    chat_hash: str = Field(primary_key=True, max_length=64)
    up_to_update_id: int = Field(
        sa_column=Column(BigInteger, primary_key=True, autoincrement=False)
    )
    erased_at: datetime


class InboxRow(SQLModel, table=True):
    """Updates stored before Telegram is told they were received; payload scrubbed when done."""

    __tablename__ = "inbox"

    update_id: int = Field(sa_column=Column(BigInteger, primary_key=True, autoincrement=False))
    chat_id: int | None = Field(default=None, sa_column=Column(BigInteger, index=True))
    payload_enc: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    status: str = Field(default="new", max_length=16, index=True)  # new, done, parked
    attempts: int = 0
    next_attempt_at: datetime | None = None
    received_at: datetime
    done_at: datetime | None = None
    error: str | None = Field(default=None, max_length=200)


class OutboxRow(SQLModel, table=True):
    """Messages to send, written in the same transaction as the change that caused them."""

    __tablename__ = "outbox"

    id: int | None = Field(default=None, primary_key=True)
    chat_id: int = Field(sa_column=Column(BigInteger, nullable=False, index=True))
    locale: str = Field(max_length=16)
    payload: str = Field(sa_column=Column(Text, nullable=False))
    dedup_key: str | None = Field(default=None, max_length=200, unique=True)
    status: str = Field(default="pending", max_length=16, index=True)  # pending, sent, failed
    attempts: int = 0
    next_attempt_at: datetime | None = None
    created_at: datetime
    sent_at: datetime | None = None


class AuditRow(SQLModel, table=True):
    """Append-only, hash-chained audit trail (see adapters.audit): ids and event names only."""

    __tablename__ = "audit_log"

    seq: int = Field(sa_column=Column(BigInteger, primary_key=True, autoincrement=False))
    at: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))
    actor: str = Field(max_length=64)
    action: str = Field(max_length=32)
    case_id: str | None = Field(default=None, max_length=32, index=True)
    detail: str = Field(default="", max_length=200)
    prev_hash: str = Field(max_length=64)
    hash: str = Field(max_length=64)


class UploadSessionRow(SQLModel, table=True):
    """A web upload opened from the chat for one case and item (see adapters.uploads).

    The link's token is kept only as its SHA-256; the file list (names are personal data) is
    encrypted with the case key. Per-file progress is the vault itself: each chunk is its own
    blob, committed durably before it is acknowledged, so a row can never claim a chunk the
    disk does not hold. No foreign key to `cases`: erasure removes case rows freely and the
    upload sweep then removes what is left here.
    """

    __tablename__ = "upload_sessions"

    id: str = Field(primary_key=True, max_length=32)
    token_hash: str = Field(max_length=64, unique=True)
    case_id: str = Field(max_length=32, index=True)
    item_key: str = Field(max_length=64)
    chat_id: int = Field(sa_column=Column(BigInteger, nullable=False, index=True))
    state: str = Field(max_length=16, index=True)  # open, finishing, complete, expired
    manifest_enc: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    total_bytes: int = Field(default=0, sa_column=Column(BigInteger, nullable=False))
    handed: int = 0  # files handed to the intake so far (a resumed hand-over skips them)
    expires_at: datetime
    created_at: datetime
    completed_at: datetime | None = None
