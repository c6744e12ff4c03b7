"""The outbox's one-process rate limiter (adapters.telegram._RateLimiter) on its own, and the
gate that checks the limits again as each request leaves (SendGate)."""

from __future__ import annotations

import asyncio
import time
from collections import Counter, deque
from datetime import timedelta
from pathlib import Path

import pytest
from aiogram import Bot
from aiogram.client.session.aiohttp import AiohttpSession

from adapters.database import create_engine
from adapters.keyring import KeyRing
from adapters.keys import new_data_key
from adapters.migrate import upgrade
from adapters.store import SqlStore, utcnow
from adapters.tables import OutboxRow
from adapters.telegram import (
    CHAT_BURST,
    CHAT_WINDOW_S,
    GLOBAL_PER_SECOND,
    GROUP_WINDOW_S,
    SWEEP_MIN_CHATS,
    SendGate,
    _RateLimiter,
    recent_sends,
)
from tests.emulator import BotApiEmulator
from tests.harness import GLOBAL_LIMIT, max_per_window, rate_breaches


async def test_sixty_waiting_chats_are_paced_and_each_sleeps_about_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """60 chats ask at once: their turns come evenly paced at GLOBAL_PER_SECOND, in the order
    asked, and a waiting chat is not woken at every free slot to sleep again."""
    limiter = _RateLimiter()
    sleeps: Counter[str] = Counter()
    real_sleep = asyncio.sleep

    async def counted_sleep(delay: float, *args: object) -> None:
        task = asyncio.current_task()
        sleeps[task.get_name() if task else "?"] += 1
        await real_sleep(delay)

    monkeypatch.setattr(asyncio, "sleep", counted_sleep)
    turns: list[tuple[float, int]] = []

    async def send(chat_id: int) -> None:
        await limiter.wait_turn(chat_id)
        turns.append((time.monotonic(), chat_id))

    chats = list(range(1_000, 1_060))
    tasks = []
    for chat_id in chats:  # asked in this order
        tasks.append(asyncio.create_task(send(chat_id), name=f"chat-{chat_id}"))
        await real_sleep(0)
    await asyncio.gather(*tasks)
    # Paced at GLOBAL_PER_SECOND, 21 turns can fall within a second by a few microseconds of
    # clock reading; what is promised (and checked at the emulator) is GLOBAL_LIMIT.
    assert max_per_window([t for t, _ in turns], 1.0) <= GLOBAL_LIMIT
    span = turns[-1][0] - turns[0][0]  # a process that wakes late only makes it longer
    assert span >= 0.99 * (len(chats) - 1) / GLOBAL_PER_SECOND
    assert [c for _, c in turns] == chats
    assert max(sleeps.values()) <= 2, sleeps.most_common(3)


async def test_a_chat_gets_three_at_once_then_about_one_a_second() -> None:
    limiter = _RateLimiter()
    times = []
    for _ in range(5):
        await limiter.wait_turn(42)
        times.append(time.monotonic())
    assert times[2] - times[0] < 1.0  # a burst of three
    assert times[3] - times[0] >= 3.0  # then the window: no fourth within it


async def test_turns_given_together_still_leave_within_the_limits() -> None:
    """What a stalled event loop does: 30 chats' turns, and 5 messages to one chat, all
    handed over at the same instant. The gate lets them reach Telegram within the limits
    (without it all 35 arrive within a few milliseconds)."""
    async with BotApiEmulator() as emu:
        session = AiohttpSession(api=emu.api_server)
        session.middleware(SendGate())
        bot = Bot(emu.token, session=session)
        chats = [emu.user(8_000 + i).id for i in range(30)]
        busy = emu.user(9_000).id
        try:
            await asyncio.gather(
                *(bot.send_message(chat, "hello") for chat in chats),
                *(bot.send_message(busy, f"part {n}") for n in range(5)),
                bot.send_chat_action(busy, "typing"),  # not a message: not held
            )
        finally:
            await bot.session.close()
        sends = [c for c in emu.calls_for("sendMessage") if c.status == 200]
        assert len(sends) == 35
        times = sorted(c.time for c in sends)
        assert max_per_window(times, 1.0) <= GLOBAL_LIMIT
        assert times[-1] - times[0] >= 1.0  # some had to wait
        to_busy = sorted(c.time for c in sends if c.params.get("chat_id") in (busy, str(busy)))
        assert max_per_window(to_busy, 3.0) <= CHAT_BURST
        assert rate_breaches(sends) == []
        action = emu.calls_for("sendChatAction")[0].time
        assert action - times[0] < 0.5  # not held behind the messages


