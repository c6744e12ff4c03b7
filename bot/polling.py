"""The bot's runtime, one for both modes: long polling (`run`) and webhook (`webhook`, see
bot.webhook) differ only in how updates reach the inbox; the inbox processor, the outbox
sender, the retention loop, the web server and the graceful stop are the same."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import logging
import signal
from dataclasses import dataclass

from aiogram import Bot, Dispatcher
from aiogram.client.session.aiohttp import AiohttpSession
from aiogram.client.telegram import TelegramAPIServer
from aiogram.exceptions import TelegramAPIError
from aiogram.types import BotCommand
from aiohttp import web

from adapters import metrics
from adapters.bundle import Bundle
from adapters.cluster import SOLO, RedisCluster, SharedRateLimiter, Solo
from adapters.database import is_sqlite
from adapters.directory import CaseDirectory, button_secret
from adapters.keys import load_or_create_master_key
from adapters.media import CLOUD_SEND_LIMIT, LOCAL_SEND_LIMIT, CaseMedia
from adapters.telegram import (
    CHAT_BURST,
    CHAT_WINDOW_S,
    GLOBAL_PER_SECOND,
    GROUP_BURST,
    GROUP_WINDOW_S,
    InboxProcessor,
    KeepResponseTypes,
    OutboxSender,
    Poller,
    SendGate,
    parked_notice,
    recent_sends,
)
from bot.app import App, build_app
from bot.settings import Settings
from bot.upload import make_upload_app
from bot.web import Readiness, build_web_app, start_server
from bot.webhook import receiver
from bot.webhook import register as register_webhook
from core.reminders import ReminderPolicy
from core.replies import Text
from handlers import coordinator, patient

log = logging.getLogger(__name__)

COMMANDS = ("start", "status", "language", "help", "privacy", "delete")
RETENTION_EVERY_S = 3600.0
REMINDERS_EVERY_S = 300.0
# Several instances: how often each looks for alerts whose sender died mid-request (at start
# their dead sender's lease may not have expired yet).
RECOVER_EVERY_S = 60.0
STOP_GRACE_S = 10.0  # on SIGTERM, how long in-flight updates and sends may take to finish
DEFAULT_WEBHOOK_PORT = 8080  # webhook mode without WEB_PORT


def make_bot(settings: Settings, gate: SendGate | None = None) -> Bot:
    assert settings.bot_token is not None
    server = TelegramAPIServer.from_base(
        settings.telegram_api_base_url, is_local=settings.telegram_api_local
    )
    session = AiohttpSession(api=server)
    session.middleware(KeepResponseTypes())
    session.middleware(gate or SendGate())  # registered last: the nearest to the request
    return Bot(settings.bot_token, session=session)


FULL_GC_EVERY = 100  # middle-generation collections per full one (Python's default: 10)


def set_aside_startup_objects() -> None:
    """Exempt what start-up built from garbage collection, for the life of the process.

    Modules, the pydantic schemas of every Bot API type and the SQL mappings are some 300 000
    objects that live as long as the bot; every full collection walked them all, a pause of
    about 140 ms (on this 2-core machine) in which no patient is answered: most of the slow
    tail of the update latency under load. Frozen, they are no longer walked; what handling
    updates allocates is collected as before. Collection, off while the bot started (see
    bot.cli.main), is on again from here.

    Full collections are made ten times rarer than Python's default (FULL_GC_EVERY): under
    load what handling allocates and keeps for a while (queued sends, their rows and
    sessions; some 60 000 to 100 000 objects) made a full collection every 10 s or so, each
    a 25 to 70 ms pause of the event loop, and each found fewer than 150 objects to free.
    The young generations, where the cyclic garbage is (SQL expressions built per query),
    are collected as often as before.
    """
    gc.collect()
    gc.freeze()
    young, middle, _ = gc.get_threshold()
    gc.set_threshold(young, middle, FULL_GC_EVERY)
    gc.enable()


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


async def set_commands_quietly(bot: Bot, app: App) -> None:
    try:
        await set_commands(bot, app)
    except TelegramAPIError as exc:  # a menu is a nicety: never a reason not to serve
        log.warning("could not set the command menu: %s", type(exc).__name__)


async def export_case(app: App, case_id: str, actor: str) -> Bundle:
    """The hand-off bundle, its manifest in the coordinators' language (a button's action)."""
    # Imported here, not at start: the ZIP, DICOM and PDF libraries it needs take longer to
    # import than the rest of the bot but aiogram, and most starts never build a bundle.
    from adapters.export import build_bundle

    locale = app.settings.coordinator_locale

    def render(key: str, params: dict[str, object]) -> str:
        return app.translator.text(locale, Text(key, params))

    return await build_bundle(
        app.store,
        app.vault,
        app.checklists,
        case_id,
        app.settings.exports_dir,
        render=render,
        actor=actor,
    )


@dataclass
class Runtime:
    """What both modes share: the inbox processor that feeds stored updates to the handlers,
    one at a time per chat, and the outbox sender that delivers the replies."""

    app: App
    bot: Bot
    processor: InboxProcessor
    sender: OutboxSender
    inbox_wake: asyncio.Event  # set when an update is stored (poller or webhook)
    outbox_wake: asyncio.Event
    cluster: Solo = SOLO  # several instances (REDIS_URL): leases, shared limits, job turns

    async def retention(self) -> None:
        while True:
            erased = await self.retention_turn()
            if erased:
                log.info("retention erased %d case(s)", erased)
                self.outbox_wake.set()
            await asyncio.sleep(RETENTION_EVERY_S)

    async def retention_turn(self) -> int:
        """One period's retention run (cases closed long ago erased, old inbox and outbox
        rows deleted): on one instance of a cluster (alone: this one, always); returns the
        cases erased, 0 on the others."""
        async with self.cluster.turn("retention", RETENTION_EVERY_S) as mine:
            if not mine:
                return 0
            erased = await self.app.service.erase_expired(self.app.settings.retention_days)
            updates, messages = await self.app.store.prune_handled()
            if updates or messages:
                log.info("pruned %d handled update(s), %d sent message(s)", updates, messages)
            return erased

    async def reminders(self) -> None:
        """Reminders for missing items, checked every few minutes (each is sent at most once:
        see ConversationService.send_reminders)."""
        while True:
            sent = await self.reminders_turn()
            if sent:
                log.info("queued %d reminder(s)", sent)
                self.outbox_wake.set()
            await asyncio.sleep(REMINDERS_EVERY_S)

    async def reminders_turn(self) -> int:
        """One period's reminders, on one instance of a cluster (as `retention_turn`)."""
        settings = self.app.settings
        policy = ReminderPolicy.parse(
            settings.reminder_days, settings.reminder_hours, settings.patient_timezone
        )
        async with self.cluster.turn("reminders", REMINDERS_EVERY_S) as mine:
            return await self.app.service.send_reminders(policy) if mine else 0

    async def recover_alerts(self) -> None:
        """Several instances: now and then, alerts cut short by a dead instance (see
        OutboxSender.recover)."""
        while True:
            await asyncio.sleep(RECOVER_EVERY_S)
            try:
                await self.sender.recover()
            except Exception as exc:  # database or Redis away: next time (never stop the bot)
                log.warning("alert recovery failed (%s)", type(exc).__name__)


