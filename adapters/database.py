"""Database engine set-up: SQLite (WAL, synchronous=FULL, BEGIN IMMEDIATE) or PostgreSQL."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from contextvars import ContextVar
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine


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
        url, pool_size=POOL_SIZE, max_overflow=POOL_OVERFLOW, connect_args={"timeout": 30}
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
