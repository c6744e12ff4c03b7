"""Database engine set-up: SQLite (WAL, synchronous=FULL, BEGIN IMMEDIATE) or PostgreSQL."""

from __future__ import annotations

import asyncio
import collections
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from contextvars import ContextVar
from typing import Any

import aiosqlite
from sqlalchemy import event
from sqlalchemy.dialects.sqlite.aiosqlite import (
    AsyncAdapt_aiosqlite_connection,
    AsyncAdapt_aiosqlite_cursor,
    AsyncAdapt_aiosqlite_dbapi,
)
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.util import EMPTY_DICT


def async_url(url: str) -> str:
    """The async driver form of a database URL (`sqlite://` -> `sqlite+aiosqlite://`...)."""
    parsed = make_url(url)
    drivers = {"sqlite": "sqlite+aiosqlite", "postgresql": "postgresql+asyncpg"}
    backend = parsed.get_backend_name()
    if backend in drivers and parsed.drivername != drivers[backend]:
        parsed = parsed.set(drivername=drivers[backend])
    return parsed.render_as_string(hide_password=False)


# Connections an engine's pool hands out at once (pool_size + max_overflow), on both backends.
POOL_SIZE, POOL_OVERFLOW = 10, 5
POOL_CONNECTIONS = POOL_SIZE + POOL_OVERFLOW


class Gate:
    """At most `size` sessions of this process at once; the others wait their turn here.

    Under load (hundreds of chats' lanes at once) waiting at the pool gives up after 30 s,
    and on SQLite writers waiting for the lock sleep in SQLite's busy handler in growing
    steps while the lock sits idle; an asyncio queue hands the turn over at once, in order.
    A task that already holds the gate passes: a nested session cannot deadlock on it.
    """

    def __init__(self, size: int) -> None:
        self._size = size
        self._held: ContextVar[bool] = ContextVar(f"gate-{id(self)}", default=False)
        self._turns: asyncio.Semaphore | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @asynccontextmanager
    async def __call__(self) -> AsyncIterator[None]:
        if self._held.get():
            yield
            return
        loop = asyncio.get_running_loop()
        if self._turns is None or self._loop is not loop:  # a semaphore serves one loop
            self._turns, self._loop = asyncio.Semaphore(self._size), loop
        async with self._turns:
            token = self._held.set(True)
            try:
                yield
            finally:
                self._held.reset(token)


def _statement_trip(
    connection: aiosqlite.Connection, operation: str, parameters: Any, many: bool
) -> tuple[Any, list[Any], int, int | None]:
    """Run in aiosqlite's thread: one statement executed, read and closed. Returns its
    description, rows, rowcount and lastrowid."""
    cursor = connection._conn.cursor()  # the thread's own sqlite3 connection
    try:
        if many:
            cursor.executemany(operation, parameters)
        elif parameters is None:
            cursor.execute(operation)
        else:
            cursor.execute(operation, parameters)
        description = cursor.description
        rows = cursor.fetchall() if description else []
        return description, rows, cursor.rowcount, cursor.lastrowid
    finally:
        cursor.close()


class OneTripCursor(AsyncAdapt_aiosqlite_cursor):
    """A statement in one trip to aiosqlite's thread instead of four.

    SQLAlchemy's aiosqlite cursor opens a cursor, executes, fetches and closes in four
    trips. After each, the caller waits for its turn on the event loop, behind every other
    ready task, and on SQLite it waits holding the only write lock: a text update's
    transaction is about ten statements, so forty waits that every other writer queues
    behind. Here the four steps run as one function in the connection's thread, through
    aiosqlite's own queue (`_execute`, private but the one SQLAlchemy's adapter itself uses
    to set isolation_level), and the results are kept on this cursor.
    """

    __slots__ = ("_arraysize", "_description", "_lastrowid", "_rowcount")

    def __init__(self, adapt_connection: AsyncAdapt_aiosqlite_connection) -> None:
        # Not the parent's __init__: it opens an aiosqlite cursor, a trip of its own.
        self._adapt_connection = adapt_connection
        self._connection = adapt_connection._connection
        # No aiosqlite cursor: the parent's close() sees None and has nothing to close.
        self._cursor = None  # type: ignore[assignment]
        self._soft_closed_memoized = EMPTY_DICT
        self._rows = collections.deque()
        self._description: Any = None
        self._rowcount: int = -1
        self._lastrowid: int | None = None
        self._arraysize = 1  # sqlite3's default, fetchmany's size

    @property
    def description(self) -> Any:
        return self._description

    @property
    def rowcount(self) -> int:
        return self._rowcount

    @property
    def lastrowid(self) -> Any:
        return self._lastrowid

    @property
    def arraysize(self) -> int:
        return self._arraysize

    @arraysize.setter
    def arraysize(self, value: int) -> None:
        self._arraysize = value

    async def _trip(self, operation: str, parameters: Any, many: bool) -> None:
        async with self._adapt_connection._execute_mutex:
            connection = self._connection
            result = await connection._execute(
                _statement_trip, connection, operation, parameters, many
            )
        self._description, rows, self._rowcount, self._lastrowid = result
        self._rows = collections.deque(rows)

    async def _execute_async(self, operation: Any, parameters: Any) -> None:
        await self._trip(operation, parameters, False)

    async def _executemany_async(self, operation: Any, seq_of_parameters: Any) -> None:
        await self._trip(operation, seq_of_parameters, True)

    async def _async_soft_close(self) -> None:
        pass  # nothing is open: the statement's cursor was closed in its trip


class _OneTripConnection(AsyncAdapt_aiosqlite_connection):
    __slots__ = ()
    # mypy holds class attributes invariant; a cursor subclass is what the parent expects.
    _cursor_cls = OneTripCursor  # type: ignore[assignment]


class _OneTripDBAPI(AsyncAdapt_aiosqlite_dbapi):
    """aiosqlite as SQLAlchemy adapts it, with OneTripCursor as the cursor."""

    def connect(self, *arg: Any, **kw: Any) -> _OneTripConnection:
        return _OneTripConnection(self, super().connect(*arg, **kw)._connection)


def is_sqlite(url: str) -> bool:
    return make_url(url).get_backend_name() == "sqlite"


def create_engine(url: str, *, readonly: bool = False) -> AsyncEngine:
    """The engine for `url`. With `readonly` on SQLite: deferred, query-only transactions
    that read a WAL snapshot without ever waiting for the write lock."""
    url = async_url(url)
    if not is_sqlite(url):
        return create_async_engine(
            url, pool_size=POOL_SIZE, max_overflow=POOL_OVERFLOW, pool_pre_ping=True
        )
    engine = create_async_engine(
        url,
        module=_OneTripDBAPI(aiosqlite, sqlite3),
        pool_size=POOL_SIZE,
        max_overflow=POOL_OVERFLOW,
        connect_args={"timeout": 30},
    )

    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # pysqlite's own transaction handling would defer BEGIN; we issue it ourselves.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        # NORMAL can roll back acknowledged commits after a power loss; FULL cannot.
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.execute("PRAGMA foreign_keys=ON")
        if readonly:
            cursor.execute("PRAGMA query_only=ON")  # a write here would be a bug: refuse it
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(connection: Any) -> None:
        # A deferred transaction that reads then writes fails with SQLITE_BUSY_SNAPSHOT under
        # WAL whatever busy_timeout says; IMMEDIATE takes the write lock up front.
        connection.exec_driver_sql("BEGIN" if readonly else "BEGIN IMMEDIATE")

    return engine
