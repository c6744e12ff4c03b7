"""Web upload benchmark: `python bench/upload_bench.py [--quick | --mb N] [--rounds R]
[--file-kb K] [--compare REV]`.

Generates a study (DICOM files of 4 MiB with random pixels, 1 GiB by default, 50 MiB with
--quick; --file-kb 512 for files the size of a CT's slices) and, in each round, side by side
over loopback:

* `curl -T` of the files to a trivial aiohttp sink that reads and drops the bytes: the
  baseline (goal: the upload endpoint at >= 0.7x its throughput);
* `curl -T` of the files to a durable sink that writes each body to a file and fsyncs it
  before answering (no encryption, names or checks);
* `dd bs=1M conv=fsync` of the same bytes into one file: what this disk takes durably with
  one fsync at the end and no network at all, the ceiling for anything that must store them;
* as many bytes written from memory past the page cache (O_DIRECT) 4 MiB at a time, as the
  vault writes the upload's parts (not fsynced): the disk's own speed, a ceiling for the
  upload endpoint, which must write every byte it is sent;
* the page's protocol (the chunks the server asks for, PARALLEL in flight) sent by curl to
  the trivial sink: what the protocol itself costs, with a client as fast as curl; and to
  the durable sink: the same chunks stored and fsynced, without encryption or the vault;
* the same to the real upload sub-app (bot.upload) on a real App: every chunk encrypted into
  its own vault blob (not fsynced: see adapters.uploads) before it is acknowledged;
* the same to that sub-app with the vault's writes dropped (the chunks sealed, the sealed
  blocks not written: a reference, not a product mode): what writing every byte to the disk
  costs the endpoint;
* with --compare REV, the same again to the upload sub-app as of git revision REV (its tree
  extracted with `git archive`, run on this venv and the compiled catalogs): before and after
  a change, side by side in one run;
* after the last round, the hand-over that follows (the folder as one ZIP through the
  intake: checks, members), timed apart: the patient does not wait on it with the page open.

Ratios are taken within each round and the median over the rounds is printed, so load from
elsewhere on the machine moves both sides of a ratio alike. Servers run in their own
processes; their peak RSS (VmHWM) is printed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import json
import math
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.revision import extract_revision  # noqa: E402

FILE_BYTES = 4 * 1024 * 1024  # pixel data per DICOM file
PARALLEL = 3  # as the page
MIB = 1024 * 1024


# -- servers (run as subprocesses of this script) --------------------------------------------


def serve_sink(port: int, durable: bool) -> None:
    """Reads each body and drops it; `durable`: writes it to a file and fsyncs first (the
    durability the upload had when it fsynced each chunk, without encryption or checks), then
    deletes the file (what is measured is done; a run would otherwise leave GiBs behind)."""
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
        path = spool / str(count)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            async for piece in request.content.iter_chunked(MIB):
                await asyncio.to_thread(os.write, fd, piece)
            await asyncio.to_thread(os.fsync, fd)
        finally:
            os.close(fd)
            path.unlink()
        return web.json_response({"ok": True})

    async def main() -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", sink)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        print("ready", flush=True)
        await asyncio.Event().wait()

    # stop() ends a server with SIGTERM: as an exit, so that the spool is removed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        asyncio.run(main())
    finally:
        shutil.rmtree(spool, ignore_errors=True)


def serve_upload(data_dir: Path, port: int, cases: int, unstored: bool = False) -> None:
    """The upload sub-app on the bot's own server set-up (bot.web.start_server); prints one
    link per case (a link serves one upload: each round needs its own). `unstored`: a
    reference, not the product: the vault seals every chunk as always but drops the sealed
    blocks instead of writing them to the disk (the parts it keeps are then short and could
    not be handed over): what the endpoint would reach if writing cost nothing."""
    import logging

    from aiohttp import web
    from sqlmodel import select

    from adapters.tables import CaseRow
    from bot.app import build_app, prepare
    from bot.polling import set_aside_startup_objects
    from bot.settings import Settings
    from bot.upload import UploadLinks, make_upload_app
    from bot.web import start_server
    from core.events import Event, EventKind
    from core.ports import Patient

    logging.basicConfig(level=logging.WARNING)
    if unstored:
        from adapters.vault import BlobWriter

        def dropped(self: BlobWriter, blocks: memoryview) -> None:
            """In place of BlobWriter._write_blocks: every whole block, sealed, goes nowhere."""

        BlobWriter._write_blocks = dropped  # type: ignore[method-assign]  # the reference's point
    settings = Settings(data_dir=data_dir, bot_token="123456:BENCH-token_abcdefghijklmnop")  # noqa: S106
    prepare(settings)

    async def main() -> None:
        app = build_app(settings)
        links = UploadLinks(app, settings, base_url=f"http://127.0.0.1:{port}")
        issued = []
        for chat_id in range(4242, 4242 + cases):
            patient = Patient(chat_id, chat_id, "en")
            events = [
                Event(EventKind.START),
                Event(EventKind.AGREE),
                Event(EventKind.CHOOSE_PROCEDURE, "general"),
                Event(EventKind.TEXT, "Ann Example"),
                Event(EventKind.TEXT, "31.01.1980"),
            ]
            for update_id, event in enumerate(events, chat_id * 10):
                await app.service.handle(patient, event, update_id)
            async with app.store.reader() as session:
                query = select(CaseRow).where(CaseRow.chat_id == chat_id)
                case = (await session.exec(query)).one()
            issued.append(await links.issue_link(case.id, "imaging", chat_id))
        root = web.Application()
        root.add_subapp("/upload/", make_upload_app(app, settings))
        await start_server(root, "127.0.0.1", port)
        set_aside_startup_objects()  # as the bot does once it serves (bot.polling.serve)
        print(" ".join(issued), flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())


def cpu_seconds(pid: int) -> float:
    """User and system time the process has used so far (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children_cpu() -> float:
    """User and system time of this script's finished child processes (curl, dd, cat)."""
    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    return used.ru_utime + used.ru_stime


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def start(*args: str, root: Path = ROOT) -> tuple[subprocess.Popen[str], str]:
    """This script (as of `root`'s tree) with `args`, and the first line it prints."""
    script = root / Path(__file__).relative_to(ROOT)
    process = subprocess.Popen(
        [sys.executable, script, *args], stdout=subprocess.PIPE, text=True, cwd=root
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


def start_upload(
    flag: str, data_dir: Path, rounds: int, root: Path = ROOT
) -> tuple[subprocess.Popen[str], str, list[str]]:
    """An upload server (`flag`: --serve or --serve-unstored) as of `root`'s tree, once it
    listens: the process, its API's URL and one link's token per round."""
    port = free_port()
    process, links = start(flag, str(data_dir), str(port), str(rounds), root=root)
    wait_for_port(port)
    tokens = [link.rsplit("/", 1)[1] for link in links.split()]
    return process, f"http://127.0.0.1:{port}/upload/api", tokens


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


def write_study(folder: Path, total_mib: int, file_bytes: int = FILE_BYTES) -> list[Path]:
    from pydicom import dcmread
    from pydicom.data import get_testdata_file
    from pydicom.uid import generate_uid

    template = dcmread(str(get_testdata_file("CT_small.dcm")))
    template.Rows, template.Columns = 1024, file_bytes // 2048  # 16-bit pixels
    study, series = generate_uid(), generate_uid()
    (folder / "DICOM").mkdir(parents=True)
    paths = []
    for number in range(max(1, total_mib * MIB // file_bytes)):
        dataset = copy.deepcopy(template)
        dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        dataset.StudyInstanceUID, dataset.SeriesInstanceUID = study, series
        dataset.InstanceNumber = number + 1
        dataset.PixelData = os.urandom(file_bytes)
        path = folder / "DICOM" / f"IM{number:05d}"
        dataset.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


# -- clients -------------------------------------------------------------------------------------


def curl(*args: str) -> None:
    subprocess.run(
        ["curl", "-sS", "--no-progress-meter", "--fail", "-H", "Expect:", *args], check=True
    )


def curl_upload(paths: list[Path], url: str) -> float:
    """Each file in its own PUT, one after the other on one connection."""
    started = time.perf_counter()
    curl("-o", "/dev/null", "-T", "{" + ",".join(map(str, paths)) + "}", url + "/")
    return time.perf_counter() - started


def dd_copy(paths: list[Path], target: Path) -> float:
    """The same bytes into one file with a plain `dd conv=fsync`: no network, no crypto."""
    started = time.perf_counter()
    with subprocess.Popen(["cat", *map(str, paths)], stdout=subprocess.PIPE) as cat:
        subprocess.run(
            ["dd", f"of={target}", "bs=1M", "iflag=fullblock", "conv=fsync", "status=none"],
            stdin=cat.stdout,
            check=True,
        )
    elapsed = time.perf_counter() - started
    target.unlink()
    return elapsed


def direct_writes(size: int, target: Path) -> float:
    """`size` bytes (rounded up to 4 MiB) written past the page cache, 4 MiB at a time from
    one page-aligned buffer: the disk's speed for the vault's writes, with nothing to read,
    receive or encrypt."""
    import mmap

    block = 4 * MIB
    buffer = mmap.mmap(-1, block)
    buffer.write(os.urandom(block))
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o600)
    try:
        started = time.perf_counter()
        for _ in range(-(-size // block)):
            os.write(fd, buffer)
        elapsed = time.perf_counter() - started
    finally:
        os.close(fd)
        target.unlink()
        buffer.close()
    return elapsed


def manifest(paths: list[Path]) -> list[dict[str, Any]]:
    return [{"path": f"CD/DICOM/{p.name}", "size": p.stat().st_size, "modified": 0} for p in paths]


FIRST_LAYOUT = 1  # the layout number of a fresh upload's first file list


def cut_chunks(paths: list[Path], folder: Path) -> list[tuple[str, Path]]:
    """The page's chunks of the study, as (URL below the API, file holding the body): the
    files as one stream cut every PART_SIZE bytes, as the server lays out a fresh upload.
    Cut into files here, before any clock runs (a browser sends slices of the picked files
    without copying them)."""
    from adapters.uploads import PART_SIZE

    folder.mkdir(exist_ok=True)
    bodies: list[tuple[str, Path]] = []
    pending = bytearray()

    def flush(final: bool) -> None:
        while len(pending) >= PART_SIZE or (final and pending):
            body = folder / str(len(bodies))
            body.write_bytes(pending[:PART_SIZE])
            del pending[:PART_SIZE]
            bodies.append((f"chunks/{FIRST_LAYOUT}/{len(bodies)}", body))

    for path in paths:
        with path.open("rb") as source:
            while piece := source.read(MIB):
                pending += piece
                flush(final=False)
    flush(final=True)
    return bodies


def protocol_upload(
    files: list[dict[str, Any]], bodies: list[tuple[str, Path]], api: str, token: str | None
) -> float:
    """The page's protocol, sent by curl: declare the files, then PUT every chunk, PARALLEL
    at a time (one curl, --parallel), each on a connection of its own as a browser opens
    them (--parallel-immediate: without it curl waits for a connection it could reuse,
    which a chunk's connection closed after its answer never is, so it sent the chunks one
    at a time). With a token (the real endpoint), the answer to the declaration must be
    the layout the chunks were cut for."""
    from adapters.uploads import PART_SIZE

    auth = ["-H", f"Authorization: Bearer {token}"] if token else []
    config = Path(tempfile.mkstemp(prefix="upload-bench-", suffix=".curl")[1])
    answer = config.with_suffix(".json")
    config.write_text(
        "".join(
            f'url = "{api}/{url}"\nupload-file = "{body}"\noutput = "/dev/null"\n'
            for url, body in bodies
        )
    )
    try:
        started = time.perf_counter()
        declared = json.dumps({"files": files})
        curl(
            "-o",
            str(answer),
            *auth,
            "-H",
            "Content-Type: application/json",
            "--data-binary",
            declared,
            f"{api}/files",
        )
        if token:
            layout = json.loads(answer.read_text())
            if (layout["layout"], layout["part_size"]) != (FIRST_LAYOUT, PART_SIZE):
                raise SystemExit(f"unexpected layout {layout['layout']}, {layout['part_size']}")
        curl(
            "-Z", "--parallel-immediate", "--parallel-max", str(PARALLEL), *auth, "-K", str(config)
        )
        return time.perf_counter() - started
    finally:
        config.unlink()
        answer.unlink(missing_ok=True)


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
    parser.add_argument("--rounds", type=int, default=3, help="rounds of every measure")
    parser.add_argument("--file-kb", type=int, default=FILE_BYTES // 1024, help="pixels per file")
    parser.add_argument("--compare", metavar="REV", help="also the endpoint as of git REV")
    parser.add_argument("--sink", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--durable-sink", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--serve", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--serve-unstored", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.sink or args.durable_sink:
        serve_sink(args.sink or args.durable_sink, durable=bool(args.durable_sink))
        return 0
    if args.serve or args.serve_unstored:
        data_dir, port, cases = args.serve or args.serve_unstored
        serve_upload(Path(data_dir), int(port), int(cases), unstored=bool(args.serve_unstored))
        return 0
    for tool in ("curl", "dd", "cat"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is needed for the baselines")
    size_mib = 50 if args.quick else args.mb

    work = Path(tempfile.mkdtemp(prefix="upload-bench-", dir=os.environ.get("TMPDIR")))
    servers: list[subprocess.Popen[str]] = []
    try:
        paths = write_study(work / "CD", size_mib, args.file_kb * 1024)
        total = sum(p.stat().st_size for p in paths)
        gib = total / 1024**3
        files = manifest(paths)
        bodies = cut_chunks(paths, work / "chunks")
        print(
            f"study: {len(paths)} DICOM files, {total / MIB:.0f} MiB (random pixels), "
            f"{len(bodies)} chunks; {args.rounds} rounds"
        )
        print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start")

        sink, sink_url = start_sink("--sink")
        durable, durable_url = start_sink("--durable-sink")
        server, api, tokens = start_upload("--serve", work / "data", args.rounds)
        servers += [sink, durable, server]
        rss_idle = peak_rss_mib(server.pid)
        unstored, unstored_api, unstored_tokens = start_upload(
            "--serve-unstored", work / "data-unstored", args.rounds
        )
        servers.append(unstored)
        before_api, before_tokens = "", [""] * args.rounds
        if args.compare:
            old_root = extract_revision(args.compare, work / "before")
            before, before_api, before_tokens = start_upload(
                "--serve", work / "data-before", args.rounds, root=old_root
            )
            servers.append(before)

        def timed(run: Callable[[], float]) -> float:
            os.sync()  # each measure starts with no dirty pages left by the one before
            return run()

        # CPU time per GiB of each measure's server and of its client (curl, or dd and cat):
        # what each path costs, whatever the load from elsewhere (which moves wall-clock
        # times a lot on a shared machine), and on two cores the bound of what a path can
        # reach beside another.
        cpu: dict[str, list[tuple[float, float]]] = {}

        def costed(name: str, pid: int | None, run: Callable[[], float]) -> Callable[[], float]:
            """`run` with its CPU time counted; `pid`: its server (None: it has none)."""

            def measure() -> float:
                server_before, client_before = cpu_seconds(pid) if pid else 0.0, children_cpu()
                elapsed = run()
                server = cpu_seconds(pid) - server_before if pid else math.nan
                client = children_cpu() - client_before
                cpu.setdefault(name, []).append((server / gib, client / gib))
                return elapsed

            return measure

        rounds: list[dict[str, float]] = []
        for number, (token, unstored_token, before_token) in enumerate(
            zip(tokens, unstored_tokens, before_tokens, strict=True)
        ):
            measures: dict[str, Callable[[], float]] = {
                "curl": costed("curl", sink.pid, lambda: curl_upload(paths, sink_url)),
                "durable": costed("durable", durable.pid, lambda: curl_upload(paths, durable_url)),
                "dd": costed("dd", None, lambda: dd_copy(paths, work / "dd-copy")),
                "direct": lambda: direct_writes(total, work / "direct"),  # in this process
                "client": costed(
                    "client", sink.pid, lambda: protocol_upload(files, bodies, sink_url, None)
                ),
                "client_durable": costed(
                    "client_durable",
                    durable.pid,
                    lambda: protocol_upload(files, bodies, durable_url, None),
                ),
                "upload": costed(
                    "upload",
                    server.pid,
                    lambda: protocol_upload(files, bodies, api, token),  # noqa: B023 - called in this iteration only
                ),
                "unstored": costed(
                    "unstored",
                    unstored.pid,
                    lambda: protocol_upload(files, bodies, unstored_api, unstored_token),  # noqa: B023 - called in this iteration only
                ),
            }
            if args.compare:
                measures["before"] = costed(
                    "before",
                    before.pid,
                    lambda: protocol_upload(files, bodies, before_api, before_token),  # noqa: B023 - called in this iteration only
                )
            # Every other round runs them in the reverse order: a load that rises or falls
            # through a round does not always favour the same side.
            order = list(measures) if number % 2 == 0 else list(reversed(measures))
            rounds.append({name: timed(measures[name]) for name in order})
        rss_upload = peak_rss_mib(server.pid)
        handover_s = asyncio.run(hand_over(api, tokens[-1]))
        rss_handover = peak_rss_mib(server.pid)
        sink_rss, durable_rss = peak_rss_mib(sink.pid), peak_rss_mib(durable.pid)

        def median(name: str) -> float:
            return statistics.median(r[name] for r in rounds)

        def ratio(fast: str, slow: str) -> float:
            """Throughput of `slow` over that of `fast` (times the other way round)."""
            return statistics.median(r[fast] / r[slow] for r in rounds)

        def costs(name: str) -> tuple[float, float]:
            """Median CPU seconds per GiB of the measure's server and of its client."""
            return (
                statistics.median(server for server, _ in cpu[name]),
                statistics.median(client for _, client in cpu[name]),
            )

        def rate(name: str) -> str:
            seconds = [r[name] for r in rounds]
            spread = f"{total / MIB / max(seconds):.0f}-{total / MIB / min(seconds):.0f}"
            line = f"{total / MIB / median(name):5.0f} MiB/s (rounds: {spread:>9})"
            if name in cpu:
                server, client = costs(name)
                served = "" if math.isnan(server) else f"server {server:.2f}, "
                line += f"; CPU s/GiB {served}client {client:.2f}"
            return line

        print(f"curl -> sink (drops the bytes)              {rate('curl')}")
        print(f"curl -> durable sink (write + fsync a file) {rate('durable')}")
        print(f"dd conv=fsync of the same bytes, no network {rate('dd')}")
        print(f"O_DIRECT writes of 4 MiB from memory         {rate('direct')}")
        print(f"page protocol (curl) -> sink                {rate('client')}")
        print(f"page protocol (curl) -> durable sink        {rate('client_durable')}")
        print(f"page protocol (curl) -> upload endpoint     {rate('upload')}")
        print(f"the same, its disk writes dropped (a ref.)  {rate('unstored')}")
        if args.compare:
            print(f"the same -> upload endpoint as of {args.compare:<9} {rate('before')}")
            print(
                f"upload endpoint as of {args.compare}: {ratio('curl', 'before'):.2f}x curl to "
                f"the sink; now {ratio('before', 'upload'):.2f}x that; server CPU per GiB "
                f"{costs('before')[0]:.2f} s then, {costs('upload')[0]:.2f} s now"
            )
        print(
            f"upload endpoint: {ratio('curl', 'upload'):.2f}x curl to the sink (goal >= 0.7x), "
            f"{ratio('durable', 'upload'):.2f}x curl to the durable sink, "
            f"{ratio('dd', 'upload'):.2f}x dd conv=fsync, "
            f"{ratio('direct', 'upload'):.2f}x O_DIRECT writes; "
            f"{ratio('client', 'upload'):.2f}x the same chunks to the sink, "
            f"{ratio('client_durable', 'upload'):.2f}x to the durable sink"
        )
        print(
            f"references, to curl -> sink: O_DIRECT writes {ratio('curl', 'direct'):.2f}x, "
            f"dd conv=fsync {ratio('curl', 'dd'):.2f}x, the durable "
            f"sink {ratio('curl', 'durable'):.2f}x, the page's chunks to the sink "
            f"{ratio('curl', 'client'):.2f}x and to the durable sink "
            f"{ratio('curl', 'client_durable'):.2f}x"
        )
        print(
            f"peak RSS: upload server {rss_idle:.0f} MiB idle, {rss_upload:.0f} MiB after the "
            f"uploads, {rss_handover:.0f} MiB after the hand-over; sinks {sink_rss:.0f} and "
            f"{durable_rss:.0f} MiB"
        )
        # What bounds the endpoint, as fractions of curl to the sink. Client and server share
        # this machine's cores: costing more CPU per GiB than curl to the sink, it reaches at
        # most their ratio at the same use of the cores. And it writes every byte it is sent:
        # the same server with its sealed blocks dropped instead (a reference, not a product
        # mode) shows what the writing costs, in speed and in CPU, beyond the disk's own speed.
        sink_cost, upload_cost = sum(costs("curl")), sum(costs("upload"))
        print(
            f"bounds, to curl -> sink: the CPU at the sink's use of the cores "
            f"{sink_cost / upload_cost:.2f}x (server and client per GiB: endpoint "
            f"{upload_cost:.2f} s, curl -> sink {sink_cost:.2f} s, {os.cpu_count()} cores); "
            f"the endpoint without its disk writes {ratio('curl', 'unstored'):.2f}x (writing "
            f"costs it {ratio('unstored', 'upload'):.2f}x its speed and "
            f"{costs('upload')[0] - costs('unstored')[0]:.2f} s of server CPU per GiB); the "
            f"disk's own O_DIRECT writes {ratio('curl', 'direct'):.2f}x"
        )
        print(f"load average {os.getloadavg()[0]:.1f} at the end")
        print(
            f"hand-over (the folder as one ZIP: intake checks, scans unpacked): "
            f"{handover_s:.2f} s = {total / MIB / handover_s:.0f} MiB/s"
        )
    finally:
        for process in servers:
            stop(process)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
