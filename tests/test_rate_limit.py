"""The outbox's one-process rate limiter (adapters.telegram._RateLimiter) on its own."""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import pytest

from adapters.telegram import GLOBAL_PER_SECOND, _RateLimiter
from tests.harness import GLOBAL_LIMIT, max_per_window


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
