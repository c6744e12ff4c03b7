"""Crash-and-fault harness: the real bot process, simulated patients, SIGKILL at random.

N simulated patients walk the default checklist at once against the Bot API emulator (text,
button presses, PDFs, an album, a DICOM file, a photo) while a killer SIGKILLs the bot at
random instants (seeded) and restarts it, and a fault injector makes the emulator answer
429 with ``retry_after``, 5xx, dropped connections, slow and stalled downloads.

Afterwards the harness stops the bot cleanly and checks, reading the SQLite database and the
vault folder directly (read-only) and the emulator's logs:

- every update the emulator saw confirmed is in the inbox as ``done`` or ``parked``;
- the effects happened exactly once: one ``case_files`` row per ``file_unique_id`` and case,
  each item's file list matches its rows, each patient's files are all there exactly once;
- no blob without its row, no row without its blob; ``PRAGMA integrity_check`` is ``ok``;
- every complete case was alerted exactly once to the coordinator chat (and no other case);
- no message was sent faster than the limits (3 per 3 s per chat, 25 per second overall).

``run_harness(HarnessConfig(...))`` returns a ``HarnessReport`` (counts and violations);
``tests/test_crash_harness.py`` runs the short form, ``bench/kill_bench.py`` the long one.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import json
import os
import random
import re
import sqlite3
import sys
import tempfile
import time
import tomllib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.botproc import REPO, BotProcess
from tests.emulator import BotApiEmulator, Call, SimUser
from tests.files import dicom_path, document_photo, pdf_bytes

COORDINATOR = 900_001
FILE_ITEMS = ("referral", "imaging", "identity")
FINISHED = "everything the hospital needs"
MEDICATIONS = "Metformin 500 mg twice a day. Allergic to penicillin."
PER_CHAT_LIMIT, PER_CHAT_WINDOW = 3, 3.0
GLOBAL_LIMIT, GLOBAL_WINDOW = 25, 1.0
_STEP_RE = re.compile(r"Step (\d+) of (\d+)")


@dataclass
class HarnessConfig:
    patients: int = 6
    kills: int = 30
    seed: int = 20261105
    alive: tuple[float, float] = (0.5, 2.5)  # seconds between "ready" and the timer kill
    faults: bool = True
    silence: float = 30.0  # a patient nudges (/start, /status) after this long without news
    drain_timeout: float = 240.0  # after the last kill, time for every patient to finish
    ready_timeout: float = 90.0
    workdir: Path | None = None
    verbose: bool = False


@dataclass
class HarnessReport:
    counts: dict[str, Any] = field(default_factory=dict)
    violations: list[str] = field(default_factory=list)
    workdir: Path | None = None

    @property
    def ok(self) -> bool:
        return not self.violations

    def summary(self) -> str:
        lines = ["crash harness counts:"]
        lines += [f"  {key:<28} {value}" for key, value in self.counts.items()]
        if self.violations:
            lines.append(f"VIOLATIONS ({len(self.violations)}):")
            lines += [f"  - {v}" for v in self.violations[:60]]
        else:
            lines.append("all invariants hold")
        return "\n".join(lines)


def item_titles() -> dict[str, str]:
    data = tomllib.loads((REPO / "checklists" / "general.toml").read_text())
    return {item["key"]: item["title"] for item in data["items"]}


def item_keys() -> list[str]:
    data = tomllib.loads((REPO / "checklists" / "general.toml").read_text())
    return [item["key"] for item in data["items"]]


def event_text(event: dict[str, Any]) -> str:
    return " ".join(
        event.get(k) or "" for k in ("plain_text", "text", "plain_caption", "caption")
    ).strip()


class SimPatient:
    """A patient who reads the bot's newest message and does what it asks.

    Tolerates restarts: acts on the newest prompt only (older ones may be re-sent after a
    crash), nudges with /start (every third time /status) after a silence, and never sends
    again a file the bot confirmed as received; an unconfirmed file is sent again only after
    the bot, asked afresh, still shows the step without it.
    """

    def __init__(
        self, emu: BotApiEmulator, user: SimUser, index: int, rng: random.Random, slow: float
    ) -> None:
        self.emu = emu
        self.user = user
        self.index = index
        self.rng = rng
        self.slow_probability = slow
        self.keys = item_keys()
        self.mark = emu.cursor()
        self.finished = False
        self.nudges = 0
        self.resends = 0
        self.actions = 0
        self.sent_files: dict[str, list[tuple[bytes, str, str, bool]]] = {}
        self.unique_ids: dict[str, set[str]] = {k: set() for k in FILE_ITEMS}
        self.confirmed: set[str] = set()
        self.waits: Counter[str] = Counter()
        self.answered = False
        self.stall_candidates: list[str] = []
        referral = [(pdf_bytes([f"Referral letter {index}", "Dear colleague"]), "referral.pdf")]
        if index % 2 == 0:  # every other patient sends the referral as an album of two PDFs
            referral.append((pdf_bytes([f"Referral letter {index}", "Page two"]), "page2.pdf"))
        self.files: dict[str, list[tuple[bytes, str, str, bool]]] = {
            "referral": [(d, n, "application/pdf", False) for d, n in referral],
            "imaging": [(dicom_path().read_bytes(), "IMG0001", "application/octet-stream", False)],
            "identity": [(document_photo(f"Passport of patient {index}"), "", "image/jpeg", True)],
        }

    # -- acting

    def _begin(self) -> None:
        self.mark = self.emu.cursor()
        self.actions += 1

    def say(self, text: str) -> None:
        self._begin()
        self.emu.send_text(self.user, text)

    def tap(self, message: dict[str, Any], data: str) -> bool:
        try:
            self.emu.press(self.user, message, data)
        except ValueError:  # the button is gone: ask for the current prompt instead
            return False
        self._begin()
        return True

    def send_item_files(self, item: str) -> None:
        files = self.files[item]
        self._begin()
        if len(files) > 1:
            ids = self.emu.send_album(self.user, [(d, n, m) for d, n, m, _ in files])
        elif files[0][3]:
            ids = [self.emu.send_photo(self.user, files[0][0])]
        else:
            data, name, mime, _ = files[0]
            ids = [self.emu.send_document(self.user, data, file_name=name, mime_type=mime)]
        for update_id in ids:
            message = self.emu.update(update_id)["message"]
            media = message.get("document") or message["photo"][-1]
            self.unique_ids[item].add(media["file_unique_id"])
            if self.rng.random() < self.slow_probability:  # set before the bot can fetch it
                self.emu.faults.slow_download(media["file_id"], self.rng.uniform(30e3, 150e3))
            self.stall_candidates.append(media["file_id"])
        self.sent_files[item] = files

    # -- reading

    def _mine(self, event: dict[str, Any]) -> bool:
        return event.get("chat_id") == self.user.id

    async def next_message(self, timeout: float) -> dict[str, Any] | None:
        """The newest bot message since the last action, once the burst has settled."""
        try:
            await self.emu.wait_for(self._mine, timeout=timeout, since=self.mark)
        except TimeoutError:
            return None
        settle_until = time.monotonic() + 4.0
        seen = len(self.emu.events)
        while time.monotonic() < settle_until:
            await asyncio.sleep(0.7)
            if len(self.emu.events) == seen:
                break
            seen = len(self.emu.events)
        mine = [e for e in self.emu.events[self.mark :] if self._mine(e)]
        return mine[-1]

    def _item_of(self, message: dict[str, Any], text: str) -> str | None:
        for button in self.emu.buttons(message):
            action, _, arg = str(button.get("callback_data") or "").partition(":")
            if action in {"done", "skip", "dont_have"} and arg in self.keys:
                return arg
        step = _STEP_RE.search(text)
        if step:
            return self.keys[int(step.group(1)) - 1]
        return None

    def _button(self, message: dict[str, Any], label: str) -> str | None:
        for button in self.emu.buttons(message):
            if label.lower() in str(button.get("text", "")).lower():
                return str(button.get("callback_data") or button["text"])
        return None

    def act(self, message: dict[str, Any]) -> bool:
        """Do what the message asks; False when it asks nothing this patient can do now."""
        text = event_text(message)
        if FINISHED in text:
            self.finished = True
            return True
        for label in ("I agree", "General medical review"):
            if (data := self._button(message, label)) is not None:
                return self.tap(message, data)
        item = self._item_of(message, text)
        if item is None and "your full name" in text:  # who the patient is, asked once
            self.say("Patient " + "".join("abcdefghij"[int(d)] for d in str(self.index)))
            return True
        if item is None and "date of birth" in text:
            self.say("31.01.1980")
            return True
        if item is None:
            return False
        if item in FILE_ITEMS:
            done = self._button(message, "Done with this item")
            if done is not None or "Received" in text or "already have" in text:
                self.confirmed.add(item)
            if done is not None:
                return self.tap(message, done)
            if item not in self.sent_files:
                self.send_item_files(item)
                return True
            if item not in self.confirmed:
                self.waits[item] += 1
                if self.waits[item] >= 3:  # asked afresh three times, still not received
                    self.waits[item] = 0
                    self.resends += 1
                    self.send_item_files(item)
                    return True
            return False
        if item == "medications":
            if not self.answered or self.waits[item] >= 2:
                self.answered, self.waits[item] = True, 0
                self.say(MEDICATIONS)
                return True
            self.waits[item] += 1
            return False
        label = "I don't have this" if item == "lab_results" else "Skip"
        data = self._button(message, label)
        return data is not None and self.tap(message, data)

    async def run(self, stop: asyncio.Event, silence: float) -> None:
        self.say("/start")
        while not self.finished and not stop.is_set():
            message = await self.next_message(silence)
            if message is not None and self.act(message):
                continue
            if self.finished or stop.is_set():
                break
            if message is None or not self.emu.events[self.mark :]:
                self.nudges += 1
                self.say("/status" if self.nudges % 3 == 0 else "/start")
            else:
                self.say("/start")  # a message with nothing to do: ask where we stand


class Harness:
    def __init__(self, config: HarnessConfig) -> None:
        self.config = config
        self.rng = random.Random(config.seed)
        self.kills = 0
        self.kill_modes: Counter[str] = Counter()
        self.crashes: list[str] = []
        self.violations: list[str] = []
        self.unfinished: list[int] = []
        self.leaked_children: list[int] = []
        self._children: list[int] = []
        self.startup_times: list[float] = []

    # -- bot lifecycle

    async def start_bot(self) -> None:
        mark, began = len(self.emu.calls), time.monotonic()
        self.bot.start()
        try:
            limit = self.config.ready_timeout
            await self.emu.wait_for_call("getUpdates", timeout=limit, since=mark)
        except TimeoutError:
            self.violations.append(f"bot not ready within {self.config.ready_timeout}s")
            raise
        self.startup_times.append(time.monotonic() - began)

    def _remember_children(self) -> None:
        if self.bot.proc is None:
            return
        pid = self.bot.proc.pid
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{pid}/task"):
                children = Path(f"/proc/{pid}/task/{task}/children").read_text().split()
                self._children.extend(int(c) for c in children)

    async def kill_bot(self, mode: str) -> None:
        if not self.bot.alive:
            code = self.bot.proc.returncode if self.bot.proc else None
            self.crashes.append(f"bot exited by itself (rc={code}) before kill {self.kills + 1}")
        self._remember_children()
        self.bot.kill()
        self.kills += 1
        self.kill_modes[mode] += 1
        self.emu.faults.stalled.clear()

    async def _wait_new(self, collection: list[Any], method: str | None, limit: float) -> bool:
        start = len(collection)
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            for item in collection[start:]:
                if method is None or (isinstance(item, Call) and item.method == method):
                    return True
            await asyncio.sleep(0.005)
        return False

    async def killer(self) -> None:
        low, high = self.config.alive
        for _ in range(self.config.kills):
            mode = self.rng.choice(["timer", "timer", "timer", "download", "send", "commit"])
            found = True
            if mode == "download":  # during a download, streaming into the vault
                found = await self._wait_new(self.emu.downloads, None, high)
                await asyncio.sleep(self.rng.uniform(0.0, 0.4) if found else 0)
            elif mode == "send":  # right around an outbox send
                found = await self._wait_new(self.emu.calls, "sendMessage", high)
                await asyncio.sleep(self.rng.uniform(0.0, 0.01) if found else 0)
            elif mode == "commit":  # just after an update was fetched: storing or handling it
                await asyncio.sleep(self.rng.uniform(0.0, 0.3))
                found = await self._wait_new(self.emu.calls, "getUpdates", high)
                await asyncio.sleep(self.rng.uniform(0.0, 0.05) if found else 0)
            else:
                await asyncio.sleep(self.rng.uniform(low, high))
            if not found:
                mode += "-timeout"
            await self.kill_bot(mode)
            if self.config.verbose or os.environ.get("HARNESS_PROGRESS"):
                done = sum(p.finished for p in self.patients)
                print(
                    f"[harness] kill {self.kills}/{self.config.kills} ({mode}) "
                    f"updates={len(self.emu._all_updates)} finished={done}",
                    file=sys.stderr,
                    flush=True,
                )
            await asyncio.sleep(self.rng.uniform(0.0, 0.3))
            await self.start_bot()

    async def injector(self, stop: asyncio.Event) -> None:
        faults = self.emu.faults
        while not stop.is_set():
            await asyncio.sleep(self.rng.uniform(0.5, 2.0))
            roll = self.rng.random()
            if roll < 0.35:
                faults.fail_next("sendMessage", 429, retry_after=self.rng.choice([1, 2]))
            elif roll < 0.55:
                faults.fail_next("sendMessage", self.rng.choice([500, 502, 503]))
            elif roll < 0.62:
                faults.disconnect_next("sendMessage")
            elif roll < 0.72:
                faults.fail_next("getUpdates", self.rng.choice([429, 502]), retry_after=1)
            elif roll < 0.82:
                faults.fail_next("getFile", self.rng.choice([500, 502]))
            elif self.stalls_allowed:
                candidates = [f for p in self.patients for f in p.stall_candidates[-2:]]
                if candidates:
                    faults.stall_download(self.rng.choice(candidates))

    # -- the run

    async def run(self) -> HarnessReport:
        cfg = self.config
        workdir = cfg.workdir or Path(tempfile.mkdtemp(prefix="crash-harness-"))
        workdir.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        async with BotApiEmulator() as emu:
            self.emu = emu
            emu.user(COORDINATOR, first_name="Coordinator")
            self.bot = BotProcess(emu, workdir, coordinator_chat_id=COORDINATOR)
            self.patients = [
                SimPatient(
                    emu,
                    emu.user(6_000 + i, first_name=f"P{i}", language_code="en"),
                    i,
                    random.Random(cfg.seed * 1000 + i),
                    0.4 if cfg.faults else 0.0,
                )
                for i in range(cfg.patients)
            ]
            self.stalls_allowed = cfg.faults
            stop, stop_faults = asyncio.Event(), asyncio.Event()
            try:
                await self.start_bot()
                walkers = [asyncio.create_task(p.run(stop, cfg.silence)) for p in self.patients]
                injector = asyncio.create_task(self.injector(stop_faults)) if cfg.faults else None
                await self.killer()
                kill_phase = time.monotonic() - started
                self.stalls_allowed = False
                emu.faults.stalled.clear()
                await asyncio.sleep(min(20.0, cfg.drain_timeout / 4))
                stop_faults.set()
                if injector is not None:
                    await injector
                emu.faults.clear()
                _, pending = await asyncio.wait(walkers, timeout=cfg.drain_timeout)
                stop.set()
                for task in pending:
                    task.cancel()
                await asyncio.gather(*walkers, return_exceptions=True)
                await self.quiesce(workdir / "data" / "care-companion.db")
            finally:
                stop.set()
                self.bot.stop()
            report = self.check(workdir)
            report.counts["seconds (kill phase)"] = round(kill_phase, 1)
            report.counts["seconds (total)"] = round(time.monotonic() - started, 1)
            return report

    async def quiesce(self, db: Path, timeout: float = 60.0) -> None:
        """Wait until every update is confirmed and handled and the outbox is empty."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.emu.pending_updates() and await asyncio.to_thread(_idle, db):
                await asyncio.sleep(1.5)  # room for a late (wrong) message to show up
                return
            await asyncio.sleep(0.5)
        self.violations.append(f"not quiescent {timeout}s after the patients stopped")

    # -- invariants

    def check(self, workdir: Path) -> HarnessReport:
        emu, v = self.emu, self.violations
        v.extend(self.crashes)
        db = workdir / "data" / "care-companion.db"
        conn = _connect_ro(db)
        try:
            integrity = conn.execute("PRAGMA integrity_check").fetchone()[0]
            inbox = dict(conn.execute("SELECT update_id, status FROM inbox").fetchall())
            files = conn.execute("SELECT id, case_id, item_key, unique_id, blob_id FROM case_files")
            file_rows = files.fetchall()
            cases = conn.execute("SELECT id, chat_id, state, completions FROM cases").fetchall()
            items = conn.execute("SELECT case_id, item_key, files_json FROM case_items").fetchall()
            outbox = Counter(
                dict(conn.execute("SELECT status, count(*) FROM outbox GROUP BY status").fetchall())
            )
        finally:
            conn.close()
        if integrity != "ok":
            v.append(f"integrity_check: {integrity}")

        # Every update the emulator saw confirmed: stored and handled (or parked) once.
        all_ids = sorted(emu._all_updates)
        confirmed = [u for u in all_ids if u <= emu.confirmed_update_id]
        for update_id in confirmed:
            if inbox.get(update_id) not in ("done", "parked"):
                v.append(f"update {update_id} confirmed but inbox status={inbox.get(update_id)}")
        if len(confirmed) != len(all_ids):
            v.append(f"{len(all_ids) - len(confirmed)} updates never confirmed")
        parked = [u for u, s in inbox.items() if s == "parked"]

        # Files: one row per (case, unique id); items list exactly their rows.
        per_unique = Counter((r[1], r[3]) for r in file_rows)
        v.extend(f"file {k} has {n} rows" for k, n in per_unique.items() if n > 1)
        rows_by_case: dict[str, set[str]] = {}
        for file_id, case_id, _, _, _ in file_rows:
            rows_by_case.setdefault(case_id, set()).add(file_id)
        listed_by_case: dict[str, list[str]] = {}
        per_item: dict[tuple[str, str], int] = {}
        for case_id, item_key, files_json in items:
            ids = [f["file_id"] for f in json.loads(files_json)]
            listed_by_case.setdefault(case_id, []).extend(ids)
            per_item[(case_id, item_key)] = len(ids)
        for case_id in set(rows_by_case) | set(listed_by_case):
            listed = listed_by_case.get(case_id, [])
            if len(listed) != len(set(listed)):
                v.append(f"case {case_id}: a file listed twice in its items")
            if set(listed) != rows_by_case.get(case_id, set()):
                v.append(f"case {case_id}: item files {sorted(listed)} != rows")

        # Blobs: exactly the rows' blobs on disk.
        blobs_dir = workdir / "data" / "vault" / "blobs"
        on_disk = {p.name for p in blobs_dir.glob("*/*") if p.is_file()}
        wrong_shard = [
            p for p in blobs_dir.glob("*/*") if p.is_file() and p.parent.name != p.name[:2]
        ]
        row_blobs = {r[4] for r in file_rows}
        orphans, missing = on_disk - row_blobs, row_blobs - on_disk
        v.extend(f"orphan blob without row: {b}" for b in sorted(orphans))
        v.extend(f"row without blob: {b}" for b in sorted(missing))
        v.extend(f"blob in wrong shard: {p}" for p in wrong_shard)

        # Patients: each file they sent is stored exactly once in its item. A simulated
        # patient that ran out of time is a fault of the bot only if the bot still owes it
        # something: an update not handled, or a reply not sent.
        case_of_chat = {chat: case_id for case_id, chat, _, _ in cases}
        owes = outbox.get("pending", 0) + sum(s == "new" for s in inbox.values())
        self.unfinished = [p.index for p in self.patients if not p.finished]
        if self.unfinished and owes:
            v.append(f"patients {self.unfinished} stalled while the bot owed {owes} items")
        if len(self.unfinished) == len(self.patients):
            v.append("no patient finished: the run shows no progress")
        for patient in self.patients:
            case_id = case_of_chat.get(patient.user.id)
            if case_id is None:
                continue
            for item in FILE_ITEMS:
                stored = {r[3] for r in file_rows if r[1] == case_id and r[2] == item}
                expected = patient.unique_ids[item]
                if patient.finished and stored != expected:
                    v.append(
                        f"patient {patient.index} item {item}: stored {len(stored)} file(s) "
                        f"{sorted(stored)}, sent {sorted(expected)}"
                    )
                if per_item.get((case_id, item), 0) != len(stored):
                    v.append(f"case {case_id} item {item}: list/rows mismatch")

        # Alerts: every complete case exactly once, nothing for the others.
        coordinator_texts = [event_text(m) for m in emu.sent(COORDINATOR)]
        alerts = 0
        for case_id, _, state, completions in cases:
            count = sum(case_id in t for t in coordinator_texts)
            alerts += count
            want = 1 if state == "complete" else 0
            if count != want:
                v.append(f"case {case_id} ({state}, completions={completions}) alerted {count}x")

        # Limits, measured where Telegram would: at the emulator.
        sends = [c for c in emu.calls_for("sendMessage") if c.status == 200]
        v.extend(rate_breaches(sends))
        failed_calls = [c for c in emu.calls if c.status not in (200, None) or c.error]
        log = self.bot.log()
        self._check_leaks()
        v.extend(f"intake worker left running after a kill: pid {p}" for p in self.leaked_children)
        counts: dict[str, Any] = {
            "patients": len(self.patients),
            "patients finished": sum(p.finished for p in self.patients),
            "unfinished (bot owed nothing)": len(self.unfinished),
            "kills": self.kills,
            "kill instants": dict(self.kill_modes),
            "bot starts": self.bot.starts,
            "bot start to ready (s)": (
                f"mean {sum(self.startup_times) / max(1, len(self.startup_times)):.1f}, "
                f"max {max(self.startup_times, default=0):.1f}"
            ),
            "updates": len(all_ids),
            "updates confirmed": len(confirmed),
            "inbox done / parked": f"{sum(s == 'done' for s in inbox.values())} / {len(parked)}",
            "files (rows)": len(file_rows),
            "blobs on disk": len(on_disk),
            "cases / complete": f"{len(cases)} / {sum(c[2] == 'complete' for c in cases)}",
            "alerts": alerts,
            "sendMessage ok / calls": f"{len(sends)} / {len(emu.calls_for('sendMessage'))}",
            "outbox": dict(outbox),
            "429s seen": sum(c.status == 429 for c in emu.calls),
            "5xx seen": sum((c.status or 0) >= 500 for c in emu.calls),
            "failed or aborted calls": len(failed_calls),
            "retries (update failed)": log.count("update failed"),
            "retries (send failed/429)": log.count("send failed") + log.count("429 from"),
            "downloads (done/started)": (
                f"{sum(d['completed'] for d in emu.downloads)}/{len(emu.downloads)}"
            ),
            "patient nudges": sum(p.nudges for p in self.patients),
            "patient re-sends": sum(p.resends for p in self.patients),
            "tracebacks in bot log": log.count("Traceback"),
        }
        if self.config.verbose:
            counts["failure lines"] = sorted(
                {line.split(": ", 1)[-1][:120] for line in log.splitlines() if "failed" in line}
            )[:20]
        return HarnessReport(counts, v, workdir)

    def _check_leaks(self) -> None:
        for pid in set(self._children):
            with contextlib.suppress(OSError):
                stat = Path(f"/proc/{pid}/stat").read_text()
                if stat.rsplit(")", 1)[1].split()[0] != "Z":
                    self.leaked_children.append(pid)


