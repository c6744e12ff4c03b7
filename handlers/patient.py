"""The patient's private chat: every update becomes one core event.

Handlers send nothing themselves: the service queues replies in the outbox in the same
transaction as the state change, and the outbox sender delivers them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from aiogram import Bot, F, Router
from aiogram.exceptions import TelegramAPIError
from aiogram.filters import Command, CommandObject, CommandStart
from aiogram.types import CallbackQuery, Message, Update

from core.events import BUTTON_EVENTS, Event, EventKind
from core.ports import IncomingFile, Patient
from core.service import ConversationService
from handlers.filters import Where

log = logging.getLogger(__name__)

DOWNLOAD_CHUNK = 64 * 1024
CLOUD_DOWNLOAD_LIMIT = 20 * 1024 * 1024  # getFile on the cloud Bot API: 20 MB at most
# What the bot handles; getUpdates and setWebhook ask Telegram for nothing else.
ALLOWED_UPDATES = ("message", "callback_query")

_COMMANDS = {
    "status": EventKind.STATUS,
    "help": EventKind.HELP,
    "privacy": EventKind.PRIVACY,
    "language": EventKind.LANGUAGE_MENU,
    "delete": EventKind.DELETE_REQUEST,
}


_BUTTON_ACTIONS = frozenset(kind.value for kind in BUTTON_EVENTS)


def _patient(message: Message) -> Patient:
    user = message.from_user
    return Patient(
        chat_id=message.chat.id,
        user_id=user.id if user else message.chat.id,
        language_code=user.language_code if user else None,
    )


def incoming_file(message: Message) -> IncomingFile | None:
    """The file a message carries, if any: a document, or the largest size of a photo."""
    if message.document is not None:
        doc = message.document
        return IncomingFile(
            doc.file_unique_id,
            doc.file_id,
            doc.file_name,
            doc.mime_type,
            doc.file_size,
            message_id=message.message_id,
        )
    if message.photo:
        photo = message.photo[-1]  # Telegram lists sizes smallest first
        return IncomingFile(
            photo.file_unique_id,
            photo.file_id,
            None,
            "image/jpeg",
            photo.file_size,
            compressed_photo=True,
            message_id=message.message_id,
        )
    return None


class TelegramFileSource:
    """Streams a Telegram file in pieces: over HTTP from the cloud, or from the local
    Bot API server's disk (`TELEGRAM_API_LOCAL`), never holding the whole file."""

    def __init__(self, bot: Bot, local_path_map: tuple[str, str] | None = None) -> None:
        self._bot = bot
        self._map = local_path_map

    def too_big(self, incoming: IncomingFile) -> bool:
        """Over what the cloud Bot API lets a bot download (a local server has no limit)."""
        local = self._bot.session.api.is_local
        return not local and incoming.size is not None and incoming.size > CLOUD_DOWNLOAD_LIMIT

    async def chunks(self, incoming: IncomingFile) -> AsyncIterator[bytes]:
        file = await self._bot.get_file(incoming.source_ref)
        assert file.file_path is not None, "getFile returned no path"
        if self._bot.session.api.is_local:
            path = file.file_path
            if self._map and path.startswith(self._map[0]):
                path = self._map[1] + path[len(self._map[0]) :]
            async for piece in _read_local(path):
                yield piece
            return
        url = self._bot.session.api.file_url(self._bot.token, file.file_path)
        async for piece in self._bot.session.stream_content(
            url=url, timeout=60, chunk_size=DOWNLOAD_CHUNK, raise_for_status=True
        ):
            yield piece


async def _read_local(path: str) -> AsyncIterator[bytes]:
    with open(path, "rb") as handle:  # noqa: ASYNC230  # each read runs in a thread below
        while piece := await asyncio.to_thread(handle.read, DOWNLOAD_CHUNK):
            yield piece


def build_router() -> Router:
    """A fresh router (aiogram routers cannot join two dispatchers)."""
    router = Router(name="patient")
    router.message.filter(Where(F.chat.type == "private"))
    router.callback_query.filter(Where(F.message.chat.type == "private"))

    @router.message(CommandStart())
    async def start(
        message: Message, command: CommandObject, service: ConversationService, update_id: int
    ) -> None:
        await service.handle(
            _patient(message), Event(EventKind.START, command.args or ""), update_id
        )

    @router.message(Command(*_COMMANDS))
    async def command(
        message: Message, command: CommandObject, service: ConversationService, update_id: int
    ) -> None:
        await service.handle(_patient(message), Event(_COMMANDS[command.command]), update_id)

    @router.message(Where(F.document | F.photo))
    async def file(
        message: Message,
        service: ConversationService,
        file_source: TelegramFileSource,
        update_id: int,
        album_updates: list[Update] | None = None,
    ) -> None:
        if message.bot is not None:  # "typing..." while the file downloads and is checked
            with contextlib.suppress(TelegramAPIError):
                await message.bot.send_chat_action(message.chat.id, "typing")
        if album_updates:  # the inbox processor grouped the parts of one album
            files = [
                (found, update.update_id)
                for update in album_updates
                if update.message and (found := incoming_file(update.message))
            ]
            for big, big_update in [f for f in files if file_source.too_big(f[0])]:
                event = Event(EventKind.LARGE_FILE, str(big.size))
                await service.handle(_patient(message), event, big_update)
            files = [f for f in files if not file_source.too_big(f[0])]
            if files:
                await service.handle_album(_patient(message), files, file_source)
            return
        incoming = incoming_file(message)
        assert incoming is not None
        if file_source.too_big(incoming):  # the upload page takes it instead
            event = Event(EventKind.LARGE_FILE, str(incoming.size))
            await service.handle(_patient(message), event, update_id)
            return
        await service.handle_file(_patient(message), incoming, file_source, update_id)

    @router.message(Where(F.text))
    async def text(message: Message, service: ConversationService, update_id: int) -> None:
        kind = EventKind.HELP if (message.text or "").startswith("/") else EventKind.TEXT
        await service.handle(_patient(message), Event(kind, message.text or ""), update_id)

    @router.message()
    async def other(message: Message, service: ConversationService, update_id: int) -> None:
        await service.handle(_patient(message), Event(EventKind.UNSUPPORTED), update_id)

    @router.callback_query()
    async def pressed(query: CallbackQuery, service: ConversationService, update_id: int) -> None:
        action, _, arg = (query.data or "").partition(":")
        message = query.message
        try:
            if action not in _BUTTON_ACTIONS:
                log.info("ignored button action update=%s", update_id)
            elif message is not None:
                patient = Patient(
                    message.chat.id, query.from_user.id, query.from_user.language_code
                )
                await service.handle(patient, Event(EventKind(action), arg[:64]), update_id)
        finally:
            # Answered once the reply is queued: that request's round trip to Telegram does
            # not hold the reply back. A replayed, old query can no longer be answered; the
            # event still counts.
            with contextlib.suppress(TelegramAPIError):
                await query.answer()

    return router
