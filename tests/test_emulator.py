"""Tests of the Bot API emulator against a real aiogram ``Bot`` talking HTTP to it."""

from __future__ import annotations

import asyncio
import io
import logging
import os
import signal
import sys
import time
from pathlib import Path

import aiohttp
import pytest
from aiogram import Bot, Dispatcher, F, Router
from aiogram.client.session.aiohttp import AiohttpSession
from aiogram.exceptions import (
    TelegramBadRequest,
    TelegramConflictError,
    TelegramForbiddenError,
    TelegramNetworkError,
    TelegramRetryAfter,
    TelegramServerError,
    TelegramUnauthorizedError,
)
from aiogram.filters import CommandStart
from aiogram.types import (
    BotCommand,
    BufferedInputFile,
    CallbackQuery,
    InlineKeyboardButton,
    InlineKeyboardMarkup,
    Message,
)

from tests.emulator import BotApiEmulator

CHAT = 4242


def keyboard(*pairs: tuple[str, str]) -> InlineKeyboardMarkup:
    """One-row inline keyboard from (text, callback_data) pairs."""
    buttons = [InlineKeyboardButton(text=t, callback_data=d) for t, d in pairs]
    return InlineKeyboardMarkup(inline_keyboard=[buttons])


@pytest.fixture
async def emu():
    async with BotApiEmulator() as emulator:
        yield emulator
        assert emulator.internal_errors == []


@pytest.fixture
async def bot(emu: BotApiEmulator):
    session = AiohttpSession(api=emu.api_server)
    instance = Bot(token=emu.token, session=session)
    yield instance
    await session.close()


async def test_get_me(bot: Bot, emu: BotApiEmulator) -> None:
    me = await bot.get_me()
    assert me.is_bot
    assert me.id == int(emu.token.split(":")[0])
    assert emu.base_url.startswith("http://127.0.0.1:")
    assert [c.method for c in emu.calls] == ["getMe"]


async def test_wrong_token_is_unauthorized(emu: BotApiEmulator) -> None:
    session = AiohttpSession(api=emu.api_server)
    try:
        with pytest.raises(TelegramUnauthorizedError):
            await Bot("1:wrong", session=session).get_me()
    finally:
        await session.close()


async def test_unknown_method_is_404(emu: BotApiEmulator) -> None:
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{emu.base_url}/bot{emu.token}/frobnicate") as resp,
    ):
        assert resp.status == 404
        assert await resp.json() == {
            "ok": False,
            "error_code": 404,
            "description": "Not Found: method not found",
        }


async def test_text_update_and_offset_confirmation(bot: Bot, emu: BotApiEmulator) -> None:
    user = emu.user(CHAT, first_name="Ann", language_code="de")
    update_id = emu.send_text(user, "/start hello")
    updates = await bot.get_updates(timeout=0)
    assert [u.update_id for u in updates] == [update_id]
    message = updates[0].message
    assert message is not None
    assert message.text == "/start hello"
    assert message.chat.id == CHAT
    assert message.from_user is not None
    assert message.from_user.language_code == "de"
    assert message.entities is not None
    assert message.entities[0].type == "bot_command"
    assert message.entities[0].length == len("/start")

    # Unconfirmed updates are delivered again.
    assert len(await bot.get_updates(timeout=0)) == 1
    assert emu.confirmed_update_id == 0
    assert await bot.get_updates(offset=update_id + 1, timeout=0) == []
    assert emu.confirmed_update_id == update_id
    assert emu.pending_updates() == []


async def test_long_poll_times_out_with_empty_list(bot: Bot) -> None:
    started = time.monotonic()
    assert await bot.get_updates(timeout=1) == []
    assert 0.9 <= time.monotonic() - started < 3


async def test_long_poll_wakes_up_on_new_update(bot: Bot, emu: BotApiEmulator) -> None:
    user = emu.user(CHAT)
    poll = asyncio.create_task(bot.get_updates(timeout=10))
    await asyncio.sleep(0.2)
    started = time.monotonic()
    emu.send_text(user, "hi")
    updates = await poll
    assert time.monotonic() - started < 1
    assert updates[0].message is not None
    assert updates[0].message.text == "hi"


async def test_allowed_updates_filter(bot: Bot, emu: BotApiEmulator) -> None:
    user = emu.user(CHAT)
    emu.send_text(user, "text")
    sent = await bot.send_message(CHAT, "x", reply_markup=keyboard(("A", "a")))
    assert emu.button(sent.model_dump(), "A") == "a"
    emu.press(user, sent.message_id, "a")
    updates = await bot.get_updates(timeout=0, allowed_updates=["callback_query"])
    assert [u.callback_query is not None for u in updates] == [True]


