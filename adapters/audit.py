"""Append-only, hash-chained audit log: who did what to which case, and when.

Every coordinator view, download, export, review and every erasure is recorded with
:func:`append`, inside the transaction of the change it describes, so an action and
its audit row commit or roll back together.

Rows carry ids and event names only, never personal data: the actor is a role plus at
most a Telegram id (``"coordinator:123456"``, ``"patient"``, ``"system"``,
``"operator"``), the action a dotted event name (``"case.view"``, ``"file.download"``,
``"case.export"``, ``"review.accept"``, ``"review.send_back"``, ``"case.erase"``),
and ``detail`` a short technical note (a file id, a reason code).  Both actor and action
are checked against a narrow pattern so a name or a caption cannot slip in by mistake;
``detail`` is limited to 200 printable characters and must be kept free of personal
data by the caller.

Chain: row *n* stores ``prev_hash`` (the ``hash`` of row *n-1*, or 64 zeros for the
first row) and ``hash = sha256(canonical JSON of seq, at, actor, action, case_id,
detail, prev_hash)``.  :func:`verify_chain` recomputes it, so an edited row (its own
hash no longer matches), a deleted row (a gap in ``seq`` and a broken link) and
reordered rows (hashes cover ``seq``) are all detected.  What a chain alone cannot
show is the removal of the *newest* rows; keep the head hash (:func:`head`) somewhere
else (a ticket, a log shipped off the server) to detect that.

Concurrency: appends are serialised so two transactions never build on the same
predecessor.  On PostgreSQL :func:`append` takes a transaction-scoped advisory lock
before reading the last row (a plain ``FOR UPDATE`` on the last row is not enough: a
waiter would wake up holding the *old* last row, and an empty table has no row to lock);
the lock is held until the caller commits, so append late in the transaction.  SQLite
transactions start with ``BEGIN IMMEDIATE`` (adapters.database), which already
serialises writers.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from sqlalchemy import func
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from adapters.tables import AuditRow

if TYPE_CHECKING:  # the store itself appends audit rows (erasure): no import cycle at run time
    from adapters.store import SqlStore

__all__ = [
    "GENESIS_HASH",
    "AuditEntry",
    "ChainProblem",
    "append",
    "entries",
    "format_entries",
    "head",
    "verify_chain",
]

GENESIS_HASH = "0" * 64
# Any constant shared by every process of this application; "audit" in ASCII.
_PG_LOCK_KEY = 0x61756469740001

_ACTOR_RE = re.compile(r"(coordinator:-?\d{1,20}|patient|system|operator)")
_ACTION_RE = re.compile(r"[a-z][a-z_]{0,14}(\.[a-z][a-z_]{0,14}){1,2}")
# A case id as the audit takes it (and a backup reads it back from the audit).
CASE_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,32}")
_DETAIL_MAX = 200
_PAGE = 1000


@dataclass(frozen=True, slots=True)
class AuditEntry:
    seq: int
    at: datetime  # aware, UTC
    actor: str
    action: str
    case_id: str | None
    detail: str
    prev_hash: str
    hash: str


@dataclass(frozen=True, slots=True)
class ChainProblem:
    """One break in the chain; ``kind`` is "gap", "link" or "hash"."""

    seq: int
    kind: str
    detail: str

    def __str__(self) -> str:
        return f"seq {self.seq}: {self.kind}: {self.detail}"


def _utc(at: datetime) -> datetime:
    # SQLite keeps no time zone: every stored time is UTC, so a naive value is UTC.
    return at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)


def _canonical_time(at: datetime) -> str:
    return _utc(at).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def compute_hash(
    seq: int,
    at: datetime,
    actor: str,
    action: str,
    case_id: str | None,
    detail: str,
    prev_hash: str,
) -> str:
    """SHA-256 (hex) of the canonical JSON of a row's fields and its predecessor's hash."""
    canonical = json.dumps(
        {
            "seq": seq,
            "at": _canonical_time(at),
            "actor": actor,
            "action": action,
            "case_id": case_id,
            "detail": detail,
            "prev_hash": prev_hash,
        },
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=True,
    )
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()


def _check(actor: str, action: str, case_id: str | None, detail: str) -> None:
    if not isinstance(actor, str) or _ACTOR_RE.fullmatch(actor) is None:
        raise ValueError("audit actor must be coordinator:<id>, patient, system or operator")
    if not isinstance(action, str) or _ACTION_RE.fullmatch(action) is None:
        raise ValueError("audit action must be a dotted event name such as 'case.view'")
    if case_id is not None and (
        not isinstance(case_id, str) or CASE_ID_RE.fullmatch(case_id) is None
    ):
        raise ValueError("audit case_id must be a case id")
    if not isinstance(detail, str) or len(detail) > _DETAIL_MAX or not detail.isprintable():
        raise ValueError(f"audit detail must be at most {_DETAIL_MAX} printable characters")


async def append(
    session: AsyncSession,
    actor: str,
    action: str,
    case_id: str | None,
    detail: str = "",
    *,
    at: datetime | None = None,
) -> AuditEntry:
    """Add one audit row in the caller's transaction (committed with it); returns it."""
    _check(actor, action, case_id, detail)
    bind = session.get_bind()
    if bind.dialect.name == "postgresql":
        await session.exec(select(func.pg_advisory_xact_lock(_PG_LOCK_KEY)))
    last = (
        await session.exec(select(AuditRow).order_by(col(AuditRow.seq).desc()).limit(1))
    ).first()
    seq = 1 if last is None else last.seq + 1
    prev_hash = GENESIS_HASH if last is None else last.hash
    when = _utc(at or datetime.now(UTC))
    digest = compute_hash(seq, when, actor, action, case_id, detail, prev_hash)
    session.add(
        AuditRow(
            seq=seq,
            at=when,
            actor=actor,
            action=action,
            case_id=case_id,
            detail=detail,
            prev_hash=prev_hash,
            hash=digest,
        )
    )
    await session.flush()
    return AuditEntry(seq, when, actor, action, case_id, detail, prev_hash, digest)


