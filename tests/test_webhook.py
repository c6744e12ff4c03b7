"""End to end: the real `care-companion webhook` process, the emulator delivering updates to
it by webhook; and /readyz in process against dependencies that are down."""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import socket
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web as aioweb
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families

from adapters import metrics
from adapters.database import create_engine
from adapters.keyring import KeyRing
from adapters.store import SqlStore
from bot.web import Readiness, build_web_app
from tests.botproc import BotProcess
from tests.conftest import COORDINATOR
from tests.emulator import BotApiEmulator
from tests.files import pdf_bytes
from tests.patient_driver import PatientDriver
from tests.services import _reachable, services_required
from tests.test_e2e_patient import walk_first_items

pytestmark = pytest.mark.e2e

SECRET = "webhook-secret-of-the-tests-0123456789"
HOOK_PATH = "/telegram/webhook"
METRICS = {
    "care_companion_updates_received_total",
    "care_companion_updates_processed_total",
    "care_companion_send_retries_total",
    "care_companion_webhook_forged_requests_total",
    "care_companion_intake_check_seconds_count",
    "care_companion_intake_verdicts_total",
    "care_companion_inbox_depth",
    "care_companion_outbox_depth",
    "care_companion_cases_open",
}
LABELS = {"source", "outcome", "reason", "kind", "status", "state", "le"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def hook_bot(emulator: BotApiEmulator, tmp_path: Path) -> Iterator[BotProcess]:
    emulator.user(COORDINATOR, first_name="Coordinator")
    port = free_port()
    process = BotProcess(
        emulator,
        tmp_path,
        coordinator_chat_id=COORDINATOR,
        extra_env={
            "COORDINATOR_IDS": str(COORDINATOR),
            "WEB_BASE_URL": f"http://127.0.0.1:{port}",
            "WEB_PORT": str(port),
            "WEBHOOK_SECRET": SECRET,
        },
        mode="webhook",
    )
    yield process
    assert process.stop() == 0  # SIGTERM: a graceful stop
    assert "Traceback" not in process.log(), process.log()[-3000:]


def web(bot: BotProcess) -> str:
    return f"http://127.0.0.1:{bot.env['WEB_PORT']}"


async def started(bot: BotProcess, emu: BotApiEmulator) -> None:
    """Started and registered: the bot listens before it calls setWebhook."""
    mark = len(emu.calls)
    bot.start()
    # Generous: on a busy 2-core machine the start-up (imports) alone takes half a minute.
    await emu.wait_for_call("setWebhook", timeout=180, since=mark)


def transcript(emu: BotApiEmulator, chat_id: int) -> list[tuple[str, list[str]]]:
    """What the patient sees: each message's final text and buttons, the checklist card
    last (it goes out when the chat pauses, wherever that falls: see enqueue_card)."""
    messages = [
        (m["plain_text"] or m["plain_caption"] or "", [b["text"] for b in emu.buttons(m)])
        for m in emu.sent(chat_id)
    ]
    cards = [m for m in messages if "Your checklist" in m[0]]
    return [m for m in messages if m not in cards] + cards


async def settled(bot: BotProcess) -> None:
    """Until the bot's outbox has nothing left to send (the card's last edit included): how
    long that takes depends on the chat's pace and the machine, not a fixed sleep."""
    deadline = asyncio.get_running_loop().time() + 60
    while True:
        with contextlib.closing(sqlite3.connect(bot.data_dir / "care-companion.db")) as db:
            query = "SELECT count(*) FROM outbox WHERE status = 'pending'"
            (pending,) = db.execute(query).fetchone()
        if not pending:
            return
        assert asyncio.get_running_loop().time() < deadline, f"{pending} messages still queued"
        await asyncio.sleep(0.2)


def inbox_status(bot: BotProcess, update_id: int) -> str | None:
    with contextlib.closing(sqlite3.connect(bot.data_dir / "care-companion.db")) as db:
        row = db.execute("SELECT status FROM inbox WHERE update_id = ?", (update_id,)).fetchone()
    return row[0] if row else None


async def get(url: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as http, http.get(url) as response:
        return response.status, await response.text()


async def scrape(bot: BotProcess) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    status, text = await get(web(bot) + "/metrics")
    assert status == 200
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str):
    return samples[(name, frozenset(labels.items()))]


async def test_patient_gets_the_same_answers_as_by_polling(
    emulator: BotApiEmulator, hook_bot: BotProcess, tmp_path: Path
) -> None:
    """The same walk by polling and by webhook: the same messages; webhook mode never polls;
    the probes answer and the metrics count what happened, with no personal data. Polling
    with WEB_PORT serves the probes and metrics too, and no webhook."""
    chat = 7_345_678_912
    async with BotApiEmulator() as polled:
        polled.user(COORDINATOR, first_name="Coordinator")
        (tmp_path / "polling").mkdir()
        port = free_port()
        polling = BotProcess(  # the same web settings: the upload page's button shows too
            polled,
            tmp_path / "polling",
            coordinator_chat_id=COORDINATOR,
            extra_env={"WEB_PORT": str(port), "WEB_BASE_URL": f"http://127.0.0.1:{port}"},
        )
        mark = len(polled.calls)
        polling.start()
        try:
            await polled.wait_for_call("getUpdates", timeout=180, since=mark)
            await walk_first_items(PatientDriver(polled, polled.user(chat, first_name="Ann")))
            await settled(polling)  # the card's last edit included
            by_polling = transcript(polled, chat)
            assert (await get(web(polling) + "/healthz"))[0] == 200
            assert (await get(web(polling) + HOOK_PATH))[0] == 404
            samples = await scrape(polling)
            assert value(samples, "care_companion_updates_received_total", source="polling") > 0
        finally:
            assert polling.stop() == 0
        assert "Traceback" not in polling.log()

    await started(hook_bot, emulator)
    await walk_first_items(PatientDriver(emulator, emulator.user(chat, first_name="Ann")))
    await settled(hook_bot)
    assert transcript(emulator, chat) == by_polling

    assert emulator.calls_for("getUpdates") == []
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"{emulator.base_url}/bot{emulator.token}/getWebhookInfo") as response,
    ):
        info = (await response.json())["result"]
    assert info["url"] == web(hook_bot) + HOOK_PATH and info["pending_update_count"] == 0
    assert info["allowed_updates"] == ["message", "callback_query"]
    assert emulator.webhook_secret == SECRET
    delivered = [d for d in emulator.webhook_deliveries if d["status"] == 200]
    assert len(delivered) == len(emulator.webhook_deliveries)  # each taken at the first try

    assert await get(web(hook_bot) + "/healthz") == (200, '{"ok": true}')
    assert await get(web(hook_bot) + "/readyz") == (200, '{"ok": true}')
    samples = await scrape(hook_bot)
    assert {name for name, _ in samples} >= METRICS
    assert value(samples, "care_companion_updates_received_total", source="webhook") == len(
        delivered
    )
    assert value(samples, "care_companion_updates_received_total", source="polling") == 0
    handled = value(samples, "care_companion_updates_processed_total", outcome="handled")
    assert handled == len(delivered)
    assert value(samples, "care_companion_intake_check_seconds_count") == 2  # the PDF, the scan
    assert value(samples, "care_companion_cases_open", state="collecting") == 1
    assert value(samples, "care_companion_inbox_depth", status="new") == 0
    for name, labels in samples:
        if name.startswith("care_companion_"):
            assert {key for key, _ in labels} <= LABELS, name
            assert not any(str(chat) in label for _, label in labels), name
    _, text = await get(web(hook_bot) + "/metrics")
    for personal in ("Ann", "31.01.1980", "1980-01-31", "referral.pdf", "IMG0001"):
        assert personal not in text


