"""Real services for the tests: PostgreSQL at 127.0.0.1:5432 (database `test`).

On a laptop without it the tests that need it skip with a visible reason; with
REQUIRE_SERVICES=1 (set by .ci/run) its absence fails them instead.
"""

from __future__ import annotations

import os
import secrets
import socket
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

PG_HOST, PG_PORT = "127.0.0.1", 5432
PG_ADMIN_URL = os.environ.get(
    "TEST_POSTGRES_URL", f"postgresql://postgres@{PG_HOST}:{PG_PORT}/test"
)


def services_required() -> bool:
    return os.environ.get("REQUIRE_SERVICES", "") in {"1", "true", "yes"}


def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def need_postgres() -> None:
    if _reachable(PG_HOST, PG_PORT):
        return
    message = f"PostgreSQL is not answering at {PG_HOST}:{PG_PORT}"
    if services_required():
        pytest.fail(message + " and REQUIRE_SERVICES=1")
    pytest.skip(message)


@contextmanager
def fresh_postgres_database() -> Iterator[str]:
    """A new, empty database for one test; dropped afterwards."""
    import psycopg

    need_postgres()
    name = f"cc_test_{secrets.token_hex(6)}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