def _entry(row: AuditRow) -> AuditEntry:
    return AuditEntry(
        row.seq,
        _utc(row.at),
        row.actor,
        row.action,
        row.case_id,
        row.detail,
        row.prev_hash,
        row.hash,
    )


async def entries(store: SqlStore, case_id: str | None = None) -> list[AuditEntry]:
    """Audit rows in order, all of them or those of one case."""
    query = select(AuditRow).order_by(col(AuditRow.seq))
    if case_id is not None:
        query = query.where(AuditRow.case_id == case_id)
    async with store.session() as session:
        return [_entry(row) for row in (await session.exec(query)).all()]


async def head(store: SqlStore) -> AuditEntry | None:
    """The newest row: record its hash elsewhere to detect a truncated log later."""
    async with store.session() as session:
        row = (
            await session.exec(select(AuditRow).order_by(col(AuditRow.seq).desc()).limit(1))
        ).first()
    return None if row is None else _entry(row)


async def verify_chain(store: SqlStore) -> list[ChainProblem]:
    """Recompute the chain; an empty list means no edited, deleted or reordered row.

    Reads in pages of 1000 rows, so memory stays flat however long the log grows.
    """
    problems: list[ChainProblem] = []
    expected_seq, expected_prev = 1, GENESIS_HASH
    after = 0
    while True:
        async with store.session() as session:
            rows = (
                await session.exec(
                    select(AuditRow)
                    .where(AuditRow.seq > after)
                    .order_by(col(AuditRow.seq))
                    .limit(_PAGE)
                )
            ).all()
        if not rows:
            return problems
        for row in rows:
            if row.seq != expected_seq:
                problems.append(
                    ChainProblem(
                        row.seq, "gap", f"expected seq {expected_seq}: rows missing before this"
                    )
                )
            if row.prev_hash != expected_prev:
                problems.append(
                    ChainProblem(
                        row.seq, "link", "prev_hash does not match the previous row's hash"
                    )
                )
            digest = compute_hash(
                row.seq, row.at, row.actor, row.action, row.case_id, row.detail, row.prev_hash
            )
            if digest != row.hash:
                problems.append(
                    ChainProblem(row.seq, "hash", "row content does not match its hash (edited)")
                )
            expected_seq, expected_prev = row.seq + 1, row.hash
            after = row.seq


def format_entries(items: list[AuditEntry]) -> str:
    """Human-readable lines for ``care-companion audit CASE_ID`` (ids and names only)."""
    if not items:
        return "no audit entries"
    lines = []
    for entry in items:
        at = _utc(entry.at).strftime("%Y-%m-%d %H:%M:%S UTC")
        line = f"{entry.seq:>6}  {at}  {entry.actor:<24}  {entry.action:<18}"
        line += f"  {entry.case_id or '-'}"
        if entry.detail:
            line += f"  {entry.detail}"
        lines.append(line.rstrip())
    return "\n".join(lines)
