"""The web upload: a page for files too big for the chat (a CD's scans), bound to one case
and one checklist item, served as an aiohttp sub-application mounted at ``/upload/``.

Two ways in:

* a one-time link ``WEB_BASE_URL/upload/u/<token>`` (`UploadLinks.issue_link`): the token
  is random (256 bits), stored only as its SHA-256, expires (UPLOAD_LINK_HOURS), and is
  spent once its files are handed to the intake;
* the Telegram Mini App ``WEB_BASE_URL/upload/app?case=<case id>`` (`UploadLinks.app_url`,
  for a ``web_app`` button): every request carries Telegram's signed ``initData``, checked
  with the bot token exactly as Telegram documents, and the user it names may only reach
  their own chat's open upload for that case.

Routes (relative to the mount point)::

    GET  u/<token>                      the page (or a notice: expired, used, not valid)
    GET  app?case=<id>                  the page inside Telegram
    GET  static/page.js, static/page.css
    GET  api/status                     state, bytes declared and stored
    POST api/files                      the picked files; answers the stream's layout (each
                                        file's offset, the part size) and the chunks stored
    PUT  api/chunks/<layout>/<n>        chunk n of the stream (the files one after the
                                        other): exactly the part size (the last shorter);
                                        read past aiohttp's parser into the vault's
                                        buffers, then its connection closes (_DirectBody)
    POST api/finish                     every chunk is in: hand the files to the intake
                                        (or, if a stored chunk was found damaged, the
                                        chunks to send again: state "open", "missing")

API requests authenticate with ``Authorization: Bearer <token>`` or ``tma <initData>``
(never a cookie, so no cross-site request can act for the patient). Chunks stream into the
encrypted vault (adapters.uploads); the hand-over runs `ConversationService.handle_file`
for each file, which stores, checks and answers the patient in the chat as for a chat
upload. Tokens never reach a log: this module logs session id prefixes only, and the
server runs without an access log (bot.web) or with `ScrubbedAccessLogger`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import html
import ipaddress
import json
import logging
import re
import socket
import string
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

from aiohttp import ClientPayloadError, web
from aiohttp.abc import AbstractAccessLogger

from adapters.uploads import (
    COMPLETE,
    FINISHING,
    OPEN,
    PART_SIZE,
    HandoverUnit,
    UploadRefused,
    UploadSession,
    UploadStore,
    plan_handover,
)
from bot.app import App
from bot.settings import Settings
from core.ports import IncomingFile, Patient
from core.replies import Text, Verbatim
from handlers.render import format_size, is_rtl

log = logging.getLogger(__name__)

PAGE_DIR = Path(__file__).resolve().parent / "upload_page"

# Defaults of the settings this module reads with getattr (see README, "Web uploads").
LINK_HOURS = 24.0  # UPLOAD_LINK_HOURS: how long a link works if it is not used up before
MAX_CASE_BYTES = 4 * 1024**3  # UPLOAD_MAX_CASE_BYTES: stored files plus declared uploads
# The Mini App's launch data is signed once, when the patient opens it; an upload of a CD
# over a slow line takes hours, so it stays good as long as a link would.
INIT_DATA_MAX_AGE = LINK_HOURS * 3600
CLOCK_SKEW = 60  # seconds an auth_date may lie in the future (clocks differ)
MAX_JSON_BODY = 4 * 1024 * 1024  # the file list of a full CD (10,000 names) fits easily
# Rate limits (token buckets: per second, burst). A CD of small files is hundreds of PUTs in
# a row, three at a time, so the ordinary limits are generous; what must stay slow is
# guessing: a request with an unknown token or bad initData costs from a small budget per
# IP (ten, then one per 30 s); a valid credential is never refused for it.
IP_RATE, IP_BURST = 200.0, 1000.0
SESSION_RATE, SESSION_BURST = 100.0, 1000.0
FAILURE_RATE, FAILURE_BURST = 1 / 30, 10.0
HANDOVER_RETRY_S = 30.0  # a failed hand-over is tried again when the page asks after this

_CASE_ID = re.compile(r"[0-9a-f]{32}")
_TOKEN_IN_PATH = re.compile(r"(/u/)[^/?#]+")
_TELEGRAM_FRAMES = "https://web.telegram.org https://*.telegram.org"
_ASSETS = {
    "page.js": "application/javascript",
    "page.css": "text/css",
}
# Texts the page's script shows (templates: it fills {done}, {total}, {count}, {percent}).
_SCRIPT_TEXTS = (
    "uploading",
    "retrying",
    "overall",
    "files",
    "resume",
    "finishing",
    "done",
    "empty",
    "failed",
    "busy",
    "expired",
    "used",
    "invalid",
    "not_ready",
    "open_in_telegram",
)
_STATUS = {
    "invalid": 401,
    "expired": 410,
    "used": 410,
    "too_big": 413,
    "not_ready": 409,
    "bad_request": 400,
}


# -- links -------------------------------------------------------------------------------


class UploadLinks:
    """Issues upload links for the chat side. `base_url` overrides WEB_BASE_URL (tests)."""

    def __init__(self, app: App, settings: Settings | None = None, base_url: str | None = None):
        settings = settings or app.settings
        self._uploads = UploadStore(app.store, app.vault, app.store.keys)
        self._base = (base_url or getattr(settings, "web_base_url", None) or "").rstrip("/")
        self._ttl = timedelta(hours=float(getattr(settings, "upload_link_hours", LINK_HOURS)))

    async def issue_link(self, case_id: str, item_key: str, chat_id: int) -> str:
        """A one-time link to upload files for this case's item, from this chat only.

        Raises RuntimeError without WEB_BASE_URL, and adapters.uploads.UploadRefused when
        the case is not this chat's (or was erased)."""
        if not self._base:
            raise RuntimeError("WEB_BASE_URL is not set: upload links need the public address")
        token = await self._uploads.create(case_id, item_key, chat_id, self._ttl)
        log.info("upload link issued case=%s item=%s", case_id, item_key)
        return f"{self._base}/upload/u/{token}"

    def app_url(self, case_id: str) -> str:
        """The Mini App address for a `web_app` button (https only, per Telegram); it opens
        the chat's newest open upload for the case, so issue a link first."""
        if not self._base:
            raise RuntimeError("WEB_BASE_URL is not set: upload links need the public address")
        return f"{self._base}/upload/app?case={case_id}"


