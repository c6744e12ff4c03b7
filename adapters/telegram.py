"""Telegram I/O with durability aiogram does not give by default.

- `Poller`: getUpdates -> inbox row committed -> only then the next getUpdates confirms it.
- `InboxProcessor`: feeds stored updates to the dispatcher, one at a time per chat and in
  order, chats in parallel; a failing update is retried with backoff, then parked.
- `OutboxSender`: delivers queued replies with per-chat and global rate limits, waiting
  `retry_after` on 429 and backing off on 5xx and network errors.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import time
from collections import deque
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import aiohttp
from aiogram import Bot, Dispatcher
from aiogram.client.session.middlewares.base import (
    BaseRequestMiddleware,
    NextRequestMiddlewareType,
)
from aiogram.exceptions import (
    TelegramAPIError,
    TelegramBadRequest,
    TelegramForbiddenError,
    TelegramNetworkError,
    TelegramNotFound,
    TelegramRetryAfter,
    TelegramServerError,
    TelegramUnauthorizedError,
)
from aiogram.methods import Response, TelegramMethod
from aiogram.methods.base import TelegramType
from aiogram.types import (
    BufferedInputFile,
    FSInputFile,
    InlineKeyboardButton,
    InlineKeyboardMarkup,
    Update,
    WebAppInfo,
)
from sqlalchemy import or_
from sqlalchemy import update as sql_update
from sqlalchemy.exc import DBAPIError, OperationalError, SQLAlchemyError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlmodel import col, func, select

from adapters import metrics
from adapters.cluster import LATE_S, SOLO, ClusterUnavailable, RateLimiter, Solo
from adapters.media import CaseMedia, PreviewUnavailable
from adapters.store import CARD_PREFIX, SqlStore, aware, utcnow
from adapters.tables import CardRow, InboxRow, OutboxRow
from core.replies import Reply, Text, Verbatim
from handlers.render import RenderedButton, Translator

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 5  # then an update is parked and the patient told something went wrong
ALBUM_WAIT_S = 1.0  # how long the first part of an album waits for the others
CAPTION_MAX = 1024  # Telegram's limit for a photo's caption
SCRUBBED = "{}"  # the payload of a message once it is out
# Several instances (adapters.cluster): how long a lane waits for a chat's lease that
# another instance holds before leaving the chat to a later scan.
INBOX_LEASE_WAIT_S = 2.0
# Texts and button presses handled at once (files are not counted): see InboxProcessor._slot_for.
QUICK_LANES = 8
LANE_BATCH = 5  # a chat's pending messages read at once (sent one by one, in order)
OUTBOX_LEASE_WAIT_S = 0.2  # short: the holder sends every pending row of the chat anyway


# The database not answering, or every connection of the pool busy for its whole timeout
# (PostgreSQL, hundreds of chats at once on a starved machine): the scans try again later.
DATABASE_AWAY = (SQLAlchemyError, OSError)


class KeepResponseTypes(BaseRequestMiddleware):
    """Keeps aiogram's parsed-response classes alive for the life of the bot.

    aiogram parses every Bot API answer with `Response[T]` for the method's result type T;
    pydantic caches such parametrised classes only weakly, so each garbage collection threw
    them away and the next answer rebuilt one, schema and all: a quarter of the bot's CPU
    under load went there. One strong reference per result type ends that.
    """

    def __init__(self) -> None:
        self._kept: dict[Any, type] = {}

    async def __call__(
        self,
        make_request: NextRequestMiddlewareType[TelegramType],
        bot: Bot,
        method: TelegramMethod[TelegramType],
    ) -> Response[TelegramType]:
        returning = method.__returning__
        if returning not in self._kept:
            self._kept[returning] = Response[returning]  # type: ignore[valid-type]  # runtime type
        return await make_request(bot, method)


def backoff(attempt: int) -> float:
    """Seconds before retry number `attempt` (1, 2, 4, ... capped at 5 minutes)."""
    return float(min(300, 2 ** max(0, attempt - 1)))


def chat_of(payload: dict[str, Any]) -> int | None:
    for key in ("message", "edited_message", "channel_post"):
        if key in payload:
            return int(payload[key]["chat"]["id"])
    query = payload.get("callback_query")
    if query and query.get("message"):
        return int(query["message"]["chat"]["id"])
    if query:
        return int(query["from"]["id"])
    return None


class Poller:
    def __init__(
        self, bot: Bot, store: SqlStore, wake: asyncio.Event, allowed: tuple[str, ...]
    ) -> None:
        self._bot = bot
        self._store = store
        self._wake = wake
        self._allowed = list(allowed)

    async def run(self) -> None:
        offset: int | None = None
        failures = 0
        while True:
            try:
                updates = await self._bot.get_updates(
                    offset=offset, timeout=25, allowed_updates=self._allowed, request_timeout=40
                )
                failures = 0
            except TelegramUnauthorizedError:
                log.critical("the Bot API refused the token (401); check BOT_TOKEN")
                raise
            except (TelegramNetworkError, TelegramServerError, TelegramRetryAfter) as exc:
                failures += 1
                delay = getattr(exc, "retry_after", None) or backoff(failures)
                log.warning("getUpdates failed (%s); retrying in %ss", type(exc).__name__, delay)
                await asyncio.sleep(min(float(delay), 60.0))
                continue
            batch = []
            for update in updates:
                payload = update.model_dump(mode="json", exclude_none=True, by_alias=True)
                text = json.dumps(payload, ensure_ascii=False)
                batch.append((update.update_id, chat_of(payload), text))
            await self._store.store_updates(batch)  # one commit for the whole batch
            metrics.UPDATES_RECEIVED.labels("polling").inc(len(updates))
            if updates:
                # Only now, with every update committed, may the next call confirm them.
                offset = updates[-1].update_id + 1
                self._wake.set()


class InboxProcessor:
    def __init__(
        self,
        bot: Bot,
        dispatcher: Dispatcher,
        store: SqlStore,
        wake: asyncio.Event,
        on_parked: Callable[[int | None], Any],
        context: dict[str, Any],
        handled: asyncio.Event | None = None,
        cluster: Solo = SOLO,
    ) -> None:
        self._bot = bot
        self._dp = dispatcher
        self._cluster = cluster  # several instances: a chat's lane is drained under its lease
        self._store = store
        self._wake = wake
        self._on_parked = on_parked
        self._context = context
        self._handled = handled  # set after each update, so the outbox sends at once
        self._stopping = False
        self._transient: dict[int, int] = {}  # outage retries per update (not counted to park)
        self._queued: set[int] = set()
        self._queues: dict[int, deque[int]] = {}
        self._workers: dict[int, asyncio.Task[None]] = {}
        self._quick_slots = asyncio.Semaphore(QUICK_LANES)

    def _slot_for(
        self, payloads: list[dict[str, Any]]
    ) -> contextlib.AbstractAsyncContextManager[Any]:
        """A text or a button press waits for one of QUICK_LANES slots; a file does not (its
        download and checks take seconds, mostly waiting on the network and a worker).

        Why a cap: every update in work wants the database's write turn (one at a time on
        SQLite) and the event loop; with hundreds in work at once each one's handling took
        as long as all of theirs (p99 0.8 s for 500 patients arriving together), for no
        more throughput. Capped, an update waits its turn in the inbox instead, its chat's
        order unchanged (a chat's updates are still handled one after the other).
        """
        if any(carries_file(payload) for payload in payloads):
            return contextlib.nullcontext()
        return self._quick_slots

    def stop(self) -> None:
        """Take no new updates; the ones being handled finish (see bot.polling)."""
        self._stopping = True
        self._wake.set()

    async def finish(self) -> None:
        while self._workers:
            await asyncio.gather(*list(self._workers.values()), return_exceptions=True)

    async def run(self) -> None:
        while not self._stopping:
            try:
                await self._dispatch_pending()
            except DATABASE_AWAY as exc:  # scanned again in a second: never stop the bot for it
                log.warning("inbox scan failed error=%s", type(exc).__name__)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=1.0)
            self._wake.clear()

    async def _dispatch_pending(self) -> None:
        now = utcnow()
        async with self._store.reader() as session:
            rows = (
                await session.exec(
                    select(InboxRow.update_id, InboxRow.chat_id, InboxRow.next_attempt_at)
                    .where(InboxRow.status == "new")
                    .order_by(col(InboxRow.update_id))
                    .limit(500)
                )
            ).all()
        # A chat whose oldest update waits for its retry waits with it: its later updates
        # (an album's other parts among them) must not overtake it.
        waiting_lanes: set[int] = set()
        for update_id, chat_id, next_attempt_at in rows:
            lane = chat_id if chat_id is not None else -update_id
            if lane in waiting_lanes:
                continue
            if next_attempt_at is not None and aware(next_attempt_at) > now:
                waiting_lanes.add(lane)
                continue
            if update_id in self._queued:
                continue
            self._queued.add(update_id)
            self._queues.setdefault(lane, deque()).append(update_id)
            if lane not in self._workers:
                self._workers[lane] = asyncio.create_task(self._drain(lane))

    async def drain_all(self) -> None:
        """Process everything pending now (used by tests and at shutdown)."""
        await self._dispatch_pending()
        while self._workers:
            await asyncio.gather(*list(self._workers.values()), return_exceptions=True)

    async def _drain(self, lane: int) -> None:
        queue = self._queues[lane]
        try:
            # With several instances, the chat's lease: wait a moment for an instance that
            # is finishing the chat's previous update (it may have arrived there).
            async with self._cluster.lease(f"inbox:{lane}", wait=INBOX_LEASE_WAIT_S) as lease:
                while queue and lease and not lease.lost and not self._stopping:
                    group, rows, payloads = await self._album_group(queue)
                    async with self._slot_for(payloads):
                        ok = await self._process(rows, payloads)
                    if not ok:
                        # Keep the chat's order: later updates wait for this one's retry.
                        for waiting in queue:
                            self._queued.discard(waiting)
                        queue.clear()
                        break
                    for update_id in group:
                        queue.remove(update_id)
                        self._queued.discard(update_id)
        except Exception as exc:  # outside a handler: the database away, its pool run dry...
            log.warning("inbox lane stopped chat=%s error=%s", lane, type(exc).__name__)
        finally:
            # However the lane ends (its chat held by another instance, an error above), what
            # it did not handle goes back to the next scan; kept queued here, it would wait
            # for the chat's next update, which a patient waiting for an answer never sends.
            for waiting in queue:
                self._queued.discard(waiting)
            del self._workers[lane]
            self._queues.pop(lane, None)

    async def _load(self, update_id: int) -> InboxRow | None:
        async with self._store.reader() as session:
            row = await session.get(InboxRow, update_id)
        if row is None or row.status != "new" or row.payload_enc is None:
            return None
        return row

    def _payload(self, row: InboxRow) -> dict[str, Any]:
        assert row.payload_enc is not None
        return dict(json.loads(self._store.keys.decrypt_inbox(row.update_id, row.payload_enc)))

    async def _album_group(
        self, queue: deque[int]
    ) -> tuple[list[int], list[InboxRow], list[dict[str, Any]]]:
        """The head update, with the rest of its album when it is part of one: their ids,
        and the rows of those still to handle with their payloads (decrypted once, here).

        Telegram delivers an album as separate updates sharing `media_group_id`; waiting a
        moment after the first one lets the others arrive, so the album gets one answer.
        """
        head = await self._load(queue[0])
        if head is None:
            return [queue[0]], [], []
        payloads = [self._payload(head)]
        group_id = media_group_of(payloads[0])
        if group_id is None:
            return [queue[0]], [head], payloads
        waited = (utcnow() - aware(head.received_at)).total_seconds()
        if waited < ALBUM_WAIT_S:
            await asyncio.sleep(ALBUM_WAIT_S - waited)
            await self._dispatch_pending()  # queue the parts that arrived meanwhile
        group, rows = [queue[0]], [head]
        for update_id in list(queue)[1:]:
            row = await self._load(update_id)
            if row is None:
                break
            payload = self._payload(row)
            if media_group_of(payload) != group_id:
                break
            group.append(update_id)
            rows.append(row)
            payloads.append(payload)
        return group, rows, payloads

    async def _process(self, rows: list[InboxRow], payloads: list[dict[str, Any]]) -> bool:
        if not rows:
            return True
        head = rows[0]
        started = time.perf_counter()
        try:
            updates = [
                Update.model_validate(payload, context={"bot": self._bot}) for payload in payloads
            ]
            extra = {"album_updates": updates} if len(updates) > 1 else {}
            await self._dp.feed_update(
                self._bot, updates[0], update_id=head.update_id, **extra, **self._context
            )
        except Exception as exc:  # any handler failure is retried, then parked
            return await self._failed(head.update_id, head.chat_id, head.attempts, exc)
        # Handlers mark their update in their own transaction; only an update no handler
        # took needs a write here (a read first: most updates need none).
        if not await self._all_marked(rows):
            async with self._store.transaction() as tx:
                for row in rows:
                    if not await tx.update_seen(row.update_id):
                        await tx.mark_update(row.update_id, row.chat_id)
        self._transient.pop(head.update_id, None)
        metrics.UPDATES_PROCESSED.labels("handled").inc(len(rows))
        # ms: handling, from the update taken up to its replies queued (committed); since:
        # from when it was stored in the inbox, so its wait for its turn counts too.
        log.info(
            "update handled update=%s ms=%.1f since=%.1f",
            head.update_id,
            (time.perf_counter() - started) * 1000,
            (utcnow() - aware(head.received_at)).total_seconds() * 1000,
        )
        if self._handled is not None:
            self._handled.set()
        return True

    async def _all_marked(self, rows: list[InboxRow]) -> bool:
        ids = [row.update_id for row in rows]
        if self._store.marked_here(ids):  # the usual case: no read
            return True
        async with self._store.reader() as session:
            done = await session.exec(
                select(func.count())
                .select_from(InboxRow)
                .where(col(InboxRow.update_id).in_(ids), InboxRow.status == "done")
            )
            return done.one() == len(ids)

    async def _failed(
        self, update_id: int, chat_id: int | None, attempts: int, exc: Exception
    ) -> bool:
        """Schedule a retry. Outages (network, Bot API 5xx, database restarting, disk full)
        wait and resume however long they last; other errors are parked after a few tries."""
        transient = is_transient(exc)
        if transient:
            self._transient[update_id] = self._transient.get(update_id, 0) + 1
            delay = backoff(self._transient[update_id])
        else:
            attempts += 1
            delay = backoff(attempts)
        parked = not transient and attempts >= MAX_ATTEMPTS
        metrics.UPDATES_PROCESSED.labels("parked" if parked else "failed").inc()
        log.warning(
            "update failed update=%s attempt=%d transient=%s error=%s%s",
            update_id,
            attempts,
            transient,
            type(exc).__name__,
            " (parked)" if parked else "",
            exc_info=not (transient or isinstance(exc, TelegramAPIError)),
        )
        async with self._store.session() as session:
            row = await session.get(InboxRow, update_id)
            if row is not None and row.status == "new":
                row.attempts = attempts
                row.error = type(exc).__name__[:200]
                row.next_attempt_at = utcnow() + timedelta(seconds=delay)
                if parked:
                    row.status = "parked"
                session.add(row)
        if parked:
            await self._on_parked(chat_id)
        return False


FILE_FIELDS = ("document", "photo", "video", "audio", "voice", "video_note", "animation")


def carries_file(payload: dict[str, Any]) -> bool:
    message = payload.get("message") or payload.get("edited_message") or {}
    return any(name in message for name in FILE_FIELDS)


def media_group_of(payload: dict[str, Any]) -> str | None:
    message = payload.get("message")
    return str(message["media_group_id"]) if message and "media_group_id" in message else None


def is_transient(exc: BaseException) -> bool:
    """Failures that say "not now" rather than "never": retried without limit."""
    if isinstance(
        exc,
        # PoolTimeout: every database connection busy for the pool's whole wait (overload).
        TelegramNetworkError
        | TelegramServerError
        | TelegramRetryAfter
        | TimeoutError
        | PoolTimeout,
    ):
        return True
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EIO):
        return True
    if isinstance(exc, aiohttp.ClientError | ConnectionError):
        return True
    return isinstance(exc, DBAPIError) and (
        exc.connection_invalidated or isinstance(exc, OperationalError)
    )


# Telegram's limits are about 1 message/s per chat, 20/min per group and 30/s overall (we
# promise 25/s). Slots are taken when a send starts; requests reach Telegram a little
# later and unevenly, so the buckets keep a margin below what they promise.
CHAT_WINDOW_S, CHAT_BURST = 3.6, 3
GROUP_WINDOW_S, GROUP_BURST = 63.0, 20
GLOBAL_PER_SECOND = 20
SWEEP_MIN_CHATS = 1024  # the rate limiter forgets quiet chats once it keeps this many


class _RateLimiter:
    """Sliding windows per chat (a burst of 3, about 1/s) and per group; overall, sends are
    paced evenly (one every 1/GLOBAL_PER_SECOND s) so that scheduling jitter cannot bunch a
    second's worth of them together, and never more than GLOBAL_PER_SECOND in any second."""

    def __init__(self, window: float = 1.0, per_window: int = GLOBAL_PER_SECOND) -> None:
        self._last: dict[int, deque[float]] = {}
        self._global: deque[float] = deque()
        self._next_global = 0.0
        self._window, self._per_window = window, per_window  # the overall count's window
        self._sweep_at = SWEEP_MIN_CHATS  # see record()

    def _chat_delay(self, chat_id: int, now: float) -> float:
        window, limit = (
            (GROUP_WINDOW_S, GROUP_BURST) if chat_id < 0 else (CHAT_WINDOW_S, CHAT_BURST)
        )
        sent = self._last.setdefault(chat_id, deque())
        while sent and now - sent[0] >= window:
            sent.popleft()
        return window - (now - sent[0]) if len(sent) >= limit else 0.0

    def _second_delay(self, now: float) -> float:
        while self._global and now - self._global[0] >= self._window:
            self._global.popleft()
        if len(self._global) < self._per_window:
            return 0.0
        return self._window - (now - self._global[0])

    async def wait_turn(self, chat_id: int) -> None:
        """Sleep until a message to this chat fits every limit, then take its slot.

        A chat's own window first (only that chat's sender waits on it); then a place in the
        overall pace, reserved at once in the order asked. Before, every waiting chat woke at
        each free slot and all but one slept again: with hundreds of chats waiting, thousands
        of wake-ups a second. The one-second count is checked again on waking, for a process
        that woke late and would otherwise send several reserved slots' messages together.
        """
        wait = self._chat_delay(chat_id, time.monotonic())
        while wait > 0:
            await asyncio.sleep(wait)
            wait = self._chat_delay(chat_id, time.monotonic())
        slot = max(time.monotonic(), self._next_global)
        self._next_global = slot + 1.0 / GLOBAL_PER_SECOND
        now = time.monotonic()
        wait = max(slot - now, self._second_delay(now))
        while wait > 0:
            await asyncio.sleep(wait)
            now = time.monotonic()
            wait = max(slot - now, self._second_delay(now))
        self.record(chat_id, time.monotonic())

    def record(self, chat_id: int, now: float) -> None:
        self._last.setdefault(chat_id, deque()).append(now)
        self._global.append(now)
        # A chat's times matter for a window after its last send; without a sweep the
        # process would keep a few hundred bytes for every chat it ever wrote to. Swept when
        # the chats kept have doubled since the last sweep: constant work per send.
        if len(self._last) >= self._sweep_at:
            self._last = {
                chat: times
                for chat, times in self._last.items()
                # Empty: a wait for its turn that was cancelled after dropping old times.
                if times and now - times[-1] < GROUP_WINDOW_S  # the longest window
            }
            self._sweep_at = max(SWEEP_MIN_CHATS, 2 * len(self._last))

    async def hold(self, chat_id: int) -> None:
        """Wait while a send now would go over a window, then count it (see SendGate)."""
        now = time.monotonic()
        wait = max(self._chat_delay(chat_id, now), self._second_delay(now))
        while wait > 0:
            await asyncio.sleep(wait)
            now = time.monotonic()
            wait = max(self._chat_delay(chat_id, now), self._second_delay(now))
        self.record(chat_id, now)


# Requests that put a message in a chat, by aiogram's method class name (what Telegram's
# limits count); a chat action ("typing..."), answering a button press, deleting or polling
# does not.
SENDING_METHODS = ("Send", "Edit", "Copy", "Forward")


def puts_a_message(method: TelegramMethod[Any]) -> bool:
    name = type(method).__name__
    return name.startswith(SENDING_METHODS) and name != "SendChatAction"


# The promised 25 a second, counted over 1.2 s: 20.8 a second at most, above the outbox's
# even pace of GLOBAL_PER_SECOND, so paced sends pass; a jitter of 0.2 s cannot make 25 more.
GATE_WINDOW_S, GATE_PER_WINDOW = 1.2, 25


class SendGate(BaseRequestMiddleware):
    """The limits checked once more as each message request leaves, on the times requests
    actually left.

    The outbox paces messages when their turn is given (`_RateLimiter.wait_turn`); between
    that and the request there is still the message's rendering and the event loop's other
    work. On a machine busy with other processes the loop can stall for half a second, and
    the turns given meanwhile then went out together: the emulator counted 27 to 36
    messages in one second (we promise 25) at load 3-6 on two cores. This gate lets a
    request out only if the windows, counted on real departures, still have room; in an
    even run it never waits. Overall it counts GATE_PER_WINDOW in GATE_WINDOW_S, not 25 in
    one second: requests take a little longer to arrive at some moments than at others,
    and a burst leaving just over a second after the previous one could arrive within the
    same second as it.
    """

    def __init__(self) -> None:
        self._left = _RateLimiter(GATE_WINDOW_S, GATE_PER_WINDOW)

    def remember(self, ages: dict[int, list[float]]) -> None:
        """Count what the previous run may have sent (see recent_sends) into each chat's
        window before anything is sent: a restart, 2 s after a kill, would otherwise find
        the windows empty, and a chat's next three messages could follow its last ones
        at once (the crash harness saw 4 in 2.4 s)."""
        now = time.monotonic()
        for chat_id, chat_ages in ages.items():
            for age in sorted(chat_ages, reverse=True):  # oldest first, as sends are kept
                self._left.record(chat_id, now - age)

    async def __call__(
        self,
        make_request: NextRequestMiddlewareType[TelegramType],
        bot: Bot,
        method: TelegramMethod[TelegramType],
    ) -> Response[TelegramType]:
        chat_id = getattr(method, "chat_id", None)
        if isinstance(chat_id, int) and puts_a_message(method):
            await self._left.hold(chat_id)
        return await make_request(bot, method)


async def recent_sends(store: SqlStore) -> dict[int, list[float]]:
    """Per chat, how many seconds ago the previous run may have sent it a message, for the
    windows still open (see SendGate.remember).

    Sends marked sent carry their time. A row still pending (or an alert "sending") may
    have gone out too, its mark lost with the process (marks are written after the send,
    in batches); when, nobody knows: it counts as sent just now, up to a window's worth.
    """
    since = utcnow() - timedelta(seconds=GROUP_WINDOW_S)
    async with store.reader() as session:
        sent = (
            await session.exec(
                select(OutboxRow.chat_id, OutboxRow.sent_at).where(
                    OutboxRow.status == "sent", col(OutboxRow.sent_at) >= since
                )
            )
        ).all()
        unsure = (
            await session.exec(
                select(OutboxRow.chat_id, func.count())
                .where(col(OutboxRow.status).in_(("pending", "sending")))
                .group_by(col(OutboxRow.chat_id))
            )
        ).all()
    now = utcnow()
    ages: dict[int, list[float]] = {}
    for chat_id, sent_at in sent:
        assert sent_at is not None
        ages.setdefault(chat_id, []).append((now - aware(sent_at)).total_seconds())
    for chat_id, count in unsure:
        burst = GROUP_BURST if chat_id < 0 else CHAT_BURST
        ages.setdefault(chat_id, []).extend([0.0] * min(count, burst))
    return ages


class ClaimedElsewhere(Exception):
    """An alert another instance marked "sending" first: it is theirs to send."""


class OutboxSender:
    def __init__(
        self,
        bot: Bot,
        store: SqlStore,
        translator: Translator,
        wake: asyncio.Event,
        protected_chats: frozenset[int] = frozenset(),
        media: CaseMedia | None = None,
        cluster: Solo = SOLO,
        limiter: RateLimiter | None = None,
    ) -> None:
        self._bot = bot
        self._cluster = cluster  # several instances: a chat is sent to under its lease
        self._media = media  # previews for coordinators, made at send time
        self._store = store
        self._translator = translator
        self._wake = wake
        # Chats that receive case contents (coordinators): what is sent there cannot be
        # forwarded or saved (protect_content).
        self._protected = protected_chats
        # Several instances share one limiter in Redis (adapters.cluster.SharedRateLimiter).
        self._limiter: RateLimiter = limiter or _RateLimiter()
        self._marks = OutboxMarks(store)
        self._lanes: dict[int, asyncio.Task[None]] = {}
        self._stopping = False

    async def recover(self) -> int:
        """At start: alerts whose send was cut short by a crash may or may not have arrived.

        They are not sent again (at most once); the log names each for the operator, and the
        coordinator still sees the case as ready in /cases.
        """
        if self._cluster.shared:
            return await self._recover_unheld()
        async with self._store.session() as session:
            rows = (
                await session.exec(select(OutboxRow).where(OutboxRow.status == "sending"))
            ).all()
            for row in rows:
                log.warning("alert may not have arrived outbox=%s chat=%s", row.id, row.chat_id)
                row.status = "unconfirmed"
                session.add(row)
        return len(rows)

    async def _recover_unheld(self) -> int:
        """`recover` with several instances (run at start and then now and then, see
        bot.polling): an alert is "sending" while the instance sending it holds its chat's
        lease, so only one whose chat nobody holds was cut short by a crash."""
        async with self._store.reader() as session:
            rows = (
                await session.exec(
                    select(OutboxRow.id, OutboxRow.chat_id).where(OutboxRow.status == "sending")
                )
            ).all()
        recovered = 0
        for outbox_id, chat_id in rows:
            async with self._cluster.lease(f"outbox:{chat_id}") as lease:
                if lease is None:
                    continue  # being sent right now, or its dead sender's lease not yet expired
                async with self._store.session() as session:
                    row = await session.get(OutboxRow, outbox_id)
                    if row is not None and row.status == "sending":
                        log.warning("alert may not have arrived outbox=%s chat=%s", row.id, chat_id)
                        row.status = "unconfirmed"
                        session.add(row)
                        recovered += 1
        return recovered

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()

    async def run(self) -> None:
        await self.recover()
        while not self._stopping:
            try:
                await self._start_lanes()
            except DATABASE_AWAY as exc:  # as in InboxProcessor.run
                log.warning("outbox scan failed error=%s", type(exc).__name__)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=0.5)
            self._wake.clear()

    async def _pending_chats(self) -> list[int]:
        now = utcnow()
        async with self._store.reader() as session:
            chats = await session.exec(
                select(OutboxRow.chat_id)
                .where(OutboxRow.status == "pending")
                .where(
                    or_(
                        col(OutboxRow.next_attempt_at).is_(None),
                        col(OutboxRow.next_attempt_at) <= now,
                    )
                )
                .distinct()
            )
            return list(chats.all())

    async def _start_lanes(self) -> None:
        for chat_id in await self._pending_chats():
            if chat_id not in self._lanes:
                self._lanes[chat_id] = asyncio.create_task(self._send_chat(chat_id))

    async def finish(self) -> None:
        """Wait for the chats being sent to (after stop(): no new ones start)."""
        while self._lanes:
            await asyncio.gather(*list(self._lanes.values()), return_exceptions=True)

    async def flush(self) -> None:
        """Send everything that is due now (tests and shutdown)."""
        await self._start_lanes()
        while self._lanes:
            await asyncio.gather(*list(self._lanes.values()), return_exceptions=True)

    async def _send_chat(self, chat_id: int) -> None:
        try:
            # With several instances, one sends to a chat at a time (its lease): in order,
            # each message once. The holder sends every pending row, whoever queued it.
            async with self._cluster.lease(f"outbox:{chat_id}", wait=OUTBOX_LEASE_WAIT_S) as lease:
                while lease and not lease.lost:
                    now = utcnow()
                    async with self._store.reader() as session:
                        rows = (
                            await session.exec(
                                select(OutboxRow)
                                .where(OutboxRow.chat_id == chat_id, OutboxRow.status == "pending")
                                # A card not due yet lets the messages queued after it pass:
                                # it only shows where the case stands (see enqueue_card).
                                .where(
                                    or_(
                                        col(OutboxRow.next_attempt_at).is_(None),
                                        col(OutboxRow.next_attempt_at) <= now,
                                        ~col(OutboxRow.payload).startswith(CARD_PREFIX),
                                    )
                                )
                                .order_by(col(OutboxRow.id))
                                .limit(LANE_BATCH)
                            )
                        ).all()
                    if not rows:
                        return
                    for row in rows:
                        if row.next_attempt_at and aware(row.next_attempt_at) > now:
                            return
                        if self._stopping or lease.lost:
                            return
                        if not await self._send_row(row):
                            return  # retry later; later messages of this chat wait (order)
        finally:
            self._lanes.pop(chat_id, None)

    async def _send_row(self, row: OutboxRow) -> bool:
        assert row.id is not None
        # An alert (a row with a dedup key) is sent at most once: marked "sending" right
        # before its request, once its turn under the rate limits has come, so a kill while
        # the request is in flight cannot make the restarted bot (or another instance) send
        # it a second time. Only texts and deletions carry dedup keys (not cards, pictures).
        claim = row.id if row.dedup_key is not None else None
        try:
            payload = self._store.outbox_payload(row)
            if "delete_message" in payload:
                await self._turn(row.chat_id, claim)
                await self._bot.delete_message(row.chat_id, int(payload["delete_message"]))
            elif "card" in payload:
                await self._deliver_card(row.chat_id, row.locale, Reply.from_dict(payload["card"]))
            elif "media" in payload and payload["media"].get("type") == "export":
                await self._deliver_bundle(row.chat_id, row.locale, payload)
            elif "media" in payload:
                await self._deliver_media(row.chat_id, row.locale, payload)
            else:
                await self._deliver(row.chat_id, row.locale, Reply.from_dict(payload), claim)
        except TelegramRetryAfter as exc:
            log.warning("429 from Telegram outbox=%s retry_after=%s", row.id, exc.retry_after)
            metrics.SEND_RETRIES.labels("rate_limited").inc()
            await self._reschedule(row.id, float(exc.retry_after), count=False)
            return False
        except (TelegramServerError, TelegramNetworkError, TimeoutError, ClusterUnavailable) as exc:
            log.warning("send failed outbox=%s error=%s", row.id, type(exc).__name__)
            metrics.SEND_RETRIES.labels("unavailable").inc()
            await self._reschedule(row.id, backoff(row.attempts + 1), count=True)
            return False
        except ClaimedElsewhere:
            log.warning("alert claimed by another instance outbox=%s", row.id)
            return True  # that instance sends it (and finishes the row): leave it alone
        except (TelegramForbiddenError, TelegramBadRequest, TelegramNotFound) as exc:
            # The patient blocked the bot or the chat is gone: retrying cannot help.
            log.error("send refused outbox=%s error=%s", row.id, type(exc).__name__)
            await self._finish(row.id, "failed", row.payload)
            return True
        await self._finish(row.id, "sent", row.payload)
        return True

    async def _turn(self, chat_id: int, claim: int | None) -> None:
        """Wait for the message's turn under the rate limits; an alert (`claim`) is then
        marked "sending" (see _send_row)."""
        await self._limiter.wait_turn(chat_id)
        if claim is None:
            return
        marking = time.monotonic()
        if not await self._claim(claim):
            raise ClaimedElsewhere
        if time.monotonic() - marking > LATE_S:
            # The commit was slow (a busy database): sent now, the message would come too
            # close to the chat's next ones (seen with two instances at load 12). Another turn.
            await self._limiter.wait_turn(chat_id)

    async def _deliver(
        self, chat_id: int, locale: str, reply: Reply, claim: int | None = None
    ) -> None:
        rendered = self._translator.render(locale, reply)
        markup = None
        if rendered.buttons:
            markup = InlineKeyboardMarkup(
                inline_keyboard=[[inline_button(b) for b in row] for row in rendered.buttons]
            )
        for index, text in enumerate(rendered.texts):
            last = index == len(rendered.texts) - 1
            # Each part of a long text counts; an alert is claimed with its first part.
            await self._turn(chat_id, claim if index == 0 else None)
            await self._bot.send_message(
                chat_id,
                text,
                reply_markup=markup if last else None,
                protect_content=chat_id in self._protected or None,
            )

    async def _deliver_media(self, chat_id: int, locale: str, payload: dict[str, Any]) -> None:
        """A preview: made now from the vault, sent protected to a coordinator's chat only.
        When it cannot be made, the caption goes as text with why."""
        caption = Reply.from_dict(payload["caption"])
        if self._media is None or chat_id not in self._protected:
            log.error("preview refused for an unprotected chat=%s", chat_id)
            return
        try:
            picture = await self._media.picture(payload["media"])
        except PreviewUnavailable:
            unavailable = Reply((*caption.parts, Text("preview.unavailable")))
            await self._deliver(chat_id, locale, unavailable)
            return
        text = self._translator.render(locale, caption).texts[0][:CAPTION_MAX]
        extension = "png" if picture.mime == "image/png" else "jpg"
        await self._limiter.wait_turn(chat_id)
        await self._bot.send_photo(
            chat_id,
            BufferedInputFile(picture.data, filename=f"preview.{extension}"),
            caption=text,
            protect_content=True,
        )

    async def _deliver_card(self, chat_id: int, locale: str, card: Reply) -> None:
        """The patient's checklist card: the same message edited in place, pinned when first
        sent. A card deleted by the patient is sent (and pinned) anew."""
        text = self._translator.render(locale, card).texts[0]
        async with self._store.reader() as session:
            known = await session.get(CardRow, chat_id)
        if known is not None:
            await self._limiter.wait_turn(chat_id)
            try:
                await self._bot.edit_message_text(
                    text=text, chat_id=chat_id, message_id=known.message_id
                )
                return
            except TelegramBadRequest as exc:
                if "not modified" in str(exc):
                    return  # the same content: nothing to do
                log.info("card gone chat=%s: sending a new one", chat_id)
        await self._limiter.wait_turn(chat_id)
        sent = await self._bot.send_message(chat_id, text)
        with contextlib.suppress(TelegramAPIError):  # pinning is a nicety (groups need rights)
            await self._bot.pin_chat_message(chat_id, sent.message_id, disable_notification=True)
        async with self._store.session() as session:
            await session.merge(
                CardRow(chat_id=chat_id, message_id=sent.message_id, updated_at=utcnow())
            )

    async def _deliver_bundle(self, chat_id: int, locale: str, payload: dict[str, Any]) -> None:
        """The hand-off archive (AES-encrypted on disk) as a document, to a coordinator's chat.
        Too big for the Bot API, or gone: the caption says where it is on the server."""
        caption = Reply.from_dict(payload["caption"])
        if self._media is None or chat_id not in self._protected:
            log.error("bundle refused for an unprotected chat=%s", chat_id)
            return
        path = self._media.bundle_path(payload["media"])
        if path is None:  # removed by the operator since: the caption still says it was made
            await self._deliver(chat_id, locale, caption)
            return
        if path.stat().st_size > self._media.send_limit:
            too_big = Text("coordinator.export_too_big", {"path": Verbatim(str(path))})
            await self._deliver(chat_id, locale, Reply((*caption.parts, too_big)))
            return
        text = self._translator.render(locale, caption).texts[0][:CAPTION_MAX]
        await self._limiter.wait_turn(chat_id)
        await self._bot.send_document(
            chat_id, FSInputFile(path, filename=path.name), caption=text, protect_content=True
        )

    async def _reschedule(self, outbox_id: int, delay: float, count: bool) -> None:
        def retry(row: OutboxRow) -> None:
            row.status = "pending"  # an alert refused by Telegram was not delivered: retry
            row.attempts += 1 if count else 0
            row.next_attempt_at = utcnow() + timedelta(seconds=delay)

        await self._marks.change(outbox_id, retry)

    async def _claim(self, outbox_id: int) -> bool:
        """Mark an alert "sending" if it is still pending: False when another instance
        claimed it first (its sender held the chat's lease after ours expired)."""
        async with self._store.session() as session:
            # A compare-and-set in one statement (on the session's connection: an UPDATE
            # has no ORM result), so of two senders exactly one sees its row change.
            connection = await session.connection()
            claimed = await connection.execute(
                sql_update(OutboxRow)
                .where(col(OutboxRow.id) == outbox_id, col(OutboxRow.status) == "pending")
                .values(status="sending")
            )
            return claimed.rowcount == 1

    async def _finish(self, outbox_id: int, status: str, sent_payload: str) -> None:
        def finish(row: OutboxRow) -> None:
            # A card replaced by a newer version while this one was on its way stays
            # pending: the newer one goes out next (only cards are ever replaced).
            if row.payload == sent_payload:
                row.status, row.sent_at = status, utcnow()
                row.payload = SCRUBBED  # delivered (or refused): no content stays behind

        await self._marks.change(outbox_id, finish)