async def test_concurrent_polls_conflict(bot: Bot) -> None:
    first = asyncio.create_task(bot.get_updates(timeout=5))
    await asyncio.sleep(0.2)
    second = asyncio.create_task(bot.get_updates(timeout=0))
    with pytest.raises(TelegramConflictError):
        await first
    assert await second == []


async def test_inline_keyboard_press_answer_and_edit(bot: Bot, emu: BotApiEmulator) -> None:
    user = emu.user(CHAT)
    sent = await bot.send_message(
        CHAT,
        "<b>Consent?</b>",
        parse_mode="HTML",
        reply_markup=keyboard(("Yes", "c:y"), ("No", "c:n")),
    )
    assert sent.text == "Consent?"
    message = emu.sent(CHAT)[0]
    assert message["text"] == "<b>Consent?</b>"
    assert message["method"] == "sendMessage"
    assert emu.button(message, "yes") == "c:y"
    assert emu.button(message, 1) == "c:n"
    with pytest.raises(ValueError, match="no button"):
        emu.press(user, message, "c:maybe")

    press_id = emu.press(user, message, "c:y")
    (update,) = await bot.get_updates(timeout=0)
    query = update.callback_query
    assert update.update_id == press_id
    assert query is not None
    assert query.data == "c:y"
    assert query.chat_instance
    assert isinstance(query.message, Message)
    assert query.message.message_id == sent.message_id

    assert await bot.answer_callback_query(query.id, text="Saved")
    assert emu.callback_answer(press_id)["text"] == "Saved"
    with pytest.raises(TelegramBadRequest, match="query is too old"):
        await bot.answer_callback_query(query.id)

    mark = emu.cursor()
    await bot.edit_message_text("Thanks!", chat_id=CHAT, message_id=sent.message_id)
    event = await emu.wait_for(lambda e: e["event"] == "edited", since=mark, timeout=2)
    assert event["text"] == "Thanks!"
    assert message["reply_markup"] is None
    assert message["history"][0]["text"] == "<b>Consent?</b>"
    with pytest.raises(TelegramBadRequest, match="message is not modified"):
        await bot.edit_message_text("Thanks!", chat_id=CHAT, message_id=sent.message_id)

    assert await bot.pin_chat_message(CHAT, sent.message_id)
    assert emu.pinned[CHAT] == sent.message_id
    assert await bot.delete_message(CHAT, sent.message_id)
    assert message["deleted"]
    with pytest.raises(TelegramBadRequest, match="message to delete not found"):
        await bot.delete_message(CHAT, sent.message_id)


async def test_message_validation(bot: Bot, emu: BotApiEmulator) -> None:
    with pytest.raises(TelegramBadRequest, match="chat not found"):
        await bot.send_message(999, "hello")
    user = emu.user(CHAT)
    with pytest.raises(TelegramBadRequest, match="can't parse entities"):
        await bot.send_message(CHAT, "a <unescaped> b", parse_mode="HTML")
    with pytest.raises(TelegramBadRequest, match="message is too long"):
        await bot.send_message(CHAT, "x" * 4097)
    with pytest.raises(TelegramBadRequest, match="BUTTON_DATA_INVALID"):
        await bot.send_message(CHAT, "k", reply_markup=keyboard(("A", "x" * 65)))
    emu.block(user)
    with pytest.raises(TelegramForbiddenError):
        await bot.send_message(CHAT, "hello")


async def test_wait_for_text_sees_html_rendered_text(bot: Bot, emu: BotApiEmulator) -> None:
    emu.user(CHAT)
    waiter = asyncio.create_task(emu.wait_for_text(CHAT, "Tom & Jerry", timeout=3))
    await bot.send_message(CHAT, "<i>Tom &amp; Jerry</i>", parse_mode="HTML")
    assert (await waiter)["event"] == "sent"
    with pytest.raises(TimeoutError):
        await emu.wait_for_text(CHAT, "never", timeout=0.2)