def _idle(db: Path) -> bool:
    """No update waiting in the inbox and no message waiting in the outbox."""
    if not db.exists():
        return False
    with contextlib.closing(_connect_ro(db)) as conn:
        busy = conn.execute(
            "SELECT (SELECT count(*) FROM inbox WHERE status = 'new')"
            " + (SELECT count(*) FROM outbox WHERE status = 'pending')"
        ).fetchone()[0]
    return busy == 0


def _connect_ro(db: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)


def rate_breaches(sends: list[Call]) -> list[str]:
    """Messages sent faster than Telegram allows: >3 in 3 s to one chat, >25 in 1 s overall."""
    breaches = []
    by_chat: dict[int, list[float]] = {}
    for call in sends:
        by_chat.setdefault(int(call.params.get("chat_id", 0)), []).append(call.time)
    for chat_id, times in by_chat.items():
        times.sort()
        window, limit = (60.0, 20) if chat_id < 0 else (PER_CHAT_WINDOW, PER_CHAT_LIMIT)
        for i in range(len(times) - limit):
            if times[i + limit] - times[i] < window:
                breaches.append(
                    f"chat {chat_id}: {limit + 1} messages within "
                    f"{times[i + limit] - times[i]:.2f}s"
                )
                break
    times = sorted(c.time for c in sends)
    worst = max(
        (bisect_count(times, i, GLOBAL_WINDOW) for i in range(len(times))),
        default=0,
    )
    if worst > GLOBAL_LIMIT:
        breaches.append(f"overall: {worst} messages within {GLOBAL_WINDOW}s (limit {GLOBAL_LIMIT})")
    return breaches


def bisect_count(times: list[float], start: int, window: float) -> int:
    return bisect.bisect_left(times, times[start] + window) - start


def max_per_window(times: list[float], window: float) -> int:
    times = sorted(times)
    return max((bisect_count(times, i, window) for i in range(len(times))), default=0)


async def run_harness(config: HarnessConfig) -> HarnessReport:
    return await Harness(config).run()
