"""Several instances side by side: who works on which chat, how fast the bot may send, and
which instance runs the periodic jobs. With REDIS_URL (and PostgreSQL) any number of
instances share the work; without it the bot is one process and `SOLO` makes all of this a
no-op (no I/O, no task, no wait).

- Leases. An instance drains a chat's inbox lane (`inbox:<chat>`) or outbox lane
  (`outbox:<chat>`) only while it holds that chat's lease: a Redis key set with NX and a TTL
  (LEASE_TTL_S), renewed while the work goes on, released with a compare-and-delete that
  announces the release (pub/sub), which wakes the instances waiting for it. So a
  chat's updates are handled one at a time and in order, and its messages sent in order,
  whichever instance received them. An instance killed mid-update stops renewing: its
  leases expire and another instance's periodic scan of the inbox and outbox takes over
  (the update was never marked done, so it is handled again from the start).
- Rate limits. `SharedRateLimiter` keeps Telegram's limits for the whole cluster: one Lua
  script per send reserves the next global slot (GLOBAL_PER_SECOND, evenly paced) and checks
  the chat's sliding window, with Redis's clock, so two instances together send no faster
  than one would.
- Jobs. `turn(job, every_s)` lets one instance at a time run a periodic job (reminders,
  retention) and keeps the others from running it again within the period.

Why Redis leases rather than PostgreSQL locks: a session advisory lock or a row held with
SELECT ... FOR UPDATE SKIP LOCKED ties up one database connection (and, for the row lock, an
open transaction) for as long as the chat is being worked on, which includes downloading
and checking files for minutes; a few hundred busy chats would need a few hundred
connections, and a long transaction holds back vacuum. A lease is one small key, freed by
its TTL when its holder dies, and the rate limiter needs Redis anyway.

What a lease cannot rule out: its holder frozen, or cut off from Redis, for longer than the
TTL while another instance takes the chat (the holder finishes the update in hand, then
sees `Lease.lost`). The database covers that: an update is marked done in the transaction
that applies it, and on PostgreSQL that transaction locks the update's inbox row before it
checks "already done" (adapters.store.SqlTransaction.update_seen), so of two instances
handling the same update at the very same moment the second waits for the first to commit,
then finds it done and changes nothing. A chat's messages have no such guard: a sender
frozen past its lease's TTL may send a message the new holder sends too (alerts excepted:
they are marked "sending" before their request and never sent again).

Redis going away is an outage: no lease is taken (lanes wait for the next scan), no message
sent (the rate limiter cannot reserve a slot), /readyz fails. A holder that cannot renew
stops starting work under its lease in the last fifth of its TTL (`Lease.lost`), even while
its renewal still hangs. Redis back without its data (a restart without persistence: every
lease gone at once, not a TTL after its holder's last renewal): no lease is given out until
a TTL after the data set began (`_TAKE`), so the holders of the lost leases have stopped,
their sends in flight landed and marked, before anyone takes their chats over. That wait
also outlasts a chat's rate-limit window (3.6 s), lost with the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import secrets
import socket
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from typing import Protocol, TypeVar

from redis.asyncio import BlockingConnectionPool, Redis
from redis.exceptions import RedisError

log = logging.getLogger(__name__)
T = TypeVar("T")

LEASE_TTL_S = 10.0  # how long a dead instance's chats wait before another takes them
# A waiting lease is tried again when its holder's release is announced (pub/sub), else
# after LEASE_POLL_S, then twice as long each time up to LEASE_POLL_MAX_S. A lease found held
# by another instance is not tried again, by any wait of this instance (the scans start one
# per chat with work every second), until its release is heard or LEASE_POLL_MAX_S passed.
# The polls only catch a release whose announcement was missed (the listener reconnecting)
# and a lease freed by its TTL (its holder died). Polled every 0.05 s by every wait, two
# instances contending for chats ran five to six times the Redis commands of one.
LEASE_POLL_S, LEASE_POLL_MAX_S = 0.5, 2.0
# Nothing new is started under a lease in the last fifth of its TTL (2 s): what was started
# before has that long to finish (an update's handling or a send takes milliseconds). Renewed
# every third of the TTL, a lease never gets that close to its expiry while Redis answers.
LEASE_MARGIN = 0.2
REDIS_TIMEOUT_S = 5.0  # a Redis call slower than this counts as Redis being down
# A send woken more than this after its slot takes a new one: with slots every 1/20 s, no
# second then holds more than 20 x (1 + LATE_S) sends, under Telegram's 30 (we promise 25).
LATE_S, LATE_TRIES = 0.2, 3
REDIS_CONNECTIONS = 64  # per instance; a busy instance waits for a free one, never fails

# Take a lease (KEYS[1]) for ARGV[1] with a TTL of ARGV[2] ms, unless Redis lost its data
# less than a TTL ago. Returns 1 taken, 0 held by another, or minus how long (ms) leases still
# wait. Why the wait: a restart without persistence empties Redis, every lease with it, but
# the instances that held leases when it went away may still be working under them (each
# stops at most a TTL after its last confirmed renewal, see Lease.lost); a lease given out at
# once would put two instances on one chat, sending its messages twice. KEYS[2] marks the data
# set: missing, it began when this Redis process started (had Redis kept its data on disk,
# the mark would be there), so leases wait until a TTL after that; KEYS[3] exists while they
# wait. Redis's uptime is whole seconds, rounded down: the wait errs on the long side. The
# marks are read in one call: a lease taken costs three commands (this script, MGET, SET).
_TAKE = """
local marks = redis.call('MGET', KEYS[2], KEYS[3])
if not marks[1] then
  local uptime = string.match(redis.call('INFO', 'server'), 'uptime_in_seconds:(%d+)')
  redis.call('SET', KEYS[2], '1')
  local left = tonumber(ARGV[2]) - tonumber(uptime) * 1000
  if left > 0 then
    redis.call('SET', KEYS[3], '1', 'PX', left)
    return -left
  end
