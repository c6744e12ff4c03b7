"""Filters checked on the event loop.

aiogram runs a plain (synchronous) filter, a magic `F...` one included, in a worker thread
(`asyncio.to_thread`): a thread hop per filter per update, several per update, each
contending for the GIL with the database driver's threads under load. These checks are a
few attribute reads; `Where(F....)` runs them in place (aiogram awaits a `Filter`).
"""

from __future__ import annotations

from typing import Any

from aiogram.filters import Filter
from aiogram.types import TelegramObject
from aiogram.utils.magic_filter import MagicFilter


class Where(Filter):
    def __init__(self, magic: MagicFilter) -> None:
        self._magic = magic

    async def __call__(self, event: TelegramObject) -> Any:
        return self._magic.resolve(event)
