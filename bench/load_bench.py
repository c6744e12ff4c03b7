"""Load benchmark: `python bench/load_bench.py` from the project root.

500 simulated patients (default) on loopback against one real bot process (`python -m bot
run`) and the Bot API emulator, text and button steps only. Prints:

- bot-side latency per update, receive to reply queued, from the bot's log lines
  `update handled update=<id> ms=<ms>` (goal p99 <= 50 ms);
- emulator-side latency, update fetched by getUpdates to its reply's sendMessage call (this
  includes the outbox's rate limiting: about 1 message/s per chat and 25/s overall);
- messages per second, updates handled per second;
- peak RSS of the bot process (VmHWM) and its RSS over time (sampled each second: first vs
  last), and the number of messages sent faster than the limits (goal 0).

Options: --patients (500), --steps (6, at most 10), --ramp seconds over which the patients
arrive (10), --seed.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.botproc import BotProcess  # noqa: E402
from tests.emulator import BotApiEmulator, SimUser  # noqa: E402
from tests.harness import event_text, max_per_window, rate_breaches  # noqa: E402

HANDLED_RE = re.compile(r"update handled update=(\d+) ms=([\d.]+)")
# (action, argument, what the bot's answer contains): text and buttons only.
WALK = [
    ("say", "/start", "I agree"),
    ("tap", "I agree", "General medical review"),
    ("tap", "General medical review", "your full name"),
    ("say", "Ann Example", "date of birth"),
    ("say", "31.01.1980", "Step 1 of 7"),
    ("tap", "I don't have this", "Step 2 of 7"),
    ("tap", "I don't have this", "Step 3 of 7"),
    ("tap", "Skip", "Step 4 of 7"),
    ("tap", "I don't have this", "Step 5 of 7"),
    ("say", "Metformin 500 mg twice a day. Allergic to penicillin.", "Step 6 of 7"),
    ("tap", "Skip", "Step 7 of 7"),
    ("tap", "I don't have this", "everything the hospital needs"),
]


class TimingEmulator(BotApiEmulator):
    """The emulator, noting when each update was first handed to the bot."""

    def __init__(self) -> None:
        super().__init__()
        self.fetched: dict[int, float] = {}

    async def _m_getupdates(self, p: dict[str, Any]) -> list[dict[str, Any]]:
        batch = await super()._m_getupdates(p)
        now = time.monotonic()
        for update in batch:
            self.fetched.setdefault(update["update_id"], now)
        return batch


class LoadPatient:
    def __init__(self, emu: TimingEmulator, user: SimUser, steps: int) -> None:
        self.emu = emu
        self.user = user
        self.steps = WALK[:steps]
        self.updates: list[int] = []
        self.done = 0
        self.error: str | None = None

    def _mine(self, fragment: str) -> Any:
        def match(event: dict[str, Any]) -> bool:
            if event.get("chat_id") != self.user.id:
                return False
            labels = " ".join(str(b.get("text")) for b in self.emu.buttons(event))
            return fragment in event_text(event) or fragment in labels

        return match

    async def run(self, delay: float) -> None:
        await asyncio.sleep(delay)
        last: dict[str, Any] | None = None
        try:
            for action, arg, expect in self.steps:
                mark = self.emu.cursor()
                if action == "say":
                    self.updates.append(self.emu.send_text(self.user, arg))
                else:
                    assert last is not None
                    data = self.emu.button(last, arg)
                    self.updates.append(self.emu.press(self.user, last, data))
                last = await self.emu.wait_for(self._mine(expect), timeout=300, since=mark)
                self.done += 1
        except (TimeoutError, LookupError, ValueError) as exc:
            self.error = f"{type(exc).__name__}: {str(exc)[:200]}"


def rss_kb(pid: int, field: str = "VmRSS") -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def run(args: argparse.Namespace) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="load-bench-"))
    rng = random.Random(args.seed)
    async with TimingEmulator() as emu:
        bot = BotProcess(emu, workdir)
        mark = len(emu.calls)
        bot.start()
        await emu.wait_for_call("getUpdates", timeout=120, since=mark)
        assert bot.proc is not None
        pid = bot.proc.pid
        samples: list[tuple[float, int]] = []
        stop = asyncio.Event()

        async def sampler() -> None:
            while not stop.is_set():
                samples.append((time.monotonic(), rss_kb(pid)))
                await asyncio.sleep(1.0)

        sampling = asyncio.create_task(sampler())
        patients = [
            LoadPatient(emu, emu.user(10_000 + i, first_name=f"L{i}"), args.steps)
            for i in range(args.patients)
        ]
        started = time.monotonic()
        await asyncio.gather(*(p.run(rng.uniform(0, args.ramp)) for p in patients))
        walked = time.monotonic() - started
        await asyncio.sleep(2.0)
        peak = rss_kb(pid, "VmHWM")
        stop.set()
        await sampling
        bot.stop()
        log = bot.log()

    handled = {int(u): float(ms) for u, ms in HANDLED_RE.findall(log)}
    ours = [u for p in patients for u in p.updates]
    handler_ms = [handled[u] for u in ours if u in handled]
    sends = [c for c in emu.calls_for("sendMessage") if c.status == 200]
    by_chat: dict[int, list[float]] = {}
    for call in sends:
        by_chat.setdefault(int(call.params["chat_id"]), []).append(call.time)
    fetch_to_send = []
    for patient in patients:
        times = sorted(by_chat.get(patient.user.id, []))
        for update_id in patient.updates:
            fetched = emu.fetched.get(update_id)
            later = [t for t in times if fetched is not None and t >= fetched]
            if later:
                fetch_to_send.append((later[0] - fetched) * 1000)  # type: ignore[operator]
    send_times = sorted(c.time for c in sends)
    span = (send_times[-1] - send_times[0]) if len(send_times) > 1 else float("nan")
    breaches = rate_breaches(sends)
    failed = [p for p in patients if p.error]
    rss = [kb for _, kb in samples if kb]
    print(f"load bench: {args.patients} patients x {args.steps} steps, ramp {args.ramp}s")
    print(f"  updates sent / handled (log)   {len(ours)} / {len(handler_ms)}")
    print(f"  patients finished              {args.patients - len(failed)} / {args.patients}")
    print(f"  walk time                      {walked:.1f} s")
    print(
        f"  bot-side ms, receive->queued   p50 {pct(handler_ms, 0.5):.1f}  "
        f"p99 {pct(handler_ms, 0.99):.1f}  max {max(handler_ms, default=0):.1f}  "
        f"mean {statistics.fmean(handler_ms) if handler_ms else float('nan'):.1f}  (goal p99<=50)"
    )
    print(
        f"  emulator ms, fetched->sent     p50 {pct(fetch_to_send, 0.5):.0f}  "
        f"p99 {pct(fetch_to_send, 0.99):.0f}  (includes the outbox's rate limits)"
    )
    print(
        f"  messages/s                     {len(sends) / span:.1f} mean over {span:.1f} s, "
        f"max in any 1 s {max_per_window(send_times, 1.0)}"
    )
    print(f"  updates handled/s              {len(handler_ms) / walked:.1f}")
    print(f"  peak RSS (VmHWM)               {peak / 1024:.1f} MiB")
    if rss:
        print(
            f"  RSS first / last / max         {rss[0] / 1024:.1f} / {rss[-1] / 1024:.1f} / "
            f"{max(rss) / 1024:.1f} MiB over {len(rss)} samples"
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
    parser.add_argument("--steps", type=int, default=6, choices=range(1, len(WALK) + 1))
    parser.add_argument("--ramp", type=float, default=10.0)
    parser.add_argument("--seed", type=int, default=7)
    return asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
