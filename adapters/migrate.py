"""Schema migrations (Alembic), run by `care-companion migrate` and at every start.

Policy: every migration is additive (new tables, new nullable columns), so instances still
running the previous version keep working while `migrate` runs; tests/test_ops.py checks
the migration files for destructive operations. The reverse is not safe: code must never
run on a schema newer than it knows, so the revision is checked before anything else.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from adapters.database import create_engine

MIGRATIONS = Path(__file__).parent / "migrations"


class SchemaTooNewError(RuntimeError):
    """The database was migrated by a newer version of care-companion than this one."""


def alembic_config(database_url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return config


def _scripts() -> ScriptDirectory:
    return ScriptDirectory.from_config(alembic_config("sqlite://"))


def head_revision() -> str:
    head = _scripts().get_current_head()
    assert head is not None
    return head


def known_revisions() -> set[str]:
    return {script.revision for script in _scripts().walk_revisions()}


async def current_revision(database_url: str) -> str | None:
    """The database's Alembic revision, None when it has no schema yet.

    Read-only (on SQLite a deferred, query-only transaction), so it never waits for the
    write lock of a running bot.
    """
    engine = create_engine(database_url, readonly=True)
    try:
        async with engine.connect() as connection:
            return await connection.run_sync(
                lambda sync: MigrationContext.configure(sync).get_current_revision()
            )
    finally:
        await engine.dispose()


def refuse_unknown(revision: str | None) -> None:
    """SchemaTooNewError when *revision* is not one of ours (a newer version wrote it)."""
    if revision is not None and revision not in known_revisions():
        raise SchemaTooNewError(
            f"database schema {revision} is newer than this version of care-companion "
            "knows; upgrade the code"
        )


def check_schema_known(database_url: str) -> None:
    """Refuse to go on against a schema newer than this code. Blocking: run before the loop."""
    refuse_unknown(asyncio.run(current_revision(database_url)))


def upgrade(database_url: str) -> None:
    """Bring the schema to the newest revision this code knows. Blocking: run before the loop.

    An old instance restarted after a newer one migrated must stop here with a clear
    line, not run against columns and tables it does not know.
    """
    check_schema_known(database_url)
    command.upgrade(alembic_config(database_url), "head")
