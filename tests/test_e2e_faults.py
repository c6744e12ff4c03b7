"""Faults answered cleanly, against the real bot process: a file that can never be fetched
is parked after a few tries (patient and coordinator told, later messages still served);
429 and 5xx on sends are waited out and retried, never dropped."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.botproc import BotProcess
from tests.emulator import BotApiEmulator
from tests.files import pdf_bytes
from tests.patient_driver import PatientDriver

pytestmark = pytest.mark.e2e
COORDINATOR = 900_003


@pytest.fixture
async def emulator() -> AsyncIterator[BotApiEmulator]:
    async with BotApiEmulator() as emu:
        yield emu


@pytest.fixture
def bot(emulator: BotApiEmulator, tmp_path: Path) -> Iterator[BotProcess]:
    emulator.user(COORDINATOR, first_name="Coordinator")
    process = BotProcess(emulator, tmp_path, coordinator_chat_id=COORDINATOR)
    yield process
    process.stop()
    assert "Traceback" not in process.log()


async def _at_first_item(bot: BotProcess, emulator: BotApiEmulator, user_id: int) -> PatientDriver:
    mark = len(emulator.calls)
    bot.start()
    await emulator.wait_for_call("getUpdates", timeout=60, since=mark)
    patient = PatientDriver(emulator, emulator.user(user_id, first_name="Di"))
    patient.say("/start")
    await patient.tap("I agree")
    await patient.tap("General medical review")
    await patient.introduce()
    await patient.expect("Step 1 of 7")
    return patient


async def test_unfetchable_file_is_parked_and_the_chat_goes_on(
    emulator: BotApiEmulator, bot: BotProcess
) -> None:
    patient = await _at_first_item(bot, emulator, 7101)
    emulator.faults.fail_next(
        "getFile", status=400, count=20, description="Bad Request: wrong file_id"
    )
    update_id = patient.send_file(pdf_bytes(["Referral"]), "referral.pdf", "application/pdf")
    await patient.expect("something went wrong", timeout=60)
    await emulator.wait_for_text(COORDINATOR, "something went wrong", timeout=30)
    patient.say("/status")  # the next message of this chat is still served
    await patient.expect("Your records so far")
    with sqlite3.connect(bot.data_dir / "care-companion.db") as db:
        status, attempts = db.execute(
            "select status, attempts from inbox where update_id = ?", (update_id,)
        ).fetchone()
    assert status == "parked" and attempts == 5


async def test_429_and_5xx_on_sends_are_waited_out(
    emulator: BotApiEmulator, bot: BotProcess
) -> None:
    patient = await _at_first_item(bot, emulator, 7102)
    emulator.faults.fail_next("sendMessage", status=429, retry_after=2, count=1)
    emulator.faults.fail_next("sendMessage", status=502, count=2)
    started = time.monotonic()
    patient.say("/status")
    await patient.expect("Your records so far", timeout=60)
    assert time.monotonic() - started >= 2.0  # retry_after was honoured
    refused = [c for c in emulator.calls_for("sendMessage") if c.status in (429, 502)]
    assert len(refused) == 3
    await asyncio.sleep(1.0)
    statuses = [
        e
        for e in emulator.events
        if e.get("chat_id") == 7102 and "Your records" in (e.get("text") or "")
    ]
    assert len(statuses) == 1  # delivered once, not once per retry