class OutboxMarks:
    """Outbox rows' new states (sending, sent, retry later), committed together: the
    lanes that finish a send while a commit is under way share the next one, so that
    hundreds of chats do not queue one commit each for the database's single writer.
    Each lane still waits until its own row's change is committed before it goes on,
    exactly as with a transaction of its own (an alert is marked "sending" durably
    before its request)."""

    def __init__(self, store: SqlStore) -> None:
        self._store = store
        self._queued: list[tuple[int, Callable[[OutboxRow], None], asyncio.Future[None]]] = []
        self._writer: asyncio.Task[None] | None = None

    async def change(self, outbox_id: int, apply: Callable[[OutboxRow], None]) -> None:
        committed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queued.append((outbox_id, apply, committed))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write())
        await committed

    async def _write(self) -> None:
        while self._queued:
            batch, self._queued = self._queued, []
            try:
                async with self._store.session() as session:
                    ids = [outbox_id for outbox_id, _, _ in batch]
                    query = select(OutboxRow).where(col(OutboxRow.id).in_(ids))
                    rows = {row.id: row for row in await session.exec(query)}
                    for outbox_id, apply, _ in batch:
                        row = rows.get(outbox_id)
                        if row is not None:
                            apply(row)
                            session.add(row)
            except Exception as exc:  # each lane gets the error, as from its own commit
                for _, _, committed in batch:
                    if not committed.done():
                        committed.set_exception(exc)
            else:
                for _, _, committed in batch:
                    if not committed.done():
                        committed.set_result(None)


def inline_button(button: RenderedButton) -> InlineKeyboardButton:
    """A callback button, or a link (opened in the browser, or in Telegram as a Mini App)."""
    if button.url is not None and button.mini_app:
        return InlineKeyboardButton(text=button.label, web_app=WebAppInfo(url=button.url))
    if button.url is not None:
        return InlineKeyboardButton(text=button.label, url=button.url)
    return InlineKeyboardButton(text=button.label, callback_data=button.data)


def parked_notice() -> Reply:
    return Reply((Text("error.generic"),))