async def test_forged_requests_are_refused_and_counted(
    emulator: BotApiEmulator, hook_bot: BotProcess
) -> None:
    """No secret or a wrong one: 401, nothing stored or answered, counted. The same update
    with the secret is taken and answered."""
    await started(hook_bot, emulator)
    user = emulator.user(5202, first_name="Eve")
    forged_id, genuine_id = 900_000_001, 900_000_002

    def update(update_id: int) -> dict[str, Any]:
        message = {
            "message_id": update_id % 1000,
            "from": user.as_user(),
            "chat": user.as_chat(),
            "date": 1_700_000_000,
            "text": "/start",
            "entities": [{"type": "bot_command", "offset": 0, "length": 6}],
        }
        return {"update_id": update_id, "message": message}

    async def post(body: Any, secret: str | None) -> int:
        headers = {"X-Telegram-Bot-Api-Secret-Token": secret} if secret is not None else {}
        async with (
            aiohttp.ClientSession() as http,
            http.post(web(hook_bot) + HOOK_PATH, json=body, headers=headers) as response,
        ):
            return response.status

    wrong = secrets.token_hex(len(SECRET) // 2)
    for secret in (None, "", wrong, SECRET[:-1], SECRET + "x"):
        assert await post(update(forged_id), secret) == 401
    await asyncio.sleep(1.5)  # room for a wrong answer to show up
    assert emulator.sent(user.chat_id) == []
    assert inbox_status(hook_bot, forged_id) is None
    assert await post({"message": "no update_id"}, SECRET) == 400  # not an update at all
    samples = await scrape(hook_bot)
    assert value(samples, "care_companion_webhook_forged_requests_total") == 5
    assert value(samples, "care_companion_updates_received_total", source="webhook") == 0

    assert await post(update(genuine_id), SECRET) == 200
    assert await post(update(genuine_id), SECRET) == 200  # Telegram sending it again: ignored
    await emulator.wait_for_text(user.chat_id, "Privacy notice", timeout=30)
    assert inbox_status(hook_bot, genuine_id) == "done"
    await asyncio.sleep(1.0)
    assert len([m for m in emulator.sent(user.chat_id) if "Privacy" in m["text"]]) == 1


async def test_kill_9_after_the_200_resumes_from_the_inbox(
    emulator: BotApiEmulator, hook_bot: BotProcess
) -> None:
    """An update answered 200 is in the inbox: killed while handling it, the restarted bot
    handles it (Telegram does not send it again). An update posted while the bot is down is
    retried until it is back."""
    await started(hook_bot, emulator)
    patient = PatientDriver(emulator, emulator.user(5203, first_name="Bo"))
    patient.say("/start")
    await patient.tap("I agree")
    await patient.tap("General medical review")
    await patient.introduce()
    await patient.expect("Step 1 of 7")

    emulator.faults.delay("getFile", 30)  # the handler hangs on the download...
    mark = len(emulator.calls)
    referral = patient.send_file(pdf_bytes(["Referral letter"]), "referral.pdf", "application/pdf")
    await emulator.wait_delivered(referral)
    await emulator.wait_for_call("getFile", since=mark)
    hook_bot.kill()  # ...and the process dies there
    assert inbox_status(hook_bot, referral) == "new"
    status_query = patient.say("/status")
    await asyncio.sleep(0.5)  # a delivery or two to a closed port
    emulator.faults.delay("getFile", 0)

    await started(hook_bot, emulator)
    await patient.expect_button("Done with this item")
    await patient.expect("Your records so far")
    await patient.tap("Done with this item")
    await patient.expect("Step 2 of 7")
    attempts = [d for d in emulator.webhook_deliveries if d["update_id"] == referral]
    assert [d["status"] for d in attempts] == [200]  # taken once: handled from the inbox
    attempts = [d for d in emulator.webhook_deliveries if d["update_id"] == status_query]
    assert attempts[0]["status"] is None and attempts[-1]["status"] == 200
    assert inbox_status(hook_bot, referral) == "done"


async def test_readyz_names_what_is_down(tmp_path: Path) -> None:
    """Database and Redis at a closed port, no master key: 503 naming each; alive still."""
    closed = free_port()
    engine = create_engine(f"postgresql://postgres@127.0.0.1:{closed}/gone")
    store = SqlStore(engine, KeyRing(secrets.token_bytes(32)))
    readiness = Readiness(engine, tmp_path / "master.key", f"redis://127.0.0.1:{closed}/0")
    app = build_web_app(readiness, lambda: metrics.refresh(store))
    try:
        async with TestClient(TestServer(app)) as client:
            ready = await client.get("/readyz")
            body = await ready.json()
            assert ready.status == 503 and body["ok"] is False
            assert set(body["failed"]) == {"database", "redis", "master_key"}
            assert str(closed) not in json.dumps(body)  # what failed, not where it lives
            assert (await client.get("/healthz")).status == 200
            assert (await client.get("/metrics")).status == 200  # the counters still
    finally:
        await engine.dispose()


async def test_readyz_with_redis(tmp_path: Path) -> None:
    if not _reachable("127.0.0.1", 6379):
        message = "Redis is not answering at 127.0.0.1:6379"
        if services_required():
            pytest.fail(message + " and REQUIRE_SERVICES=1")
        pytest.skip(message)
    from adapters.keys import load_or_create_master_key

    load_or_create_master_key(tmp_path / "master.key")
    engine = create_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    readiness = Readiness(engine, tmp_path / "master.key", "redis://127.0.0.1:6379/0")
    app = build_web_app(readiness, lambda: asyncio.sleep(0))
    try:
        async with TestClient(TestServer(app)) as client:
            ready = await client.get("/readyz")
            assert (ready.status, await ready.json()) == (200, {"ok": True})
            readiness.stopping = True  # SIGTERM: the balancer is turned away first
            ready = await client.get("/readyz")
            assert (ready.status, await ready.json()) == (
                503,
                {"ok": False, "failed": {"stopping": "SIGTERM"}},
            )
    finally:
        await engine.dispose()


async def api(emu: BotApiEmulator, method: str, **params: Any) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{emu.base_url}/bot{emu.token}/{method}", json=params) as response,
    ):
        return response.status, (await response.json()).get("result")


