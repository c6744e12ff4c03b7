"""Long-polling mode: the bot's Telegram loops (poller, inbox processor, outbox sender)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import signal
from pathlib import Path

from aiogram import Bot, Dispatcher
from aiogram.client.session.aiohttp import AiohttpSession
from aiogram.client.telegram import TelegramAPIServer
from aiogram.exceptions import TelegramAPIError
from aiogram.types import BotCommand

from adapters.directory import CaseDirectory, button_secret
from adapters.export import Bundle, build_bundle
from adapters.keys import load_or_create_master_key
from adapters.media import CLOUD_SEND_LIMIT, LOCAL_SEND_LIMIT, CaseMedia
from adapters.telegram import InboxProcessor, OutboxSender, Poller, parked_notice
from bot.app import App, build_app
from bot.settings import Settings
from core.replies import Text
from handlers import coordinator, patient

log = logging.getLogger(__name__)

COMMANDS = ("start", "status", "language", "help", "privacy", "delete")
RETENTION_EVERY_S = 3600.0
STOP_GRACE_S = 10.0  # on SIGTERM, how long in-flight updates and sends may take to finish


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


def exports_dir(settings: Settings) -> Path:
    return settings.data_dir / "exports"


async def export_case(app: App, case_id: str, actor: str) -> Bundle:
    """The hand-off bundle, its manifest in the coordinators' language (a button's action)."""
    locale = app.settings.coordinator_locale

    def render(key: str, params: dict[str, object]) -> str:
        return app.translator.text(locale, Text(key, params))

    return await build_bundle(
        app.store,
        app.vault,
        app.checklists,
        case_id,
        exports_dir(app.settings),
        render=render,
        actor=actor,
    )


async def run_polling(settings: Settings) -> None:
    app = build_app(settings)
    bot = make_bot(settings)
    dispatcher = Dispatcher()
    # Coordinators first: their commands fall through to the patient router for anyone else.
    dispatcher.include_router(
        coordinator.build_router(frozenset(settings.coordinator_ids), settings.coordinator_chat_id)
    )
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
    master, _ = load_or_create_master_key(settings.key_file, create=False)
    coordinator_desk = CaseDirectory(
        app.store,
        app.store.keys,
        button_secret(master),
        checklists=app.checklists,
        locale=settings.coordinator_locale,
        context=app.context,
        exporter=functools.partial(export_case, app),
    )
    processor = InboxProcessor(
        bot,
        dispatcher,
        app.store,
        inbox_wake,
        on_parked,
        {"service": app.service, "file_source": file_source, "coordinator_desk": coordinator_desk},
        handled=outbox_wake,
    )
    coordinator_chats = frozenset(settings.coordinator_ids) | frozenset(
        [settings.coordinator_chat_id] if settings.coordinator_chat_id is not None else []
    )
    sender = OutboxSender(
        bot,
        app.store,
        app.translator,
        outbox_wake,
        coordinator_chats,
        media=CaseMedia(
            app.store,
            app.vault,
            exports_dir(settings),
            LOCAL_SEND_LIMIT if settings.telegram_api_local else CLOUD_SEND_LIMIT,
        ),
    )
    poller = Poller(bot, app.store, inbox_wake, patient.ALLOWED_UPDATES)

    async def retention() -> None:
        while True:
            erased = await app.service.erase_expired(settings.retention_days)
            if erased:
                log.info("retention erased %d case(s)", erased)
                outbox_wake.set()
            await asyncio.sleep(RETENTION_EVERY_S)

    resumed = await app.eraser.finish_pending()
    if resumed:
        log.info("finished %d interrupted erasure(s)", resumed)
    try:
        me = await bot.get_me()
        log.info("connected to the Bot API as bot id=%s", me.id)
        await bot.delete_webhook(drop_pending_updates=False)
        try:
            await set_commands(bot, app)
        except TelegramAPIError as exc:  # a menu is a nicety: never a reason not to serve
            log.warning("could not set the command menu: %s", type(exc).__name__)
        tasks: list[asyncio.Task[object]] = [
            asyncio.create_task(poller.run(), name="poller"),
            asyncio.create_task(processor.run(), name="inbox"),
            asyncio.create_task(sender.run(), name="outbox"),
            asyncio.create_task(retention(), name="retention"),
        ]
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        stopper: asyncio.Task[object] = asyncio.create_task(stop.wait(), name="stop")
        waiting: list[asyncio.Task[object]] = [*tasks, stopper]
        done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        # Graceful stop: take nothing new, let what is being handled or sent finish (so no
        # transaction is cut in the middle), then cancel what is left. A kill -9 skips all
        # this, and is safe too: it only costs a retry.
        processor.stop()
        sender.stop()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(processor.finish(), timeout=STOP_GRACE_S)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(sender.finish(), timeout=STOP_GRACE_S)
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
