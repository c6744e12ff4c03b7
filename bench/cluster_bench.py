"""Cluster benchmark: `python bench/cluster_bench.py` from the project root.

The same load against three set-ups, side by side in one run, each with a fresh database
and the Bot API emulator delivering updates by webhook through a round-robin balancer (the
one of tests/test_cluster.py), on whatever this machine has (it was written on 2 cores):

    sqlite x1   one instance on SQLite, no REDIS_URL: the default deployment
    pg x1       one instance on PostgreSQL, with REDIS_URL (the cluster layer in play)
    pg x2       two instances on PostgreSQL and Redis

The load: --patients (200) walk the first --steps (6) steps of the checklist by text and
buttons, arriving over --ramp seconds (20), each waiting for the bot's answer before the
next step; then each sends --burst (5) /status at once. Printed per set-up, then the ratios
pg x2 / pg x1 and pg x1 / sqlite x1:

- walk: updates per second, and latency update sent -> its answer seen (p50, p99). The
  answers go out within Telegram's limits (about 1 message/s per chat, 20/s overall for
  the whole bot, however many instances), so this is bounded by sending, not handling;
- burst: updates handled per second (first stored -> last done) and latency stored -> done
  (p50, p99), from the inbox table: what the instances can handle, queueing included;
- handler ms p99 (the log's `update handled ... ms=`), the most messages in any second, and
  the messages sent faster than the limits (goal 0).

Needs PostgreSQL at 127.0.0.1:5432 (as the tests do) and `redis-server`: the bench runs a
Redis of its own, so the commands it counts are its set-ups' alone (other users of a shared
Redis would be counted too).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import sqlalchemy  # noqa: E402

from adapters.cluster import connect  # noqa: E402
from bot.app import prepare  # noqa: E402
from bot.settings import Settings  # noqa: E402
from tests.botproc import BotProcess  # noqa: E402
from tests.emulator import BotApiEmulator  # noqa: E402
from tests.harness import max_per_window, rate_breaches  # noqa: E402
from tests.load import HANDLED_RE, WALK, LoadPatient  # noqa: E402
from tests.services import fresh_postgres_database  # noqa: E402
from tests.test_cluster import (  # noqa: E402
    LIMITED,
    Balancer,
    PrivateRedis,
    address,
    instance,
    new_token,
    start_all,
)

SETUPS = {"sqlite x1": ("sqlite", 1), "pg x1": ("postgres", 1), "pg x2": ("postgres", 2)}


@dataclass
class Result:
    name: str
    walk_updates: int = 0
    walk_s: float = float("nan")
    walk_latency: list[float] = field(default_factory=list)  # ms
    burst_updates: int = 0
    burst_s: float = float("nan")
    burst_latency: list[float] = field(default_factory=list)  # ms
    handler_ms: list[float] = field(default_factory=list)
    peak_per_s: int = 0
    breaches: int = 0
    redis_commands: int = 0  # Redis commands the set-up ran (leases, limits), all told
    stuck: int = 0

    def rows(self) -> dict[str, float]:
        return {
            "walk updates/s": self.walk_updates / self.walk_s,
            "walk p50 ms (sent -> answer)": pct(self.walk_latency, 0.5),
            "walk p99 ms (sent -> answer)": pct(self.walk_latency, 0.99),
            "burst updates/s (handled)": self.burst_updates / self.burst_s,
            "burst p50 ms (stored -> done)": pct(self.burst_latency, 0.5),
            "burst p99 ms (stored -> done)": pct(self.burst_latency, 0.99),
            "handler p99 ms": pct(self.handler_ms, 0.99),
            "max messages in 1 s": self.peak_per_s,
            "limit breaches": self.breaches,
            "patients stuck": self.stuck,
            "Redis commands per update": self.redis_commands
            / max(1, self.walk_updates + self.burst_updates),
        }


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def inbox_times(url: str, update_ids: list[int]) -> list[tuple[Any, Any, str]]:
    """(received_at, done_at, status) of these updates, read with a plain sync driver."""
    engine = sqlalchemy.create_engine(url.replace("postgresql://", "postgresql+psycopg://"))
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                sqlalchemy.text(
                    "SELECT update_id, received_at, done_at, status FROM inbox"
                    " WHERE update_id >= :low"
                ),
                {"low": min(update_ids)},
            ).all()
    finally:
        engine.dispose()
    wanted = set(update_ids)
    return [(_when(r[1]), _when(r[2]), r[3]) for r in rows if r[0] in wanted]


def _when(value: Any) -> Any:
    """SQLite hands timestamps back as text."""
    return datetime.fromisoformat(value) if isinstance(value, str) else value


async def run_setup(name: str, args: argparse.Namespace, redis_url: str) -> Result:
    backend, count = SETUPS[name]
    result = Result(name)
    workdir = Path(tempfile.mkdtemp(prefix="cluster-bench-"))
    data_dir = workdir / "data"
    with database(backend, data_dir) as url:
        commands_before = await redis_commands(redis_url)
        async with BotApiEmulator(token=new_token()) as emu, Balancer() as balancer:
            await asyncio.to_thread(prepare, Settings(data_dir=data_dir, database_url=url))
            bots: list[BotProcess] = [
                instance(
                    emu,
                    workdir / f"i{i}",
                    data_dir=data_dir,
                    database_url=url,
                    balancer=balancer,
                    redis_url=redis_url if backend == "postgres" else None,
                    coordinator=None,
                )
                for i in range(count)
            ]
            balancer.backends = [address(bot) for bot in bots]
            try:
                await start_all(emu, bots)
                patients = [
                    LoadPatient(emu, emu.user(30_000 + i, first_name=f"B{i}"), args.steps)
                    for i in range(args.patients)
                ]
                started = time.monotonic()
                await asyncio.gather(
                    *(p.run(args.ramp * i / args.patients, 300) for i, p in enumerate(patients))
                )
                result.walk_s = time.monotonic() - started
                result.walk_updates = sum(p.done for p in patients)
                result.walk_latency = [s * 1000 for p in patients for s in p.latencies]
                result.stuck = sum(p.error is not None for p in patients)

                burst = [
                    emu.send_text(p.user, "/status") for _ in range(args.burst) for p in patients
                ]
                deadline = time.monotonic() + 300
                rows: list[tuple[Any, Any, str]] = []
                while time.monotonic() < deadline:
                    rows = await asyncio.to_thread(inbox_times, url, burst)
                    if len(rows) == len(burst) and all(r[2] == "done" for r in rows):
                        break
                    await asyncio.sleep(0.5)
                done = [r for r in rows if r[2] == "done"]
                result.burst_updates = len(done)
                if done:
                    span = max(r[1] for r in done) - min(r[0] for r in done)
                    result.burst_s = span.total_seconds()
                    result.burst_latency = [(r[1] - r[0]).total_seconds() * 1000 for r in done]
            finally:
                for bot in bots:
                    bot.stop()
            result.handler_ms = [
                float(ms) for bot in bots for _, ms in HANDLED_RE.findall(bot.log())
            ]
            limited = [c for c in emu.calls if c.method in LIMITED]
            result.peak_per_s = max_per_window([c.time for c in limited], 1.0)
            result.breaches = len(rate_breaches(limited))
        if backend == "postgres":
            result.redis_commands = await redis_commands(redis_url) - commands_before
    print(f"  {name}: done ({workdir})", flush=True)
    return result


async def redis_commands(redis_url: str) -> int:
    """Commands the Redis server has run since it started (those a Lua script runs too)."""
    redis = connect(redis_url)
    try:
        return int((await redis.info("stats"))["total_commands_processed"])
    finally:
        await redis.aclose()


@contextlib.contextmanager
def database(backend: str, data_dir: Path) -> Iterator[str]:
    """A fresh PostgreSQL database, dropped afterwards; or the SQLite file in the data dir."""
    if backend == "postgres":
        with fresh_postgres_database() as url:
            yield url
    else:
        yield f"sqlite:///{data_dir / 'care-companion.db'}"


def report(results: list[Result], args: argparse.Namespace) -> None:
    names = [r.name for r in results]
    by_name = {r.name: r.rows() for r in results}
    ratios = [("pg x2 / pg x1", "pg x2", "pg x1"), ("pg x1 / sqlite", "pg x1", "sqlite x1")]
    ratios = [r for r in ratios if r[1] in by_name and r[2] in by_name]
    print(
        f"\ncluster bench: {args.patients} patients x {args.steps} steps (ramp {args.ramp}s),"
        f" then {args.burst} x /status each; webhook mode behind a round-robin balancer"
    )
    header = f"  {'':32}" + "".join(f"{n:>12}" for n in names)
    header += "".join(f"{label:>16}" for label, _, _ in ratios)
    print(header)
    for row in results[0].rows():
        line = f"  {row:32}" + "".join(f"{by_name[n][row]:>12.1f}" for n in names)
        for _, top, bottom in ratios:
            a, b = by_name[top][row], by_name[bottom][row]
            line += f"{(a / b if b else float('nan')):>16.2f}"
        print(line)


async def main_async(args: argparse.Namespace) -> int:
    results = []
    with PrivateRedis(Path(tempfile.mkdtemp(prefix="cluster-bench-redis-"))) as redis:
        for name in args.setups:
            print(f"running {name}...", flush=True)
            results.append(await run_setup(name, args, redis.url))
    report(results, args)
    bad = any(r.breaches or r.stuck for r in results)
    return 1 if bad else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=200)
    parser.add_argument("--steps", type=int, default=6, choices=range(1, len(WALK) + 1))
    parser.add_argument("--ramp", type=float, default=20.0)
    parser.add_argument("--burst", type=int, default=5)
    parser.add_argument("--setups", nargs="+", default=list(SETUPS), choices=list(SETUPS))
    return asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