async def test_send_document_multipart_and_by_file_id(bot: Bot, emu: BotApiEmulator) -> None:
    emu.user(CHAT)
    payload = os.urandom(300_000)
    result = await bot.send_document(
        CHAT, BufferedInputFile(payload, "summary.pdf"), caption="Your summary"
    )
    assert result.document is not None
    assert result.document.file_name == "summary.pdf"
    assert result.document.file_size == len(payload)
    stored = emu.sent(CHAT)[0]
    assert stored["file_bytes"] == payload
    assert stored["caption"] == "Your summary"
    assert stored["document"]["mime_type"] == "application/pdf"

    again = await bot.send_document(CHAT, result.document.file_id)
    assert again.document is not None
    assert again.document.file_unique_id == result.document.file_unique_id
    with pytest.raises(TelegramBadRequest, match="wrong file identifier"):
        await bot.send_document(CHAT, "no-such-file-id")


async def test_get_file_and_download(bot: Bot, emu: BotApiEmulator) -> None:
    user = emu.user(CHAT)
    payload = os.urandom(150_000)
    update_id = emu.send_document(user, payload, "scan.pdf", "application/pdf", caption="mri")
    document = emu.update(update_id)["message"]["document"]
    assert document["file_size"] == len(payload)
    (update,) = await bot.get_updates(timeout=0)
    assert update.message is not None
    assert update.message.document is not None
    assert update.message.caption == "mri"

    file = await bot.get_file(update.message.document.file_id)
    assert file.file_size == len(payload)
    assert file.file_path is not None
    assert not file.file_path.startswith("/")
    buffer = await bot.download(update.message.document.file_id, destination=io.BytesIO())
    assert buffer is not None
    assert buffer.read() == payload
    assert emu.downloads[-1]["completed"]
    with pytest.raises(TelegramBadRequest, match="invalid file_id"):
        await bot.get_file("nope")


async def test_photo_sizes_and_album(bot: Bot, emu: BotApiEmulator) -> None:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (1000, 700), "red").save(buf, "PNG")
    user = emu.user(CHAT)
    ids = emu.send_album(
        user, [{"data": buf.getvalue(), "photo": True}, (b"%PDF-1.4 x", "a.pdf", "application/pdf")]
    )
    updates = await bot.get_updates(timeout=0)
    assert [u.update_id for u in updates] == ids
    messages = [u.message for u in updates]
    assert all(m is not None and m.media_group_id for m in messages)
    assert len({m.media_group_id for m in messages if m}) == 1
    photo = messages[0].photo if messages[0] else None
    assert photo is not None
    assert len(photo) > 1
    assert (photo[-1].width, photo[-1].height) == (1000, 700)
    largest = await bot.download(photo[-1].file_id)
    assert largest is not None
    assert largest.read() == buf.getvalue()
    assert emu.file_bytes(photo[0].file_id) != buf.getvalue()


async def test_file_too_big_and_local_mode(emu: BotApiEmulator, bot: Bot) -> None:
    user = emu.user(CHAT)
    big = emu.send_document(user, b"\0" * (20 * 1024 * 1024 + 1), "big.dcm")
    big_id = emu.update(big)["message"]["document"]["file_id"]
    with pytest.raises(TelegramBadRequest, match="file is too big"):
        await bot.get_file(big_id)

    small = emu.send_document(user, Path(__file__), mime_type="text/x-python")
    small_id = emu.update(small)["message"]["document"]["file_id"]
    emu.faults.file_too_big(small_id)
    with pytest.raises(TelegramBadRequest, match="file is too big"):
        await bot.get_file(small_id)

    emu.local_mode = True
    file = await bot.get_file(big_id)
    assert file.file_path is not None
    assert Path(file.file_path).is_absolute()
    assert emu.files[big_id].path == Path(file.file_path)
    assert emu.files[big_id].size == 20 * 1024 * 1024 + 1


async def test_retry_after_and_server_errors(bot: Bot, emu: BotApiEmulator) -> None:
    emu.user(CHAT)
    emu.faults.fail_next("sendMessage", status=429, retry_after=3)
    with pytest.raises(TelegramRetryAfter) as info:
        await bot.send_message(CHAT, "hi")
    assert info.value.retry_after == 3
    await bot.send_message(CHAT, "hi")

    emu.faults.fail_next("getMe", status=502, count=2)
    for _ in range(2):
        with pytest.raises(TelegramServerError):
            await bot.get_me()
    await bot.get_me()
    assert [c.status for c in emu.calls_for("getme")] == [502, 502, 200]


async def test_delay_and_disconnect(bot: Bot, emu: BotApiEmulator) -> None:
    emu.faults.delay("getMe", 0.5)
    started = time.monotonic()
    await bot.get_me()
    assert time.monotonic() - started >= 0.5
    emu.faults.delay("getMe", 0)

    emu.faults.disconnect_next("getMe")
    with pytest.raises(TelegramNetworkError):
        await bot.get_me()
    assert (await bot.get_me()).is_bot


