"""Large imaging studies (issue 8): the real bot process against the Bot API emulator.

- Local Bot API server mode: a 300 MB study zipped from a CD arrives by absolute path and
  is streamed into the vault in bounded memory; the patient reads the study's summary.
- Cloud mode: a file over the 20 MB download limit is answered at once with a one-time
  link to the upload page (served by the bot itself), never downloaded.
"""

from __future__ import annotations

import socket
import sqlite3
import zipfile
from pathlib import Path

import aiohttp
import numpy as np
import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid

from tests.botproc import BotProcess
from tests.emulator import BotApiEmulator
from tests.files import dicom_path
from tests.patient_driver import PatientDriver
from tests.test_e2e_patient import started

pytestmark = pytest.mark.e2e
STUDY_BYTES = 300 * 1024 * 1024
RSS_GROWTH_LIMIT_KB = 128 * 1024


def rss_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise LookupError(field)


def big_study(folder: Path) -> Path:
    """A CT series of about 300 MB (each slice its own UIDs and noise), zipped as a CD copy."""
    template = dcmread(dicom_path())
    rng = np.random.default_rng(7)
    study, series = generate_uid(), generate_uid()
    cd = folder / "cd.zip"
    slices = STUDY_BYTES // (512 * 512 * 2) + 1
    with zipfile.ZipFile(cd, "w", zipfile.ZIP_STORED) as archive:
        for number in range(slices):
            ds = template.copy()
            ds.Rows = ds.Columns = 512
            ds.PixelData = rng.integers(0, 4000, (512, 512), dtype=np.uint16).tobytes()
            ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            ds.InstanceNumber = number + 1
            path = folder / "slice.dcm"
            ds.save_as(path)
            archive.write(path, f"DICOM/S0001/I{number:04d}")
    return cd


async def reach_imaging(patient: PatientDriver) -> None:
    patient.say("/start")
    await patient.tap("I agree")
    await patient.tap("General medical review")
    await patient.introduce()
    await patient.expect("Step 1 of 7")
    await patient.tap("I don't have this")
    await patient.expect("Step 2 of 7")


async def test_a_300_mb_study_arrives_by_path_in_bounded_memory(tmp_path: Path) -> None:
    async with BotApiEmulator(local_mode=True) as emulator:
        bot = BotProcess(emulator, tmp_path, extra_env={"TELEGRAM_API_LOCAL": "true"})
        try:
            await started(bot, emulator)
            patient = PatientDriver(emulator, emulator.user(8801, first_name="Li"))
            await reach_imaging(patient)
            cd = big_study(tmp_path)
            assert cd.stat().st_size > STUDY_BYTES
            assert bot.proc is not None
            before = rss_kb(bot.proc.pid, "VmRSS")
            patient.send_file(cd, "cd.zip", "application/zip")
            summary = await patient.expect("series", timeout=600)
            peak = rss_kb(bot.proc.pid, "VmHWM")
            print(f"bot RSS before {before // 1024} MiB, peak {peak // 1024} MiB")
            assert "CT" in summary["text"] and "1 series" in summary["text"]
            assert peak - before < RSS_GROWTH_LIMIT_KB, (before, peak)
            # getFile answered with a path on the server's disk, read from there, not over HTTP
            assert emulator.calls_for("getFile") and emulator.downloads == []
        finally:
            bot.stop()
        assert "Traceback" not in bot.log()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def test_a_file_too_big_for_the_chat_gets_the_upload_page(tmp_path: Path) -> None:
    port = free_port()
    async with BotApiEmulator() as emulator:
        env = {"WEB_BASE_URL": f"http://127.0.0.1:{port}", "WEB_PORT": str(port)}
        bot = BotProcess(emulator, tmp_path, extra_env=env)
        try:
            await started(bot, emulator)
            patient = PatientDriver(emulator, emulator.user(8802, first_name="Ana"))
            await reach_imaging(patient)
            prompt = emulator.sent(8802)[-1]
            assert any("whole CD" in b["text"] for b in emulator.buttons(prompt))
            patient.send_file(b"\0" * (20 * 1024 * 1024 + 1), "IMG0001.dcm", "application/dicom")
            offer = await patient.expect("larger than Telegram")
            [link] = [b["url"] for b in emulator.buttons(offer) if b.get("url")]
            assert link.startswith(f"http://127.0.0.1:{port}/upload/u/")
            assert not emulator.calls_for("getFile")  # never downloaded
            async with aiohttp.ClientSession() as http, http.get(link) as page:
                assert page.status == 200 and "text/html" in page.headers["Content-Type"]
            with sqlite3.connect(bot.data_dir / "care-companion.db") as db:
                payloads = [row[0] for row in db.execute("SELECT payload FROM outbox")]
            token = link.rsplit("/", 1)[1]
            assert not any(token in p for p in payloads)  # the link was sealed, then scrubbed
        finally:
            bot.stop()
        assert "Traceback" not in bot.log()
