"""The web upload (bot.upload, adapters.uploads) on a real App: SQLite, vault, service.

The browser tests drive the real page in headless Chromium (Debian's `chromium`, through
Playwright): a folder of 300 DICOM files, the server stopped and started again mid-upload,
the page reloaded and the folder picked again; it must finish, having sent only what was
missing, and the case must hold exactly the bytes picked (a screenshot of the finished page
is saved under test-artifacts/). The Mini App page with Telegram's signed launch data. The
others speak HTTP directly: used, expired and foreign links, forged Mini App data, limits,
headers, a hand-over resumed after a restart, parts a machine crash damaged (found when the
page resumes, or by the hand-over) sent again, parts unsynced while case files are fsynced,
the sweep.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import gzip
import hashlib
import hmac
import io
import json
import logging
import os
import runpy
import shutil
import socket
import time
import zipfile
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import aiohttp
import pytest
from aiohttp import web
from pydantic import ValidationError
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid
from sqlalchemy import update
from sqlmodel import col, func, select

from adapters.keyops import verify_all
from adapters.store import utcnow
from adapters.tables import CaseRow, FileMemberRow, FileRow, OutboxRow, UploadSessionRow
from adapters.uploads import ManifestFile, UploadSession, UploadStore, plan_handover
from bot.app import App, build_app, prepare
from bot.settings import Settings
from bot.upload import (
    ScrubbedAccessLogger,
    UploadLinks,
    _DirectBody,
    check_init_data,
    make_upload_app,
)
from core.events import Event, EventKind
from core.ports import Patient
from handlers.render import Translator
from tests.files import pdf_bytes
from tests.fsyncs import CAN_NAME_FDS, fsynced_paths
from tests.scenario import IDENTITY_STEPS, PATIENT_NAME, apply_steps
from tests.services import services_required

BOT_TOKEN = "123456789:TEST-upload-token_abcdefghijklmnop"
COORDINATOR = -100777
CHAT_A, CHAT_B = 5_550_001, 5_550_002
ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"  # gitignored
# The page's messages, until they are merged into the catalogs (then the catalogs answer).
MSGS_FILE = Path("/tmp/msgs/upload.py")
STUDY_FILES = 300
# The chunk size here (UPLOAD_PART_BYTES): small, so the test study (300 small scans, ~7 MB,
# one stream) is a few hundred chunks and the server can be stopped in the middle.
PART = 32 * 1024


# -- the app and its server ------------------------------------------------------------------


class _WithPageMessages(Translator):
    """The catalogs, with the page's keys from MSGS_FILE where the catalogs lack them."""

    def __init__(self, messages: dict[str, dict[str, str]]) -> None:
        super().__init__()
        self._messages = messages

    def gettext(self, locale: str, key: str) -> str:
        message = super().gettext(locale, key)
        if message == key and key in self._messages:
            return self._messages[key].get(locale) or self._messages[key]["en"]
        return message