elseif marks[2] then
  return math.min(-1, -redis.call('PTTL', KEYS[3]))
end
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return 1
end
return 0
"""
# Renew only a lease still ours (another instance may hold it once ours expired).
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
# Release a lease still ours and announce it (KEYS[2] the channel, ARGV[2] the lease's name)
# to the instances waiting for it.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  redis.call('PUBLISH', KEYS[2], ARGV[2])
  return 1
end
return 0
"""
# One send: KEYS[1] the chat's recent sends (a sorted set of send times), KEYS[2] the next
# free global slot. ARGV: the chat's window (ms), its limit, the global interval (ms), a
# unique member. Returns {wait_ms, reserved}: reserved = 1 means "send in wait_ms", the
# slot is taken; 0 means the chat's window is full, try again in wait_ms (no slot taken, so
# a chat waiting for its own window never holds up the others). Times come from Redis's
# clock, in milliseconds (exact in a Lua number), so instances need no synchronised clocks.
_RESERVE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local window, limit, interval = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local slot = math.max(now, tonumber(redis.call('GET', KEYS[2]) or '0'))
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
local recent = redis.call('ZRANGEBYSCORE', KEYS[1], slot - window + 1, '+inf', 'WITHSCORES')
local count = #recent / 2
if count >= limit then
  return {tonumber(recent[2 * (count - limit + 1)]) + window - now, 0}
