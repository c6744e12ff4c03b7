"""SQLite trips benchmark: `python bench/sqlite_trips_bench.py [--rounds 3] [--busy 4]`.

The write transaction of a text step (ConversationService.handle on the real SQLite store)
timed with the bot's cursor (adapters.database.InlineCursor: statements inside a
transaction, and BEGIN IMMEDIATE when the write lock is free, run on the event loop's
thread; only COMMIT goes to aiosqlite's thread), with its predecessor (OneTripCursor: one
trip to the thread per statement) and with SQLAlchemy's own aiosqlite cursor (four trips per
statement), alternating in the same run on the same database. `--busy` tasks keep the event
loop busy the way other chats' work does under load (each runs 1 ms of CPU, then yields):
every trip then waits behind them, holding SQLite's only write lock. Prints, per set-up, the
time per update (p50, p99) and the trips per update, and the ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import aiosqlite  # noqa: E402
from sqlalchemy.dialects.sqlite.aiosqlite import AsyncAdapt_aiosqlite_cursor  # noqa: E402

from adapters import database  # noqa: E402
from bot.app import App, build_app, prepare  # noqa: E402
from bot.settings import Settings  # noqa: E402
from core.events import Event, EventKind  # noqa: E402
from core.ports import Patient  # noqa: E402

STEPS = [
    Event(EventKind.START),
    Event(EventKind.AGREE),
    Event(EventKind.CHOOSE_PROCEDURE, "general"),
    Event(EventKind.TEXT, "Ann Example"),
]
TRIPS = [0]


def count_trips() -> None:
    real = aiosqlite.Connection._execute

    async def counted(self: aiosqlite.Connection, fn: Any, *args: Any, **kwargs: Any) -> Any:
        TRIPS[0] += 1
        return await real(self, fn, *args, **kwargs)

    aiosqlite.Connection._execute = counted  # type: ignore[method-assign]


async def busy(stop: asyncio.Event) -> None:
    while not stop.is_set():
        until = time.perf_counter() + 0.001
        while time.perf_counter() < until:
            pass
        await asyncio.sleep(0)


async def walk(app: App, first_chat: int, patients: int) -> tuple[list[float], int]:
    """Each patient's steps as updates; the time of each and the trips in all."""
    times, trips_before = [], TRIPS[0]
    for n in range(patients):
        chat = first_chat + n
        patient = Patient(chat_id=chat, user_id=chat, language_code="en")
        for i, step in enumerate(STEPS):
            started = time.perf_counter()
            await app.service.handle(patient, step, chat * 100 + i)
            times.append(time.perf_counter() - started)
    return times, TRIPS[0] - trips_before


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


async def run(args: argparse.Namespace) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="trips-bench-"))
    settings = Settings(data_dir=workdir / "data", database_url=f"sqlite:///{workdir}/db.sqlite")
    await asyncio.to_thread(prepare, settings)
    app = build_app(settings)
    count_trips()
    setups = {
        "inline": database.InlineCursor,
        "one trip": database.OneTripCursor,
        "four trips": AsyncAdapt_aiosqlite_cursor,
    }
    results: dict[str, list[float]] = {name: [] for name in setups}
    trips: dict[str, int] = dict.fromkeys(setups, 0)
    stop = asyncio.Event()
    noise = [asyncio.create_task(busy(stop)) for _ in range(args.busy)]
    try:
        chat = 1
        for _ in range(args.rounds):
            for name, cursor in setups.items():
                # New cursors of the pooled connections are of this class from now on.
                database._SqliteConnection._cursor_cls = cursor  # type: ignore[assignment]
                times, n = await walk(app, chat, args.patients)
                chat += args.patients
                results[name] += times
                trips[name] += n
    finally:
        stop.set()
        await asyncio.gather(*noise)
        database._SqliteConnection._cursor_cls = database.InlineCursor  # type: ignore[assignment]
        await app.close()
    updates = args.rounds * args.patients * len(STEPS)
    print(
        f"SQLite write transactions of text steps, {updates} updates per set-up, "
        f"{args.busy} busy tasks on the loop"
    )
    for name, times in results.items():
        mean = statistics.fmean(times) * 1000
        print(
            f"  {name:<10}  p50 {pct(times, 0.5):7.2f} ms  p99 {pct(times, 0.99):7.2f} ms  "
            f"mean {mean:7.2f} ms  trips/update {trips[name] / updates:.1f}"
        )
    base = results["four trips"]
    for name in ("inline", "one trip"):
        times = results[name]
        print(
            f"  ratio {name}/four trips: p50 {pct(times, 0.5) / pct(base, 0.5):.2f}  "
            f"p99 {pct(times, 0.99) / pct(base, 0.99):.2f}  "
            f"mean {statistics.fmean(times) / statistics.fmean(base):.2f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--patients", type=int, default=25)
    parser.add_argument("--busy", type=int, default=4, help="busy tasks on the event loop")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
