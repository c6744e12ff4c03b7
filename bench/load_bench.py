"""Load benchmark: `python bench/load_bench.py` from the project root.

500 simulated patients (default) on loopback against one real bot process (`python -m bot
run`) and the Bot API emulator, text and button steps only (tests/load.py). Prints:

- bot-side latency per update, from the bot's log lines `update handled update=<id>
  ms=<handling> since=<ms>`: handling (the stored update taken up to its replies queued,
  committed; goal p99 <= 50 ms), and the same counted from when the update was stored in
  the inbox (so waiting for its turn too);
- emulator-side latency, update fetched by getUpdates to its reply's sendMessage call (this
  includes the outbox's rate limiting: about 1 message/s per chat and 20/s overall);
- messages per second (sent and edited: the checklist card's edits count towards
  Telegram's limits too), updates handled per second;
- the bot process's CPU time per update handled (the figure that moves least with the
  machine's other load);
- peak RSS of the bot process (VmHWM), its RSS over time (sampled each second: first vs
  last, and after each wave), and the number of messages sent faster than the limits
  (goal 0).

Options: --patients (500), --steps (6, at most 12), --ramp seconds over which the patients
arrive (10), --think MIN-MAX seconds a patient takes before each step after the first
(0, the saturated form: every patient answers the moment the reply arrives; a realistic
form reads and types, e.g. 20-60: 500 patients then ask for about 12 steps/s, within
Telegram's overall 20-30 messages/s), --waves (1: with 2, a second group of as many new
patients follows the first, to compare memory), --postgres (the bot on a fresh database
of the PostgreSQL at 127.0.0.1:5432, see tests/services.py, instead of its SQLite file),
--timeout seconds a patient waits for an answer before giving up (300), --seed.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.harness import max_per_window  # noqa: E402
from tests.load import pct, run_load  # noqa: E402
from tests.services import fresh_postgres_database  # noqa: E402


def parse_think(text: str) -> tuple[float, float]:
    low, _, high = text.partition("-")
    return float(low), float(high or low)


def stats(values: list[float]) -> str:
    mean = statistics.fmean(values) if values else float("nan")
    return (
        f"p50 {pct(values, 0.5):.1f}  p99 {pct(values, 0.99):.1f}  "
        f"max {max(values, default=0):.1f}  mean {mean:.1f}"
    )


async def run(args: argparse.Namespace) -> int:
    if not args.postgres:
        return await measure(args, None)
    with fresh_postgres_database() as database:
        return await measure(args, database)


async def measure(args: argparse.Namespace, database: str | None) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="load-bench-"))
    result = await run_load(
        workdir,
        [args.patients] * args.waves,
        args.steps,
        args.ramp,
        parse_think(args.think),
        args.seed,
        args.timeout,
        extra_env={"DATABASE_URL": database} if database else None,
    )
    handled, since = result.handled_ms(), result.since_ms()
    send_times = sorted(c.time for c in result.sends)
    span = (send_times[-1] - send_times[0]) if len(send_times) > 1 else float("nan")
    replies = len(result.replies())
    walked = sum(wave.walked_s for wave in result.waves)
    breaches, failed = result.breaches(), result.failed()
    total = args.patients * args.waves
    print(
        f"load bench: {total} patients x {args.steps} steps, ramp {args.ramp}s, "
        f"think {args.think}s, {'PostgreSQL' if database else 'SQLite'}"
    )
    print(f"  updates sent / handled (log)   {len(result.updates)} / {len(handled)}")
    print(f"  patients finished              {total - len(failed)} / {total}")
    print(f"  walk time                      {walked:.1f} s")
    print(f"  bot-side ms, handling          {stats(handled)}  (goal p99<=50)")
    if since:
        print(f"  bot-side ms, stored->queued    {stats(since)}  (incl. waiting in the inbox)")
    fetch = result.fetch_to_reply_ms()
    print(
        f"  emulator ms, fetched->sent     p50 {pct(fetch, 0.5):.0f}  "
        f"p99 {pct(fetch, 0.99):.0f}  (includes the outbox's rate limits)"
    )
    print(
        f"  messages/s (sent + edited)     {len(result.sends) / span:.1f} mean over {span:.1f} s, "
        f"max in any 1 s {max_per_window(send_times, 1.0)}; "
        f"{replies} sent, {len(result.sends) - replies} edits"
    )
    print(f"  updates handled/s              {len(handled) / walked:.1f}")
    cpu = sum(wave.cpu_s for wave in result.waves)
    print(
        f"  bot CPU per update handled     {cpu * 1000 / max(1, len(handled)):.1f} ms "
        f"({cpu:.1f} s CPU, {cpu / walked * 100:.0f}% of one core on average)"
    )
    print(f"  peak RSS (VmHWM)               {result.peak_kb / 1024:.1f} MiB")
    if result.rss:
        after = " / ".join(f"{wave.rss_after_kb / 1024:.1f}" for wave in result.waves)
        print(
            f"  RSS first / last / max         {result.rss[0] / 1024:.1f} / "
            f"{result.rss[-1] / 1024:.1f} / {max(result.rss) / 1024:.1f} MiB over "
            f"{len(result.rss)} samples; after each wave {after} MiB"
        )
    print(f"  limit breaches                 {len(breaches)}")
    for breach in breaches[:10]:
        print(f"    - {breach}")
    for patient in failed[:5]:
        print(f"  patient {patient.user.id} stuck after {patient.done} steps: {patient.error}")
    print(f"  bot log: {workdir / 'bot.log'}")
    return 0 if not breaches and not failed else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=500)
    parser.add_argument("--steps", type=int, default=6, choices=range(1, 13))
    parser.add_argument("--ramp", type=float, default=10.0)
    parser.add_argument("--think", default="0", help="MIN-MAX seconds before each step")
    parser.add_argument("--waves", type=int, default=1)
    parser.add_argument("--postgres", action="store_true")
    parser.add_argument("--timeout", type=float, default=300.0, help="s a patient waits a reply")
    parser.add_argument("--seed", type=int, default=7)
    return asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
