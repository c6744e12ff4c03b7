"""Operator views of the inbox for the CLI: `inbox list`, `inbox retry`.

An update whose handling failed five times for a reason that is not an outage is parked
(adapters.telegram): kept, encrypted, with the error's name, and the chat goes on without
it. Once the cause is fixed (a new release, a file the Bot API can give again), `inbox
retry` puts it back in line: the running bot (any instance) handles it within a second,
as if it had just arrived. Neither command prints what an update holds.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlmodel import col, select

from adapters import audit
from adapters.store import SqlStore, utcnow
from adapters.tables import CaseRow, InboxRow


def _parked(update_ids: Sequence[int] | None = None) -> Any:
    """Parked updates (those named, or all), oldest first, each with its chat's case id (or
    None: a chat without a case)."""
    query = (
        select(InboxRow, CaseRow.id)
        .join(CaseRow, col(CaseRow.chat_id) == col(InboxRow.chat_id), isouter=True)
        .where(InboxRow.status == "parked")
    )
    if update_ids is not None:
        query = query.where(col(InboxRow.update_id).in_(list(update_ids)))
    return query.order_by(col(InboxRow.update_id))


async def parked_updates(store: SqlStore) -> list[dict[str, Any]]:
    """Every parked update: its id, when it came, how often it failed and with what, and
    the case of its chat (if the chat has one)."""
    async with store.session() as session:
        rows = (await session.exec(_parked())).all()
    return [
        {
            "update_id": row.update_id,
            "received_at": row.received_at.isoformat(),
            "attempts": row.attempts,
            "error": row.error,
            "case_id": case_id,
        }
        for row, case_id in rows
    ]


async def retry_parked(store: SqlStore, update_ids: Sequence[int] | None) -> list[int]:
    """Put parked updates (those named, or all with None) back in line, attempts counted
    afresh; audited, one entry per update. Returns the ids put back (a named id that is not
    parked is left as it is)."""
    async with store.session() as session:
        rows = (await session.exec(_parked(update_ids))).all()
        for row, case_id in rows:
            row.status, row.attempts, row.next_attempt_at = "new", 0, utcnow()
            session.add(row)
            await audit.append(
                session, "operator", "inbox.retry", case_id, f"update={row.update_id}"
            )
        return [row.update_id for row, _ in rows]
