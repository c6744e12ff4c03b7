"""The load driver: simulated patients walking text and button steps against the real bot
process (`python -m bot run`) and the Bot API emulator. bench/load_bench.py runs it with
hundreds of patients and prints the figures; tests/test_e2e_load.py runs a short form.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.botproc import BotProcess
from tests.emulator import BotApiEmulator, Call, SimUser
from tests.harness import event_text, rate_breaches

# The bot logs `update handled update=<id> ms=<handling> since=<from stored in the inbox>`.
HANDLED_RE = re.compile(r"update handled update=(\d+) ms=([\d.]+)")
SINCE_RE = re.compile(r"update handled update=(\d+) ms=[\d.]+ since=([\d.]+)")
SENDS = ("sendMessage", "editMessageText")  # both count towards Telegram's limits
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
    """Walks the first `steps` of WALK, each step once the answer to the previous arrived,
    after thinking `think` seconds (uniform between the two bounds), noting each update and
    how long its answer took to show up."""

    def __init__(
        self,
        emu: BotApiEmulator,
        user: SimUser,
        steps: int = len(WALK),
        think: tuple[float, float] = (0.0, 0.0),
        rng: random.Random | None = None,
    ) -> None:
        self.emu = emu
        self.user = user
        self.steps = WALK[:steps]
        self.think = think
        self.rng = rng or random.Random(user.id)
        self.updates: list[int] = []
        self.latencies: list[float] = []  # seconds, update sent -> its answer seen
        self.done = 0
        self.error: str | None = None

    def _mine(self, fragment: str) -> Any:
        def match(event: dict[str, Any]) -> bool:
            if event.get("chat_id") != self.user.id:
                return False
            labels = " ".join(str(b.get("text")) for b in self.emu.buttons(event))
            return fragment in event_text(event) or fragment in labels

        return match

    async def run(self, delay: float, timeout: float = 120.0) -> None:
        await asyncio.sleep(delay)
        last: dict[str, Any] | None = None
        try:
            for index, (action, arg, expect) in enumerate(self.steps):
                if index and self.think[1] > 0:
                    await asyncio.sleep(self.rng.uniform(*self.think))
                mark = self.emu.cursor()
                sent = time.monotonic()
                if action == "say":
                    self.updates.append(self.emu.send_text(self.user, arg))
                else:
                    assert last is not None
                    data = self.emu.button(last, arg)
                    self.updates.append(self.emu.press(self.user, last, data))
                last = await self.emu.wait_for(self._mine(expect), timeout=timeout, since=mark)
                self.latencies.append(time.monotonic() - sent)
                self.done += 1
        except (TimeoutError, LookupError, ValueError) as exc:
            self.error = f"step {self.done}: {type(exc).__name__}: {str(exc)[:300]}"


@dataclass
class Wave:
    """One group of patients walking together, and what the bot process looked like after."""

    patients: list[LoadPatient]
    walked_s: float
    rss_after_kb: int
    cpu_s: float  # CPU time the bot process used during the wave (user + system)


@dataclass
class LoadRun:
    waves: list[Wave]
    log: str
    sends: list[Call]  # messages sent or edited (accepted by the emulator)
    fetched: dict[int, float]  # update id -> when the bot fetched it (emulator's clock)
    peak_kb: int  # VmHWM of the bot process
    rss: list[int] = field(default_factory=list)  # RSS sampled each second, in KiB

    @property
    def patients(self) -> list[LoadPatient]:
        return [p for wave in self.waves for p in wave.patients]

    @property
    def updates(self) -> list[int]:
        return [u for p in self.patients for u in p.updates]

    def handled_ms(self) -> list[float]:
        handled = {int(u): float(ms) for u, ms in HANDLED_RE.findall(self.log)}
        return [handled[u] for u in self.updates if u in handled]

    def since_ms(self) -> list[float]:
        since = {int(u): float(ms) for u, ms in SINCE_RE.findall(self.log)}
        return [since[u] for u in self.updates if u in since]

    def replies(self) -> list[Call]:
        return [c for c in self.sends if c.method.lower() == "sendmessage"]

    def fetch_to_reply_ms(self) -> list[float]:
        """Per update: from fetched by the bot to the first message the emulator got after."""
        by_chat: dict[int, list[float]] = {}
        for call in self.replies():
            by_chat.setdefault(int(call.params["chat_id"]), []).append(call.time)
        spans = []
        for patient in self.patients:
            times = sorted(by_chat.get(patient.user.id, []))
            for update_id in patient.updates:
                fetched = self.fetched.get(update_id)
                later = [t for t in times if fetched is not None and t >= fetched]
                if fetched is not None and later:
                    spans.append((later[0] - fetched) * 1000)
        return spans

    def breaches(self) -> list[str]:
        return rate_breaches(self.sends)

    def failed(self) -> list[LoadPatient]:
        return [p for p in self.patients if p.error]


def rss_kb(pid: int, name: str = "VmRSS") -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(name + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pct(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def run_load(
    workdir: Path,
    waves: Sequence[int],
    steps: int,
    ramp: float,
    think: tuple[float, float] = (0.0, 0.0),
    seed: int = 7,
    timeout: float = 300.0,
    extra_env: dict[str, str] | None = None,
) -> LoadRun:
    """One bot process; each wave's patients (new chats) walk together, the next wave
    starts when the previous one is through (so memory can be compared between waves)."""
    rng = random.Random(seed)
    async with TimingEmulator() as emu:
        bot = BotProcess(emu, workdir, extra_env=extra_env)
        mark = len(emu.calls)
        bot.start()
        try:
            await emu.wait_for_call("getUpdates", timeout=120, since=mark)
            assert bot.proc is not None
            pid = bot.proc.pid
            samples: list[int] = []
            stop = asyncio.Event()

            async def sampler() -> None:
                while not stop.is_set():
                    samples.append(rss_kb(pid))
                    await asyncio.sleep(1.0)

            sampling = asyncio.create_task(sampler())
            done: list[Wave] = []
            chat = 10_000
            for size in waves:
                patients = [
                    LoadPatient(emu, emu.user(chat + i, first_name=f"L{i}"), steps, think, rng)
                    for i in range(size)
                ]
                chat += size
                started, cpu = time.monotonic(), cpu_seconds(pid)
                await asyncio.gather(*(p.run(rng.uniform(0, ramp), timeout) for p in patients))
                walked = time.monotonic() - started
                await asyncio.sleep(2.0)  # the last cards and sends
                done.append(Wave(patients, walked, rss_kb(pid), cpu_seconds(pid) - cpu))
            peak = rss_kb(pid, "VmHWM")
            stop.set()
            await sampling
        finally:
            bot.stop()
        sends = [c for method in SENDS for c in emu.calls_for(method) if c.status == 200]
        rss = [kb for kb in samples if kb]
        return LoadRun(done, bot.log(), sends, dict(emu.fetched), peak, rss)
