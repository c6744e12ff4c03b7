"""The hash-chained audit log (adapters.audit) on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from datetime import timedelta

import pytest
from sqlalchemy import delete, update
from sqlalchemy.sql.expression import Executable
from sqlmodel import col

from adapters import audit
from adapters.database import create_engine
from adapters.keyring import KeyRing
from adapters.keys import new_data_key
from adapters.migrate import upgrade
from adapters.store import SqlStore
from adapters.tables import AuditRow

CASE_A = "a" * 32
CASE_B = "b" * 32


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[SqlStore]:
    await asyncio.to_thread(upgrade, database_url)
    sql_store = SqlStore(create_engine(database_url), KeyRing(new_data_key()))
    yield sql_store
    await sql_store.engine.dispose()


async def _fill(store: SqlStore) -> None:
    steps = [
        ("coordinator:1001", "case.view", CASE_A, ""),
        ("coordinator:1001", "file.download", CASE_A, "file 0123abcd"),
        ("patient", "case.erase", CASE_B, ""),
        ("coordinator:-42", "review.accept", CASE_A, ""),
        ("system", "case.erase", CASE_A, "retention"),
    ]
    for actor, action, case_id, detail in steps:
        async with store.session() as session:
            await audit.append(session, actor, action, case_id, detail)


async def _tamper(store: SqlStore, statement: Executable) -> None:
    """What someone with write access to the database could do behind the bot's back."""
    async with store.engine.begin() as connection:
        await connection.execute(statement)


async def test_append_and_verify(store: SqlStore) -> None:
    assert await audit.verify_chain(store) == []
    await _fill(store)
    assert await audit.verify_chain(store) == []
    everything = await audit.entries(store)
    assert [e.seq for e in everything] == [1, 2, 3, 4, 5]
    assert everything[0].prev_hash == audit.GENESIS_HASH
    assert all(b.prev_hash == a.hash for a, b in itertools.pairwise(everything))
    assert all(e.at.utcoffset() == timedelta(0) for e in everything)  # aware, UTC
    of_a = await audit.entries(store, CASE_A)
    assert [e.action for e in of_a] == ["case.view", "file.download", "review.accept", "case.erase"]
    text = audit.format_entries(of_a)
    assert "file.download" in text and "coordinator:1001" in text and CASE_B not in text
    assert len(text.splitlines()) == 4
    assert audit.format_entries([]) == "no audit entries"
    newest = await audit.head(store)
    assert newest is not None and newest.seq == 5


async def test_rolled_back_transaction_leaves_no_entry(store: SqlStore) -> None:
    with pytest.raises(RuntimeError):
        async with store.session() as session:
            await audit.append(session, "operator", "case.export", CASE_A)
            raise RuntimeError("the change failed")
    assert await audit.entries(store) == []


async def test_concurrent_appends_build_one_chain(store: SqlStore) -> None:
    async def one(i: int) -> None:
        async with store.session() as session:
            await audit.append(session, f"coordinator:{i}", "case.view", CASE_A)

    await asyncio.gather(*(one(i) for i in range(20)))
    assert [e.seq for e in await audit.entries(store)] == list(range(1, 21))
    assert await audit.verify_chain(store) == []


@pytest.mark.parametrize(
    ("actor", "action", "case_id", "detail"),
    [
        ("Maria Rossi", "case.view", CASE_A, ""),
        ("coordinator:12", "viewed Maria's file", CASE_A, ""),
        ("coordinator:12", "case.view", "../etc/passwd", ""),
        ("coordinator:12", "case.view", CASE_A, "line one\nline two"),
        ("coordinator:12", "case.view", CASE_A, "x" * 201),
    ],
)
async def test_append_refuses_free_text(
    store: SqlStore, actor: str, action: str, case_id: str, detail: str
) -> None:
    async with store.session() as session:
        with pytest.raises(ValueError):
            await audit.append(session, actor, action, case_id, detail)


async def test_edited_detail_is_detected(store: SqlStore) -> None:
    await _fill(store)
    await _tamper(store, update(AuditRow).where(col(AuditRow.seq) == 2).values(detail="nothing"))
    problems = await audit.verify_chain(store)
    assert [(p.seq, p.kind) for p in problems] == [(2, "hash")]
    assert "edited" in str(problems[0])


async def test_edited_actor_with_recomputed_hash_breaks_the_next_link(store: SqlStore) -> None:
    """A forger who also recomputes the row's own hash is caught by the next row."""
    await _fill(store)
    rows = await audit.entries(store)
    row = rows[1]
    forged = audit.compute_hash(
        row.seq, row.at, "system", row.action, row.case_id, row.detail, row.prev_hash
    )
    await _tamper(
        store,
        update(AuditRow).where(col(AuditRow.seq) == 2).values(actor="system", hash=forged),
    )
    assert [(p.seq, p.kind) for p in await audit.verify_chain(store)] == [(3, "link")]


async def test_deleted_middle_row_is_detected(store: SqlStore) -> None:
    await _fill(store)
    await _tamper(store, delete(AuditRow).where(col(AuditRow.seq) == 3))
    kinds = {(p.seq, p.kind) for p in await audit.verify_chain(store)}
    assert kinds == {(4, "gap"), (4, "link")}


async def test_deleted_first_row_is_detected(store: SqlStore) -> None:
    await _fill(store)
    await _tamper(store, delete(AuditRow).where(col(AuditRow.seq) == 1))
    kinds = {(p.seq, p.kind) for p in await audit.verify_chain(store)}
    assert kinds == {(2, "gap"), (2, "link")}


async def test_swapped_rows_are_detected(store: SqlStore) -> None:
    await _fill(store)
    await _tamper(store, update(AuditRow).where(col(AuditRow.seq) == 2).values(seq=-2))
    await _tamper(store, update(AuditRow).where(col(AuditRow.seq) == 3).values(seq=2))
    await _tamper(store, update(AuditRow).where(col(AuditRow.seq) == -2).values(seq=3))
    problems = await audit.verify_chain(store)
    assert {p.seq for p in problems} >= {2, 3}
    assert {p.kind for p in problems} >= {"hash", "link"}


async def test_appending_after_tampering_does_not_hide_it(store: SqlStore) -> None:
    await _fill(store)
    await _tamper(store, update(AuditRow).where(col(AuditRow.seq) == 4).values(detail="x"))
    async with store.session() as session:
        await audit.append(session, "operator", "case.export", CASE_A)
    assert [(p.seq, p.kind) for p in await audit.verify_chain(store)] == [(4, "hash")]