end
redis.call('SET', KEYS[2], slot + interval, 'PX', slot + interval - now + 1000)
redis.call('ZADD', KEYS[1], slot, ARGV[4])
redis.call('PEXPIRE', KEYS[1], slot - now + window)
return {slot - now, 1}
"""


class ClusterUnavailable(ConnectionError):
    """Redis did not answer: the caller treats it as an outage and tries again later."""


@dataclass
class Lease:
    """A lease this process holds. `lost` turns True when Redis says it is no longer ours, or
    when its TTL is about to run out since the last renewal Redis confirmed (Redis away or
    slow: the renewal's own failure may come later than that, after a connection timeout):
    the work in hand finishes, nothing new is started under it."""

    stop_at: float = math.inf  # time.monotonic(): LEASE_MARGIN before it expires unrenewed
    taken_away: bool = False

    @property
    def lost(self) -> bool:
        return self.taken_away or time.monotonic() >= self.stop_at


_HELD = Lease()  # what one instance always holds


class Solo:
    """One instance: every lease is granted at once and every job runs; no I/O at all."""

    shared = False

    @contextlib.asynccontextmanager
    async def lease(
        self, name: str, *, wait: float = 0.0, keep_for_s: float | None = None
    ) -> AsyncIterator[Lease | None]:
        yield _HELD

    @contextlib.asynccontextmanager
    async def turn(self, job: str, every_s: float) -> AsyncIterator[bool]:
        yield True

    async def close(self) -> None:
        return None


SOLO = Solo()


class RedisCluster(Solo):
    """Leases and job turns in Redis, under `namespace` (one per bot: `cc:<bot id>`)."""

    shared = True

    def __init__(self, redis: Redis, namespace: str, lease_ttl_s: float = LEASE_TTL_S) -> None:
        self.redis = redis
        self.namespace = namespace
        self._ttl_ms = int(lease_ttl_s * 1000)
        # A lease's value names its holder, so an operator (or a test) can see who has what.
        self.instance = f"{socket.gethostname()}:{os.getpid()}"
        self._take = redis.register_script(_TAKE)
        self._renew = redis.register_script(_RENEW)
        self._release = redis.register_script(_RELEASE)
        self._quiet_logged_until = 0.0
        # The leases this instance waits for: name -> an event per waiting call, set when the
        # lease's release is announced (see _listen, started by the first wait).
        self._waiters: dict[str, set[asyncio.Event]] = {}
        self._listener: asyncio.Task[None] | None = None
        self._closing = False
        # Leases found held by another instance, with when to try them again anyway; trusted
        # only while the listener hears the releases (`_hearing`).
        self._elsewhere: dict[str, float] = {}
        self._hearing = False

    @classmethod
    def from_url(cls, url: str, namespace: str) -> RedisCluster:
        return cls(connect(url), namespace)

    def key(self, *parts: object) -> str:
        return ":".join([self.namespace, *map(str, parts)])

    @contextlib.asynccontextmanager
    async def lease(
        self, name: str, *, wait: float = 0.0, keep_for_s: float | None = None
    ) -> AsyncIterator[Lease | None]:
        """Hold `name` for the body, or yield None when another instance holds it (after
        trying for up to `wait` seconds) or Redis is down. On exit the lease is released, or
        with `keep_for_s` kept that long (so nobody takes it again at once)."""
        key, token = self.key("lease", name), f"{self.instance}:{secrets.token_hex(6)}"
        stop_at = await self._acquire(name, key, token, wait)
        if stop_at is None:
            yield None
            return
        lease, done = Lease(stop_at=stop_at), asyncio.Event()
        # Stopped by an event, never cancelled: see `command`.
        renewer = asyncio.create_task(self._keep(name, key, token, lease, done))
        try:
            yield lease
        finally:
            done.set()
            await renewer
            # If Redis does not answer, the TTL frees the lease anyway.
            with contextlib.suppress(RedisError, OSError):
                if keep_for_s is None:
                    released = self.key("released")
                    await command(self._release(keys=[key, released], args=[token, name]))
                else:
                    await command(self._renew(keys=[key], args=[token, int(keep_for_s * 1000)]))

    @contextlib.asynccontextmanager
    async def turn(self, job: str, every_s: float) -> AsyncIterator[bool]:
        """Whether this instance runs `job` now: never two runs at once in the cluster, and
        none within 0.9 x `every_s` after the last one ended (not the full period, so the
        instance that ran it last, trying again one period later, finds it free)."""
        async with self.lease(f"job:{job}", keep_for_s=0.9 * every_s) as lease:
            yield lease is not None

    async def _acquire(self, name: str, key: str, token: str, wait: float) -> float | None:
        """When work under the lease must stop unless it is renewed (Lease.stop_at) once it
        is taken; None if it was not within `wait`."""
        deadline = time.monotonic() + wait
        keys = [key, self.key("data", "since"), self.key("data", "young")]
        # Listening before the first try: a release between that try and the wait still wakes.
        released = asyncio.Event()
        waiting = self._waiters.setdefault(name, set())
        waiting.add(released)
        poll = LEASE_POLL_S
        try:
            while True:
                released.clear()
                asked = time.monotonic()  # the TTL runs from Redis's answer: from before it
                # Held elsewhere, and no release heard since: wait for one (a call that may
                # not wait asks Redis, the release may be on its way).
                if not (wait > 0 and self._hearing and self._elsewhere.get(name, 0.0) > asked):
                    try:
                        taken = await command(self._take(keys=keys, args=[token, self._ttl_ms]))
                    except (RedisError, OSError) as exc:
                        log.warning("lease not taken: Redis unavailable (%s)", type(exc).__name__)
                        return None
                    if taken == 1:
                        return self._stop_at(asked)
                    if taken == 0:
                        self._elsewhere[name] = asked + LEASE_POLL_MAX_S
                    elif asked >= self._quiet_logged_until:  # once per wait
                        self._quiet_logged_until = asked - taken / 1000
                        log.warning("Redis lost its data: no lease for %.1f s", -taken / 1000)
                now = time.monotonic()
                if now >= deadline:
                    return None
                self._listen_for_releases()
                trusted = self._elsewhere.get(name, 0.0) - now if self._hearing else 0.0
                pause = trusted if trusted > 0 else poll  # until the next try
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(released.wait(), min(deadline - now, pause))
                if trusted <= 0:
                    poll = min(2 * poll, LEASE_POLL_MAX_S)
        finally:
            waiting.discard(released)
            if not waiting:
                del self._waiters[name]

    def _listen_for_releases(self) -> None:
        if self._listener is None or self._listener.done():
            self._listener = asyncio.create_task(self._listen(), name="lease-releases")

    async def _listen(self) -> None:
        """Wake this instance's waiters for a lease when its release is announced. One
        connection per instance; a wait on Redis itself (BLPOP) would hold a connection per
        waiting chat, and hundreds of them would drain the pool the renewals need."""
        failing = False
        while not self._closing:
            try:
                async with self.redis.pubsub() as pubsub:
                    await pubsub.subscribe(self.key("released"))
                    failing, self._hearing, forget_at = False, True, 0.0
                    while not self._closing:  # a timeout, to see `_closing` (see `close`)
                        message = await pubsub.get_message(
                            ignore_subscribe_messages=True, timeout=1.0
                        )
                        if message is not None:
                            name = message["data"].decode()
                            self._elsewhere.pop(name, None)
                            for event in self._waiters.get(name, ()):
                                event.set()
                        now = time.monotonic()
                        if now >= forget_at:  # chats no wait asked about again
                            self._elsewhere = {n: t for n, t in self._elsewhere.items() if t > now}
                            forget_at = now + LEASE_POLL_MAX_S
            except (RedisError, OSError) as exc:
                self._hearing = False  # releases missed meanwhile: try every lease again
                self._elsewhere.clear()
                if not failing:  # the waits poll meanwhile; said once per outage
                    log.warning(
                        "lease releases unheard: Redis unavailable (%s)", type(exc).__name__
                    )
                failing = True
                await asyncio.sleep(1.0)

    async def _keep(
        self, name: str, key: str, token: str, lease: Lease, done: asyncio.Event
    ) -> None:
        """Renew the lease every third of its TTL until `done`; mark it lost when Redis says
        it is no longer ours or does not answer in time."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), self._ttl_ms / 3000)
            if done.is_set():
                return
            asked = time.monotonic()
            try:
                renewed = await self._renew(keys=[key], args=[token, self._ttl_ms])
            except (RedisError, OSError):
                renewed = 0
            if not renewed or lease.lost:  # a renewal that came too late changes nothing
                lease.taken_away = True
                log.warning("lease lost lease=%s", name)
                return
            lease.stop_at = self._stop_at(asked)

    def _stop_at(self, asked: float) -> float:
        """A lease Redis set or renewed for a TTL in answer to a call made at `asked`."""
        return asked + (1 - LEASE_MARGIN) * self._ttl_ms / 1000

    async def close(self) -> None:
        self._closing = True
        if self._listener is not None:
            # It sees `_closing` within a second; cancelled only if it does not (redis-py may
            # drop a cancellation that comes while it reads, see `command`).
            await asyncio.wait([self._listener], timeout=2.0)
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError, RedisError, OSError):
                await self._listener
        await self.redis.aclose()


