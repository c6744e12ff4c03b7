"""Faults answered cleanly, against the real bot process: a file that cannot be fetched is
parked after a few tries (patient and coordinator told, later messages still served), and
handled once the operator puts it back in line (`inbox retry`); 429 and 5xx on sends are
waited out and retried, never dropped."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.botproc import BotProcess
from tests.emulator import BotApiEmulator
from tests.files import pdf_bytes
from tests.patient_driver import PatientDriver
from tests.test_shell_and_cli import run_cli

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
    database = bot.data_dir / "care-companion.db"

    def inbox_row() -> tuple[str, int]:
        with sqlite3.connect(database) as db:
            return db.execute(
                "select status, attempts from inbox where update_id = ?", (update_id,)
            ).fetchone()

    def files() -> int:
        with sqlite3.connect(database) as db:
            return db.execute("select count(*) from case_files").fetchone()[0]

    assert inbox_row() == ("parked", 5) and files() == 0

    # The operator sees it (never what it holds) and, the Bot API giving the file again,
    # puts it back in line while the bot runs: it is handled, once.
    listed = await asyncio.to_thread(run_cli, bot.workdir, "inbox", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    parked = json.loads(listed.stdout)
    assert [(p["update_id"], p["attempts"], p["error"]) for p in parked] == [
        (update_id, 5, "TelegramBadRequest")
    ]
    assert parked[0]["case_id"] and "referral" not in listed.stdout
    emulator.faults.clear()
    retried = await asyncio.to_thread(run_cli, bot.workdir, "inbox", "retry", str(update_id))
    assert retried.returncode == 0 and "1 update(s) back in line" in retried.stdout
    deadline = time.monotonic() + 60
    while inbox_row()[0] != "done":
        assert time.monotonic() < deadline, "the update put back in line was not handled"
        await asyncio.sleep(0.2)
    assert files() == 1
    again = await asyncio.to_thread(run_cli, bot.workdir, "inbox", "retry", str(update_id))
    assert again.returncode == 1 and f"not parked: {update_id}" in again.stderr
    with sqlite3.connect(database) as db:
        audited = db.execute("select actor, detail from audit_log where action = 'inbox.retry'")
        assert audited.fetchall() == [("operator", f"update={update_id}")]


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