async def test_emulator_delivers_like_telegram(emulator: BotApiEmulator) -> None:
    """The emulator's side of a webhook: the secret header, a retry after a non-2xx, a chat's
    updates in order, getUpdates refused while set, nothing posted after deleteWebhook."""
    received: list[tuple[int, str | None]] = []
    answers = [500]  # the first POST fails

    async def hook(request: aioweb.Request) -> aioweb.Response:
        update_id = (await request.json())["update_id"]
        received.append((update_id, request.headers.get("X-Telegram-Bot-Api-Secret-Token")))
        return aioweb.Response(status=answers.pop(0) if answers else 200)

    app = aioweb.Application()
    app.router.add_post("/hook", hook)
    async with TestServer(app) as server:
        assert await api(
            emulator, "setWebhook", url=str(server.make_url("/hook")), secret_token=SECRET
        ) == (200, True)
        ann, bo = emulator.user(6001), emulator.user(6002)
        first, second = emulator.send_text(ann, "one"), emulator.send_text(ann, "two")
        other = emulator.send_text(bo, "three")
        for update_id in (first, second, other):
            await emulator.wait_delivered(update_id)
        order = [update_id for update_id, _ in received]
        assert order.count(first) == 2 and order.index(second) > order.index(first, 1)
        assert {secret for _, secret in received} == {SECRET}
        assert (await api(emulator, "getUpdates"))[0] == 409

        assert await api(emulator, "deleteWebhook") == (200, True)
        later = emulator.send_text(ann, "four")
        await asyncio.sleep(0.5)
        assert later not in [update_id for update_id, _ in received]
        status, updates = await api(emulator, "getUpdates")
        assert status == 200 and [u["update_id"] for u in updates] == [later]