def make_cluster(settings: Settings) -> Solo:
    """Several instances share the work through REDIS_URL; without it, one instance and
    no coordination at all. The namespace is the bot's id: one bot, one cluster."""
    if not settings.redis_url:
        return SOLO
    if is_sqlite(settings.db_url):
        log.warning("REDIS_URL is set but the database is SQLite: only one instance may run")
    assert settings.bot_token is not None
    return RedisCluster.from_url(settings.redis_url, f"cc:{settings.bot_token.split(':')[0]}")


def build_runtime(app: App, bot: Bot, cluster: Solo = SOLO) -> Runtime:
    settings = app.settings
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
        reminders_total=len(settings.reminder_days),
        ingest=app.ingest,
    )
    # Chats are handled in order, one update at a time each, in the processor's per-chat
    # lanes; with several instances, a lane is drained only under its chat's lease.
    processor = InboxProcessor(
        bot,
        dispatcher,
        app.store,
        inbox_wake,
        on_parked,
        {"service": app.service, "file_source": file_source, "coordinator_desk": coordinator_desk},
        handled=outbox_wake,
        cluster=cluster,
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
            settings.exports_dir,
            LOCAL_SEND_LIMIT if settings.telegram_api_local else CLOUD_SEND_LIMIT,
        ),
        cluster=cluster,
        # Telegram's limits are the bot's, however many instances send: kept in Redis then.
        limiter=SharedRateLimiter(
            cluster, (CHAT_WINDOW_S, CHAT_BURST), (GROUP_WINDOW_S, GROUP_BURST), GLOBAL_PER_SECOND
        )
        if isinstance(cluster, RedisCluster)
        else None,
    )
    return Runtime(app, bot, processor, sender, inbox_wake, outbox_wake, cluster)


