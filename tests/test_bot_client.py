"""The bot's Bot API client as `care-companion run` builds it (bot.polling.make_bot)."""

from __future__ import annotations

import gc
import json
import subprocess
import sys
import warnings
import weakref
from pathlib import Path

from aiogram import Bot
from aiogram.client.session.aiohttp import AiohttpSession
from aiogram.methods import GetMe, Response, SendMessage

from bot.polling import FULL_GC_EVERY, make_bot, set_aside_startup_objects
from bot.settings import Settings
from tests.botproc import REPO
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
    being on again (it is off while the bot starts), the young generations as often as
    before, full collections ten times more rarely."""
    thresholds = gc.get_threshold()
    gc.unfreeze()
    gc.disable()
    try:
        set_aside_startup_objects()
        assert gc.isenabled()
        frozen = gc.get_freeze_count()
        assert frozen > 10_000  # this process's modules and pydantic schemas at least
        # Full collections ten times rarer than Python's default; the young ones unchanged.
        assert gc.get_threshold() == (700, 10, FULL_GC_EVERY)
        full_before = gc.get_stats()[2]["collections"]
        later = weakref.ref(_Cycle())
        for _ in range(100_000):  # cyclic garbage, collected without being asked
            _Cycle()
            if later() is None:
                break
        assert later() is None
        assert gc.get_stats()[2]["collections"] == full_before  # only young ones were needed
        later = weakref.ref(_Cycle())
        gc.collect()
        assert later() is None  # garbage made after the freeze is still collected
        assert gc.get_freeze_count() == frozen
    finally:
        gc.unfreeze()
        gc.set_threshold(*thresholds)
        gc.enable()


class _Cycle:
    def __init__(self) -> None:
        self.me = self


# In a fresh interpreter: aiogram imported by bot.aiogram_types (as `care-companion run` does),
# then the JSON schemas of the types every update goes through, and a rich update parsed.
_ORDERED_BUILD = """
import json, sys, warnings
warnings.simplefilter("ignore")
from bot.aiogram_types import import_aiogram
import_aiogram()
from pydantic import BaseModel
from aiogram import methods, types
complete = all(
    model.__pydantic_complete__
    for module in (types, methods)
    for model in (getattr(module, name) for name in module.__all__)
    if isinstance(model, type) and issubclass(model, BaseModel)
    and not model.__pydantic_generic_metadata__["parameters"]
)
schemas = {name: getattr(types, name).model_json_schema() for name in sys.argv[1:]}
parsed = types.Update.model_validate(json.loads(sys.stdin.read())).model_dump(mode="json")
print(json.dumps({"complete": complete, "schemas": schemas, "parsed": parsed}))
"""
_RICH_UPDATE = {
    "update_id": 7,
    "message": {
        "message_id": 3,
        "date": 1_700_000_000,
        "chat": {"id": 42, "type": "private", "first_name": "Ann"},
        "from": {"id": 42, "is_bot": False, "first_name": "Ann", "language_code": "th"},
        "caption": "scan",
        "document": {"file_id": "d", "file_unique_id": "u", "file_name": "a.pdf"},
        "reply_to_message": {
            "message_id": 2,
            "date": 1_700_000_000,
            "chat": {"id": 42, "type": "private"},
            "photo": [{"file_id": "p", "file_unique_id": "q", "width": 9, "height": 9}],
            "reply_markup": {"inline_keyboard": [[{"text": "ok", "callback_data": "x"}]]},
        },
    },
}


def test_types_built_in_dependency_order_are_the_same_types() -> None:
    """bot.aiogram_types builds aiogram's types in another order, a third faster: every model
    is complete, the schemas are those of aiogram's own import (this process's), and an update
    parses the same."""
    from aiogram import types

    names = ["Update", "Message", "CallbackQuery"]
    run = subprocess.run(
        [sys.executable, "-c", _ORDERED_BUILD, *names],
        input=json.dumps(_RICH_UPDATE),
        capture_output=True,
        text=True,
        check=True,
        timeout=180,
        cwd=REPO,
    )
    ordered = json.loads(run.stdout)
    assert ordered["complete"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # aiogram's Default(...) values have no JSON form
        assert ordered["schemas"] == {
            name: getattr(types, name).model_json_schema() for name in names
        }
    assert ordered["parsed"] == types.Update.model_validate(_RICH_UPDATE).model_dump(mode="json")