async def test_a_refused_start_is_one_line_not_a_trace(
    emulator: BotApiEmulator, tmp_path: Path
) -> None:
    """The Bot API refuses the token (run) or the webhook address (webhook): the operator
    reads Telegram's reason on one line and the process exits 1."""
    from tests.test_shell_and_cli import run_cli

    settings = {
        "TELEGRAM_API_BASE_URL": emulator.base_url,
        "WEB_BASE_URL": "https://bot.example.org",
        "WEBHOOK_SECRET": SECRET,
        "WEB_PORT": str(free_port()),
    }
    wrong_token = {**settings, "BOT_TOKEN": "123:not-the-token"}
    refused = await asyncio.to_thread(run_cli, tmp_path, "run", env=wrong_token)
    emulator.faults.fail_next(
        "setWebhook",
        400,
        description="Bad Request: bad webhook: "
        "Webhook can be set up only on ports 80, 88, 443 or 8443",
    )
    hook = {**settings, "BOT_TOKEN": emulator.token}
    rejected = await asyncio.to_thread(run_cli, tmp_path, "webhook", env=hook)

    for result, reason in ((refused, "Unauthorized"), (rejected, "ports 80, 88, 443 or 8443")):
        assert result.returncode == 1
        assert "Traceback" not in result.stderr
        last = result.stderr.strip().splitlines()[-1]
        assert last.startswith("care-companion: the Bot API refused:") and reason in last
