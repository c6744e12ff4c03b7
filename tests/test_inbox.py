"""The inbox processor on a real SQLite store, with a stand-in handler that notes what runs."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiogram import Bot, Dispatcher, Router
from aiogram.types import Message

from adapters.telegram import QUICK_LANES, InboxProcessor
from bot.app import App, build_app, prepare
from bot.settings import Settings

TOKEN = "123456789:AAHdqTcvCH1vGWJxfSeofSAs0K5PALDsaw"  # never used on a network here


def processor_with(app: App, handler: Callable[..., Awaitable[None]]) -> tuple[Bot, InboxProcessor]:
    """An inbox processor on the app's store whose only handler, for every message, is
    `handler`; the bot is never asked anything (its session is closed by the test)."""
    router = Router()
    router.message()(handler)
    dispatcher = Dispatcher()
    dispatcher.include_router(router)
    bot = Bot(TOKEN)
    return bot, InboxProcessor(bot, dispatcher, app.store, asyncio.Event(), print, {})


def message(update_id: int, chat_id: int, **content: Any) -> tuple[int, int, str]:
    user = {"id": chat_id, "is_bot": False, "first_name": "P"}
    body = {"message_id": update_id, "date": 0, "chat": {"id": chat_id, "type": "private"}}
    payload = {"update_id": update_id, "message": {**body, "from": user, **content}}
    return update_id, chat_id, json.dumps(payload)


async def test_texts_in_work_are_capped_files_are_not_and_each_chat_keeps_its_order(
    tmp_path: Path,
) -> None:
    """40 chats' texts at once: at most QUICK_LANES in a handler together; files sent
    meanwhile do not wait for a slot; every chat's updates are handled in order, once."""
    settings = Settings(data_dir=tmp_path / "data")
    await asyncio.to_thread(prepare, settings)
    app = build_app(settings)
    in_work: dict[str, int] = {"text": 0, "file": 0}
    peaks: dict[str, int] = {"text": 0, "file": 0, "text_beside_files": 0}
    handled: list[tuple[int, int]] = []  # (chat, update)
    release_files, texts_through, slots_full = asyncio.Event(), asyncio.Event(), asyncio.Event()

    async def handler(message: Message) -> None:
        kind = "file" if message.document else "text"
        in_work[kind] += 1
        peaks[kind] = max(peaks[kind], in_work[kind])
        if kind == "text" and in_work["file"]:
            peaks["text_beside_files"] = max(peaks["text_beside_files"], in_work["text"])
        if kind == "file":  # a download that takes long
            await release_files.wait()
        else:  # the first texts hold on until the slots are all taken, the rest go through
            if in_work["text"] == QUICK_LANES:
                slots_full.set()
            await asyncio.wait_for(slots_full.wait(), timeout=20)
        handled.append((message.chat.id, message.message_id))
        in_work[kind] -= 1
        if len(handled) == len(texts):
            texts_through.set()

    bot, processor = processor_with(app, handler)
    document = {"document": {"file_id": "f", "file_unique_id": "u", "file_size": 10}}
    updates = [message(1 + i, 500 + i, **document) for i in range(QUICK_LANES + 2)]
    texts = [
        message(1000 + 100 * step + i, 2000 + i, text="hi") for step in range(3) for i in range(40)
    ]
    try:
        await app.store.store_updates(updates + texts)
        draining = asyncio.create_task(processor.drain_all())

        await asyncio.wait_for(texts_through.wait(), timeout=60)  # the files still hold on
        assert sorted(u for c, u in handled) == sorted(u for u, c, _ in texts)
        release_files.set()
        await asyncio.wait_for(draining, timeout=30)
    finally:
        await bot.session.close()
        await app.close()
    assert peaks["text"] == QUICK_LANES  # the cap is reached and never passed
    assert peaks["file"] == QUICK_LANES + 2  # files took no slot
    assert peaks["text_beside_files"] == QUICK_LANES  # nor did they take the texts' slots
    for i in range(40):
        assert [u for c, u in handled if c == 2000 + i] == [1000 + 100 * s + i for s in range(3)]
    assert len(handled) == len(updates) + len(texts)


async def test_a_chats_later_updates_wait_for_its_failed_one(tmp_path: Path) -> None:
    """An update that fails waits for its retry, and its chat's later updates wait with it:
    an album part or a "done" press overtaking it would land on the wrong item. Another
    chat goes on meanwhile."""
    settings = Settings(data_dir=tmp_path / "data")
    await asyncio.to_thread(prepare, settings)
    app = build_app(settings)
    handled: list[int] = []
    failures = {1: 2}  # update 1 fails twice (retried after 1 s, then 2 s), then succeeds
    all_handled = asyncio.Event()

    async def handler(message: Message) -> None:
        if failures.get(message.message_id, 0):
            failures[message.message_id] -= 1
            raise ValueError("the handler failed")
        handled.append(message.message_id)
        if len(handled) == 3:
            all_handled.set()

    bot, processor = processor_with(app, handler)
    try:
        await app.store.store_updates(
            [message(1, 3001, text="a"), message(2, 3001, text="b"), message(3, 3002, text="c")]
        )
        running = asyncio.create_task(processor.run())
        await asyncio.wait_for(all_handled.wait(), timeout=30)
        processor.stop()
        await running
    finally:
        await bot.session.close()
        await app.close()
    assert handled.index(1) < handled.index(2)
    assert handled.index(3) < handled.index(1)  # the other chat did not wait