def open_app(settings: Settings) -> App:
    app = build_app(settings)
    if MSGS_FILE.exists():
        app.translator = _WithPageMessages(runpy.run_path(str(MSGS_FILE))["MSGS"])
    return app


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class UploadServer:
    """The upload sub-app mounted at /upload/ as the bot's web server mounts it, on its own
    runner on 127.0.0.1. `delay` slows each chunk a little (a real line is slower than
    loopback), so the test can stop the server mid-upload."""

    def __init__(self, settings: Settings, port: int) -> None:
        self.settings = settings
        self.port = port
        self.base_url = f"http://127.0.0.1:{port}"
        self.app: App | None = None
        self.runner: web.AppRunner | None = None
        self.delay = 0.0
        self.chunk_puts = 0
        self.put_paths: list[str] = []
        self.puts_now = self.puts_at_once = 0  # chunk requests in the handler, the most
        self.closing_puts = 0  # answers that close their connection

    @web.middleware
    async def _slow_chunks(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if request.method != "PUT":
            return await handler(request)
        self.chunk_puts += 1
        self.put_paths.append(request.path)
        self.puts_now += 1
        self.puts_at_once = max(self.puts_at_once, self.puts_now)
        try:
            await asyncio.sleep(self.delay)
            response = await handler(request)
            self.closing_puts += response.keep_alive is False
            return response
        finally:
            self.puts_now -= 1

    async def start(self) -> App:
        self.app = open_app(self.settings)
        root = web.Application(middlewares=[self._slow_chunks])
        root.add_subapp("/upload/", make_upload_app(self.app, self.settings))
        self.runner = web.AppRunner(
            root, access_log_class=ScrubbedAccessLogger, shutdown_timeout=0.5
        )
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", self.port, reuse_address=True)
        await site.start()
        return self.app

    async def stop(self) -> None:
        """As a bot restart: the server goes away mid-request, the App is closed."""
        if self.runner is not None:
            await self.runner.cleanup()
        if self.app is not None:
            await self.app.close()
        self.runner = self.app = None

    def links(self) -> UploadLinks:
        assert self.app is not None
        return UploadLinks(self.app, self.settings, base_url=self.base_url)


async def serving(tmp_path: Path, part_bytes: int, **more: Any) -> AsyncIterator[UploadServer]:
    """An upload server on a fresh data folder, with chunks of `part_bytes` (and `more`
    settings)."""
    settings = Settings(
        data_dir=tmp_path / "data",
        database_url=f"sqlite:///{tmp_path / 'data' / 'cc.db'}",
        bot_token=BOT_TOKEN,
        coordinator_chat_id=COORDINATOR,
        upload_part_bytes=part_bytes,
        **more,
    )
    await asyncio.to_thread(prepare, settings)
    upload_server = UploadServer(settings, free_port())
    await upload_server.start()
    yield upload_server
    await upload_server.stop()


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[UploadServer]:
    async for upload_server in serving(tmp_path, PART):
        yield upload_server


@pytest.fixture
async def unproxied_server(tmp_path: Path) -> AsyncIterator[UploadServer]:
    """The upload server trusting no proxy: the tests' own address is a client's."""
    async for upload_server in serving(tmp_path, PART, web_trusted_proxies=""):
        yield upload_server


def current(server: UploadServer) -> App:
    assert server.app is not None
    return server.app


async def collecting_case(app: App, chat_id: int, language: str = "en") -> str:
    """A patient who consented, chose the general checklist and gave their name and birth
    date: the case is collecting, as when the bot offers the upload page."""
    patient = Patient(chat_id, chat_id, language)
    steps: list[Any] = [
        Event(EventKind.START),
        Event(EventKind.AGREE),
        Event(EventKind.CHOOSE_PROCEDURE, "general"),
        *IDENTITY_STEPS,
    ]
    await apply_steps(app, patient, steps, chat_id * 100)
    async with app.store.reader() as session:
        case = (await session.exec(select(CaseRow).where(CaseRow.chat_id == chat_id))).one()
    assert case.state == "collecting"
    return case.id


async def count(app: App, model: type, *where: Any) -> int:
    async with app.store.reader() as session:
        query = select(func.count()).select_from(model)
        for condition in where:
            query = query.where(condition)
        return int((await session.exec(query)).one())


def vault_files(app: App) -> set[str]:
    return {path.name for path in (app.vault.root / "blobs").rglob("*") if path.is_file()}


def store_of(app: App) -> UploadStore:
    return UploadStore(app.store, app.vault, app.store.keys)


async def session_of(app: App, link: str) -> UploadSession:
    return await store_of(app).by_token(link.rsplit("/", 1)[1], complete_ok=True)


def bearer(link: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {link.rsplit('/', 1)[1]}"}


def text(app: App, key: str, locale: str = "en") -> str:
    return app.translator.gettext(locale, f"upload.page.{key}")


def signed_init_data(
    user_id: int, bot_token: str = BOT_TOKEN, auth_date: float | None = None
) -> str:
    """Mini App launch data signed as Telegram signs it (core.telegram.org/bots/webapps)."""
    fields = {
        "query_id": "AAHdF6IQAAAAAN0XohDhrOrc",
        "user": json.dumps({"id": user_id, "first_name": "Ann"}, separators=(",", ":")),
        "auth_date": str(int(auth_date if auth_date is not None else time.time())),
    }
    check = "\n".join(f"{key}={value}" for key, value in sorted(fields.items()))
    secret = hmac.new(b"WebAppData", bot_token.encode(), hashlib.sha256).digest()
    fields["hash"] = hmac.new(secret, check.encode(), hashlib.sha256).hexdigest()
    return urlencode(fields)


# -- a study on "CD" -------------------------------------------------------------------------


def write_study(folder: Path, files: int) -> list[Path]:
    """A CD copy: pydicom's bundled CT and MR examples as templates, each file its own
    SOPInstanceUID, one study, named for the test patient; CD-style names, no extension."""
    templates = [dcmread(str(get_testdata_file(name))) for name in ("CT_small.dcm", "MR_small.dcm")]
    study, series = generate_uid(), [generate_uid(), generate_uid()]
    (folder / "DICOM").mkdir(parents=True)
    paths = []
    for number in range(files):
        dataset = copy.deepcopy(templates[number % 2])
        uid = generate_uid()
        dataset.SOPInstanceUID = uid
        dataset.file_meta.MediaStorageSOPInstanceUID = uid
        dataset.StudyInstanceUID = study
        dataset.SeriesInstanceUID = series[number % 2]
        dataset.InstanceNumber = number + 1
        dataset.PatientName = PATIENT_NAME.replace(" ", "^")
        dataset.PatientBirthDate = "19800131"
        path = folder / "DICOM" / f"IM{number:05d}"
        dataset.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def chromium() -> str:
    """Debian's chromium for Playwright; skip with the reason if it (or Playwright) is
    missing, fail instead under REQUIRE_SERVICES=1."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    try:
        import playwright  # noqa: F401
    except ImportError:
        found, missing = None, "the playwright package is not installed (pip install -e '.[dev]')"
    else:
        missing = "Debian's chromium is not installed (apt-get install chromium)"
    if found:
        return found
    if services_required():
        pytest.fail(missing + " and REQUIRE_SERVICES=1")
    pytest.skip(missing)


async def until(condition: Callable[[], Awaitable[bool]], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


# -- the browser test ------------------------------------------------------------------------


async def test_page_uploads_a_cd_folder_through_a_restart_and_a_reload(
    server: UploadServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    executable = chromium()
    from playwright.async_api import async_playwright

    caplog.set_level(logging.DEBUG)
    app = current(server)
    case_id = await collecting_case(app, CHAT_A)
    link = await server.links().issue_link(case_id, "imaging", CHAT_A)
    token = link.rsplit("/", 1)[1]
    sent = write_study(tmp_path / "CD", STUDY_FILES)
    chunks = -(-sum(path.stat().st_size for path in sent) // PART)
    assert chunks > 150  # many small files, fewer and larger chunks (each spans files)
    upload = await session_of(app, link)

    async def stored_parts() -> int:
        store = UploadStore(
            current(server).store, current(server).vault, current(server).store.keys
        )
        fresh = await store.get(upload.id)
        return len(await asyncio.to_thread(store.received, fresh))

    server.delay = 0.02
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=executable, headless=True)
        page = await browser.new_page(locale="en-US")
        try:
            await page.goto(link)
            await page.wait_for_selector("body[data-state=ready]")
            assert await page.inner_text("h1") == text(app, "title")
            await page.set_input_files("#pick-folder", str(tmp_path / "CD"))

            # 1. The bot restarts mid-upload: the page waits, says so, and carries on.
            await until(lambda: _at_least(stored_parts, 40), 60, "40 chunks stored")
            await server.stop()
            await page.wait_for_function(
                "t => document.getElementById('notice').textContent === t",
                arg=text(app, "retrying"),
                timeout=15_000,
            )
            app = await server.start()
            await until(lambda: _at_least(stored_parts, 120), 60, "120 chunks stored")

            # 2. The page is reloaded: the files are picked again, only the rest is sent.
            await page.reload()
            await page.wait_for_selector("body[data-state=ready]")
            assert "%" in await page.inner_text("#notice")  # "NN% of this upload is saved"
            already = await stored_parts()
            assert already >= 120
            server.chunk_puts, server.delay = 0, 0.0
            await page.set_input_files("#pick-folder", str(tmp_path / "CD"))
            await page.wait_for_selector("body[data-state=complete]", timeout=180_000)
            assert server.chunk_puts <= chunks - already, "stored chunks were sent again"
            print(f"\n{already} chunks stored before the reload, {server.chunk_puts} sent after")
            assert await page.inner_text("#notice") == text(app, "done")
            ARTIFACTS.mkdir(exist_ok=True)
            shot = ARTIFACTS / "upload-finished.png"
            await page.screenshot(path=str(shot), full_page=False)
            print(f"\nscreenshot of the finished page: {shot}")
        finally:
            await browser.close()

    # The case holds exactly the bytes picked: one ZIP (the CD) whose members are the files.
    async with app.store.reader() as session:
        files = (await session.exec(select(FileRow).where(FileRow.case_id == case_id))).all()
        members = (
            await session.exec(select(FileMemberRow).where(FileMemberRow.case_id == case_id))
        ).all()
        row = (
            await session.exec(select(UploadSessionRow).where(UploadSessionRow.id == upload.id))
        ).one()
    assert [(f.item_key, f.unique_id) for f in files] == [("imaging", f"web:{upload.id}.0")]
    assert row.state == "complete" and row.manifest_enc is None
    key = app.store.keys.case_key(case_id, (await _wrapped(app, case_id)))
    with app.vault.reader(files[0].blob_id, key) as reader, zipfile.ZipFile(reader) as archive:
        names = sorted(archive.namelist())
        assert names == sorted(f"DICOM/{path.name}" for path in sent)
        for path in sent:
            assert archive.read(f"DICOM/{path.name}") == path.read_bytes()
    assert sorted(m.sha256 for m in members) == sorted(
        hashlib.sha256(path.read_bytes()).hexdigest() for path in sent
    )
    assert not [name for name in vault_files(app) if name.startswith(f"u{upload.id}")]
    # The service answered the patient in the chat.
    assert await count(app, OutboxRow, OutboxRow.chat_id == CHAT_A) > 0
    # No plaintext anywhere on disk: a scan's unique id is in no file under DATA_DIR.
    marker = str(dcmread(sent[7]).SOPInstanceUID).encode()
    for path in (tmp_path / "data").rglob("*"):
        if path.is_file():
            assert marker not in path.read_bytes(), path
    # The token never reached a log (the access log included).
    assert token not in caplog.text
    assert "/upload/u/…" in caplog.text

    # The link is spent: the page says so, and nothing more can be stored with it.
    before = (await count(app, FileRow), vault_files(app))
    async with aiohttp.ClientSession() as http:
        async with http.get(link) as response:
            assert response.status == 410
            assert text(app, "used") in await response.text()
        async with http.post(
            f"{server.base_url}/upload/api/files",
            json={"files": [{"path": "x.pdf", "size": 3, "modified": 0}]},
            headers=bearer(link),
        ) as response:
            assert response.status == 410
        async with http.put(
            f"{server.base_url}/upload/api/chunks/1/0", data=b"abc", headers=bearer(link)
        ) as response:
            assert response.status == 410
    assert (await count(app, FileRow), vault_files(app)) == before


async def _at_least(stored: Callable[[], Awaitable[int]], n: int) -> bool:
    return await stored() >= n


async def _wrapped(app: App, case_id: str) -> bytes:
    async with app.store.reader() as session:
        case = await session.get(CaseRow, case_id)
    assert case is not None
    return case.wrapped_key


# -- the protocol, without a browser -------------------------------------------------------


async def declare(
    http: aiohttp.ClientSession, api: str, headers: dict[str, str], files: list[dict[str, Any]]
) -> tuple[int, dict[str, Any]]:
    async with http.post(f"{api}/files", json={"files": files}, headers=headers) as response:
        return response.status, await response.json()


async def put_stream(
    http: aiohttp.ClientSession,
    api: str,
    headers: dict[str, str],
    answer: dict[str, Any],
    stream: bytes,
) -> int:
    """Send the chunks of the declared stream the server does not hold, as the page does;
    the status of the last answer."""
    part, status = answer["part_size"], 200
    for index in range(-(-len(stream) // part)):
        if index in answer["have"]:
            continue
        url = f"{api}/chunks/{answer['layout']}/{index}"
        body = stream[index * part : (index + 1) * part]
        async with http.put(url, data=body, headers=headers) as response:
            status = response.status
    return status


async def put_file(
    http: aiohttp.ClientSession, base: str, headers: dict[str, str], data: bytes, name: str
) -> tuple[int, int]:
    """Declare one file and send its chunks as the page does; (status of the last answer,
    the layout)."""
    declared = [{"path": name, "size": len(data), "type": "application/pdf", "modified": 1}]
    status, answer = await declare(http, f"{base}/upload/api", headers, declared)
    if status != 200:
        return status, -1
    return await put_stream(http, f"{base}/upload/api", headers, answer, data), answer["layout"]


async def finish_and_wait(http: aiohttp.ClientSession, url: str, headers: dict[str, str]) -> None:
    async with http.post(f"{url}/finish", json={}, headers=headers) as response:
        assert response.status == 200, await response.text()
    for _ in range(600):
        async with http.get(f"{url}/status", headers=headers) as response:
            if (await response.json())["state"] == "complete":
                return
        await asyncio.sleep(0.05)
    raise AssertionError("the hand-over did not complete")


async def test_a_file_goes_through_the_intake_once_and_the_link_is_then_spent(
    server: UploadServer,
) -> None:
    app = current(server)
    case_id = await collecting_case(app, CHAT_A)
    link = await server.links().issue_link(case_id, "referral", CHAT_A)
    letter = pdf_bytes(["Referral from Dr Example"])
    api = f"{server.base_url}/upload/api"
    async with aiohttp.ClientSession() as http:
        status, layout = await put_file(http, server.base_url, bearer(link), letter, "ref.pdf")
        assert status == 200
        # A chunk sent twice (its answer was lost) is stored once.
        first = letter[:PART]
        url = f"{api}/chunks/{layout}/0"
        async with http.put(url, data=first, headers=bearer(link)) as resp:
            assert resp.status == 200 and (await resp.json())["new"] is False
        await finish_and_wait(http, api, bearer(link))
        # The finish arriving again (a retry) changes nothing.
        async with http.post(f"{api}/finish", json={}, headers=bearer(link)) as response:
            assert (await response.json())["state"] == "complete"
    async with app.store.reader() as session:
        files = (await session.exec(select(FileRow).where(FileRow.case_id == case_id))).all()
    assert [(f.item_key, f.size, f.mime) for f in files] == [
        ("referral", len(letter), "application/pdf")
    ]
    key = app.store.keys.case_key(case_id, await _wrapped(app, case_id))
    with app.vault.reader(files[0].blob_id, key) as reader:
        assert reader.read() == letter
    # The service answered in the chat, naming nothing of the file in clear in the outbox.
    async with app.store.reader() as session:
        replies = (
            await session.exec(select(OutboxRow.payload).where(OutboxRow.chat_id == CHAT_A))
        ).all()
    assert replies and all("ref.pdf" not in payload for payload in replies)


async def test_the_files_travel_as_one_stream_and_another_list_starts_again(
    server: UploadServer,
) -> None:
    """A chunk holds the end of one file and the start of the next; the same list declared
    again keeps what is stored, another list is a new layout (the old chunks go, a chunk for
    the old layout is refused); the hand-over cuts the stream back into the files."""
    app = current(server)
    case_id = await collecting_case(app, CHAT_A)
    link = await server.links().issue_link(case_id, "imaging", CHAT_A)
    api, headers = f"{server.base_url}/upload/api", bearer(link)
    contents = {
        "CD/A": os.urandom(PART + PART // 2),
        "CD/empty": b"",
        "CD/B": os.urandom(10),
        "CD/C": os.urandom(PART * 2 // 3),
    }
    files = [{"path": path, "size": len(data), "modified": 5} for path, data in contents.items()]
    stream = b"".join(contents.values())
    a_end = len(contents["CD/A"])
    async with aiohttp.ClientSession() as http:
        status, answer = await declare(http, api, headers, [*files, files[0]])  # A twice
        assert status == 200
        assert answer["offsets"] == [0, a_end, a_end, a_end + 10, 0]
        assert (answer["total"], answer["part_size"], answer["have"]) == (len(stream), PART, [])
        layout = answer["layout"]
        # Chunk 1: A's end, B, C's start.
        url = f"{api}/chunks/{layout}/1"
        async with http.put(url, data=stream[PART : 2 * PART], headers=headers) as response:
            assert response.status == 200
        # The same list again (a reload): the same layout, chunk 1 kept.
        status, again = await declare(http, api, headers, files)
        assert (status, again["layout"], again["have"]) == (200, layout, [1])
        # Another list (C left out): a new layout, nothing kept, the old layout refused.
        status, other = await declare(http, api, headers, files[:3])
        assert (status, other["layout"], other["have"]) == (200, layout + 1, [])
        async with http.put(url, data=stream[PART : 2 * PART], headers=headers) as response:
            assert response.status == 409
        upload = await session_of(app, link)
        assert not [name for name in vault_files(app) if name.startswith(f"u{upload.id}-{layout}-")]
        # The full list once more, every chunk sent.
        status, answer = await declare(http, api, headers, files)
        assert status == 200 and answer["have"] == []
        assert await put_stream(http, api, headers, answer, stream) == 200
    upload = await session_of(app, link)
    assert upload.chunks == 3 and await asyncio.to_thread(store_of(app).received, upload) == [
        0,
        1,
        2,
    ]
    # What the intake will read: one ZIP (the folder) whose members are the files, exactly.
    [unit] = plan_handover(upload.files)
    zipped = b"".join(store_of(app).unit_pieces(upload, unit))
    with zipfile.ZipFile(io.BytesIO(zipped)) as archive:
        assert {name: archive.read(name) for name in archive.namelist()} == {
            path.removeprefix("CD/"): data for path, data in contents.items()
        }


# Larger than a socket read and than the vault's 4 MiB receive buffers, and not a multiple.
BIG_PART = 9 * 1024 * 1024 + 4321


@pytest.fixture
async def big_server(tmp_path: Path) -> AsyncIterator[UploadServer]:
    async for upload_server in serving(tmp_path, BIG_PART):
        yield upload_server


async def raw_put(
    port: int,
    path: str,
    token: str,
    body: bytes,
    *,
    behind: bytes = b"",
    cut: str | None = None,
    whole: bool = False,
    extra: str = "",
    step: int = 1 << 20,
) -> bytes:
    """PUT over a bare connection, as bytes on the wire: the body in writes of `step` bytes
    with pauses (most of it arrives after the handler started), or `whole`: the head, the body
    and `behind` (a pipelined request) in one write. With `cut` ("reset" or "eof") the
    connection is cut after half the body. `extra`: more header lines. Returns all the
    server sent until it closed the connection (or, for a kept one, until 2 s of
    silence)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = (
        f"PUT {path} HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer {token}\r\n"
        f"Content-Length: {len(body)}\r\n{extra}\r\n"
    ).encode()
    try:
        if whole:
            writer.write(head + body + behind)
        else:
            writer.write(head)
            end = len(body) // 2 if cut else len(body)
            for start in range(0, end, step):
                writer.write(body[start : min(start + step, end)])
                await writer.drain()
                await asyncio.sleep(0.002)
            if cut == "reset":
                writer.transport.abort()
                return b""
            if cut == "eof":
                writer.write_eof()
        await writer.drain()
        answer = b""
        with contextlib.suppress(TimeoutError):
            while piece := await asyncio.wait_for(reader.read(65536), 2):
                answer += piece
        return answer
    finally:
        writer.close()


async def test_a_large_chunk_is_read_past_the_parser_and_its_connection_closed(
    big_server: UploadServer,
) -> None:
    """A chunk larger than a socket read goes from the connection straight into the vault's
    buffers: its part holds exactly the bytes sent; the answer closes the connection
    (`Connection: close`), and a request pipelined behind the body is neither answered nor
    taken for the chunk's bytes. A chunk the parser read whole keeps its connection. A
    connection reset or half-closed mid-body stores nothing, leaves no temp file, and the
    chunk is taken when sent again; the vault's receive buffers hold no plaintext after."""
    server = big_server
    app = current(server)
    case_id = await collecting_case(app, CHAT_A)
    link = await server.links().issue_link(case_id, "imaging", CHAT_A)
    token, headers = link.rsplit("/", 1)[1], bearer(link)
    api = f"{server.base_url}/upload/api"
    data = os.urandom(2 * BIG_PART + 1000)  # two large chunks and a small one
    async with aiohttp.ClientSession() as http:
        status, answer = await declare(
            http, api, headers, [{"path": "CD/IM1", "size": len(data), "modified": 7}]
        )
    assert status == 200 and answer["part_size"] == BIG_PART
    layout = answer["layout"]
    path = f"/upload/api/chunks/{layout}"
    status_request = (
        f"GET /upload/api/status HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer {token}\r\n\r\n"
    ).encode()
    chunk = [data[i * BIG_PART : (i + 1) * BIG_PART] for i in range(3)]
    upload = await session_of(app, link)
    uploads = store_of(app)

    async def stored() -> list[int]:
        return await asyncio.to_thread(uploads.received, upload)

    # Chunk 0: answered, and the connection closed after the answer (read() saw its end).
    started = time.monotonic()
    wire = await raw_put(server.port, f"{path}/0", token, chunk[0])
    assert time.monotonic() - started < 2  # not the 2 s of silence raw_put waits out
    head, _, body = wire.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and b"connection: close" in head.lower()
    assert json.loads(body) == {"stored": True, "new": True}
    # Chunk 1 with chunked framing too (its bytes are not the chunk's): refused, not read.
    chunked = b"5\r\nhello\r\n0\r\n\r\n"
    extra = "Transfer-Encoding: chunked\r\n"
    wire = await raw_put(server.port, f"{path}/1", token, chunked, extra=extra, whole=True)
    assert wire.startswith((b"HTTP/1.1 400 ", b"HTTP/1.0 400 "))  # by the parser
    # Chunk 1 cut off halfway, by a reset and by a half-close: nothing kept.
    for cut in ("reset", "eof"):
        wire = await raw_put(server.port, f"{path}/1", token, chunk[1], cut=cut)
        assert wire == b""
        await until(
            lambda: asyncio.to_thread(lambda: not os.listdir(app.vault.tmp_dir)), 10, "no temp"
        )
        assert await stored() == [0]
    # Chunk 2, short: in the parser's first read, so the connection stays open for more.
    wire = await raw_put(
        server.port, f"{path}/2", token, chunk[2], behind=status_request, whole=True
    )
    first, _, rest = wire.partition(b"\r\n\r\n")
    assert first.startswith(b"HTTP/1.1 200 ") and b"connection: close" not in first.lower()
    assert b"HTTP/1.1 200 " in rest and b'"state": "open"' in rest  # the status answered
    async with (
        aiohttp.ClientSession() as http,  # chunk 1 again, by an ordinary client
        http.put(f"{api}/chunks/{layout}/1", data=chunk[1], headers=headers) as put,
    ):
        assert put.status == 200 and await put.json() == {"stored": True, "new": True}
    assert await stored() == [0, 1, 2]
    [unit] = plan_handover(upload.files)
    zipped = b"".join(uploads.unit_pieces(upload, unit))
    with zipfile.ZipFile(io.BytesIO(zipped)) as archive:
        assert archive.read("IM1") == data
    assert app.vault._spare_receive
    assert all(buffer[:] == bytes(len(buffer)) for buffer in app.vault._spare_receive)


async def test_a_large_chunk_wakes_the_server_once_per_megabyte_or_so(
    big_server: UploadServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While a chunk's body is read past the parser, the kernel wakes the event loop only
    once WAKE_BYTES of it are in (or the rest, which may be less): a 9 MiB chunk trickling
    in 64 KiB at a time takes a read per megabyte or so (without it, one per 64 KiB: some
    140), and every byte is stored."""
    reads: list[int] = []
    buffer_updated = _DirectBody.buffer_updated

    def counted(body: _DirectBody, nbytes: int) -> None:
        reads.append(nbytes)
        buffer_updated(body, nbytes)

    monkeypatch.setattr(_DirectBody, "buffer_updated", counted)
    server = big_server
    app = current(server)
    case_id = await collecting_case(app, CHAT_A)
    link = await server.links().issue_link(case_id, "imaging", CHAT_A)
    data = os.urandom(BIG_PART)
    async with aiohttp.ClientSession() as http:
        api, headers = f"{server.base_url}/upload/api", bearer(link)
        entry = {"path": "CD/IM1", "size": len(data), "modified": 7}
        status, answer = await declare(http, api, headers, [entry])
    assert status == 200
    path = f"/upload/api/chunks/{answer['layout']}/0"
    wire = await raw_put(server.port, path, link.rsplit("/", 1)[1], data, step=1 << 16)
    assert wire.startswith(b"HTTP/1.1 200 ")
    upload = await session_of(app, link)
    [unit] = plan_handover(upload.files)
    zipped = b"".join(store_of(app).unit_pieces(upload, unit))
    with zipfile.ZipFile(io.BytesIO(zipped)) as archive:
        assert archive.read("IM1") == data
    assert len(data) - sum(reads) < 1 << 20  # the rest came with the headers
    assert len(reads) <= 12  # 9 MiB at a megabyte or more a read (a buffer's last less)


async def test_the_page_sends_large_chunks_at_once_on_connections_closed_after_each(
    big_server: UploadServer, tmp_path: Path
) -> None:
    """The real page with chunks larger than a socket read: each chunk's connection is
    closed after its answer, and Chromium still sends them several at once (each on a new
    connection), the folder reaching the case exactly."""
    executable = chromium()
    from playwright.async_api import async_playwright

    server = big_server
    app = current(server)
    case_id = await collecting_case(app, CHAT_A)
    link = await server.links().issue_link(case_id, "imaging", CHAT_A)
    template = dcmread(str(get_testdata_file("CT_small.dcm")))
    template.Rows, template.Columns = 1024, 4096 // 2  # 4 MiB of 16-bit pixels
    study = generate_uid()
    (tmp_path / "CD" / "DICOM").mkdir(parents=True)
    sent = []
    for number in range(10):  # 40 MiB: 5 chunks
        dataset = copy.deepcopy(template)
        dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        dataset.StudyInstanceUID, dataset.InstanceNumber = study, number + 1
        dataset.PixelData = os.urandom(4 * 1024 * 1024)
        path = tmp_path / "CD" / "DICOM" / f"IM{number:05d}"
        dataset.save_as(path, enforce_file_format=True)
        sent.append(path)
    server.delay = 0.05  # the first answers come after the others were sent
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=executable, headless=True)
        page = await browser.new_page(locale="en-US")
        try:
            await page.goto(link)
            await page.wait_for_selector("body[data-state=ready]")
            await page.set_input_files("#pick-folder", str(tmp_path / "CD"))
            await page.wait_for_selector("body[data-state=complete]", timeout=120_000)
        finally:
            await browser.close()
    assert (server.chunk_puts, server.closing_puts) == (5, 5) and server.puts_at_once >= 2
    async with app.store.reader() as session:
        [file] = (await session.exec(select(FileRow).where(FileRow.case_id == case_id))).all()
    key = app.store.keys.case_key(case_id, (await _wrapped(app, case_id)))
    with app.vault.reader(file.blob_id, key) as reader, zipfile.ZipFile(reader) as archive:
        assert sorted(archive.namelist()) == [f"DICOM/{path.name}" for path in sent]
        for path in sent:
            assert archive.read(f"DICOM/{path.name}") == path.read_bytes()


async def test_an_encoded_chunk_is_read_through_the_parser_and_checked_decoded(
    big_server: UploadServer,
) -> None:
    """A large chunk sent gzip-encoded is not read past aiohttp's parser (whose decoding it
    needs): its decoded length is what must be the chunk's, and here it is not (the gzip
    framing makes the encoded body exactly a chunk long): refused, nothing stored. The
    same length unencoded is taken."""
    server = big_server
    app = current(server)
    case_id = await collecting_case(app, CHAT_A)
    link = await server.links().issue_link(case_id, "imaging", CHAT_A)
    api, headers = f"{server.base_url}/upload/api", bearer(link)
    data = os.urandom(BIG_PART)
    size = BIG_PART
    while len(encoded := gzip.compress(data[:size], compresslevel=0, mtime=0)) != BIG_PART:
        size -= len(encoded) - BIG_PART  # stored blocks: the framing grows with the size
    async with aiohttp.ClientSession() as http:
        status, answer = await declare(
            http, api, headers, [{"path": "scan.dcm", "size": BIG_PART, "modified": 1}]
        )
        assert status == 200
        url = f"{api}/chunks/{answer['layout']}/0"
        gzipped = {**headers, "Content-Encoding": "gzip"}
        # Read past the parser, the decoded bytes it already held would be miscounted and
        # the answer never come: a time limit makes that a failure, not a hang.
        async with asyncio.timeout(30), http.put(url, data=encoded, headers=gzipped) as response:
            assert response.status == 400
        upload = await session_of(app, link)
        assert await asyncio.to_thread(store_of(app).received, upload) == []
        async with http.put(url, data=data, headers=headers) as response:
            assert response.status == 200
    assert await asyncio.to_thread(store_of(app).received, upload) == [0]
    [unit] = plan_handover(upload.files)
    assert b"".join(store_of(app).unit_pieces(upload, unit)) == data


async def test_a_list_declared_before_the_stream_layout_is_declared_afresh(
    server: UploadServer,
) -> None:
    """An upload begun when each file had its own chunks (parts u<session>-<file>-<chunk>):
    its list is ignored, the page declares it again, and no old part passes for a new one."""
    app = current(server)
    case_id = await collecting_case(app, CHAT_A)
    link = await server.links().issue_link(case_id, "imaging", CHAT_A)
    upload = await session_of(app, link)
    wrapped = await _wrapped(app, case_id)
    old_list = {"next": 2, "files": [[0, "CD/a", 10, None, 0], [1, "CD/b", 10, None, 0]]}
    sealed = app.store.keys.encrypt_field(
        case_id, wrapped, json.dumps(old_list), f"upload-manifest/{upload.id}"
    )
    async with app.store.session() as session:
        await session.exec(
            update(UploadSessionRow)
            .where(col(UploadSessionRow.id) == upload.id)
            .values(manifest_enc=sealed, total_bytes=20)
        )
    for file_id in (0, 1):  # each old file's chunk 0
        with app.vault.writer(f"u{upload.id}-{file_id}-0", upload.key) as writer:
            writer.write(b"x" * 10)
    assert (await session_of(app, link)).files == ()
    files = [
        {"path": "CD/a", "size": 10, "modified": 0},
        {"path": "CD/b", "size": 10, "modified": 0},
    ]
    async with aiohttp.ClientSession() as http:
        status, answer = await declare(http, f"{server.base_url}/upload/api", bearer(link), files)
    assert status == 200 and answer["have"] == [] and answer["layout"] > 2
    assert not [name for name in vault_files(app) if name.startswith(f"u{upload.id}")]


async def test_a_hand_over_cut_by_a_restart_resumes_when_the_server_starts(
    server: UploadServer,
) -> None:
    app = current(server)
    case_id = await collecting_case(app, CHAT_A)
    link = await server.links().issue_link(case_id, "referral", CHAT_A)
    letter = pdf_bytes(["Referral, resumed"])
    async with aiohttp.ClientSession() as http:
        status, _ = await put_file(http, server.base_url, bearer(link), letter, "letter.pdf")
        assert status == 200
    # Every chunk is in and the upload is closed, then the bot stops before the hand-over.
    upload = await session_of(app, link)
    await UploadStore(app.store, app.vault, app.store.keys).start_finishing(upload)
    await server.stop()
    app = await server.start()

    async def complete() -> bool:
        return (await session_of(current(server), link)).state == "complete"

    await until(complete, 60, "the hand-over to resume")
    assert await count(app, FileRow, FileRow.case_id == case_id) == 1


def part_file(app: App, upload: UploadSession, index: int) -> Path:
    blob_id = upload.part(index)
    return app.vault.blobs_dir / blob_id[:2] / blob_id


def crash_damage(app: App, upload: UploadSession, short: int, zeroed: int) -> None:
    """What a machine crash may leave of parts that were never fsynced: one cut short, one
    the right size but zeros (the file system kept the size, not the data)."""
    cut = part_file(app, upload, short)
    os.truncate(cut, cut.stat().st_size // 2)
    zeros = part_file(app, upload, zeroed)
    zeros.write_bytes(bytes(zeros.stat().st_size))


async def imaging_link_and_study(
    server: UploadServer, tmp_path: Path
) -> tuple[str, str, str, dict[str, str], list[Path]]:
    """A collecting case with an upload link for its imaging item, and a 12-file study to
    send: (case id, link, the page's API, its headers, the files)."""
    case_id = await collecting_case(current(server), CHAT_A)
    link = await server.links().issue_link(case_id, "imaging", CHAT_A)
    sent = write_study(tmp_path / "CD", 12)
    return case_id, link, f"{server.base_url}/upload/api", bearer(link), sent


async def upload_study(
    http: aiohttp.ClientSession, api: str, headers: dict[str, str], sent: list[Path]
) -> tuple[list[dict[str, Any]], bytes]:
    """Declare the study as the page does and send every chunk; (the list, the stream)."""
    files = [{"path": f"CD/DICOM/{p.name}", "size": p.stat().st_size, "modified": 7} for p in sent]
    stream = b"".join(path.read_bytes() for path in sent)
    status, answer = await declare(http, api, headers, files)
    assert status == 200
    assert await put_stream(http, api, headers, answer, stream) == 200
    return files, stream


async def assert_case_holds(app: App, case_id: str, sent: list[Path]) -> None:
    """The case holds one ZIP (the CD) whose members are exactly the files sent."""
    async with app.store.reader() as session:
        files = (await session.exec(select(FileRow).where(FileRow.case_id == case_id))).all()
    assert len(files) == 1
    key = app.store.keys.case_key(case_id, await _wrapped(app, case_id))
    with app.vault.reader(files[0].blob_id, key) as reader, zipfile.ZipFile(reader) as archive:
        assert sorted(archive.namelist()) == sorted(f"DICOM/{path.name}" for path in sent)
        for path in sent:
            assert archive.read(f"DICOM/{path.name}") == path.read_bytes()


async def test_parts_a_machine_crash_damaged_are_found_on_resume_and_sent_again(
    server: UploadServer, tmp_path: Path
) -> None:
    """Parts are not fsynced: after a machine crash the bot (a new process, nothing in
    memory) trusts no part it did not write until its tags verify, so the page is told the
    damaged chunks are missing, sends only those, and the case gets the bytes sent."""
    app = current(server)
    case_id, link, api, headers, sent = await imaging_link_and_study(server, tmp_path)
    async with aiohttp.ClientSession() as http:
        files, stream = await upload_study(http, api, headers, sent)
    upload = await session_of(app, link)
    assert upload.chunks >= 6
    await server.stop()
    crash_damage(app, upload, short=1, zeroed=4)
    app = await server.start()
    server.chunk_puts = 0
    async with aiohttp.ClientSession() as http:
        # The page, reloaded, asks what is stored, then declares the same files again.
        async with http.get(f"{api}/status", headers=headers) as response:
            status = await response.json()
        damaged = upload.chunk_length(1) + upload.chunk_length(4)
        assert (status["state"], status["received"]) == ("open", len(stream) - damaged)
        assert not part_file(app, upload, 1).exists() and not part_file(app, upload, 4).exists()
        code, answer = await declare(http, api, headers, files)
        assert code == 200 and answer["layout"] == upload.layout
        assert answer["have"] == [i for i in range(upload.chunks) if i not in (1, 4)]
        assert await put_stream(http, api, headers, answer, stream) == 200
        assert server.chunk_puts == 2
        await finish_and_wait(http, api, headers)
    await assert_case_holds(app, case_id, sent)


async def test_a_damaged_part_found_by_the_hand_over_is_sent_again_not_handed_over(
    server: UploadServer, tmp_path: Path
) -> None:
    """The machine crashed after the page had sent everything and asked to finish: the
    resumed hand-over checks the parts first, hands nothing to the intake, and waits for the
    damaged chunks again (for a day at least); the page's finish then asks for them."""
    app = current(server)
    case_id, link, api, headers, sent = await imaging_link_and_study(server, tmp_path)
    async with aiohttp.ClientSession() as http:
        files, stream = await upload_study(http, api, headers, sent)
    upload = await session_of(app, link)
    assert await store_of(app).start_finishing(upload) == []
    await server.stop()
    crash_damage(app, upload, short=0, zeroed=upload.chunks - 1)
    app = await server.start()  # its start resumes the hand-over

    async def reopened() -> bool:
        return (await session_of(current(server), link)).state == "open"

    await until(reopened, 60, "the hand-over to find the damaged parts")
    assert await count(app, FileRow, FileRow.case_id == case_id) == 0
    assert (await session_of(app, link)).expires_at > utcnow() + timedelta(hours=23)
    missing = [0, upload.chunks - 1]
    async with aiohttp.ClientSession() as http:
        # The page was polling: its finish (sent again) answers what to send once more.
        async with http.post(f"{api}/finish", json={}, headers=headers) as response:
            assert await response.json() == {"state": "open", "missing": missing}
        code, answer = await declare(http, api, headers, files)
        assert code == 200
        assert answer["have"] == [i for i in range(upload.chunks) if i not in missing]
        assert await put_stream(http, api, headers, answer, stream) == 200
        await finish_and_wait(http, api, headers)
    await assert_case_holds(app, case_id, sent)


async def test_the_page_sends_again_a_chunk_a_machine_crash_damaged(
    server: UploadServer, tmp_path: Path
) -> None:
    """The machine crashes mid-upload, the page stays open: a chunk it was told is stored
    comes back damaged. The page carries on; its finish is answered with that chunk, which
    it sends again, and the case gets exactly the files picked."""
    executable = chromium()
    from playwright.async_api import async_playwright

    app = current(server)
    case_id = await collecting_case(app, CHAT_A)
    link = await server.links().issue_link(case_id, "imaging", CHAT_A)
    upload = await session_of(app, link)
    sent = write_study(tmp_path / "CD", 40)
    prefix = f"u{upload.id}-"

    async def parts_on_disk() -> bool:
        return len([name for name in vault_files(current(server)) if name.startswith(prefix)]) >= 6

    server.delay = 0.05
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=executable, headless=True)
        page = await browser.new_page(locale="en-US")
        try:
            await page.goto(link)
            await page.wait_for_selector("body[data-state=ready]")
            await page.set_input_files("#pick-folder", str(tmp_path / "CD"))
            await until(parts_on_disk, 60, "6 chunks stored")
            upload = await session_of(app, link)  # declared by now: the layout is known
            assert upload.chunks > 10
            await server.stop()
            crash_damage(app, upload, short=0, zeroed=2)  # acknowledged long before
            app = await server.start()
            await page.wait_for_selector("body[data-state=complete]", timeout=120_000)
        finally:
            await browser.close()
    puts = server.put_paths
    for index in (0, 2):
        assert puts.count(f"/upload/api/chunks/{upload.layout}/{index}") == 2
    await assert_case_holds(app, case_id, sent)


@pytest.mark.skipif(not CAN_NAME_FDS, reason="needs /proc to name a descriptor")
async def test_parts_are_not_fsynced_and_the_case_files_are(
    server: UploadServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Receiving chunks fsyncs nothing; the hand-over fsyncs the case's own blob (its file
    and its directory) before the upload completes."""
    app = current(server)
    case_id, link, api, headers, sent = await imaging_link_and_study(server, tmp_path)
    calls = fsynced_paths(monkeypatch)
    async with aiohttp.ClientSession() as http:
        await upload_study(http, api, headers, sent)
        upload = await session_of(app, link)
        assert len(vault_files(app)) >= upload.chunks  # the parts are there...
        assert calls == []  # ...and none was fsynced
        await finish_and_wait(http, api, headers)
    async with app.store.reader() as session:
        [blob_id] = (
            await session.exec(select(FileRow.blob_id).where(FileRow.case_id == case_id))
        ).all()
    tmp, blobs = str(app.vault.tmp_dir), str(app.vault.blobs_dir)
    assert any(call.startswith(f"{tmp}/{blob_id}.") for call in calls), calls
    assert f"{blobs}/{blob_id[:2]}" in calls
    assert not [call for call in calls if f"/u{upload.id}-" in call]
    await assert_case_holds(app, case_id, sent)


async def test_expired_forged_and_foreign_access_is_refused_and_stores_nothing(
    server: UploadServer,
) -> None:
    app = current(server)
    case_a = await collecting_case(app, CHAT_A)
    case_b = await collecting_case(app, CHAT_B, language="ar")
    links = server.links()
    expired = await links.issue_link(case_a, "imaging", CHAT_A)
    async with app.store.session() as session:
        await session.exec(
            update(UploadSessionRow)
            .where(
                col(UploadSessionRow.token_hash)
                == hashlib.sha256(expired.rsplit("/", 1)[1].encode()).hexdigest()
            )
            .values(expires_at=utcnow() - timedelta(minutes=1))
        )
    with pytest.raises(Exception, match="invalid"):  # B's case is not A's chat's to open
        await links.issue_link(case_b, "imaging", CHAT_A)
    before = (await count(app, FileRow), vault_files(app))
    api = f"{server.base_url}/upload/api"
    async with aiohttp.ClientSession() as http:
        # Expired: a clear page in the patient's language, and the API refuses.
        async with http.get(expired) as response:
            assert response.status == 410
            assert text(app, "expired") in await response.text()
        status, _ = await put_file(http, server.base_url, bearer(expired), b"%PDF-1.4", "a.pdf")
        assert status == 410
        # A made-up token, and one of the right shape: "not valid", in the default language.
        for bogus in ("nope", "A" * 43):
            async with http.get(f"{server.base_url}/upload/u/{bogus}") as response:
                assert response.status == 404
                assert text(app, "invalid") in await response.text()
        # Forged Mini App data: wrong signature, another bot's, stale, a changed user.
        fine = signed_init_data(CHAT_A)
        forged = [
            fine[:-4] + ("0000" if not fine.endswith("0000") else "1111"),
            signed_init_data(CHAT_A, bot_token="987654321:ANOTHER-bots-token_xyz"),
            signed_init_data(CHAT_A, auth_date=time.time() - 2 * 86400),
            fine.replace(f"%22id%22%3A{CHAT_A}", f"%22id%22%3A{CHAT_B}"),
        ]
        for init_data in forged:
            headers = {"Authorization": f"tma {init_data}"}
            async with http.get(f"{api}/status?case={case_a}", headers=headers) as response:
                assert response.status == 401, init_data
        # Genuine data of A, but B's case: A has no upload there.
        headers = {"Authorization": f"tma {fine}"}
        link_b = await links.issue_link(case_b, "imaging", CHAT_B)
        async with http.get(f"{api}/status?case={case_b}", headers=headers) as response:
            assert response.status == 401
        async with http.post(
            f"{api}/files?case={case_b}",
            json={"files": [{"path": "x.pdf", "size": 8, "modified": 0}]},
            headers=headers,
        ) as response:
            assert response.status == 401
        # A's link names A's case whatever the request says: "?case=" does not move it.
        a_link = await links.issue_link(case_a, "imaging", CHAT_A)
        async with http.post(
            f"{api}/files?case={case_b}",
            json={"files": [{"path": "x.pdf", "size": 8, "modified": 0}]},
            headers=bearer(a_link),
        ) as response:
            assert response.status == 200
        assert len((await session_of(app, a_link)).files) == 1
        # ... while B's own Mini App data reaches B's upload (and A's reaches nothing here).
        own = {"Authorization": f"tma {signed_init_data(CHAT_B)}"}
        async with http.get(f"{api}/status?case={case_b}", headers=own) as response:
            assert response.status == 200 and (await response.json())["state"] == "open"
        async with http.get(f"{server.base_url}/upload/app?case={case_b}") as response:
            page = await response.text()
            assert response.status == 200 and 'dir="rtl"' in page and 'lang="ar"' in page
            assert text(app, "title", "ar") in page
    assert (await count(app, FileRow), vault_files(app)) == before
    assert (await session_of(app, link_b)).files == ()


async def test_limits_headers_and_no_listing(server: UploadServer) -> None:
    app = current(server)
    case_id = await collecting_case(app, CHAT_A)
    link = await server.links().issue_link(case_id, "imaging", CHAT_A)
    api = f"{server.base_url}/upload/api"
    headers = bearer(link)
    async with aiohttp.ClientSession() as http:
        async with http.get(link) as response:
            assert response.status == 200
            csp = response.headers["Content-Security-Policy"]
            assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
            assert "unsafe-inline" not in csp
            assert response.headers["X-Content-Type-Options"] == "nosniff"
            assert response.headers["Referrer-Policy"] == "no-referrer"
            assert response.headers["Cache-Control"] == "no-store"
            assert "<script>" not in await response.text()  # no inline script
        async with http.get(f"{server.base_url}/upload/app?case={case_id}") as response:
            csp = response.headers["Content-Security-Policy"]
            assert "frame-ancestors https://web.telegram.org https://*.telegram.org" in csp
        for path in ("/upload/static/", "/upload/static/../upload.py", "/upload/", "/upload/u/"):
            async with http.get(server.base_url + path) as response:
                assert response.status == 404, path
        # Over the case's cap (4 GB by default): refused before a byte is sent.
        huge = [{"path": f"CD/f{i}", "size": 2 * 1024**3, "modified": 0} for i in range(3)]
        async with http.post(f"{api}/files", json={"files": huge}, headers=headers) as response:
            assert response.status == 413
        # Names are data: whatever the path, no file is created from it.
        async with http.post(
            f"{api}/files",
            json={"files": [{"path": "../../etc/passwd", "size": 10, "modified": 0}]},
            headers=headers,
        ) as response:
            assert response.status == 200
        # A chunk must be exactly as long as declared: shorter, longer, chunked: refused.
        upload = await session_of(app, link)
        chunk = f"{api}/chunks/{upload.layout}"
        for body in (b"x" * 9, b"x" * 11):
            async with http.put(f"{chunk}/0", data=body, headers=headers) as resp:
                assert resp.status == 400
        async with http.put(f"{chunk}/1", data=b"x" * 10, headers=headers) as resp:
            assert resp.status == 400

        async def chunked() -> AsyncIterator[bytes]:
            yield b"x" * 10

        async with http.put(f"{chunk}/0", data=chunked(), headers=headers) as resp:
            assert resp.status == 400
        async with http.put(f"{chunk}/0", data=b"x" * PART + b"x", headers=headers) as resp:
            assert resp.status == 400
        # A chunk for another layout (a list declared before, in another tab): refused.
        stale = f"{api}/chunks/{upload.layout - 1}/0"
        async with http.put(stale, data=b"x" * 10, headers=headers) as resp:
            assert resp.status == 409
    assert upload.files[0].path == "etc/passwd"
    assert not (app.vault.root.parent / "etc").exists()
    assert not [name for name in vault_files(app) if name.startswith(f"u{upload.id}")]
    assert os.listdir(app.vault.tmp_dir) == []


async def test_guessing_tokens_is_rate_limited_without_locking_patients_out(
    unproxied_server: UploadServer,
) -> None:
    """Ten wrong links from an address, then it waits (429); a good link still works. An
    X-Forwarded-For header is ignored from an address that is not a trusted proxy (here
    WEB_TRUSTED_PROXIES names none): each guess claims another address and all of them
    count against the connection's own."""
    server = unproxied_server
    app = current(server)
    case_id = await collecting_case(app, CHAT_A)
    link = await server.links().issue_link(case_id, "imaging", CHAT_A)
    async with aiohttp.ClientSession() as http:
        statuses = []
        for attempt in range(14):
            url = f"{server.base_url}/upload/u/{'B' * 42}{attempt:02d}"
            claimed = {"X-Forwarded-For": f"198.51.100.{attempt}"}
            async with http.get(url, headers=claimed) as response:
                statuses.append(response.status)
        assert statuses[:10] == [404] * 10
        assert statuses[-1] == 429
        wrong = {"Authorization": "Bearer " + "C" * 43}
        async with http.get(f"{server.base_url}/upload/api/status", headers=wrong) as response:
            assert response.status == 429 and "Retry-After" in response.headers
        # Behind a proxy every patient shares an address: a real link still works.
        async with http.get(link) as response:
            assert response.status == 200
        async with http.get(f"{server.base_url}/upload/api/status", headers=bearer(link)) as resp:
            assert resp.status == 200


async def test_behind_a_trusted_proxy_each_address_has_its_own_budget(tmp_path: Path) -> None:
    """With WEB_TRUSTED_PROXIES naming the proxy (127.0.0.1 here: the test's requests stand
    for the proxy's), the limits count the address the proxy put last in X-Forwarded-For:
    a stranger guessing links from one address is held back while another address is not,
    and an address the stranger writes to the left of the proxy's entry buys nothing. The
    setting takes addresses and networks (by default this machine's), and refuses anything
    else."""
    assert Settings(data_dir=tmp_path).web_trusted_proxies == ("127.0.0.1/32", "::1/128")
    assert Settings(data_dir=tmp_path, web_trusted_proxies="").web_trusted_proxies == ()
    async for server in serving(tmp_path, PART, web_trusted_proxies="127.0.0.1, 10.0.0.0/8"):
        assert server.settings.web_trusted_proxies == ("127.0.0.1/32", "10.0.0.0/8")
        async with aiohttp.ClientSession() as http:

            async def guess(forwarded: str, attempt: int, base: str = server.base_url) -> int:
                url = f"{base}/upload/u/{'B' * 42}{attempt:02d}"
                async with http.get(url, headers={"X-Forwarded-For": forwarded}) as response:
                    return response.status

            statuses = [await guess("203.0.113.7", attempt) for attempt in range(11)]
            assert statuses == [404] * 10 + [429]
            # Claiming another address in front of the proxy's entry: still the same one.
            assert await guess("198.51.100.1, 203.0.113.7", 11) == 429
            # A second trusted proxy between them (10.0.0.5) is looked past.
            assert await guess("203.0.113.7, 10.0.0.5", 12) == 429
            assert await guess("198.51.100.20", 13) == 404  # another patient: untouched
    with pytest.raises(ValidationError):
        Settings(data_dir=tmp_path, web_trusted_proxies="127.0.0.1,proxy.example.org")


def test_init_data_is_checked_as_telegram_documents() -> None:
    now = time.time()
    assert check_init_data(signed_init_data(42, auth_date=now), BOT_TOKEN, now) == 42
    assert check_init_data(signed_init_data(42, auth_date=now), BOT_TOKEN[:-1] + "x", now) is None
    old = signed_init_data(42, auth_date=now - 90_000)
    assert check_init_data(old, BOT_TOKEN, now) is None
    assert check_init_data(old, BOT_TOKEN, now, max_age=100_000) == 42
    future = signed_init_data(42, auth_date=now + 3600)
    assert check_init_data(future, BOT_TOKEN, now) is None
    assert check_init_data("", BOT_TOKEN, now) is None
    assert check_init_data("hash=" + "0" * 64, BOT_TOKEN, now) is None
    doubled = signed_init_data(42, auth_date=now) + "&user=%7B%22id%22%3A7%7D"
    assert check_init_data(doubled, BOT_TOKEN, now) is None


def test_a_folder_becomes_one_zip_and_many_loose_files_too() -> None:
    folder = [ManifestFile(f"CD/DICOM/IM{i}", 10, None, 0, 10 * i) for i in range(3)]
    loose = [ManifestFile(f"scan{i}.pdf", 10, "application/pdf", 0, 30 + 10 * i) for i in range(2)]
    units = plan_handover(folder + loose)
    assert [(u.name, u.zipped, len(u.files)) for u in units] == [
        ("CD.zip", True, 3),
        ("scan0.pdf", False, 1),
        ("scan1.pdf", False, 1),
    ]
    many = [ManifestFile(f"IM{i}.dcm", 10, None, 0, 10 * i) for i in range(40)]
    assert [(u.name, u.zipped) for u in plan_handover(many)] == [("files.zip", True)]


async def test_the_sweep_expires_uploads_and_clears_what_an_erasure_left(
    server: UploadServer,
) -> None:
    app = current(server)
    store = UploadStore(app.store, app.vault, app.store.keys)
    sessions = {}
    for chat_id in (CHAT_A, CHAT_B):
        case_id = await collecting_case(app, chat_id)
        link = await server.links().issue_link(case_id, "imaging", chat_id)
        async with aiohttp.ClientSession() as http:
            api = f"{server.base_url}/upload/api"
            declared = [{"path": "CD/IM1", "size": 2 * PART, "modified": 0}]
            status, answer = await declare(http, api, bearer(link), declared)
            assert status == 200
            async with http.put(
                f"{api}/chunks/{answer['layout']}/0", data=b"\0" * PART, headers=bearer(link)
            ) as response:
                assert response.status == 200
        sessions[chat_id] = (case_id, link, await session_of(app, link))
    assert all(app.vault.exists(s.part(0)) for _, _, s in sessions.values())
    # `care-companion verify` meanwhile: the chunks are the uploads', not orphans.
    report = await verify_all(app.store, app.vault, app.store.keys)
    assert report.ok and report.upload_chunks == 2, report.format()
    # A's link runs out; B's case is crypto-erased (its key is gone, its upload unreadable).
    async with app.store.session() as session:
        await session.exec(
            update(UploadSessionRow)
            .where(col(UploadSessionRow.id) == sessions[CHAT_A][2].id)
            .values(expires_at=utcnow() - timedelta(seconds=1))
        )
    async with app.store.transaction() as tx:
        await tx.erase_case(sessions[CHAT_B][0], None)
    assert await store.sweep() == 2
    assert not any(app.vault.exists(s.part(0)) for _, _, s in sessions.values())
    async with app.store.reader() as session:
        rows = (await session.exec(select(UploadSessionRow))).all()
    assert [(row.id, row.state, row.manifest_enc) for row in rows] == [
        (sessions[CHAT_A][2].id, "expired", None)
    ]
    async with aiohttp.ClientSession() as http, http.get(sessions[CHAT_A][1]) as response:
        assert response.status == 410
        assert text(app, "expired") in await response.text()


async def test_the_mini_app_page_uploads_with_telegrams_signed_data(
    server: UploadServer, tmp_path: Path
) -> None:
    executable = chromium()
    from playwright.async_api import async_playwright

    app = current(server)
    case_id = await collecting_case(app, CHAT_B, language="es")
    await server.links().issue_link(case_id, "referral", CHAT_B)
    letter = tmp_path / "carta.pdf"
    letter.write_bytes(pdf_bytes(["Carta de derivación"]))
    app_url = f"{server.base_url}/upload/app?case={case_id}"
    launch = urlencode({"tgWebAppData": signed_init_data(CHAT_B), "tgWebAppVersion": "8.0"})
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=executable, headless=True)
        try:
            # Opened outside Telegram (no launch data): it says where to open it.
            page = await browser.new_page()
            await page.goto(app_url)
            await page.wait_for_selector("body[data-state=refused]")
            assert await page.inner_text("#notice") == text(app, "open_in_telegram", "es")
            # As Telegram opens it: the signed data in the fragment.
            page = await browser.new_page()
            await page.goto(f"{app_url}#{launch}")
            await page.wait_for_selector("body[data-state=ready]")
            assert await page.inner_text("h1") == text(app, "title", "es")
            await page.set_input_files("#pick-files", str(letter))
            await page.wait_for_selector("body[data-state=complete]", timeout=60_000)
        finally:
            await browser.close()
    async with app.store.reader() as session:
        files = (await session.exec(select(FileRow).where(FileRow.case_id == case_id))).all()
    assert [(f.item_key, f.size) for f in files] == [("referral", letter.stat().st_size)]
