"""Web upload benchmark: `python bench/upload_bench.py [--quick | --mb N]` from the project root.

Generates a study (DICOM files of 4 MiB with random pixels, 1 GiB by default, 50 MiB with
--quick) and, in the same run, over loopback:

* `curl -T` of the files to a trivial aiohttp sink that reads and drops the bytes: the
  baseline (goal: the upload endpoint at >= 0.7x its throughput);
* this script's client, speaking the page's protocol (8 MiB chunks, 3 in flight), to the
  same sink: what the client itself costs;
* the same client to the real upload sub-app (bot.upload) on a real App: every chunk
  encrypted into its own vault blob and fsynced before it is acknowledged;
* the hand-over that follows (the folder as one ZIP through the intake: checks, members),
  timed apart: it is not part of the upload the patient waits on with the page open.

Servers run in their own processes; their peak RSS (VmHWM) is printed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

FILE_BYTES = 4 * 1024 * 1024  # pixel data per DICOM file
PARALLEL = 3  # as the page
MIB = 1024 * 1024


# -- servers (run as subprocesses of this script) --------------------------------------------


def serve_sink(port: int, durable: bool) -> None:
    """Reads each body and drops it; `durable`: writes it to a file and fsyncs first (the
    same durability as the upload, without encryption, names or checks)."""
    from aiohttp import web

    spool = Path(tempfile.mkdtemp(prefix="sink-"))
    count = 0

    async def sink(request: web.Request) -> web.Response:
        nonlocal count
        if not durable:
            async for _ in request.content.iter_chunked(MIB):
                pass
            return web.json_response({"ok": True})
        count += 1
        fd = os.open(spool / str(count), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            async for piece in request.content.iter_chunked(MIB):
                await asyncio.to_thread(os.write, fd, piece)
            await asyncio.to_thread(os.fsync, fd)
        finally:
            os.close(fd)
        return web.json_response({"ok": True})

    async def main() -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", sink)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        print("ready", flush=True)
        await asyncio.Event().wait()

    try:
        asyncio.run(main())
    finally:
        shutil.rmtree(spool, ignore_errors=True)


def serve_upload(data_dir: Path, port: int) -> None:
    import logging

    from aiohttp import web
    from sqlmodel import select

    from adapters.tables import CaseRow
    from bot.app import build_app, prepare
    from bot.settings import Settings
    from bot.upload import ScrubbedAccessLogger, UploadLinks, make_upload_app
    from core.events import Event, EventKind
    from core.ports import Patient

    logging.basicConfig(level=logging.WARNING)
    settings = Settings(data_dir=data_dir, bot_token="123456:BENCH-token_abcdefghijklmnop")  # noqa: S106
    prepare(settings)

    async def main() -> None:
        app = build_app(settings)
        patient = Patient(4242, 4242, "en")
        events = [
            Event(EventKind.START),
            Event(EventKind.AGREE),
            Event(EventKind.CHOOSE_PROCEDURE, "general"),
            Event(EventKind.TEXT, "Ann Example"),
            Event(EventKind.TEXT, "31.01.1980"),
        ]
        for update_id, event in enumerate(events, 1):
            await app.service.handle(patient, event, update_id)
        async with app.store.reader() as session:
            case = (await session.exec(select(CaseRow).where(CaseRow.chat_id == 4242))).one()
        base = f"http://127.0.0.1:{port}"
        link = await UploadLinks(app, settings, base_url=base).issue_link(case.id, "imaging", 4242)
        root = web.Application()
        root.add_subapp("/upload/", make_upload_app(app, settings))
        runner = web.AppRunner(root, access_log_class=ScrubbedAccessLogger)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        print(link, flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def start(*args: str) -> tuple[subprocess.Popen[str], str]:
    process = subprocess.Popen(
        [sys.executable, __file__, *args], stdout=subprocess.PIPE, text=True, cwd=ROOT
    )
    assert process.stdout is not None
    first = process.stdout.readline().strip()
    if not first:
        raise SystemExit(f"server {args[0]} did not start")
    return process, first


def start_sink(flag: str) -> tuple[subprocess.Popen[str], str]:
    port = free_port()
    process, _ = start(flag, str(port))
    wait_for_port(port)
    return process, f"http://127.0.0.1:{port}/sink"


def stop(process: subprocess.Popen[str]) -> None:
    process.terminate()
    process.wait()


def wait_for_port(port: int) -> None:
    """A server prints before it listens; connect until it does."""
    import socket

    for _ in range(400):
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port)):
            return
        time.sleep(0.05)
    raise SystemExit(f"nothing listens on port {port}")


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# -- the study ---------------------------------------------------------------------------------


def write_study(folder: Path, total_mib: int) -> list[Path]:
    from pydicom import dcmread
    from pydicom.data import get_testdata_file
    from pydicom.uid import generate_uid

    template = dcmread(str(get_testdata_file("CT_small.dcm")))
    template.Rows, template.Columns = 1024, FILE_BYTES // 2048  # 16-bit pixels
    study, series = generate_uid(), generate_uid()
    (folder / "DICOM").mkdir(parents=True)
    paths = []
    for number in range(max(1, total_mib * MIB // FILE_BYTES)):
        dataset = copy.deepcopy(template)
        dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        dataset.StudyInstanceUID, dataset.SeriesInstanceUID = study, series
        dataset.InstanceNumber = number + 1
        dataset.PixelData = os.urandom(FILE_BYTES)
        path = folder / "DICOM" / f"IM{number:05d}"
        dataset.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


# -- clients -------------------------------------------------------------------------------------


def curl_upload(paths: list[Path], url: str) -> float:
    started = time.perf_counter()
    subprocess.run(
        [
            "curl",
            "-sS",
            "--fail",
            "-o",
            "/dev/null",
            "-H",
            "Expect:",
            "-T",
            "{" + ",".join(map(str, paths)) + "}",
            url + "/",
        ],
        check=True,
    )
    return time.perf_counter() - started


async def protocol_upload(paths: list[Path], api: str, token: str | None) -> float:
    """The page's protocol: declare the files, then PUT 8 MiB chunks, 3 in flight."""
    import aiohttp

    from adapters.uploads import PART_SIZE

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    manifest = [
        {"path": f"CD/DICOM/{p.name}", "size": p.stat().st_size, "modified": 0} for p in paths
    ]
    started = time.perf_counter()
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{api}/files", json={"files": manifest}, headers=headers) as resp:
            resp.raise_for_status()
            ids = (
                [f["id"] for f in (await resp.json())["files"]]
                if token
                else list(range(len(paths)))
            )
        queue = [
            (path, file_id, index)
            for path, file_id in zip(paths, ids, strict=True)
            for index in range(-(-path.stat().st_size // PART_SIZE))
        ]

        def read(path: Path, index: int) -> bytes:
            with path.open("rb") as handle:
                handle.seek(index * PART_SIZE)
                return handle.read(PART_SIZE)

        async def worker() -> None:
            while queue:
                path, file_id, index = queue.pop(0)
                body = await asyncio.to_thread(read, path, index)
                url = f"{api}/files/{file_id}/chunks/{index}"
                async with http.put(url, data=body, headers=headers) as resp:
                    resp.raise_for_status()

        await asyncio.gather(*(worker() for _ in range(PARALLEL)))
    return time.perf_counter() - started


async def hand_over(api: str, token: str) -> float:
    import aiohttp

    headers = {"Authorization": f"Bearer {token}"}
    started = time.perf_counter()
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{api}/finish", json={}, headers=headers) as resp:
            resp.raise_for_status()
        while True:
            async with http.get(f"{api}/status", headers=headers) as resp:
                if (await resp.json())["state"] == "complete":
                    return time.perf_counter() - started
            await asyncio.sleep(0.2)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a 50 MiB study")
    parser.add_argument("--mb", type=int, default=1024, help="study size in MiB")
    parser.add_argument("--sink", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--durable-sink", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--serve", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.sink or args.durable_sink:
        serve_sink(args.sink or args.durable_sink, durable=bool(args.durable_sink))
        return 0
    if args.serve:
        serve_upload(Path(args.serve[0]), int(args.serve[1]))
        return 0
    if shutil.which("curl") is None:
        raise SystemExit("curl is needed for the baseline (apt-get install curl)")
    size_mib = 50 if args.quick else args.mb

    work = Path(tempfile.mkdtemp(prefix="upload-bench-", dir=os.environ.get("TMPDIR")))
    try:
        paths = write_study(work / "CD", size_mib)
        total = sum(p.stat().st_size for p in paths)
        print(f"study: {len(paths)} DICOM files, {total / MIB:.0f} MiB (random pixels)")
        print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start")

        def phase(run: Callable[[], float]) -> float:
            os.sync()  # each phase starts with no dirty pages left by the one before
            return run()

        sink, sink_url = start_sink("--sink")
        try:
            curl_s = phase(lambda: curl_upload(paths, sink_url))
            client_s = phase(lambda: asyncio.run(protocol_upload(paths, sink_url, None)))
            sink_rss = peak_rss_mib(sink.pid)
        finally:
            stop(sink)
        durable, durable_url = start_sink("--durable-sink")
        try:
            curl_durable_s = phase(lambda: curl_upload(paths, durable_url))
        finally:
            stop(durable)

        port = free_port()
        server, link = start("--serve", str(work / "data"), str(port))
        try:
            wait_for_port(port)
            rss_idle = peak_rss_mib(server.pid)
            api, token = f"http://127.0.0.1:{port}/upload/api", link.rsplit("/", 1)[1]
            upload_s = phase(lambda: asyncio.run(protocol_upload(paths, api, token)))
            rss_upload = peak_rss_mib(server.pid)
            handover_s = asyncio.run(hand_over(api, token))
            rss_handover = peak_rss_mib(server.pid)
        finally:
            stop(server)

        def rate(seconds: float) -> str:
            return f"{total / MIB / seconds:5.0f} MiB/s ({seconds:6.2f} s)"

        print(f"curl -> sink (drops the bytes)        {rate(curl_s)}")
        print(f"curl -> durable sink (write + fsync)  {rate(curl_durable_s)}")
        print(f"page protocol -> sink                 {rate(client_s)}")
        print(f"page protocol -> upload endpoint      {rate(upload_s)}")
        print(
            f"ratios of the upload endpoint: {curl_s / upload_s:.2f}x curl to the sink "
            f"(goal >= 0.7x), {curl_durable_s / upload_s:.2f}x curl to the durable sink, "
            f"{client_s / upload_s:.2f}x the same client to the sink"
        )
        print(
            f"peak RSS: upload server {rss_idle:.0f} MiB idle, {rss_upload:.0f} MiB after the "
            f"upload, {rss_handover:.0f} MiB after the hand-over; sink {sink_rss:.0f} MiB"
        )
        print(f"load average {os.getloadavg()[0]:.1f} at the end")
        print(
            f"hand-over (the folder as one ZIP: intake checks, scans unpacked): "
            f"{handover_s:.2f} s = {total / MIB / handover_s:.0f} MiB/s"
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