class RateLimiter(Protocol):
    async def wait_turn(self, chat_id: int) -> None:
        """Sleep until a message to this chat fits every limit, then take its slot."""


class SharedRateLimiter:
    """Telegram's limits for the whole cluster (the same numbers as the one-process limiter
    in adapters.telegram): a chat's sliding window, a group's, and an even global pace."""

    def __init__(
        self,
        cluster: RedisCluster,
        chat: tuple[float, int],
        group: tuple[float, int],
        per_second: int,
    ) -> None:
        self._cluster = cluster
        self._chat = (int(chat[0] * 1000), chat[1])
        self._group = (int(group[0] * 1000), group[1])
        self._interval_ms = max(1, round(1000 / per_second))
        self._reserve = cluster.redis.register_script(_RESERVE)

    async def wait_turn(self, chat_id: int) -> None:
        """Sleep until a message to this chat fits every limit; its slot is then taken.

        A process starved of CPU wakes late, and its sends would bunch up with those of the
        slots after theirs (Telegram counts them as they arrive): a slot missed by more than
        LATE_S is given up for a new one (at most LATE_TRIES times, then it is used).
        """
        window, limit = self._group if chat_id < 0 else self._chat
        keys = [self._cluster.key("sent", chat_id), self._cluster.key("next-slot")]
        loop = asyncio.get_running_loop()
        late = 0
        while True:
            try:
                wait_ms, reserved = await command(
                    self._reserve(
                        keys=keys, args=[window, limit, self._interval_ms, secrets.token_hex(6)]
                    )
                )
            except (RedisError, OSError) as exc:
                raise ClusterUnavailable(type(exc).__name__) from exc
            due = loop.time() + wait_ms / 1000
            if wait_ms > 0:
                await asyncio.sleep(wait_ms / 1000)
            if reserved and (loop.time() - due <= LATE_S or late >= LATE_TRIES):
                return
            if reserved:
                late += 1  # woken too late for this slot: take another


async def command(call: Awaitable[T]) -> T:
    """Await a Redis call, keeping a cancellation that came meanwhile. redis-py (8.1, seen
    on Python 3.11) lets a command in flight finish and return normally even when its task
    was cancelled, and the cancellation is lost: a cancelled lane would go on waiting and
    sending. Raised again here."""
    result = await call
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
    return result


def connect(url: str) -> Redis:
    """A client whose calls fail fast when Redis is down, and whose pool makes a burst of
    lanes wait for a connection instead of opening hundreds."""
    pool = BlockingConnectionPool.from_url(
        url,
        max_connections=REDIS_CONNECTIONS,
        timeout=REDIS_TIMEOUT_S,
        socket_timeout=REDIS_TIMEOUT_S,
        socket_connect_timeout=REDIS_TIMEOUT_S,
    )
    return Redis.from_pool(pool)  # the client owns the pool: aclose() closes it