def check_init_data(
    init_data: str, bot_token: str, now: float, max_age: float = INIT_DATA_MAX_AGE
) -> int | None:
    """The Telegram user id in a Mini App's `initData`, or None unless Telegram signed it
    for this bot within `max_age` seconds.

    As https://core.telegram.org/bots/webapps#validating-data-received-via-the-mini-app:
    secret_key = HMAC_SHA256(key="WebAppData", msg=bot_token); the hash is
    HMAC_SHA256(key=secret_key, msg=data_check_string), where data_check_string is every
    other field as key=value, sorted by key, joined by line feeds.
    """
    try:
        pairs = parse_qsl(init_data, keep_blank_values=True, strict_parsing=True)
    except ValueError:
        return None
    fields = dict(pairs)
    if len(fields) != len(pairs):
        return None  # a repeated field would make the check string ambiguous
    received = fields.pop("hash", "").encode()
    check = "\n".join(f"{key}={value}" for key, value in sorted(fields.items()))
    secret = hmac.new(b"WebAppData", bot_token.encode(), hashlib.sha256).digest()
    expected = hmac.new(secret, check.encode(), hashlib.sha256).hexdigest().encode()
    if not hmac.compare_digest(expected, received):
        return None
    try:
        auth_date = int(fields["auth_date"])
        user_id = json.loads(fields["user"])["id"]
    except (KeyError, ValueError, TypeError):
        return None
    if not isinstance(user_id, int) or isinstance(user_id, bool):
        return None
    if not now - max_age <= auth_date <= now + CLOCK_SKEW:
        return None
    return user_id


# -- protection ----------------------------------------------------------------------------


