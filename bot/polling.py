"""Long-polling mode: the bot's Telegram loops (poller, inbox processor, outbox sender)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal

from aiogram import Bot, Dispatcher
from aiogram.client.session.aiohttp import AiohttpSession
from aiogram.client.telegram import TelegramAPIServer
from aiogram.types import BotCommand

from adapters.telegram import InboxProcessor, OutboxSender, Poller, parked_notice
from bot.app import App, build_app
from bot.settings import Settings
from handlers import patient

log = logging.getLogger(__name__)

COMMANDS = ("start", "status", "language", "help", "privacy")


def make_bot(settings: Settings) -> Bot:
    assert settings.bot_token is not None
    server = TelegramAPIServer.from_base(
        settings.telegram_api_base_url, is_local=settings.telegram_api_local
    )
    return Bot(settings.bot_token, session=AiohttpSession(api=server))


async def set_commands(bot: Bot, app: App) -> None:
    """The command menu, in every shipped language (Telegram picks by the user's language)."""
    for locale in (None, *app.locales):
        commands = [
            BotCommand(
                command=name,
                description=app.translator.gettext(
                    locale or app.settings.default_locale, f"command.{name}"
                ),
            )
            for name in COMMANDS
        ]
        await bot.set_my_commands(commands, language_code=locale)


async def run_polling(settings: Settings) -> None:
    app = build_app(settings)
    bot = make_bot(settings)
    dispatcher = Dispatcher()
    dispatcher.include_router(patient.build_router())
    inbox_wake, outbox_wake = asyncio.Event(), asyncio.Event()

    async def on_parked(chat_id: int | None) -> None:
        async with app.store.transaction() as tx:
            if chat_id is not None:
                await tx.enqueue(chat_id, settings.default_locale, parked_notice())
            if settings.coordinator_chat_id is not None:
                await tx.enqueue(
                    settings.coordinator_chat_id, settings.coordinator_locale, parked_notice()
                )
        outbox_wake.set()

    file_source = patient.TelegramFileSource(bot, settings.local_path_map)
    processor = InboxProcessor(
        bot,
        dispatcher,
        app.store,
        inbox_wake,
        on_parked,
        {"service": app.service, "file_source": file_source},
        handled=outbox_wake,
    )
    sender = OutboxSender(bot, app.store, app.translator, outbox_wake)
    poller = Poller(bot, app.store, inbox_wake, patient.ALLOWED_UPDATES)
    try:
        me = await bot.get_me()
        log.info("connected to the Bot API as bot id=%s", me.id)
        await bot.delete_webhook(drop_pending_updates=False)
        await set_commands(bot, app)
        tasks: list[asyncio.Task[object]] = [
            asyncio.create_task(poller.run(), name="poller"),
            asyncio.create_task(processor.run(), name="inbox"),
            asyncio.create_task(sender.run(), name="outbox"),
        ]
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        stopper: asyncio.Task[object] = asyncio.create_task(stop.wait(), name="stop")
        waiting: list[asyncio.Task[object]] = [*tasks, stopper]
        done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for task in done:
            failure = None if task is stopper else task.exception()
            if failure is not None:
                raise failure  # a loop died (the token was refused...): stop with its error
        log.info("stopped")
    finally:
        await bot.session.close()
        await app.close()
