"""Erasure survives kill -9 at any instant: after a restart it completes, and a late
duplicate update of the erased chat brings nothing back."""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from sqlmodel import func, select

from adapters.tables import CaseRow, ErasureRow, FileRow
from bot.app import build_app, prepare
from bot.settings import Settings
from bot.shell import LocalFileSource, local_incoming
from core.events import Event, EventKind
from core.ports import Patient
from tests.files import pdf_bytes
from tests.scenario import walk_to_complete

REPO = Path(__file__).resolve().parent.parent
CHAT = 77
ERASE_UPDATE = 500
KILLS = 8


async def _complete_case(data_dir: Path, tmp: Path) -> None:
    settings = Settings(data_dir=data_dir, coordinator_chat_id=-5)
    await asyncio.to_thread(prepare, settings)
    app = build_app(settings)
    await walk_to_complete(app, Patient(CHAT, CHAT, "en"), tmp, 100, answer="None")
    await app.close()


def _erase_in_subprocess(data_dir: Path, delay: float | None) -> str:
    """Run the erasure; SIGKILL it `delay` seconds after it is ready (None: let it finish)."""
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.erase_worker", str(data_dir), str(CHAT), str(ERASE_UPDATE)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert process.stdout is not None
    assert process.stdout.readline().strip() == "ready"
    if delay is None:
        process.wait(timeout=120)
        return "finished"
    time.sleep(delay)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    return "killed"


async def _state(data_dir: Path) -> tuple[int, int, int, int]:
    app = build_app(Settings(data_dir=data_dir))
    async with app.store.session() as session:
        cases = (await session.exec(select(func.count()).select_from(CaseRow))).one()
        files = (await session.exec(select(func.count()).select_from(FileRow))).one()
        tombstones = (await session.exec(select(func.count()).select_from(ErasureRow))).one()
    blobs = len(list(app.vault.iter_blob_ids()))
    await app.close()
    return cases, files, blobs, tombstones


async def test_erasure_completes_after_kill_at_random_points(tmp_path: Path) -> None:
    template = tmp_path / "template"
    await _complete_case(template, tmp_path)
    assert await _state(template) == (1, 3, 3, 0)
    rng = random.Random(20261128)
    for attempt in range(KILLS):
        data_dir = tmp_path / f"run{attempt}"
        shutil.copytree(template, data_dir)
        _erase_in_subprocess(data_dir, rng.uniform(0.0, 0.25))
        # Restart: finish what was interrupted, and Telegram redelivers the unconfirmed update.
        _erase_in_subprocess(data_dir, None)
        assert await _state(data_dir) == (0, 0, 0, 1), f"attempt {attempt}"
        # A late duplicate of an earlier update, carrying a file, resurrects nothing.
        app = build_app(Settings(data_dir=data_dir))
        late = tmp_path / "late.pdf"
        late.write_bytes(pdf_bytes(["late"]))
        patient = Patient(CHAT, CHAT, "en")
        await app.service.handle_file(patient, local_incoming(late), LocalFileSource(), 103)
        await app.service.handle(patient, Event(EventKind.START), 101)
        await app.close()
        assert await _state(data_dir) == (0, 0, 0, 1), f"attempt {attempt}: resurrected"
