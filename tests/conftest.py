"""Shared fixtures. The intake tests have their own in tests/intake/conftest.py."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.botproc import BotProcess
from tests.emulator import BotApiEmulator
from tests.services import fresh_postgres_database

COORDINATOR = 900_001  # the coordinator of the e2e fixtures: their private chat gets alerts


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The same test on a SQLite file and on a fresh PostgreSQL database of its own."""
    if request.param == "sqlite":
        (tmp_path / "data").mkdir(exist_ok=True)
        yield f"sqlite:///{tmp_path / 'data' / 'cc.db'}"
    else:
        with fresh_postgres_database() as url:
            yield url


@pytest.fixture
async def emulator() -> AsyncIterator[BotApiEmulator]:
    async with BotApiEmulator() as emu:
        yield emu
        assert emu.internal_errors == []


@pytest.fixture
def bot(emulator: BotApiEmulator, tmp_path: Path) -> Iterator[BotProcess]:
    emulator.user(COORDINATOR, first_name="Coordinator")
    process = BotProcess(
        emulator,
        tmp_path,
        coordinator_chat_id=COORDINATOR,
        extra_env={"COORDINATOR_IDS": str(COORDINATOR)},
    )
    yield process
    process.stop()
    assert "Traceback" not in process.log(), process.log()[-3000:]
