"""The Alembic migrations build exactly the schema the models describe, on both engines."""

from __future__ import annotations

import asyncio
import subprocess
import sys

from alembic import command
from alembic.script import ScriptDirectory

from adapters.migrate import (
    alembic_config,
    current_revision,
    head_revision,
    known_revisions,
    upgrade,
)


def test_migrations_match_the_models(database_url: str) -> None:
    """After `upgrade head`, autogenerate finds nothing to add: models and migrations agree."""
    upgrade(database_url)
    command.check(alembic_config(database_url))  # raises if anything differs


def test_upgrade_twice_is_harmless(database_url: str) -> None:
    upgrade(database_url)
    upgrade(database_url)
    assert head_revision() >= "0004"


def test_revisions_read_from_the_files_are_alembics() -> None:
    """The start reads head and known revisions without importing Alembic: the same answer."""
    scripts = ScriptDirectory.from_config(alembic_config("sqlite://"))
    assert head_revision() == scripts.get_current_head()
    assert known_revisions() == {script.revision for script in scripts.walk_revisions()}


def test_a_database_at_an_older_revision_is_still_migrated(database_url: str) -> None:
    """Alembic is imported only when the schema is behind: then it still runs."""
    command.upgrade(alembic_config(database_url), "0008")
    assert asyncio.run(current_revision(database_url)) == "0008"
    upgrade(database_url)
    assert asyncio.run(current_revision(database_url)) == head_revision()
    command.check(alembic_config(database_url))


def test_a_start_at_head_does_not_import_alembic(database_url: str) -> None:
    """What makes a restart cheap: an up-to-date schema is one read, no Alembic."""
    upgrade(database_url)
    probe = (
        "import sys; from adapters.migrate import upgrade; "
        f"upgrade({database_url!r}); print('alembic' in sys.modules)"
    )
    run = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=120
    )
    assert run.stdout.strip() == "False"