class RateLimiter:
    """Token buckets by key (an IP, a session): `rate` per second, up to `burst` at once.
    Keeps at most `max_keys` buckets, forgetting the least recently used."""

    def __init__(self, rate: float, burst: float, max_keys: int = 50_000) -> None:
        self._rate, self._burst, self._max = rate, burst, max_keys
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def _level(self, key: str, now: float) -> float:
        tokens, at = self._buckets.get(key, (self._burst, now))
        return min(self._burst, tokens + (now - at) * self._rate)

    def take(self, key: str) -> float:
        """Spend one token if there is one: 0; else the seconds to wait."""
        now = time.monotonic()
        level = self._level(key, now)
        if level < 1:
            return (1 - level) / self._rate
        self._buckets[key] = (level - 1, now)
        self._buckets.move_to_end(key)
        while len(self._buckets) > self._max:
            self._buckets.popitem(last=False)
        return 0.0


class _Busy(Exception):  # an answer (429), not a fault
    def __init__(self, wait: float) -> None:
        super().__init__("rate limited")
        self.wait = wait


class ScrubbedAccessLogger(AbstractAccessLogger):
    """aiohttp's access log without secrets: a link's token is shown as "…" and query
    strings (a case id) are left out. Pass it as `AppRunner(..., access_log_class=...)`."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        path = _TOKEN_IN_PATH.sub(r"\1…", request.path)
        self.logger.info(
            "%s %s %s %d %.3fs", request.remote, request.method, path, response.status, time
        )


def _protect(response: web.StreamResponse, in_telegram: bool) -> None:
    """Headers every answer carries: no inline script anywhere (the page's script and style
    are files from here), not cached, not framed except the Mini App by Telegram."""
    frames = _TELEGRAM_FRAMES if in_telegram else "'none'"
    response.headers["Content-Security-Policy"] = (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
        f"connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors {frames}"
    )
    if not in_telegram:
        response.headers["X-Frame-Options"] = "DENY"  # older browsers without CSP frames
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "no-referrer"
    response.headers["Cache-Control"] = "no-store"
    response.headers["Cross-Origin-Resource-Policy"] = "same-origin"
    response.headers["Permissions-Policy"] = "camera=(), microphone=(), geolocation=()"


def _refusal(reason: str, status: int | None = None) -> web.Response:
    return web.json_response({"error": reason}, status=status or _STATUS.get(reason, 400))


async def _read_json(request: web.Request) -> Any:
    """The JSON body, read with a hard size limit (the parent app's may be anything)."""
    length = request.content_length
    if length is None or length > MAX_JSON_BODY:
        raise UploadRefused("bad_request", "body size")
    try:
        return json.loads(await request.content.readexactly(length), parse_constant=_no_constant)
    except (asyncio.IncompleteReadError, ValueError):
        raise UploadRefused("bad_request", "body") from None


# A request whose body was read past aiohttp's parser (_DirectBody): its connection closes
# after the answer, whatever the answer.
_DIRECT = web.RequestKey("upload.direct_body", bool)
# While _DirectBody reads, the kernel wakes the event loop only once this much of the body
# is in (SO_RCVLOWAT; or the rest of it, if less, or at the connection's end): a wake-up,
# and its pass of Python on the loop every request shares, per megabyte instead of per
# 200 KiB or so (the bench's 1 GiB: 1,750 reads instead of 5,270, and 0.48 s of the server's
# CPU instead of 0.53).
WAKE_BYTES = 1 << 20


class _ParsedBody:
    """A chunk's body as aiohttp's parser hands it over (`request.content`), copied into the
    caller's buffers: what _DirectBody cannot take (an encoded body, a TLS transport...)."""

    def __init__(self, request: web.Request, length: int) -> None:
        self._content = request.content
        self._length = length
        self._seen = 0
        self._piece = memoryview(b"")

    async def readinto(self, buffer: memoryview) -> int:
        if not self._piece:
            piece = await self._content.readany()
            self._seen += len(piece)
            if self._seen > self._length:
                raise UploadRefused("bad_request", "chunk too long")
            self._piece = memoryview(piece)
        count = min(len(buffer), len(self._piece))
        buffer[:count] = self._piece[:count]
        self._piece = self._piece[count:]
        return count


class _DirectBody(asyncio.BufferedProtocol):
    """A chunk's body read from the connection straight into the caller's buffers.

    aiohttp reads a connection 256 KiB at a time into a new bytes object, and its parser
    copies the body out of that into another: two fresh allocations per piece, which glibc
    hands back to the kernel and faults in again, and a pass of Python per piece on the
    event loop that every request shares (bench/upload_bench.py: the loop was the
    bottleneck). For the rest of the body this is the connection's protocol instead (the
    transport calls `get_buffer`, then `recv_into` the caller's buffer): the kernel's copy
    is the only one. It never reads past the declared length, so nothing of a request
    that may follow is taken; but aiohttp's parser still counts the body as unread, so the
    connection is closed after the answer (`Connection: close`, see _UploadServer.guard),
    and aiohttp ignores whatever the client sends meanwhile. What the parser had already
    read of the body is taken from `request.content` first; a body it read whole needs no
    taking over, and keeps the connection."""

    def __init__(self, request: web.Request, length: int) -> None:
        self._request = request
        self._length = length
        self._ready: list[bytes] | None = None  # what the parser read: None until taken
        self._left = 0  # body bytes still in the connection
        self._target: memoryview | None = None
        self._filled = 0
        self._waiter: asyncio.Future[None] | None = None
        self._error: BaseException | None = None
        self._transport: Any = None
        self._handler: Any = None
        self._socket: Any = None  # set while the body's reads wait for WAKE_BYTES

    def _take(self) -> list[bytes]:
        """At the first read: what the parser has read of the body, and the connection for
        the rest (unless the parser read it all)."""
        request = self._request
        ready = []
        while piece := request.content.read_nowait():
            ready.append(piece)
        self._left = self._length - sum(map(len, ready))
        if self._left > 0 and not request.content.is_eof():
            transport = request.transport
            assert transport is not None  # suits() checked
            request.protocol.close()  # no further request on this connection: ignore it
            request[_DIRECT] = True
            self._transport, self._handler = transport, transport.get_protocol()
            sock = transport.get_extra_info("socket")
            if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
                self._socket = sock
            transport.pause_reading()
            transport.set_protocol(self)
        return ready

    @staticmethod
    def suits(request: web.Request) -> bool:
        """Whether the body can be read past the parser: a plain TCP (or Unix) connection,
        the body as sent (no Content-Encoding for aiohttp to undo, no chunked framing)."""
        transport = request.transport
        return (
            transport is not None
            and not transport.is_closing()
            and transport.get_extra_info("sslcontext") is None
            and request.headers.get("Content-Encoding", "identity").lower() == "identity"
            and "Transfer-Encoding" not in request.headers  # (the parser refuses it anyway)
        )

    async def readinto(self, buffer: memoryview) -> int:
        if self._ready is None:
            self._ready = self._take()
        if self._ready:
            piece = self._ready[0]
            count = min(len(buffer), len(piece))
            buffer[:count] = piece[:count]
            if count == len(piece):
                self._ready.pop(0)
            else:
                self._ready[0] = piece[count:]
            return count
        if self._error is not None:
            raise self._error
        if self._transport is None or self._left <= 0:
            return 0
        self._target, self._filled = buffer[: self._left], 0
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            self._wake_at(len(self._target))
            self._transport.resume_reading()
            await self._waiter
            return self._filled
        finally:
            # Never again into this buffer: it goes back to the vault for other blobs.
            self._target = self._waiter = None
            if self._error is None:
                self._transport.pause_reading()

    def close(self) -> None:
        """Give the connection back to aiohttp (to notice the client close it) once the body
        is read or its reading failed."""
        if self._transport is None:
            return
        transport, self._transport = self._transport, None
        if self._error is None:  # else the connection is gone (connection_lost tells aiohttp)
            self._wake_at(1)  # as a socket is by default
            transport.set_protocol(self._handler)
            transport.resume_reading()
        self._request.content.feed_eof()  # read here: aiohttp need not wait for it

    def _wake_at(self, wanted: int) -> None:
        """Have the connection wake the loop once `wanted` bytes (at most WAKE_BYTES) are in.
        The kernel caps it at half the largest receive buffer and grows the buffer to hold
        it, so the sender is never held back for it."""
        if self._socket is not None:
            with contextlib.suppress(OSError):  # an option it lacks only costs wake-ups
                self._socket.setsockopt(
                    socket.SOL_SOCKET, socket.SO_RCVLOWAT, max(1, min(wanted, WAKE_BYTES))
                )

    # -- asyncio.BufferedProtocol ------------------------------------------------------------

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._target is None:  # reading is paused whenever there is no target
            raise RuntimeError("upload body read with no buffer to read into")
        return self._target[self._filled :]

    def buffer_updated(self, nbytes: int) -> None:
        assert self._target is not None
        self._filled += nbytes
        self._left -= nbytes
        if self._filled == len(self._target):
            self._transport.pause_reading()
            self._wake()
        else:
            self._wake_at(len(self._target) - self._filled)

    def eof_received(self) -> bool | None:
        self._fail(ConnectionResetError("the client closed the connection mid-body"))
        return None  # the transport closes

    def connection_lost(self, exc: BaseException | None) -> None:
        self._fail(ConnectionResetError("connection lost mid-body"))
        self._handler.connection_lost(exc)

    def pause_writing(self) -> None:
        self._handler.pause_writing()

    def resume_writing(self) -> None:
        self._handler.resume_writing()

    def _fail(self, error: BaseException) -> None:
        if self._error is None:
            self._error = error
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(self._error)

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")  # Python's json accepts NaN and Infinity


# -- the hand-over ---------------------------------------------------------------------------


@dataclass
class _StoredSource:
    """A FileSource over a unit's stored chunks, decrypted piece by piece as the intake
    reads (the blocking reads and the ZIP framing run in a worker thread)."""

    uploads: UploadStore
    upload: UploadSession
    unit: HandoverUnit

    async def chunks(self, incoming: IncomingFile) -> AsyncIterator[bytes]:
        pieces = self.uploads.unit_pieces(self.upload, self.unit)
        try:
            while (piece := await asyncio.to_thread(next, pieces, None)) is not None:
                if piece:
                    yield piece
        finally:
            with contextlib.suppress(ValueError):  # still running in its thread: it ends there
                pieces.close()


# -- the server ------------------------------------------------------------------------------


class _UploadServer:
    def __init__(self, app: App, settings: Settings) -> None:
        self.app = app
        self.settings = settings
        part_size = int(getattr(settings, "upload_part_bytes", PART_SIZE))
        self.uploads = UploadStore(app.store, app.vault, app.store.keys, part_size)
        self.max_case_bytes = int(getattr(settings, "upload_max_case_bytes", MAX_CASE_BYTES))
        self.proxies = tuple(
            ipaddress.ip_network(proxy) for proxy in getattr(settings, "web_trusted_proxies", ())
        )
        self.by_ip = RateLimiter(IP_RATE, IP_BURST)
        self.by_session = RateLimiter(SESSION_RATE, SESSION_BURST)
        self.failures = RateLimiter(FAILURE_RATE, FAILURE_BURST)
        self.page = string.Template((PAGE_DIR / "page.html").read_text(encoding="utf-8"))
        # Served from memory by name: no path from a request ever reaches the file system.
        self.assets = {name: (PAGE_DIR / name).read_bytes() for name in _ASSETS}
        self.handovers: dict[str, asyncio.Task[None]] = {}
        self.failed_at: dict[str, float] = {}
        self.sweeper: asyncio.Task[None] | None = None

    # -- requests ------------------------------------------------------------------------

    @web.middleware
    async def guard(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        """Rate limits, errors as JSON, security headers on every answer; logs name the
        route, never the path (it holds the token)."""
        route = request.match_info.route.name or "?"
        response: web.StreamResponse
        try:
            if wait := self.by_ip.take(self._address(request)):
                raise _Busy(wait)
            response = await handler(request)
        except UploadRefused as exc:
            response = _refusal(exc.reason)
        except _Busy as exc:
            response = _refusal("busy", 429)
            response.headers["Retry-After"] = str(max(1, round(exc.wait)))
        except web.HTTPException as exc:  # no such route, wrong method
            response = _refusal("invalid" if exc.status == 404 else "bad_request", exc.status)
        except (ConnectionError, ClientPayloadError):
            log.info("upload connection lost route=%s", route)  # the page sends it again
            response = _refusal("bad_request")
        except Exception:
            log.exception("upload request failed route=%s", route)
            response = _refusal("failed", 500)
        _protect(response, in_telegram=route == "app")
        if request.get(_DIRECT):
            response.force_close()  # the parser never saw the body: see _DirectBody
        return response

    async def _authorise(self, request: web.Request, complete_ok: bool = False) -> UploadSession:
        scheme, _, credential = request.headers.get("Authorization", "").partition(" ")
        try:
            if scheme == "Bearer":
                upload = await self.uploads.by_token(credential, complete_ok)
            elif scheme == "tma" and self.settings.bot_token:
                user = check_init_data(credential, self.settings.bot_token, time.time())
                case_id = request.query.get("case", "")
                if user is None or not _CASE_ID.fullmatch(case_id):
                    raise UploadRefused("invalid", "initData")
                upload = await self.uploads.for_chat(case_id, user, complete_ok)
            else:
                raise UploadRefused("invalid", "no credential")
        except UploadRefused as exc:
            self._count_failure(request, exc)
            raise
        if wait := self.by_session.take(upload.id):
            raise _Busy(wait)
        return upload

    def _count_failure(self, request: web.Request, refusal: UploadRefused) -> None:
        """Only wrong credentials cost from the IP's small budget, and a good one is never
        held back by it: behind a proxy every patient may share one address."""
        if refusal.reason == "invalid" and (wait := self.failures.take(self._address(request))):
            raise _Busy(wait) from refusal

    def _address(self, request: web.Request) -> str:
        """The address the per-address limits count for: the connection's, or, when it comes
        from one of WEB_TRUSTED_PROXIES, the last one in X-Forwarded-For that is not a
        trusted proxy's (each proxy appends the address it was reached from: what stands to
        the left of those may be the client's own invention). Without the setting, behind a
        proxy every patient would share its address, and one of them, or a stranger
        guessing links, could spend everyone's budget."""
        peer = request.remote or "?"
        if not self._trusted(peer):
            return peer
        hops = ",".join(request.headers.getall("X-Forwarded-For", ())).split(",")
        for hop in reversed(hops):
            if (hop := hop.strip()) and not self._trusted(hop):
                return hop[:64]  # a bucket's key; not parsed as an address it is still one
        return peer

    def _trusted(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
            ip = ip.ipv4_mapped  # an IPv4 client of a dual-stack socket
        return any(ip in network for network in self.proxies)

    async def link_page(self, request: web.Request) -> web.Response:
        default = self.settings.default_locale
        try:
            upload = await self.uploads.by_token(request.match_info["token"])
        except UploadRefused as exc:
            if exc.reason != "invalid":
                return self._notice(request, exc.locale or default, exc.reason, 410)
            try:
                self._count_failure(request, exc)
            except _Busy:
                return self._notice(request, default, "busy", 429)
            return self._notice(request, default, "invalid", 404)
        return self._page(request, upload.locale, "link", None, self._item_title(upload))

    async def app_page(self, request: web.Request) -> web.Response:
        case_id = request.query.get("case", "")
        locale = await self.uploads.case_locale(case_id) if _CASE_ID.fullmatch(case_id) else None
        if locale is None or not self.settings.bot_token:
            return self._notice(request, self.settings.default_locale, "invalid", 404)
        # Who is asking is known only once the script sends Telegram's signed initData.
        return self._page(request, locale, "app", case_id, None)

    async def asset(self, request: web.Request) -> web.Response:
        name = request.match_info.route.name or ""
        return web.Response(body=self.assets[name], content_type=_ASSETS[name], charset="utf-8")

    async def status(self, request: web.Request) -> web.Response:
        upload = await self._authorise(request, complete_ok=True)
        if upload.state == FINISHING:
            self._hand_over_soon(upload.id)  # after a restart, or a failed try
        received = 0
        if upload.state == OPEN and upload.files:
            have = await asyncio.to_thread(self.uploads.received, upload)
            received = sum(upload.chunk_length(index) for index in have)
        return web.json_response(
            {
                "state": upload.state,
                "files": len(upload.files),
                "total": upload.total_bytes,
                "received": received,
            }
        )

    async def declare(self, request: web.Request) -> web.Response:
        upload = await self._authorise(request)
        body = await _read_json(request)
        entries = body.get("files") if isinstance(body, dict) else None
        upload, offsets = await self.uploads.set_files(upload, entries, self.max_case_bytes)
        have = await asyncio.to_thread(self.uploads.received, upload)
        return web.json_response(
            {
                "layout": upload.layout,
                "part_size": upload.part_size,
                "total": upload.total_bytes,
                "offsets": offsets,
                "have": have,
            }
        )

    async def put_chunk(self, request: web.Request) -> web.Response:
        upload = await self._authorise(request)
        layout, index = int(request.match_info["layout"]), int(request.match_info["index"])
        if layout == upload.layout and not 0 <= index < upload.chunks:
            raise UploadRefused("bad_request", "no such chunk")
        # The declared length must be exact: no chunked bodies, nothing beyond one chunk.
        if layout == upload.layout and request.content_length != upload.chunk_length(index):
            raise UploadRefused("bad_request", "length")
        length = upload.chunk_length(index) if layout == upload.layout else 0
        if length and _DirectBody.suits(request):
            body = _DirectBody(request, length)
            try:
                stored = await self.uploads.write_chunk(upload, layout, index, body)
            finally:
                body.close()
        else:
            parsed = _ParsedBody(request, request.content_length or 0)
            stored = await self.uploads.write_chunk(upload, layout, index, parsed)
        return web.json_response({"stored": True, "new": stored})

    async def finish(self, request: web.Request) -> web.Response:
        upload = await self._authorise(request, complete_ok=True)
        if upload.state == OPEN and (missing := await self.uploads.start_finishing(upload)):
            return web.json_response({"state": OPEN, "missing": missing})
        if upload.state != COMPLETE:
            self._hand_over_soon(upload.id)
        return web.json_response({"state": FINISHING if upload.state == OPEN else upload.state})

    # -- hand-over -----------------------------------------------------------------------

    def _hand_over_soon(self, session_id: str) -> None:
        if session_id in self.handovers:
            return
        if time.monotonic() - self.failed_at.get(session_id, -HANDOVER_RETRY_S) < HANDOVER_RETRY_S:
            return
        task = asyncio.create_task(self._hand_over(session_id))
        self.handovers[session_id] = task
        task.add_done_callback(lambda _: self.handovers.pop(session_id, None))

    async def _hand_over(self, session_id: str) -> None:
        """Each file to the intake as if sent in the chat (the service answers the patient
        there), then spend the link. Resumable: units already handed are skipped, and one
        handed twice is answered as a duplicate. Parts a machine crash damaged never reach
        the intake: they are found first, and the session waits for them again (the page,
        polling, sends them)."""
        try:
            upload = await self.uploads.get(session_id)
            if upload.state != FINISHING:
                return
            if await self.uploads.missing(upload):
                await self.uploads.reopen(upload)
                return
            patient = Patient(upload.chat_id, upload.chat_id, None)
            units = plan_handover(upload.files)
            for unit in units[upload.handed :]:
                try:
                    await self.uploads.get(session_id)  # the case may have been erased since
                except UploadRefused:
                    await self.uploads.expire(session_id)
                    return
                incoming = IncomingFile(
                    unique_id=f"web:{upload.id}.{unit.index}",
                    source_ref=f"web:{upload.id}/{unit.index}",
                    name=unit.name,
                    mime=unit.mime,
                    size=None if unit.zipped else unit.files[0].size,
                )
                source = _StoredSource(self.uploads, upload, unit)
                await self.app.service.handle_file(
                    patient, incoming, source, update_id=None, item_key=upload.item_key
                )
                await self.uploads.mark_handed(session_id, unit.index + 1)
            await self.uploads.complete(session_id)
            self.failed_at.pop(session_id, None)
            log.info("upload handed over upload=%s units=%d", session_id[:8], len(units))
        except UploadRefused:
            log.info("upload hand-over dropped upload=%s", session_id[:8])
        except Exception:
            self.failed_at[session_id] = time.monotonic()
            log.exception("upload hand-over failed upload=%s", session_id[:8])

    # -- lifecycle -----------------------------------------------------------------------

    async def on_startup(self, _: web.Application) -> None:
        self.sweeper = asyncio.create_task(self._sweep_forever())
        for session_id in await self.uploads.finishing():
            self._hand_over_soon(session_id)

    async def on_cleanup(self, _: web.Application) -> None:
        # Interrupted hand-overs resume at the next start (and from the page's polling).
        tasks = [*self.handovers.values(), *([self.sweeper] if self.sweeper else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _sweep_forever(self) -> None:
        while True:
            try:
                swept = await self.uploads.sweep()
                if swept:
                    log.info("upload sweep sessions=%d", swept)
            except Exception:
                log.exception("upload sweep failed")
            await asyncio.sleep(3600)

    # -- pages ---------------------------------------------------------------------------

    def _item_title(self, upload: UploadSession) -> str | None:
        checklist = self.app.checklists.get(upload.checklist_key or "")
        items = checklist.items if checklist else ()
        return next((item.title for item in items if item.key == upload.item_key), None)

    def _texts(self, lang: str) -> dict[str, str]:
        translator = self.app.translator
        texts = {name: translator.gettext(lang, f"upload.page.{name}") for name in _SCRIPT_TEXTS}
        cap = Verbatim(format_size(self.max_case_bytes, lang))
        texts["too_big"] = translator.text(lang, Text("upload.page.too_big", {"size": cap}))
        return texts

    def _page(
        self,
        request: web.Request,
        lang: str,
        mode: str,
        case_id: str | None,
        item_title: str | None,
    ) -> web.Response:
        return self._html(request, lang, "upload", "", mode, case_id, item_title, 200)

    def _notice(self, request: web.Request, lang: str, reason: str, status: int) -> web.Response:
        message = self._texts(lang).get(reason) or self._texts(lang)["failed"]
        return self._html(request, lang, "notice", message, "link", None, None, status)

    def _html(
        self,
        request: web.Request,
        lang: str,
        state: str,
        notice: str,
        mode: str,
        case_id: str | None,
        item_title: str | None,
        status: int,
    ) -> web.Response:
        translator = self.app.translator

        def say(key: str, **params: Any) -> str:
            return html.escape(translator.text(lang, Text(f"upload.page.{key}", params)))

        router = request.app.router
        api = str(router["status"].url_for()).removesuffix("status")
        config = {
            "state": state,
            "mode": mode,
            "case": case_id,
            "lang": lang,
            "api": api,
            "text": self._texts(lang),
        }
        # JSON inside <script type="application/json">: data, never run; "<" escaped so no
        # text can close the element.
        config_json = json.dumps(config, ensure_ascii=False)
        for char, escaped in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026")):
            config_json = config_json.replace(char, escaped)
        body = self.page.substitute(
            lang=html.escape(lang),
            dir="rtl" if is_rtl(lang) else "ltr",
            title=say("title"),
            for_item=say("for_item", item=Text(item_title)) if item_title else "",
            item_hidden="" if item_title else " hidden",
            notice=html.escape(notice),
            notice_hidden="" if notice else " hidden",
            controls_hidden="" if state == "upload" else " hidden",
            intro=say("intro"),
            pick_files=say("pick_files"),
            pick_folder=say("pick_folder"),
            keep_open=say("keep_open"),
            config=config_json,
            state=state,
            script=str(router["page.js"].url_for()),
            style=str(router["page.css"].url_for()),
        )
        return web.Response(text=body, content_type="text/html", charset="utf-8", status=status)


def make_upload_app(app: App, settings: Settings) -> web.Application:
    """The upload server as an aiohttp sub-application, to mount at ``/upload/``:
    ``root.add_subapp("/upload/", make_upload_app(app, settings))``. Its start-up resumes
    interrupted hand-overs and starts the hourly sweep of expired uploads; its clean-up
    stops them."""
    server = _UploadServer(app, settings)
    sub = web.Application(middlewares=[server.guard])
    sub.router.add_get("/u/{token}", server.link_page, name="link")
    sub.router.add_get("/app", server.app_page, name="app")
    for name in _ASSETS:
        sub.router.add_get(f"/static/{name}", server.asset, name=name)
    sub.router.add_get("/api/status", server.status, name="status")
    sub.router.add_post("/api/files", server.declare, name="files")
    sub.router.add_put(r"/api/chunks/{layout:\d{1,9}}/{index:\d{1,9}}", server.put_chunk)
    sub.router.add_post("/api/finish", server.finish, name="finish")
    sub.on_startup.append(server.on_startup)
    sub.on_cleanup.append(server.on_cleanup)
    return sub
