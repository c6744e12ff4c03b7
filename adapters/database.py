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
from sqlalchemy.pool import AsyncAdaptedQueuePool
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
BUSY_TIMEOUT_MS = 30_000  # how long a SQLite writer waits for another process's write lock


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


def _run_statement(
    connection: sqlite3.Connection, operation: str, parameters: Any, many: bool
) -> tuple[Any, list[Any], int, int | None]:
    """One statement executed, read and closed: its description, rows, rowcount and
    lastrowid."""
    cursor = connection.cursor()
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


def _statement_trip(
    connection: aiosqlite.Connection, operation: str, parameters: Any, many: bool
) -> tuple[Any, list[Any], int, int | None]:
    """Run in aiosqlite's thread, on the thread's own sqlite3 connection."""
    return _run_statement(connection._conn, operation, parameters, many)


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
        self._keep(result)

    def _keep(self, result: tuple[Any, list[Any], int, int | None]) -> None:
        """A statement's outcome (see _run_statement), for the caller to read from here."""
        self._description, rows, self._rowcount, self._lastrowid = result
        self._rows = collections.deque(rows)

    async def _execute_async(self, operation: Any, parameters: Any) -> None:
        await self._trip(operation, parameters, False)

    async def _executemany_async(self, operation: Any, seq_of_parameters: Any) -> None:
        await self._trip(operation, seq_of_parameters, True)

    async def _async_soft_close(self) -> None:
        pass  # nothing is open: the statement's cursor was closed in its trip


class InlineCursor(OneTripCursor):
    """A statement inside a transaction runs at once on the caller's thread: no trip.

    Under load a trip to aiosqlite's thread cost more than the statement itself: the
    event loop's thread wakes the worker thread, and on a busy two-core machine the kernel
    often runs the woken worker at once and parks the waker while it holds the GIL (a
    py-spy profile of the bot under load showed the main thread at aiosqlite's queue put
    in about 30% of its samples). Inside a transaction a statement waits for nothing:
    the write transaction took SQLite's write lock at BEGIN IMMEDIATE, a read transaction
    reads a WAL snapshot that writers never block, and the statements here are small and
    indexed (tens of microseconds). BEGIN IMMEDIATE is tried here without waiting (see
    _began_here). What can wait for a lock or the disk still goes to the thread, one trip
    each: BEGIN IMMEDIATE when another process holds the write lock, COMMIT (the fsync of
    synchronous=FULL, and the WAL checkpoints), rollback, and any other statement outside
    a transaction (set-up pragmas).
    """

    __slots__ = ()

    def _began_here(self) -> bool:
        """BEGIN IMMEDIATE here when the write lock is free this instant (the usual case:
        this process's writers take turns at the store's gate). A trip would let every
        ready task on the loop run before the transaction's first statement, the lock
        held. Taken by another process: False, and the caller waits for it in the thread."""
        connection = self._connection._connection
        if (
            connection is None
            or connection.in_transaction
            or self._adapt_connection._execute_mutex.locked()
        ):
            return False
        connection.execute("PRAGMA busy_timeout=0")  # fail at once rather than wait here
        try:
            connection.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as error:
            if error.sqlite_errorcode & 0xFF == sqlite3.SQLITE_BUSY:
                return False
            raise
        finally:
            connection.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        return True

    def _inline(self, operation: str) -> sqlite3.Connection | None:
        """The sqlite3 connection when this statement may run here and now, else None."""
        connection = self._connection._connection  # None once aiosqlite closed it
        if connection is None:
            return None
        # A deferred BEGIN takes no lock: it cannot wait either.
        if not connection.in_transaction and operation != "BEGIN":
            return None
        if self._adapt_connection._execute_mutex.locked():  # a trip of its own in flight
            return None
        return connection

    async def _trip(self, operation: str, parameters: Any, many: bool) -> None:
        if operation == "BEGIN IMMEDIATE" and self._began_here():
            self._keep((None, [], -1, None))  # what any BEGIN gives: no rows
            return
        connection = self._inline(operation)
        if connection is None:
            await super()._trip(operation, parameters, many)
            return
        # Still a coroutine: SQLAlchemy's async layer expects one (and a switch to it).
        self._keep(_run_statement(connection, operation, parameters, many))


class _SqliteConnection(AsyncAdapt_aiosqlite_connection):
    __slots__ = ()
    # mypy holds class attributes invariant; a cursor subclass is what the parent expects.
    _cursor_cls = InlineCursor  # type: ignore[assignment]

    def _open_transaction(self) -> bool:
        connection = self._connection._connection
        return connection is None or connection.in_transaction

    def rollback(self) -> None:
        # The pool rolls back every connection it takes back, mostly after a commit: with
        # no transaction open that is nothing to do, not a trip.
        if self._open_transaction():
            super().rollback()


class _ReadOnlyConnection(_SqliteConnection):
    """A query-only connection (PRAGMA query_only): its transactions never write, so
    their end releases a WAL snapshot and touches no lock or disk: done here, no trip."""

    __slots__ = ()

    def commit(self) -> None:
        self._end_here()

    def rollback(self) -> None:
        self._end_here()

    def _end_here(self) -> None:
        connection = self._connection._connection
        if connection is None or self._execute_mutex.locked():
            super().rollback()  # closed, or a trip in flight: aiosqlite's own way
        elif connection.in_transaction:
            try:
                connection.rollback()
            except Exception as error:
                self._handle_exception(error)


class _SqliteDBAPI(AsyncAdapt_aiosqlite_dbapi):
    """aiosqlite as SQLAlchemy adapts it, with InlineCursor as the cursor."""

    def __init__(self, readonly: bool) -> None:
        super().__init__(aiosqlite, sqlite3)
        self._connection_cls = _ReadOnlyConnection if readonly else _SqliteConnection

    def connect(self, *arg: Any, **kw: Any) -> _SqliteConnection:
        return self._connection_cls(self, super().connect(*arg, **kw)._connection)


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
        module=_SqliteDBAPI(readonly),
        # A pool, as on PostgreSQL (SQLAlchemy before 2.0.38 gave file databases none).
        poolclass=AsyncAdaptedQueuePool,
        pool_size=POOL_SIZE,
        max_overflow=POOL_OVERFLOW,
        # InlineCursor uses the connection from the event loop's thread too, never at the same
        # time as aiosqlite's thread (one statement or trip at a time per connection).
        connect_args={"timeout": BUSY_TIMEOUT_MS / 1000, "check_same_thread": False},
    )

    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # pysqlite's own transaction handling would defer BEGIN; we issue it ourselves.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        # NORMAL can roll back acknowledged commits after a power loss; FULL cannot.
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
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
