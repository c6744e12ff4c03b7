"""Schema migrations (Alembic), run by `care-companion migrate` and at every start.

Policy: every migration is additive (new tables, new nullable columns), so instances still
running the previous version keep working while `migrate` runs; tests/test_ops.py checks
the migration files for destructive operations. The reverse is not safe: code must never
run on a schema newer than it knows, so the revision is checked before anything else.
"""

from __future__ import annotations

import ast
import asyncio
import functools
from pathlib import Path
from typing import TYPE_CHECKING

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from adapters.database import create_engine

if TYPE_CHECKING:
    from alembic.config import Config

MIGRATIONS = Path(__file__).parent / "migrations"
VERSION_TABLE = "alembic_version"  # Alembic's default, which env.py keeps


class SchemaTooNewError(RuntimeError):
    """The database was migrated by a newer version of care-companion than this one."""


def alembic_config(database_url: str) -> Config:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return config


def _literals(path: Path, names: set[str]) -> dict[str, object]:
    """The module-level `name = literal` (or `name: type = literal`) values of a file."""
    found: dict[str, object] = {}
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Assign):
            targets, value = node.targets, node.value
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            targets, value = [node.target], node.value
        else:
            continue
        for target in targets:
            if isinstance(target, ast.Name) and target.id in names:
                found[target.id] = ast.literal_eval(value)
    return found


@functools.cache
def _revision_links() -> dict[str, str | None]:
    """Each migration's revision and the one it revises, read from the files' own
    `revision` and `down_revision` lines without importing them: importing Alembic costs
    more than the rest of a start that finds the schema already at head (the usual start).
    tests/test_migrations.py checks this reading against Alembic's."""
    links: dict[str, str | None] = {}
    for path in sorted((MIGRATIONS / "versions").glob("*.py")):
        values = _literals(path, {"revision", "down_revision"})
        down = values.get("down_revision")
        links[str(values["revision"])] = None if down is None else str(down)
    return links


def head_revision() -> str:
    links = _revision_links()
    heads = set(links) - set(links.values())
    if len(heads) != 1:
        raise RuntimeError(f"the migrations must form one line; heads: {sorted(heads)}")
    return heads.pop()


def known_revisions() -> set[str]:
    return set(_revision_links())


def _stored_revision(connection: Connection) -> str | None:
    if not sa.inspect(connection).has_table(VERSION_TABLE):
        return None
    table = sa.table(VERSION_TABLE, sa.column("version_num"))
    revision = connection.execute(sa.select(table.c.version_num)).scalar()
    return None if revision is None else str(revision)


async def current_revision(database_url: str) -> str | None:
    """The database's Alembic revision, None when it has no schema yet.

    Read-only (on SQLite a deferred, query-only transaction), so it never waits for the
    write lock of a running bot.
    """
    engine = create_engine(database_url, readonly=True)
    try:
        async with engine.connect() as connection:
            return await connection.run_sync(_stored_revision)
    finally:
        await engine.dispose()


def refuse_unknown(revision: str | None) -> None:
    """SchemaTooNewError when *revision* is not one of ours (a newer version wrote it)."""
    if revision is not None and revision not in known_revisions():
        raise SchemaTooNewError(
            f"database schema {revision} is newer than this version of care-companion "
            "knows; upgrade the code"
        )


def upgrade(database_url: str) -> None:
    """Bring the schema to the newest revision this code knows. Blocking: run before the loop.

    An old instance restarted after a newer one migrated must stop here with a clear
    line, not run against columns and tables it does not know. Alembic is imported only
    when there is something to migrate: a restart on an up-to-date schema reads one row.
    """
    revision = asyncio.run(current_revision(database_url))
    refuse_unknown(revision)
    if revision == head_revision():
        return
    from alembic import command

    command.upgrade(alembic_config(database_url), "head")
