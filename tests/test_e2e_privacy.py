"""Private by default: after a whole scenario through the real bot, nothing personal is
readable anywhere under DATA_DIR (database file included) nor in the bot's log."""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator
from pathlib import Path

import pydicom
import pytest

from tests.botproc import BotProcess
from tests.emulator import BotApiEmulator
from tests.files import dicom_path, document_photo
from tests.patient_driver import PatientDriver

pytestmark = pytest.mark.e2e
COORDINATOR = 900_002
NAME, SURNAME, HANDLE = "Xiomara", "Quackenbush", "xiomara_q_1987"
ANSWER = "Warfarin-Zeta 5 mg; allergic to Umbrellacillin"
DICOM_NAME = "Quackenbush^Xiomara^Maribel"
FILE_NAME = "xiomara-quackenbush-referral.pdf"
PDF_MARKER = b"REFERRAL-MARKER-7f3a9c"


def marked_dicom() -> bytes:
    """A real CT slice carrying the patient's own (distinctive) name in its header."""
    dataset = pydicom.dcmread(dicom_path())
    dataset.PatientName = DICOM_NAME
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def plain_pdf() -> bytes:
    """A small PDF whose text is stored uncompressed, so its marker is in its bytes."""
    content = b"BT /F1 12 Tf 72 720 Td (" + PDF_MARKER + b") Tj ET"
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R"
        b" /Resources << /Font << /F1 5 0 R >> >> >>",
        b"<< /Length " + str(len(content)).encode() + b" >>\nstream\n" + content + b"\nendstream",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += f"{number} 0 obj\n".encode() + body + b"\nendobj\n"
    xref = len(out)
    out += f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode()
    for offset in offsets:
        out += f"{offset:010d} 00000 n \n".encode()
    out += (
        f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
    )
    return bytes(out)


@pytest.fixture
async def emulator() -> AsyncIterator[BotApiEmulator]:
    async with BotApiEmulator() as emu:
        yield emu


async def test_nothing_personal_is_readable_on_disk_or_in_logs(
    emulator: BotApiEmulator, tmp_path: Path
) -> None:
    assert PDF_MARKER in plain_pdf() and DICOM_NAME.encode() in marked_dicom()
    emulator.user(COORDINATOR, first_name="Coordinator")
    bot = BotProcess(
        emulator,
        tmp_path,
        coordinator_chat_id=COORDINATOR,
        extra_env={"DELETE_UPLOAD_MESSAGES": "true"},
    )
    mark = len(emulator.calls)
    bot.start()
    try:
        await emulator.wait_for_call("getUpdates", timeout=60, since=mark)
        user = emulator.user(6001, first_name=NAME, last_name=SURNAME, username=HANDLE)
        patient = PatientDriver(emulator, user)
        patient.say("/start")
        await patient.tap("I agree")
        await patient.tap("General medical review")
        await patient.introduce(f"{NAME} {SURNAME}", "31.01.1987")  # typed: kept only encrypted
        uploads = [patient.send_file(plain_pdf(), FILE_NAME, "application/pdf")]
        await patient.tap("Done with this item")
        uploads.append(patient.send_file(marked_dicom(), "IMG0001.dcm", "application/dicom"))
        await patient.tap("Done with this item")
        await patient.tap("Skip")
        await patient.tap("Skip")
        await patient.expect("Step 5 of 7")
        patient.say(ANSWER)
        await patient.tap("Skip")
        uploads.append(patient.send_photo(document_photo(f"{NAME} {SURNAME}")))
        await patient.tap("Done with this item")
        await emulator.wait_for_text(COORDINATOR, "is complete", timeout=30)
        # DELETE_UPLOAD_MESSAGES: each upload left the chat once stored and checked.
        for _ in range(100):
            ids = [emulator.update(u)["message"]["message_id"] for u in uploads]
            if all(emulator.message(user.id, i).get("deleted") for i in ids):
                break
            await asyncio.sleep(0.2)
        assert all(emulator.message(user.id, i).get("deleted") for i in ids)
        alert = [m for m in emulator.sent(COORDINATOR) if "is complete" in (m.get("text") or "")]
        assert alert and alert[0]["params"].get("protect_content") in (True, "true", "True")
    finally:
        bot.stop()

    secrets = [NAME, SURNAME, HANDLE, ANSWER, FILE_NAME, DICOM_NAME, "Quackenbush^Xiomara"]
    needles = [s.encode() for s in secrets] + [PDF_MARKER, "Warfarin".encode("utf-16-le")]
    found = []
    files = [p for p in bot.data_dir.rglob("*") if p.is_file()]
    assert any(p.suffix == ".db" for p in files) and len(files) >= 4
    for path in files:
        data = path.read_bytes()
        found += [(str(path.relative_to(bot.data_dir)), n) for n in needles if n in data]
    assert found == []
    log = bot.log()
    assert "update handled" in log  # the log is real, and says what happened by id
    assert [s for s in secrets if s in log] == []
