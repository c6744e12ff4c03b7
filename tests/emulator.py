"""In-process Telegram Bot API emulator for end-to-end tests.

The emulator is an aiohttp server on ``127.0.0.1`` (random free port) that speaks the Bot API
wire protocol closely enough for a real aiogram ``Bot`` (in-process or in a subprocess) to
talk to it over HTTP::

    AiohttpSession(api=TelegramAPIServer.from_base(emu.base_url))

Tests play users through the test-side API (``user``, ``send_text``, ``send_document``,
``press`` ...) and inspect what the bot did (``sent``, ``events``, ``calls``, ``wait_for``).
Faults (429, 5xx, dropped connections, slow or stalled downloads, oversized files) are
injected through ``emu.faults``.

Once the bot calls ``setWebhook``, updates are POSTed to its URL instead (with the
``X-Telegram-Bot-Api-Secret-Token`` header, retried until a 2xx, see ``_deliver_webhooks``)
and ``getUpdates`` fails with 409 Conflict, as on Telegram; ``webhook_deliveries`` logs every
attempt. Unlike Telegram, a plain ``http://`` URL on any port is accepted.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import html
import io
import itertools
import json
import mimetypes
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

DEFAULT_TOKEN = "123456789:AAEmulatorTokenForCareCompanionTests0"
CLOUD_DOWNLOAD_LIMIT = 20 * 1024 * 1024
CLOUD_UPLOAD_LIMIT = 50 * 1024 * 1024
TEXT_LIMIT = 4096
CAPTION_LIMIT = 1024
WEBHOOK_RETRY_MAX_S = 2.0
DEFAULT_EXCLUDED_UPDATES = {"chat_member", "message_reaction", "message_reaction_count"}
HTML_TAGS = {
    "b", "strong", "i", "em", "u", "ins", "s", "strike", "del", "span", "tg-spoiler",
    "a", "code", "pre", "blockquote", "tg-emoji",
}  # fmt: skip
_TAG_RE = re.compile(r"<(/?)([a-zA-Z][a-zA-Z0-9-]*)(?:\s[^<>]*)?>")
_STRIP_TAGS_RE = re.compile(r"<[^<>]*>")


class ApiError(Exception):
    """An error answered to the bot as ``{"ok": false, ...}``."""

    def __init__(self, status: int, description: str, retry_after: int | None = None) -> None:
        super().__init__(description)
        self.status = status
        self.description = description
        self.retry_after = retry_after

    def payload(self) -> dict[str, Any]:
        """The JSON body Telegram would send for this error."""
        body: dict[str, Any] = {
            "ok": False,
            "error_code": self.status,
            "description": self.description,
        }
        if self.retry_after is not None:
            body["parameters"] = {"retry_after": self.retry_after}
        return body


@dataclass(frozen=True)
class SimUser:
    """A simulated human in a private chat with the bot (chat id == user id)."""

    id: int
    first_name: str = "Ann"
    language_code: str | None = "en"
    last_name: str | None = None
    username: str | None = None

    @property
    def chat_id(self) -> int:
        """Private chat id; equal to the user id, as in Telegram."""
        return self.id

    def as_user(self) -> dict[str, Any]:
        """Telegram ``User`` object."""
        data = {"id": self.id, "is_bot": False, "first_name": self.first_name}
        for key in ("last_name", "username", "language_code"):
            if getattr(self, key) is not None:
                data[key] = getattr(self, key)
        return data

    def as_chat(self) -> dict[str, Any]:
        """Telegram ``Chat`` object of the private chat."""
        data: dict[str, Any] = {"id": self.id, "type": "private", "first_name": self.first_name}
        if self.username:
            data["username"] = self.username
        return data


@dataclass
class StoredFile:
    """A file known to the emulator (uploaded by a user or by the bot)."""

    file_id: str
    file_unique_id: str
    kind: str
    path: Path
    rel_path: str
    size: int
    file_name: str | None = None
    mime_type: str | None = None

    def read(self) -> bytes:
        """The file content."""
        return self.path.read_bytes()


@dataclass
class Upload:
    """A file part of a multipart request."""

    filename: str
    content_type: str | None
    data: bytes


@dataclass
class Call:
    """One Bot API request made by the bot (including failed and aborted ones)."""

    method: str
    time: float
    params: dict[str, Any] = field(default_factory=dict)
    status: int | None = None
    error: str | None = None
    finished: float | None = None


class Faults:
    """Fault injection knobs. Method names are case-insensitive."""

    def __init__(self) -> None:
        self._failures: dict[str, list[ApiError]] = {}
        self._disconnects: dict[str, int] = {}
        self.delays: dict[str, float] = {}
        self.slow: dict[str, float] = {}
        self.stalled: set[str] = set()
        self.too_big: set[str] = set()

    def fail_next(
        self,
        method: str,
        status: int = 429,
        retry_after: int | None = None,
        count: int = 1,
        description: str | None = None,
    ) -> None:
        """Answer the next ``count`` calls of ``method`` with an error.

        For status 429 ``retry_after`` defaults to 1 and is sent as ``parameters.retry_after``.
        """
        if status == 429 and retry_after is None:
            retry_after = 1
        if description is None:
            description = {
                429: f"Too Many Requests: retry after {retry_after}",
                500: "Internal Server Error",
                502: "Bad Gateway",
                503: "Service Unavailable",
                504: "Gateway Timeout",
                400: "Bad Request: injected failure",
                403: "Forbidden: bot was blocked by the user",
            }.get(status, f"Error {status}")
        errors = [ApiError(status, description, retry_after) for _ in range(count)]
        self._failures.setdefault(method.lower(), []).extend(errors)

    def disconnect_next(self, method: str, count: int = 1) -> None:
        """Drop the connection without any response on the next ``count`` calls."""
        self._disconnects[method.lower()] = self._disconnects.get(method.lower(), 0) + count

    def delay(self, method: str, seconds: float) -> None:
        """Delay every call of ``method`` by ``seconds`` before handling it (0 removes)."""
        if seconds > 0:
            self.delays[method.lower()] = seconds
        else:
            self.delays.pop(method.lower(), None)

    def slow_download(self, file_id: str, bytes_per_sec: float) -> None:
        """Throttle downloads of ``file_id``."""
        self.slow[file_id] = bytes_per_sec

    def stall_download(self, file_id: str) -> None:
        """Downloads of ``file_id`` send the headers and a first chunk, then hang forever."""
        self.stalled.add(file_id)

    def file_too_big(self, file_id: str) -> None:
        """``getFile`` on ``file_id`` fails with 400 "file is too big" whatever its size."""
        self.too_big.add(file_id)

    def clear(self) -> None:
        """Remove every injected fault."""
        self.__init__()  # type: ignore[misc]

    def _take(self, method: str) -> tuple[bool, ApiError | None]:
        key = method.lower()
        if self._disconnects.get(key):
            self._disconnects[key] -= 1
            return True, None
        queue = self._failures.get(key)
        return False, (queue.pop(0) if queue else None)


def _int(value: Any) -> int | None:
    if value is None or value == "":
        return None
    if isinstance(value, int):
        return value
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ApiError(400, f"Bad Request: invalid integer value {value!r}") from None


def _json(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            raise ApiError(400, "Bad Request: can't parse JSON object") from None
    return value


def _lane(update: dict[str, Any]) -> int:
    """The chat an update belongs to (webhook deliveries keep each chat's order)."""
    for value in update.values():
        if isinstance(value, dict):
            chat = value.get("chat") or (value.get("message") or {}).get("chat")
            if chat:
                return int(chat["id"])
            if "from" in value:
                return int(value["from"]["id"])
    return -int(update["update_id"])


def _bool(value: Any) -> bool:
    return value is True or str(value).lower() in {"true", "1"}


def _utf16_len(text: str) -> int:
    return len(text.encode("utf-16-le")) // 2


def html_to_plain(text: str) -> str:
    """Text as the user sees it when ``text`` is sent with ``parse_mode=HTML``."""
    return html.unescape(_STRIP_TAGS_RE.sub("", text))


def check_html(text: str) -> None:
    """Raise ``ApiError`` like Telegram does for HTML it cannot parse."""
    stack: list[str] = []
    pos = 0
    while (start := text.find("<", pos)) != -1:
        offset = len(text[:start].encode())
        match = _TAG_RE.match(text, start)
        if match is None:
            raise ApiError(
                400,
                'Bad Request: can\'t parse entities: Unsupported start tag "" '
                f"at byte offset {offset}",
            )
        closing, tag = match.group(1) == "/", match.group(2).lower()
        if tag not in HTML_TAGS:
            kind = "end" if closing else "start"
            raise ApiError(
                400,
                f'Bad Request: can\'t parse entities: Unsupported {kind} tag "{tag}" '
                f"at byte offset {offset}",
            )
        if not closing:
            stack.append(tag)
        elif not stack or stack[-1] != tag:
            expected = f'"</{stack[-1]}>"' if stack else "no end tag"
            raise ApiError(
                400,
                f"Bad Request: can't parse entities: Unmatched end tag at byte offset {offset}, "
                f'expected {expected}, found "</{tag}>"',
            )
        else:
            stack.pop()
        pos = match.end()
    if stack:
        raise ApiError(
            400,
            "Bad Request: can't parse entities: Can't find end tag corresponding to start tag "
            f'"{stack[-1]}"',
        )


def _render(text: str | None, parse_mode: str | None, limit: int, what: str) -> str | None:
    """Validate ``text`` and return its plain (rendered) form."""
    if text is None:
        return None
    if parse_mode and parse_mode.upper() == "HTML":
        check_html(text)
        plain = html_to_plain(text)
    else:
        plain = text
    if _utf16_len(plain) > limit:
        raise ApiError(400, f"Bad Request: message {what}is too long")
    return plain


def _inline_buttons(markup: dict[str, Any] | None) -> list[dict[str, Any]]:
    if not markup:
        return []
    rows = markup.get("inline_keyboard") or markup.get("keyboard") or []
    return [btn if isinstance(btn, dict) else {"text": btn} for row in rows for btn in row]


def _check_markup(markup: dict[str, Any] | None) -> None:
    for btn in _inline_buttons(markup) if markup and "inline_keyboard" in markup else []:
        data = btn.get("callback_data")
        if data is not None and not 1 <= len(str(data).encode()) <= 64:
            raise ApiError(400, "Bad Request: BUTTON_DATA_INVALID")
        if not btn.get("text"):
            raise ApiError(400, "Bad Request: text buttons are unallowed in the inline keyboard")


class BotApiEmulator:
    """Fake Telegram Bot API server plus a test-side API to play users.

    Use ``async with BotApiEmulator() as emu`` or ``await emu.start()`` / ``await emu.stop()``.
    """

    def __init__(
        self,
        token: str = DEFAULT_TOKEN,
        *,
        local_mode: bool = False,
        bot_username: str = "care_companion_test_bot",
        bot_first_name: str = "Care Companion",
    ) -> None:
        self.token = token
        self.local_mode = local_mode
        self.bot_user = {
            "id": int(token.split(":", 1)[0]),
            "is_bot": True,
            "first_name": bot_first_name,
            "username": bot_username,
            "can_join_groups": False,
            "can_read_all_group_messages": False,
            "supports_inline_queries": False,
        }
        self.faults = Faults()
        self.calls: list[Call] = []
        self.events: list[dict[str, Any]] = []
        self.downloads: list[dict[str, Any]] = []
        self.internal_errors: list[str] = []
        self.commands: dict[tuple[str, str], list[dict[str, Any]]] = {}
        self.callback_answers: dict[str, dict[str, Any]] = {}
        self.pinned: dict[int, int] = {}
        self.webhook_url = ""
        self.webhook_secret: str | None = None
        self.webhook_max_connections = 40
        # First pause after a failed delivery, doubling up to WEBHOOK_RETRY_MAX_S (Telegram
        # waits seconds to minutes; tests want a restarted bot served at once).
        self.webhook_retry_s = 0.2
        self.webhook_deliveries: list[dict[str, Any]] = []
        self._webhook_error: tuple[int, str] | None = None
        self._webhook_task: asyncio.Task[None] | None = None
        self.confirmed_update_id = 0
        self.users: dict[int, SimUser] = {}
        self.blocked: set[int] = set()
        self.files: dict[str, StoredFile] = {}
        self._files_by_path: dict[str, StoredFile] = {}
        self._messages: dict[tuple[int, int], dict[str, Any]] = {}
        self._bot_messages: list[dict[str, Any]] = []
        self._next_message_id: dict[int, int] = {}
        self._updates: list[dict[str, Any]] = []
        self._all_updates: dict[int, dict[str, Any]] = {}
        self._update_ids = itertools.count(100_001)
        self._ids = itertools.count(1)
        self._callbacks: dict[str, int] = {}
        self._allowed_updates: list[str] | None = None
        self._poll_generation = 0
        self._updates_changed = asyncio.Event()
        self._events_changed = asyncio.Event()
        self._calls_changed = asyncio.Event()
        self._stopping = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self._tmp: Path | None = None
        self.port = 0

    # ------------------------------------------------------------------ lifecycle

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT`` — pass to ``TelegramAPIServer.from_base``."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def api_server(self) -> Any:
        """A ready ``aiogram.client.telegram.TelegramAPIServer`` for this emulator."""
        from aiogram.client.telegram import TelegramAPIServer

        return TelegramAPIServer.from_base(self.base_url, is_local=self.local_mode)

    @property
    def tmp_dir(self) -> Path:
        """Directory holding every stored file."""
        if self._tmp is None:
            self._tmp = Path(tempfile.mkdtemp(prefix="botapi-emu-"))
        return self._tmp

    async def start(self) -> BotApiEmulator:
        """Bind a free port on 127.0.0.1 and start serving."""
        app = web.Application(client_max_size=2 * 1024**3)
        app.router.add_route("*", "/bot{token}/{method}", self._handle_api)
        app.router.add_get("/file/bot{token}/{path:.*}", self._handle_file)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1)
        await self._runner.setup()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        await web.SockSite(self._runner, sock).start()
        self._webhook_task = asyncio.create_task(self._deliver_webhooks())
        return self

    async def stop(self) -> None:
        """Wake every long poll / stalled download, stop the server, delete stored files."""
        self._stopping.set()
        self._wake_pollers()
        if self._webhook_task is not None:
            await self._webhook_task
            self._webhook_task = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    async def __aenter__(self) -> BotApiEmulator:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ------------------------------------------------------------------ users and updates

    def user(
        self,
        user_id: int,
        first_name: str = "Ann",
        language_code: str | None = "en",
        **extra: Any,
    ) -> SimUser:
        """Register a simulated user (``last_name``/``username`` may be passed too)."""
        sim = SimUser(user_id, first_name, language_code, **extra)
        self.users[user_id] = sim
        return sim

    def block(self, user: SimUser, blocked: bool = True) -> None:
        """Make sends to ``user`` fail with 403 "bot was blocked by the user"."""
        (self.blocked.add if blocked else self.blocked.discard)(user.id)

    def push_update(self, payload: dict[str, Any]) -> int:
        """Queue a raw update (``update_id`` is assigned) and wake long polls."""
        update_id = next(self._update_ids)
        update = {"update_id": update_id, **payload}
        self._updates.append(update)
        self._all_updates[update_id] = update
        self._wake_pollers()
        return update_id

    def update(self, update_id: int) -> dict[str, Any]:
        """The update that was queued under ``update_id``."""
        return self._all_updates[update_id]

    def pending_updates(self) -> list[dict[str, Any]]:
        """Updates not yet confirmed by the bot (delivered or not)."""
        return list(self._updates)

    def _user_message(self, user: SimUser, **content: Any) -> dict[str, Any]:
        self.users.setdefault(user.id, user)
        message = {
            "message_id": self._new_message_id(user.chat_id),
            "from": user.as_user(),
            "chat": user.as_chat(),
            "date": int(time.time()),
            **{k: v for k, v in content.items() if v is not None},
        }
        self._messages[(user.chat_id, message["message_id"])] = {
            "chat_id": user.chat_id,
            "from_bot": False,
            "payload": message,
            "message_id": message["message_id"],
            "deleted": False,
        }
        return message

    def send_text(self, user: SimUser, text: str) -> int:
        """User sends ``text``; a leading ``/word`` gets a ``bot_command`` entity."""
        entities = None
        if text.startswith("/"):
            command = text.split(maxsplit=1)[0]
            entities = [{"type": "bot_command", "offset": 0, "length": _utf16_len(command)}]
        return self.push_update({"message": self._user_message(user, text=text, entities=entities)})

    def send_document(
        self,
        user: SimUser,
        data: bytes | Path,
        file_name: str | None = None,
        mime_type: str | None = None,
        caption: str | None = None,
        media_group_id: str | None = None,
    ) -> int:
        """User sends a file as a document; returns the update id."""
        if isinstance(data, Path):
            file_name = file_name or data.name
            data = data.read_bytes()
        file_name = file_name or "document.bin"
        mime_type = mime_type or mimetypes.guess_type(file_name)[0] or "application/octet-stream"
        stored = self._store_file(data, "documents", file_name, mime_type)
        message = self._user_message(
            user,
            document=self._document_obj(stored, file_name, mime_type),
            caption=caption,
            media_group_id=media_group_id,
        )
        return self.push_update({"message": message})

    def send_photo(
        self,
        user: SimUser,
        data: bytes,
        caption: str | None = None,
        media_group_id: str | None = None,
    ) -> int:
        """User sends a compressed photo; the largest ``PhotoSize`` holds exactly ``data``."""
        message = self._user_message(
            user, photo=self._photo_sizes(data), caption=caption, media_group_id=media_group_id
        )
        return self.push_update({"message": message})

    def send_album(self, user: SimUser, items: Iterable[Any]) -> list[int]:
        """Send several documents/photos sharing one ``media_group_id``.

        Each item is ``(data, file_name, mime_type)``, or a dict of ``send_document`` keyword
        arguments; a dict with ``"photo": True`` is sent as a photo.
        """
        group = str(10_000_000_000 + next(self._ids))
        ids = []
        for item in items:
            if isinstance(item, dict):
                kwargs = dict(item)
                if kwargs.pop("photo", False):
                    ids.append(self.send_photo(user, media_group_id=group, **kwargs))
                    continue
                ids.append(self.send_document(user, media_group_id=group, **kwargs))
            else:
                ids.append(self.send_document(user, *item, media_group_id=group))
        return ids

    def press(
        self, user: SimUser, message: dict[str, Any] | int, callback_data: str, strict: bool = True
    ) -> int:
        """User presses an inline button; returns the ``callback_query`` update id.

        With ``strict`` the message must exist, not be deleted, and currently carry a button
        with this ``callback_data`` (a ``ValueError`` otherwise).
        """
        message_id = message if isinstance(message, int) else message["message_id"]
        record = self._messages.get((user.chat_id, message_id))
        if strict:
            if record is None or record["deleted"]:
                raise ValueError(f"message {message_id} does not exist in chat {user.chat_id}")
            datas = [b.get("callback_data") for b in _inline_buttons(record.get("reply_markup"))]
            if callback_data not in datas:
                raise ValueError(f"no button with callback_data={callback_data!r}; have {datas}")
        query_id = str(7_000_000_000_000 + next(self._ids))
        query: dict[str, Any] = {
            "id": query_id,
            "from": user.as_user(),
            "chat_instance": str(-(abs(hash(("chat", user.chat_id))) % 10**18)),
            "data": callback_data,
        }
        if record is not None:
            query["message"] = self._payload(record)
        update_id = self.push_update({"callback_query": query})
        self._callbacks[query_id] = update_id
        return update_id

    def callback_answer(self, update_id: int) -> dict[str, Any] | None:
        """Params of the ``answerCallbackQuery`` for the press ``update_id`` (None if none)."""
        query_id = self._all_updates[update_id]["callback_query"]["id"]
        return self.callback_answers.get(query_id)

    # ------------------------------------------------------------------ inspecting the bot

    def message(self, chat_id: int, message_id: int) -> dict[str, Any]:
        """Current state of a bot message (live dict, includes ``history`` of earlier states)."""
        return self._messages[(chat_id, message_id)]

    def buttons(self, message: dict[str, Any]) -> list[dict[str, Any]]:
        """Buttons currently on ``message`` (inline or reply keyboard), flattened.

        ``message`` is a record/event from ``sent``/``wait_for`` or a Telegram message dict."""
        chat_id = message.get("chat_id") or message.get("chat", {}).get("id")
        record = self._messages.get((chat_id, message["message_id"]), message)
        return _inline_buttons(record.get("reply_markup"))

    def button(self, message: dict[str, Any], key: str | int) -> str:
        """``callback_data`` of a button picked by index or by a (case-insensitive) substring
        of its text; reply-keyboard buttons (no callback_data) yield their text."""
        buttons = self.buttons(message)
        if isinstance(key, int):
            found = buttons[key] if -len(buttons) <= key < len(buttons) else None
        else:
            found = next((b for b in buttons if key.casefold() in b["text"].casefold()), None)
        if found is None:
            raise LookupError(f"no button {key!r}; buttons: {[b.get('text') for b in buttons]}")
        return found.get("callback_data") or found["text"]

    def sent(self, chat_id: int | None = None) -> list[dict[str, Any]]:
        """Messages the bot sent (current state, deleted ones flagged), oldest first."""
        return [m for m in self._bot_messages if chat_id is None or m["chat_id"] == chat_id]

    def calls_for(self, method: str) -> list[Call]:
        """Logged calls of one Bot API method (case-insensitive)."""
        return [c for c in self.calls if c.method.lower() == method.lower()]

    def file_bytes(self, file_id: str) -> bytes:
        """Content of a stored file."""
        return self.files[file_id].read()

    def cursor(self) -> int:
        """Position in ``events``; pass as ``since=`` to ignore what happened before."""
        return len(self.events)

    async def wait_for(
        self,
        predicate: Callable[[dict[str, Any]], bool],
        timeout: float = 10.0,
        since: int = 0,
        kinds: Iterable[str] = ("sent", "edited"),
    ) -> dict[str, Any]:
        """First event (snapshot of a sent or edited message by default) at index >= ``since``
        matching ``predicate``; raises ``TimeoutError`` listing recent bot output."""
        kinds = set(kinds)
        deadline = time.monotonic() + timeout
        index = since
        while True:
            while index < len(self.events):
                event = self.events[index]
                index += 1
                if event["event"] in kinds and predicate(event):
                    return event
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                recent = [
                    (e["event"], e.get("chat_id"), e.get("plain_text") or e.get("caption"))
                    for e in self.events[-8:]
                ]
                raise TimeoutError(f"no matching bot event within {timeout}s; recent: {recent}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._events_changed.wait(), remaining)

    async def wait_for_text(
        self,
        chat_id: int | None,
        substring: str,
        timeout: float = 10.0,
        since: int = 0,
    ) -> dict[str, Any]:
        """Wait for a sent/edited message in ``chat_id`` (None: any) whose text or caption
        (raw or rendered) contains ``substring``."""

        def matches(event: dict[str, Any]) -> bool:
            if chat_id is not None and event["chat_id"] != chat_id:
                return False
            texts = (event.get(k) for k in ("text", "plain_text", "caption", "plain_caption"))
            return any(substring in t for t in texts if t)

        return await self.wait_for(matches, timeout=timeout, since=since)

    async def wait_for_call(
        self,
        method: str,
        timeout: float = 10.0,
        since: int = 0,
    ) -> Call:
        """First logged call of ``method`` at index >= ``since`` in ``calls`` (e.g. wait until
        the bot process starts polling); raises ``TimeoutError``."""
        deadline = time.monotonic() + timeout
        while True:
            for call in self.calls[since:]:
                if call.method.lower() == method.lower():
                    return call
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"bot did not call {method} within {timeout}s")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._calls_changed.wait(), remaining)

    async def wait_delivered(self, update_id: int, timeout: float = 10.0) -> dict[str, Any]:
        """The webhook delivery of ``update_id`` the bot answered with a 2xx; raises
        ``TimeoutError``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for attempt in self.webhook_deliveries:
                if attempt["update_id"] == update_id and 200 <= (attempt["status"] or 0) < 300:
                    return attempt
            await asyncio.sleep(0.02)
        raise TimeoutError(f"update {update_id} not delivered by webhook within {timeout}s")

    # ------------------------------------------------------------------ internals: webhook

    async def _deliver_webhooks(self) -> None:
        """Telegram's side of a webhook, running from start to stop (idle while none is set).

        Like the Bot API server, it keeps one update in flight per chat (the next update of a
        chat waits for the answer to the previous one) and chats in parallel, up to
        ``max_connections``; an update leaves the queue only when the bot answers 2xx.
        """
        lanes: dict[int, asyncio.Task[None]] = {}
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
            while not self._stopping.is_set():
                changed = self._updates_changed
                if self.webhook_url:
                    heads: set[int] = set()  # chats whose oldest pending update was seen
                    for update in self._updates:
                        lane = _lane(update)
                        if lane in heads or not self._allowed(update):
                            continue
                        heads.add(lane)
                        if lane not in lanes and len(lanes) < self.webhook_max_connections:
                            task = asyncio.create_task(self._post_until_taken(http, update))
                            task.add_done_callback(lambda _, lane=lane: lanes.pop(lane, None))
                            lanes[lane] = task
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(changed.wait(), 1.0)
            for task in list(lanes.values()):
                task.cancel()
            await asyncio.gather(*lanes.values(), return_exceptions=True)

    async def _post_until_taken(self, http: aiohttp.ClientSession, update: dict[str, Any]) -> None:
        """POST ``update`` until the bot answers 2xx (or the webhook is removed); after any
        other answer, or none, wait (``Retry-After`` when the bot gives one) and again."""
        failures = 0
        while self.webhook_url and update in self._updates and not self._stopping.is_set():
            secret = self.webhook_secret
            headers = {"X-Telegram-Bot-Api-Secret-Token": secret} if secret else {}
            attempt: dict[str, Any] = {
                "update_id": update["update_id"],
                "time": time.monotonic(),
                "status": None,
                "error": None,
            }
            self.webhook_deliveries.append(attempt)
            retry_after = 0.0
            try:
                async with http.post(self.webhook_url, json=update, headers=headers) as response:
                    await response.read()
                    attempt["status"] = response.status
                    with contextlib.suppress(ValueError):
                        retry_after = float(response.headers.get("Retry-After", 0))
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                attempt["error"] = type(exc).__name__
            if attempt["status"] is not None and 200 <= attempt["status"] < 300:
                if update in self._updates:
                    self._updates.remove(update)
                self.confirmed_update_id = max(self.confirmed_update_id, update["update_id"])
                self._wake_pollers()  # the chat's next update may go now
                return
            message = f"Wrong response from the webhook: {attempt['status']}"
            self._webhook_error = (int(time.time()), attempt["error"] or message)
            failures += 1
            await asyncio.sleep(
                retry_after or min(self.webhook_retry_s * 2 ** (failures - 1), WEBHOOK_RETRY_MAX_S)
            )

    # ------------------------------------------------------------------ internals: storage

    def _new_message_id(self, chat_id: int) -> int:
        self._next_message_id[chat_id] = self._next_message_id.get(chat_id, 0) + 1
        return self._next_message_id[chat_id]

    def _store_file(
        self, data: bytes, kind: str, file_name: str | None = None, mime_type: str | None = None
    ) -> StoredFile:
        unique = hashlib.sha256(data).hexdigest()[:22]
        file_id = f"{'AgAC' if kind == 'photos' else 'BQAC'}-{unique}"
        if file_id in self.files:
            return self.files[file_id]
        suffix = Path(file_name).suffix if file_name else ".jpg"
        rel_path = f"{kind}/file_{len(self.files)}{suffix}"
        path = self.tmp_dir / rel_path
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        stored = StoredFile(file_id, unique, kind, path, rel_path, len(data), file_name, mime_type)
        self.files[file_id] = stored
        self._files_by_path[rel_path] = stored
        self._files_by_path[str(path)] = stored
        return stored

    @staticmethod
    def _document_obj(stored: StoredFile, file_name: str | None, mime: str | None) -> dict:
        doc: dict[str, Any] = {
            "file_id": stored.file_id,
            "file_unique_id": stored.file_unique_id,
            "file_size": stored.size,
        }
        if file_name:
            doc["file_name"] = file_name
        if mime:
            doc["mime_type"] = mime
        return doc

    def _photo_sizes(self, data: bytes) -> list[dict[str, Any]]:
        """PhotoSize array: real JPEG thumbnails when Pillow can read ``data``."""
        try:
            from PIL import Image

            image = Image.open(io.BytesIO(data))
            width, height = image.size
            thumbs = []
            for side in (90, 320, 800):
                if max(width, height) > side:
                    thumb = image.convert("RGB")
                    thumb.thumbnail((side, side))
                    buf = io.BytesIO()
                    thumb.save(buf, "JPEG")
                    thumbs.append((buf.getvalue(), *thumb.size))
        except Exception:  # not an image Pillow understands: fake, undecodable thumbnails
            width, height = 1280, 960
            digest = hashlib.sha256(data).hexdigest().encode()
            thumbs = [(b"emulator-thumbnail-90-" + digest, 90, 68)]
        sizes = []
        for blob, w, h in [*thumbs, (data, width, height)]:
            stored = self._store_file(blob, "photos")
            sizes.append(
                {
                    "file_id": stored.file_id,
                    "file_unique_id": stored.file_unique_id,
                    "file_size": stored.size,
                    "width": w,
                    "height": h,
                }
            )
        return sizes

    def _payload(self, record: dict[str, Any]) -> dict[str, Any]:
        """Telegram ``Message`` object for a stored message."""
        if not record["from_bot"]:
            return record["payload"]
        msg: dict[str, Any] = {
            "message_id": record["message_id"],
            "from": self.bot_user,
            "chat": self._chat(record["chat_id"], check_blocked=False),
            "date": record["date"],
        }
        for key, source in (("text", "plain_text"), ("caption", "plain_caption")):
            if record.get(source) is not None:
                msg[key] = record[source]
        for key in ("document", "photo", "edit_date"):
            if record.get(key):
                msg[key] = record[key]
        markup = record.get("reply_markup")
        if markup and "inline_keyboard" in markup:
            msg["reply_markup"] = markup
        return msg

    def _chat(self, chat_id: Any, check_blocked: bool = True) -> dict[str, Any]:
        chat_id = _int(chat_id)
        if chat_id is None:
            raise ApiError(400, "Bad Request: chat_id is empty")
        if chat_id not in self.users:
            raise ApiError(400, "Bad Request: chat not found")
        if check_blocked and chat_id in self.blocked:
            raise ApiError(403, "Forbidden: bot was blocked by the user")
        return self.users[chat_id].as_chat()

    def _emit(self, kind: str, record: dict[str, Any], **extra: Any) -> None:
        snapshot = {k: v for k, v in record.items() if k != "history"}
        snapshot.update(event=kind, seq=len(self.events), time=time.monotonic(), **extra)
        self.events.append(snapshot)
        self._events_changed.set()
        self._events_changed = asyncio.Event()

    def _wake_pollers(self) -> None:
        self._updates_changed.set()
        self._updates_changed = asyncio.Event()

    # ------------------------------------------------------------------ internals: HTTP

    async def _read_params(self, request: web.Request) -> dict[str, Any]:
        params: dict[str, Any] = dict(request.query)
        if request.method == "POST" and request.can_read_body:
            if request.content_type == "application/json":
                params.update(await request.json())
            else:
                for key, value in (await request.post()).items():
                    if isinstance(value, web.FileField):
                        value = Upload(value.filename, value.content_type, value.file.read())
                    params[key] = value
        return params

    async def _handle_api(self, request: web.Request) -> web.StreamResponse:
        method = request.match_info["method"]
        call = Call(method=method, time=time.monotonic())
        self.calls.append(call)
        self._calls_changed.set()
        self._calls_changed = asyncio.Event()
        try:
            if request.match_info["token"] != self.token:
                raise ApiError(401, "Unauthorized")
            params = await self._read_params(request)
            call.params = {
                k: (f"<file {v.filename} {len(v.data)}B>" if isinstance(v, Upload) else v)
                for k, v in params.items()
            }
            if delay := self.faults.delays.get(method.lower()):
                await asyncio.sleep(delay)
            disconnect, failure = self.faults._take(method)
            if disconnect:
                call.error = "disconnected (injected)"
                if request.transport is not None:
                    request.transport.abort()
                return web.Response(status=499)
            if failure is not None:
                raise failure
            handler = getattr(self, f"_m_{method.lower()}", None)
            if handler is None:
                raise ApiError(404, "Not Found: method not found")
            result = await handler(params)
            call.status = 200
            return web.json_response({"ok": True, "result": result})
        except ApiError as exc:
            call.status, call.error = exc.status, exc.description
            return web.json_response(exc.payload(), status=exc.status)
        except asyncio.CancelledError:
            call.error = "client gone: handler cancelled"
            raise
        except ConnectionError as exc:  # e.g. the body of a killed bot's upload was cut short
            call.error = f"client gone: {exc!r}"
            return web.Response(status=499)
        except Exception as exc:
            if request.transport is None or request.transport.is_closing():
                call.error = f"client gone: {exc!r}"  # e.g. body cut by a killed bot
                return web.Response(status=499)
            call.status, call.error = 500, f"emulator bug: {exc!r}"
            self.internal_errors.append(call.error)
            body = {"ok": False, "error_code": 500, "description": call.error}
            return web.json_response(body, status=500)
        finally:
            call.finished = time.monotonic()

    async def _handle_file(self, request: web.Request) -> web.StreamResponse:
        path = request.match_info["path"]
        stored = self._files_by_path.get(path) or self._files_by_path.get("/" + path)
        if request.match_info["token"] != self.token or stored is None:
            body = {"ok": False, "error_code": 404, "description": "Not Found"}
            return web.json_response(body, status=404)
        record = {
            "file_id": stored.file_id,
            "started": time.monotonic(),
            "finished": None,
            "bytes_sent": 0,
            "completed": False,
        }
        self.downloads.append(record)
        response = web.StreamResponse(
            headers={"Content-Type": "application/octet-stream", "Content-Length": str(stored.size)}
        )
        rate = self.faults.slow.get(stored.file_id)
        chunk_size = max(1, int(rate / 20)) if rate else 65536
        try:
            await response.prepare(request)
            with stored.path.open("rb") as fh:
                while chunk := fh.read(chunk_size):
                    if stored.file_id in self.faults.stalled:
                        await response.write(chunk[: len(chunk) // 2])  # some bytes, then hang
                        record["bytes_sent"] += len(chunk) // 2
                        await self._stopping.wait()
                        return response
                    await response.write(chunk)
                    record["bytes_sent"] += len(chunk)
                    if rate:
                        await asyncio.sleep(len(chunk) / rate)
            await response.write_eof()
            record["completed"] = True
        except (ConnectionError, asyncio.CancelledError):
            record["error"] = "client gone"
        finally:
            record["finished"] = time.monotonic()
        return response

    # ------------------------------------------------------------------ Bot API methods

    async def _m_getme(self, p: dict[str, Any]) -> dict[str, Any]:
        return self.bot_user

    async def _m_getupdates(self, p: dict[str, Any]) -> list[dict[str, Any]]:
        if self.webhook_url:
            raise ApiError(
                409,
                "Conflict: can't use getUpdates method while webhook is active; "
                "use deleteWebhook to delete the webhook first",
            )
        offset, limit = _int(p.get("offset")), _int(p.get("limit")) or 100
        timeout = max(0, _int(p.get("timeout")) or 0)
        allowed = _json(p.get("allowed_updates"))
        if allowed is not None:
            self._allowed_updates = allowed or None
        if offset:
            if offset > 0:
                self._updates = [u for u in self._updates if u["update_id"] >= offset]
                self.confirmed_update_id = max(self.confirmed_update_id, offset - 1)
            else:
                self._updates = self._updates[offset:]
        self._poll_generation += 1
        generation = self._poll_generation
        self._wake_pollers()  # terminates an older concurrent poll with 409, like Telegram
        deadline = time.monotonic() + timeout
        while True:
            if generation != self._poll_generation:
                raise ApiError(
                    409,
                    "Conflict: terminated by other getUpdates request; "
                    "make sure that only one bot instance is running",
                )
            batch = [u for u in self._updates if self._allowed(u)][: max(1, min(limit, 100))]
            remaining = deadline - time.monotonic()
            if batch or remaining <= 0 or self._stopping.is_set():
                return batch
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._updates_changed.wait(), remaining)

    def _allowed(self, update: dict[str, Any]) -> bool:
        kind = next(k for k in update if k != "update_id")
        if self._allowed_updates is None:
            return kind not in DEFAULT_EXCLUDED_UPDATES
        return kind in self._allowed_updates

    def _new_bot_message(self, method: str, p: dict[str, Any], **content: Any) -> dict[str, Any]:
        self._chat(p.get("chat_id"))
        chat_id = _int(p["chat_id"])
        assert chat_id is not None
        markup = _json(p.get("reply_markup"))
        _check_markup(markup)
        record: dict[str, Any] = {
            "message_id": self._new_message_id(chat_id),
            "chat_id": chat_id,
            "from_bot": True,
            "method": method,
            "date": int(time.time()),
            "text": None,
            "plain_text": None,
            "caption": None,
            "plain_caption": None,
            "parse_mode": p.get("parse_mode"),
            "reply_markup": markup,
            "document": None,
            "photo": None,
            "file_bytes": None,
            "file_name": None,
            "edit_date": None,
            "deleted": False,
            "pinned": False,
            "history": [],
            "params": {k: v for k, v in p.items() if not isinstance(v, Upload)},
        }
        record.update(content)
        self._messages[(chat_id, record["message_id"])] = record
        self._bot_messages.append(record)
        self._emit("sent", record)
        return self._payload(record)

    async def _m_sendmessage(self, p: dict[str, Any]) -> dict[str, Any]:
        text = p.get("text")
        if not text or not str(text).strip():
            raise ApiError(400, "Bad Request: message text is empty")
        plain = _render(text, p.get("parse_mode"), TEXT_LIMIT, "")
        return self._new_bot_message("sendMessage", p, text=text, plain_text=plain)

    def _caption(self, p: dict[str, Any]) -> dict[str, Any]:
        caption = p.get("caption")
        plain = _render(caption, p.get("parse_mode"), CAPTION_LIMIT, "caption ")
        return {"caption": caption, "plain_caption": plain}

    def _input_file(
        self, p: dict[str, Any], key: str
    ) -> tuple[bytes | None, StoredFile | None, str | None]:
        value = p.get(key)
        if isinstance(value, str) and value.startswith("attach://"):
            value = p.get(value.removeprefix("attach://"))
        if isinstance(value, Upload):
            limit = 2000 * 1024 * 1024 if self.local_mode else CLOUD_UPLOAD_LIMIT
            if len(value.data) > limit:
                raise ApiError(413, "Request Entity Too Large")
            return value.data, None, value.filename
        if isinstance(value, str) and value in self.files:
            stored = self.files[value]
            return None, stored, stored.file_name
        if value is None:
            raise ApiError(400, f"Bad Request: there is no {key} in the request")
        raise ApiError(400, "Bad Request: wrong file identifier/HTTP URL specified")

    async def _m_senddocument(self, p: dict[str, Any]) -> dict[str, Any]:
        self._chat(p.get("chat_id"))
        data, stored, name = self._input_file(p, "document")
        if data is not None:
            mime = mimetypes.guess_type(name or "")[0] or "application/octet-stream"
            stored = self._store_file(data, "documents", name, mime)
        assert stored is not None
        doc = self._document_obj(stored, name, stored.mime_type)
        return self._new_bot_message(
            "sendDocument",
            p,
            document=doc,
            file_bytes=stored.read(),
            file_name=name,
            **self._caption(p),
        )

    async def _m_sendphoto(self, p: dict[str, Any]) -> dict[str, Any]:
        self._chat(p.get("chat_id"))
        data, stored, _ = self._input_file(p, "photo")
        if data is None:
            assert stored is not None
            data = stored.read()
        return self._new_bot_message(
            "sendPhoto", p, photo=self._photo_sizes(data), file_bytes=data, **self._caption(p)
        )

    def _editable(self, p: dict[str, Any], what: str = "edit") -> dict[str, Any]:
        if p.get("inline_message_id"):
            raise ApiError(400, "Bad Request: inline messages are not supported by the emulator")
        key = (_int(p.get("chat_id")) or 0, _int(p.get("message_id")) or 0)
        record = self._messages.get(key)
        if record is None or record["deleted"]:
            raise ApiError(400, f"Bad Request: message to {what} not found")
        if what == "edit" and not record["from_bot"]:
            raise ApiError(400, "Bad Request: message can't be edited")
        return record

    def _apply_edit(self, record: dict[str, Any], method: str, **changes: Any) -> dict[str, Any]:
        if all(record.get(k) == v for k, v in changes.items()):
            raise ApiError(
                400,
                "Bad Request: message is not modified: specified new message "
                "content and reply markup are exactly the same as a current "
                "content and reply markup of the message",
            )
        record["history"].append({k: v for k, v in record.items() if k != "history"})
        record.update(changes, method=method, edit_date=int(time.time()))
        self._emit("edited", record)
        return self._payload(record)

    async def _m_editmessagetext(self, p: dict[str, Any]) -> dict[str, Any]:
        record = self._editable(p)
        if record["plain_text"] is None:
            raise ApiError(400, "Bad Request: there is no text in the message to edit")
        text = p.get("text")
        if not text or not str(text).strip():
            raise ApiError(400, "Bad Request: message text is empty")
        plain = _render(text, p.get("parse_mode"), TEXT_LIMIT, "")
        markup = _json(p.get("reply_markup"))
        _check_markup(markup)
        return self._apply_edit(
            record,
            "editMessageText",
            text=text,
            plain_text=plain,
            reply_markup=markup,
            parse_mode=p.get("parse_mode"),
        )

    async def _m_editmessagecaption(self, p: dict[str, Any]) -> dict[str, Any]:
        record = self._editable(p)
        markup = _json(p.get("reply_markup"))
        _check_markup(markup)
        return self._apply_edit(
            record, "editMessageCaption", reply_markup=markup, **self._caption(p)
        )

    async def _m_editmessagereplymarkup(self, p: dict[str, Any]) -> dict[str, Any]:
        record = self._editable(p)
        markup = _json(p.get("reply_markup"))
        _check_markup(markup)
        return self._apply_edit(record, "editMessageReplyMarkup", reply_markup=markup)

    async def _m_deletemessage(self, p: dict[str, Any]) -> bool:
        record = self._editable(p, "delete")
        record["deleted"] = True
        if record["from_bot"]:
            self._emit("deleted", record)
        return True

    async def _m_pinchatmessage(self, p: dict[str, Any]) -> bool:
        record = self._editable(p, "pin")
        record["pinned"] = True
        self.pinned[record["chat_id"]] = record["message_id"]
        if record["from_bot"]:
            self._emit("pinned", record)
        return True

    async def _m_unpinchatmessage(self, p: dict[str, Any]) -> bool:
        chat_id = _int(p.get("chat_id")) or 0
        self.pinned.pop(chat_id, None)
        return True

    async def _m_answercallbackquery(self, p: dict[str, Any]) -> bool:
        query_id = str(p.get("callback_query_id"))
        if query_id not in self._callbacks or query_id in self.callback_answers:
            raise ApiError(
                400,
                "Bad Request: query is too old and response timeout expired or query ID is invalid",
            )
        self.callback_answers[query_id] = dict(p)
        return True

    async def _m_sendchataction(self, p: dict[str, Any]) -> bool:
        self._chat(p.get("chat_id"))
        return True

    async def _m_getfile(self, p: dict[str, Any]) -> dict[str, Any]:
        stored = self.files.get(str(p.get("file_id")))
        if stored is None:
            raise ApiError(400, "Bad Request: invalid file_id")
        too_big = stored.size > CLOUD_DOWNLOAD_LIMIT and not self.local_mode
        if too_big or stored.file_id in self.faults.too_big:
            raise ApiError(400, "Bad Request: file is too big")
        return {
            "file_id": stored.file_id,
            "file_unique_id": stored.file_unique_id,
            "file_size": stored.size,
            "file_path": str(stored.path) if self.local_mode else stored.rel_path,
        }

    async def _m_setmycommands(self, p: dict[str, Any]) -> bool:
        scope = (_json(p.get("scope")) or {}).get("type", "default")
        self.commands[(scope, p.get("language_code") or "")] = _json(p.get("commands")) or []
        return True

    async def _m_deletemycommands(self, p: dict[str, Any]) -> bool:
        scope = (_json(p.get("scope")) or {}).get("type", "default")
        self.commands.pop((scope, p.get("language_code") or ""), None)
        return True

    async def _m_getmycommands(self, p: dict[str, Any]) -> list[dict[str, Any]]:
        scope = (_json(p.get("scope")) or {}).get("type", "default")
        return self.commands.get((scope, p.get("language_code") or ""), [])

    async def _m_deletewebhook(self, p: dict[str, Any]) -> bool:
        self.webhook_url, self.webhook_secret = "", None
        if _bool(p.get("drop_pending_updates")):
            self._updates.clear()
        return True

    async def _m_setwebhook(self, p: dict[str, Any]) -> bool:
        url = str(p.get("url") or "")
        if url and not re.match(r"^https?://[^\s/]+", url):
            raise ApiError(
                400, "Bad Request: bad webhook: An HTTPS URL must be provided for webhook"
            )
        secret = p.get("secret_token") or None
        if secret is not None and not re.fullmatch(r"[A-Za-z0-9_-]{1,256}", str(secret)):
            raise ApiError(400, "Bad Request: secret token contains unallowed characters")
        allowed = _json(p.get("allowed_updates"))
        if allowed is not None:
            self._allowed_updates = allowed or None
        max_connections = _int(p.get("max_connections")) or 40
        if not 1 <= max_connections <= 100:
            raise ApiError(400, "Bad Request: invalid max_connections specified")
        self.webhook_url, self.webhook_secret = url, secret
        self.webhook_max_connections = max_connections
        self._webhook_error = None
        if _bool(p.get("drop_pending_updates")):
            self._updates.clear()
        self._wake_pollers()  # a long poll in progress ends with 409; deliveries start
        return True

    async def _m_getwebhookinfo(self, p: dict[str, Any]) -> dict[str, Any]:
        info: dict[str, Any] = {
            "url": self.webhook_url,
            "has_custom_certificate": False,
            "pending_update_count": len(self._updates),
        }
        if self.webhook_url:
            info["max_connections"] = self.webhook_max_connections
            if self._allowed_updates is not None:
                info["allowed_updates"] = self._allowed_updates
        if self._webhook_error is not None:
            info["last_error_date"], info["last_error_message"] = self._webhook_error
        return info

    async def _m_close(self, p: dict[str, Any]) -> bool:
        return True

    async def _m_logout(self, p: dict[str, Any]) -> bool:
        return True

    async def _m_setmydescription(self, p: dict[str, Any]) -> bool:
        return True

    async def _m_setmyshortdescription(self, p: dict[str, Any]) -> bool:
        return True

    async def _m_setchatmenubutton(self, p: dict[str, Any]) -> bool:
        return True
