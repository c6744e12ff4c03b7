"""The SQLite engine: statements inside a transaction run on the event loop's thread, only
what can wait for a lock or the disk goes to aiosqlite's thread (one trip each), and the
cursor is still a DBAPI cursor in every way SQLAlchemy and the ORM rely on (rows, rowcount,
lastrowid, errors)."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiosqlite
import pytest
from sqlalchemy import insert, text, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlmodel import SQLModel, col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from adapters.database import BUSY_TIMEOUT_MS, create_engine
from adapters.tables import OutboxRow

NOW = datetime(2026, 11, 28, tzinfo=UTC)


def count_trips(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Every function aiosqlite hands to its thread, counted (the real one still runs)."""
    trips = [0]
    real = aiosqlite.Connection._execute

    async def counted(self: aiosqlite.Connection, fn: Any, *args: Any, **kwargs: Any) -> Any:
        trips[0] += 1
        return await real(self, fn, *args, **kwargs)

    monkeypatch.setattr(aiosqlite.Connection, "_execute", counted)
    return trips


async def with_schema(engine: AsyncEngine) -> AsyncEngine:
    async with engine.begin() as connection:
        await connection.run_sync(SQLModel.metadata.create_all, tables=[OutboxRow.__table__])
    return engine


async def three_statements(engine: AsyncEngine) -> None:
    async with AsyncSession(engine) as session, session.begin():
        await session.exec(text("SELECT 1"))
        await session.exec(text("SELECT 2"))
        await session.exec(text("SELECT 3"))


async def test_only_what_may_wait_goes_to_the_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "ours.sqlite"
    ours = create_engine(f"sqlite:///{path}")
    reader = create_engine(f"sqlite:///{path}", readonly=True)
    plain = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'plain.sqlite'}")
    try:
        for engine in (ours, reader, plain):  # connected: the pool's connect is not counted
            await three_statements(engine)
        trips = count_trips(monkeypatch)
        counted = {}
        for name, engine in (("ours", ours), ("reader", reader), ("plain", plain)):
            trips[0] = 0
            await three_statements(engine)
            counted[name] = trips[0]
    finally:
        for engine in (ours, reader, plain):
            await engine.dispose()
    # Ours: COMMIT only; BEGIN IMMEDIATE (the lock free) and the SELECTs run here, the
    # pool's reset has no transaction left to roll back. A query-only reader: nothing at all.
    assert counted == {
        "ours": 1,
        "reader": 0,
        # SQLAlchemy's own aiosqlite cursor: cursor, execute, fetch and close per SELECT,
        # then COMMIT and the pool's reset.
        "plain": 3 * 4 + 1 + 1,
    }


async def test_waiting_for_the_write_lock_does_not_stop_the_event_loop(tmp_path: Path) -> None:
    """Another process holds SQLite's write lock for a while: BEGIN IMMEDIATE waits in
    aiosqlite's thread, the event loop keeps serving, and the transaction then goes ahead."""
    path = tmp_path / "db.sqlite"
    engine = await with_schema(create_engine(f"sqlite:///{path}"))
    other = sqlite3.connect(path, isolation_level=None)  # another process's connection
    other.execute("BEGIN IMMEDIATE")
    ticks: list[float] = []

    async def ticker() -> None:
        while True:
            ticks.append(time.monotonic())
            await asyncio.sleep(0.01)

    async def write() -> None:
        async with AsyncSession(engine) as session, session.begin():
            session.add(OutboxRow(chat_id=1, locale="en", payload="{}", created_at=NOW))

    ticking = asyncio.create_task(ticker())
    try:
        writing = asyncio.create_task(write())
        await asyncio.sleep(0.5)
        assert not writing.done()  # waiting for the lock...
        held = [t for t in ticks if t >= ticks[-1] - 0.4]
        assert len(held) >= 10  # ...while the loop went on (a blocked loop ticks once)
        other.execute("COMMIT")
        await asyncio.wait_for(writing, timeout=10)
        await write()  # the lock free: begun on the loop's thread this time
        async with AsyncSession(engine) as session:
            # Tried without waiting, the connection waits for a held lock again afterwards.
            busy = await session.exec(text("PRAGMA busy_timeout"))
            assert busy.one() == (BUSY_TIMEOUT_MS,)
    finally:
        ticking.cancel()
        other.close()
        await engine.dispose()
    check = sqlite3.connect(path)
    assert check.execute("SELECT count(*) FROM outbox").fetchone() == (2,)
    check.close()


async def test_the_cursor_keeps_rows_counts_ids_and_errors(tmp_path: Path) -> None:
    engine = await with_schema(create_engine(f"sqlite:///{tmp_path / 'db.sqlite'}"))
    try:
        async with AsyncSession(engine, expire_on_commit=False) as session, session.begin():
            first = OutboxRow(chat_id=1, locale="en", payload="{}", dedup_key="a", created_at=NOW)
            second = OutboxRow(chat_id=1, locale="en", payload="{}", created_at=NOW)
            session.add(first)
            await session.flush()
            session.add(second)
            await session.flush()
            assert (first.id, second.id) == (1, 2)  # lastrowid, read back by the ORM
            # executemany
            await (await session.connection()).execute(
                insert(OutboxRow),
                [
                    {"chat_id": 2, "locale": "th", "payload": "{}", "created_at": NOW}
                    for _ in range(3)
                ],
            )
        async with AsyncSession(engine) as session, session.begin():
            rows = (await session.exec(select(OutboxRow).order_by(col(OutboxRow.id)))).all()
            assert [(row.id, row.chat_id, row.locale) for row in rows] == [
                (1, 1, "en"),
                (2, 1, "en"),
                (3, 2, "th"),
                (4, 2, "th"),
                (5, 2, "th"),
            ]
            moved = await (await session.connection()).execute(
                update(OutboxRow).where(col(OutboxRow.chat_id) == 2).values(status="sent")
            )
            assert moved.rowcount == 3
            none = await (await session.connection()).execute(
                update(OutboxRow).where(col(OutboxRow.chat_id) == 9).values(status="sent")
            )
            assert none.rowcount == 0
        with pytest.raises(IntegrityError):  # a unique key: the driver's error, translated
            async with AsyncSession(engine) as session, session.begin():
                session.add(
                    OutboxRow(chat_id=3, locale="en", payload="{}", dedup_key="a", created_at=NOW)
                )
        async with AsyncSession(engine) as session:  # rolled back, nothing half-written
            sent = await session.exec(select(OutboxRow).where(OutboxRow.status == "sent"))
            assert len(sent.all()) == 3
            assert len((await session.exec(select(OutboxRow))).all()) == 5
    finally:
        await engine.dispose()
