"""The crash-and-fault harness, CI form, and minimal reproductions of what it found.

The harness itself lives in tests/harness.py; bench/kill_bench.py runs its long form.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from aiogram import Bot
from aiogram.client.session.aiohttp import AiohttpSession

from adapters.telegram import OutboxSender
from bot.app import build_app, prepare
from bot.settings import Settings
from core.ports import Patient
from core.replies import Text, reply
from tests.botproc import BotProcess
from tests.emulator import BotApiEmulator
from tests.harness import (
    COORDINATOR,
    GLOBAL_LIMIT,
    HarnessConfig,
    event_text,
    max_per_window,
    run_harness,
)
from tests.scenario import walk_to_complete


@pytest.mark.e2e
@pytest.mark.timeout(1200)  # ~6 min on an idle 2-core machine
async def test_kill_and_fault_harness_short_form(tmp_path: Path) -> None:
    """5 patients, 30 SIGKILLs at random instants, 429/5xx/slow/stalled downloads: nothing
    confirmed is lost or applied twice, vault and rows agree, one alert per complete case,
    no message faster than the limits."""
    config = HarnessConfig(
        patients=5, kills=30, seed=5, alive=(0.3, 2.0), drain_timeout=300.0, workdir=tmp_path
    )
    report = await run_harness(config)
    print(report.summary())
    assert report.counts["kills"] >= 30
    assert report.ok, report.summary()


async def _complete_case_in_process(settings: Settings, chat_id: int, tmp_path: Path) -> None:
    """Walk one patient through the default checklist with the real service (no Telegram):
    the case is complete and its alert waits in the outbox."""
    await asyncio.to_thread(prepare, settings)
    app = build_app(settings)
    patient = Patient(chat_id=chat_id, user_id=chat_id, language_code="en")
    try:
        await walk_to_complete(app, patient, tmp_path, 1, answer="Metformin 500 mg twice a day.")
    finally:
        await app.close()


@pytest.mark.e2e
async def test_alert_in_flight_at_a_kill_is_not_sent_twice(tmp_path: Path) -> None:
    """The alert request reaches Telegram, the bot is killed before it hears the answer."""
    async with BotApiEmulator() as emu:
        emu.user(COORDINATOR, first_name="Coordinator")
        emu.user(4242, first_name="Ann")
        bot = BotProcess(emu, tmp_path, coordinator_chat_id=COORDINATOR)
        settings = Settings(data_dir=bot.data_dir, coordinator_chat_id=COORDINATOR)
        await _complete_case_in_process(settings, 4242, tmp_path)
        emu.faults.delay("sendMessage", 2.0)  # Telegram is slow to answer, as under load
        mark = len(emu.calls)
        bot.start()
        try:
            while not any(
                c.method == "sendMessage" and str(c.params.get("chat_id")) == str(COORDINATOR)
                for c in emu.calls[mark:]
            ):
                assert bot.alive, bot.log()[-2000:]
                await asyncio.sleep(0.01)
            bot.kill()  # the request is at Telegram: it will be delivered
            await asyncio.sleep(2.5)
            emu.faults.delay("sendMessage", 0)
            mark = len(emu.calls)
            bot.start()
            await emu.wait_for_call("getUpdates", timeout=90, since=mark)
            await asyncio.sleep(3.0)  # the restarted bot's outbox has run
        finally:
            bot.stop()
        alerts = [m for m in emu.sent(COORDINATOR) if "is complete" in event_text(m)]
        assert len(alerts) == 1, f"the coordinator got {len(alerts)} alerts for one case"


async def test_outbox_keeps_the_global_limit_with_many_chats(tmp_path: Path) -> None:
    """One pending message for each of 60 patients: no more than 25 leave in any second."""
    async with BotApiEmulator() as emu:
        settings = Settings(data_dir=tmp_path / "data")
        await asyncio.to_thread(prepare, settings)
        app = build_app(settings)
        chats = [emu.user(7_000 + i).id for i in range(60)]
        async with app.store.transaction() as tx:
            for chat_id in chats:
                await tx.enqueue(chat_id, "en", reply(Text("help")))
        emu.faults.delay("sendMessage", 0.3)  # a real round trip, not loopback's 1 ms
        bot = Bot(emu.token, session=AiohttpSession(api=emu.api_server))
        try:
            await OutboxSender(bot, app.store, app.translator, asyncio.Event()).flush()
        finally:
            await bot.session.close()
            await app.close()
        times = [c.time for c in emu.calls_for("sendMessage") if c.status == 200]
        assert len(times) == len(chats)
        assert max_per_window(times, 1.0) <= GLOBAL_LIMIT