def test_the_limiter_forgets_chats_whose_windows_are_over() -> None:
    """Sends to many chats, then time passes beyond the longest window: the limiter keeps
    only the chats it sent to since, not one entry for every chat it ever wrote to."""
    limiter = _RateLimiter()
    limiter._last[10**9] = deque()  # a turn cancelled after its old times were dropped
    for chat in range(3 * SWEEP_MIN_CHATS):
        limiter.record(chat, 1000.0)
    assert len(limiter._last) == 3 * SWEEP_MIN_CHATS  # windows still open: all kept...
    assert 10**9 not in limiter._last  # ...but the empty one
    for chat in range(CHAT_BURST):
        limiter.record(-1, 1000.0 + chat)  # a group, the longest window
    later = 1000.0 + GROUP_WINDOW_S
    for chat in range(SWEEP_MIN_CHATS):
        limiter.record(100_000 + chat, later)
    assert set(limiter._last) <= {-1, *range(100_000, 100_000 + SWEEP_MIN_CHATS)}
    assert -1 in limiter._last  # its last send is within the group window


async def test_a_restart_counts_what_the_previous_run_may_have_sent(tmp_path: Path) -> None:
    """The previous run sent a chat two messages 1 s ago and was killed with a third in
    flight (its row still pending): after the restart the chat's window is full, so its
    next message waits until the first of those is a window old; a chat the previous run
    did not write to lately is not held. Sends older than the longest window, and more
    unsure rows than a window holds, do not count."""
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    await asyncio.to_thread(upgrade, url)
    store = SqlStore(create_engine(url), KeyRing(new_data_key()))
    now = utcnow()

    def row(chat_id: int, status: str, ago: float | None = None) -> OutboxRow:
        sent_at = now - timedelta(seconds=ago) if ago is not None else None
        return OutboxRow(
            chat_id=chat_id, locale="en", payload="{}", status=status, created_at=now,
            sent_at=sent_at,
        )  # fmt: skip

    async with store.session() as session:
        for outbox_row in (
            row(1, "sent", 1.0),
            row(1, "sent", 0.8),
            row(1, "pending"),  # in flight at the kill, maybe received
            row(2, "sent", GROUP_WINDOW_S + 5),  # long ago
            *(row(3, "pending") for _ in range(5)),
            row(-7, "sent", 30.0),
            row(-7, "sending"),  # an alert claimed before its request
        ):
            session.add(outbox_row)
    try:
        ages = await recent_sends(store)
    finally:
        await store.engine.dispose()
    assert sorted(ages) == [-7, 1, 3]
    assert [round(age) for age in sorted(ages[1], reverse=True)] == [1, 1, 0]
    assert ages[3] == [0.0] * CHAT_BURST
    assert [round(age) for age in sorted(ages[-7], reverse=True)] == [30, 0]

    async with BotApiEmulator() as emu:
        gate = SendGate()
        session = AiohttpSession(api=emu.api_server)
        session.middleware(gate)
        bot = Bot(emu.token, session=session)
        busy, quiet = emu.user(1).id, emu.user(4).id
        gate.remember({busy: ages[1]})
        started = time.monotonic()
        try:
            await bot.send_message(quiet, "hello")
            assert time.monotonic() - started < 0.5  # not held
            await bot.send_message(busy, "next")
        finally:
            await bot.session.close()
        # The oldest of the three a window old: CHAT_WINDOW_S after it was sent (1 s ago).
        assert time.monotonic() - started >= CHAT_WINDOW_S - 1.0 - 0.05