async def test_slow_and_stalled_downloads(bot: Bot, emu: BotApiEmulator) -> None:
    user = emu.user(CHAT)
    payload = os.urandom(40_000)
    uid = emu.send_document(user, payload, "slow.pdf")
    file_id = emu.update(uid)["message"]["document"]["file_id"]
    emu.faults.slow_download(file_id, bytes_per_sec=100_000)
    started = time.monotonic()
    result = await bot.download(file_id)
    assert result is not None
    assert result.read() == payload
    assert time.monotonic() - started >= 0.3

    tiny = emu.update(emu.send_document(user, b"tiny file", "t.pdf"))["message"]["document"]
    for stalled in (file_id, tiny["file_id"]):
        emu.faults.stall_download(stalled)
        with pytest.raises((asyncio.TimeoutError, aiohttp.ClientError)):
            await bot.download(stalled, timeout=1)
        assert not emu.downloads[-1]["completed"]


async def test_commands_webhook_and_chat_action(bot: Bot, emu: BotApiEmulator) -> None:
    emu.user(CHAT)
    await bot.set_my_commands([BotCommand(command="start", description="Start")])
    assert emu.commands[("default", "")] == [{"command": "start", "description": "Start"}]
    assert await bot.send_chat_action(CHAT, "upload_document")
    await bot.set_webhook("https://example.invalid/hook")
    with pytest.raises(TelegramConflictError):
        await bot.get_updates(timeout=0)
    assert (await bot.get_webhook_info()).url == "https://example.invalid/hook"
    emu.send_text(emu.user(CHAT), "dropped")
    await bot.delete_webhook(drop_pending_updates=True)
    assert await bot.get_updates(timeout=0) == []


POLLER = """
import asyncio, sys
import aiohttp

async def main():
    async with aiohttp.ClientSession() as http:
        url = f"{sys.argv[1]}/bot{sys.argv[2]}/getUpdates"
        await http.post(url, data={"timeout": "30"})

asyncio.run(main())
"""


async def test_survives_sigkilled_client(
    bot: Bot, emu: BotApiEmulator, caplog: pytest.LogCaptureFixture
) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", POLLER, emu.base_url, emu.token, stdout=asyncio.subprocess.DEVNULL
    )
    try:
        await emu.wait_for_call("getUpdates", timeout=20)
        await asyncio.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
    assert emu.calls_for("getUpdates")[0].finished is None  # still parked in the long poll

    # A half-sent multipart upload from a dying client.
    _, writer = await asyncio.open_connection("127.0.0.1", emu.port)
    writer.write(
        f"POST /bot{emu.token}/sendDocument HTTP/1.1\r\nHost: x\r\n"
        "Content-Type: multipart/form-data; boundary=zz\r\nContent-Length: 100000\r\n\r\n"
        '--zz\r\nContent-Disposition: form-data; name="chat_id"\r\n\r\n1\r\n'.encode()
    )
    await writer.drain()
    writer.close()

    user = emu.user(CHAT)
    uid = emu.send_text(user, "after restart")
    updates = await bot.get_updates(timeout=2)
    assert [u.update_id for u in updates] == [uid]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_real_dispatcher_round_trip(bot: Bot, emu: BotApiEmulator) -> None:
    router = Router()

    @router.message(CommandStart())
    async def start(message: Message) -> None:
        await message.answer("Welcome! Ready?", reply_markup=keyboard(("Go", "go")))

    @router.callback_query(F.data == "go")
    async def go(query: CallbackQuery) -> None:
        await query.answer()
        assert isinstance(query.message, Message)
        await query.message.edit_text("Let's begin.")

    dp = Dispatcher()
    dp.include_router(router)
    polling = asyncio.create_task(
        dp.start_polling(bot, polling_timeout=1, handle_signals=False, close_bot_session=False)
    )
    try:
        user = emu.user(CHAT)
        emu.send_text(user, "/start")
        welcome = await emu.wait_for_text(CHAT, "Welcome", timeout=5)
        press_id = emu.press(user, welcome, emu.button(welcome, "Go"))
        await emu.wait_for_text(CHAT, "Let's begin.", timeout=5)
        assert emu.callback_answer(press_id) is not None
        async with asyncio.timeout(5):
            while emu.confirmed_update_id < press_id:  # noqa: ASYNC110 - polling emulator state
                await asyncio.sleep(0.05)
    finally:
        await dp.stop_polling()
        await polling
