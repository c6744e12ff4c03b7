"""The Alembic migrations build exactly the schema the models describe, on both engines."""

from __future__ import annotations

from alembic import command

from adapters.migrate import alembic_config, head_revision, upgrade


def test_migrations_match_the_models(database_url: str) -> None:
    """After `upgrade head`, autogenerate finds nothing to add: models and migrations agree."""
    upgrade(database_url)
    command.check(alembic_config(database_url))  # raises if anything differs


def test_upgrade_twice_is_harmless(database_url: str) -> None:
    upgrade(database_url)
    upgrade(database_url)
    assert head_revision() >= "0004"
