"""The bot's Bot API client as `care-companion run` builds it (bot.polling.make_bot)."""

from __future__ import annotations

import gc
import weakref
from pathlib import Path

from aiogram import Bot
from aiogram.client.session.aiohttp import AiohttpSession
from aiogram.methods import GetMe, Response, SendMessage

from bot.polling import make_bot, set_aside_startup_objects
from bot.settings import Settings
from tests.emulator import BotApiEmulator


async def _parsed_types_after_a_collection(bot: Bot, chat_id: int) -> list[bool]:
    """Answers are parsed, then a garbage collection runs: are their response classes alive?"""
    await bot.get_me()
    await bot.send_message(chat_id, "hello")
    refs = [weakref.ref(Response[m.__returning__]) for m in (GetMe, SendMessage)]
    gc.collect()
    return [ref() is not None for ref in refs]


async def test_parsed_response_classes_are_not_rebuilt_after_a_collection(
    emulator: BotApiEmulator, tmp_path: Path
) -> None:
    """pydantic caches `Response[T]` weakly: without the bot's middleware the classes die at
    the next collection and every answer rebuilds one (a quarter of the CPU under load)."""
    chat_id = emulator.user(4242).id
    plain = Bot(emulator.token, session=AiohttpSession(api=emulator.api_server))
    try:
        assert await _parsed_types_after_a_collection(plain, chat_id) == [False, False]
    finally:
        await plain.session.close()
    settings = Settings(
        data_dir=tmp_path, bot_token=emulator.token, telegram_api_base_url=emulator.base_url
    )
    bot = make_bot(settings)
    try:
        assert await _parsed_types_after_a_collection(bot, chat_id) == [True, True]
    finally:
        await bot.session.close()


def test_startup_objects_are_set_aside_from_garbage_collection() -> None:
    """What start-up built is frozen: a full collection no longer walks it (each such walk
    paused the bot ~140 ms under load); objects made later are still collected, collection
    being on again (it is off while the bot starts)."""
    gc.unfreeze()
    gc.disable()
    try:
        set_aside_startup_objects()
        assert gc.isenabled()
        frozen = gc.get_freeze_count()
        assert frozen > 10_000  # this process's modules and pydantic schemas at least
        later = weakref.ref(_Cycle())
        gc.collect()
        assert later() is None  # garbage made after the freeze is still collected
        assert gc.get_freeze_count() == frozen
    finally:
        gc.unfreeze()
        gc.enable()


class _Cycle:
    def __init__(self) -> None:
        self.me = self