def web_app(runtime: Runtime, readiness: Readiness, *, webhook: bool) -> web.Application:
    """The web server's application; features served on the web are mounted here."""
    settings, store = runtime.app.settings, runtime.app.store
    routes = []
    if webhook:
        assert settings.webhook_secret is not None
        routes.append(receiver(store, runtime.inbox_wake, settings.webhook_secret))
    return build_web_app(
        readiness,
        functools.partial(metrics.refresh, store),
        routes=routes,
        # The upload page for files too big for the chat (bot.upload), at WEB_BASE_URL/upload/.
        sub_apps={"/upload/": make_upload_app(runtime.app, settings)}
        if settings.web_base_url
        else {},
    )


async def serve(settings: Settings, *, webhook: bool = False) -> None:
    """Run the bot until SIGTERM. Updates come by long polling (`care-companion run`) or,
    with `webhook`, by Telegram's calls to the web server (`care-companion webhook`, which
    never polls); either way they are stored in the inbox first, then handled and answered
    by the same runtime. The web server runs in webhook mode, and with WEB_PORT set."""
    app = build_app(settings)
    gate = SendGate()
    bot = make_bot(settings, gate)
    cluster = make_cluster(settings)
    runtime = build_runtime(app, bot, cluster)
    # The read engine: on SQLite a probe must not queue for the write lock.
    readiness = Readiness(app.store.read_engine, settings.key_file, settings.redis_url)
    port = settings.web_port or (DEFAULT_WEBHOOK_PORT if webhook else None)
    server: web.AppRunner | None = None
    # Instances starting together: one of them finishes the interrupted erasures.
    async with cluster.lease("erasures") as lease:
        resumed = await app.eraser.finish_pending() if lease else 0
    if resumed:
        log.info("finished %d interrupted erasure(s)", resumed)
    try:
        me = await bot.get_me()
        log.info("connected to the Bot API as bot id=%s", me.id)
        if port is not None:  # listening before Telegram is told to send here
            server = await start_server(
                web_app(runtime, readiness, webhook=webhook), settings.web_host, port
            )
        if webhook:
            await register_webhook(bot, settings)
        else:
            await bot.delete_webhook(drop_pending_updates=False)
        gate.remember(await recent_sends(app.store))  # before anything is sent
        set_aside_startup_objects()
        tasks: list[asyncio.Task[object]] = [
            asyncio.create_task(runtime.processor.run(), name="inbox"),
            asyncio.create_task(runtime.sender.run(), name="outbox"),
            asyncio.create_task(runtime.retention(), name="retention"),
            asyncio.create_task(runtime.reminders(), name="reminders"),
        ]
        if cluster.shared:
            tasks.append(asyncio.create_task(runtime.recover_alerts(), name="recover"))
        if not webhook:
            poller = Poller(bot, app.store, runtime.inbox_wake, patient.ALLOWED_UPDATES)
            tasks.append(asyncio.create_task(poller.run(), name="poller"))
        # The menu is set while the bot already serves: one request per language, one after
        # the other, that no patient should wait for at a start. Not among `tasks`: its end
        # is not a reason to stop.
        menu = asyncio.create_task(set_commands_quietly(bot, app), name="menu")
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        stopper: asyncio.Task[object] = asyncio.create_task(stop.wait(), name="stop")
        waiting: list[asyncio.Task[object]] = [*tasks, stopper]
        done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        # Graceful stop: take nothing new, let what is being handled or sent finish (so no
        # transaction is cut in the middle), then cancel what is left. A kill -9 skips all
        # this, and is safe too: it only costs a retry. The web server goes last: /readyz
        # turns the balancer away meanwhile, and an update Telegram still posts is stored
        # for the next start.
        readiness.stopping = True
        runtime.processor.stop()
        runtime.sender.stop()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(runtime.processor.finish(), timeout=STOP_GRACE_S)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(runtime.sender.finish(), timeout=STOP_GRACE_S)
        for task in (*tasks, menu):
            task.cancel()
        for task in (*tasks, menu):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for task in done:
            failure = None if task is stopper else task.exception()
            if failure is not None:
                raise failure  # a loop died (the token was refused...): stop with its error
        log.info("stopped")
    finally:
        if server is not None:
            await server.cleanup()
        await bot.session.close()
        await cluster.close()
        await app.close()
