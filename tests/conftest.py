"""Shared fixtures. The intake tests have their own in tests/intake/conftest.py."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.botproc import BotProcess
from tests.emulator import BotApiEmulator

COORDINATOR = 900_001  # the coordinator of the e2e fixtures: their private chat gets alerts


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
