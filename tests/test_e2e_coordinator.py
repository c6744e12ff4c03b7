"""End to end, the coordinator's side: the real bot process against the Bot API emulator.

A patient completes a case; the coordinator opens it from the alert, reviews the referral
(a preview of its first page arrives, protected), sends it back as blurred; the patient
reads why, sends a new copy, and the case completes again: a second alert, and only one.
The coordinator then exports the bundle: the archive and, apart, its password; the archive
opens with the password and holds the patient's new file byte for byte. Someone else
pressing the same buttons gets nothing.
"""

from __future__ import annotations

import asyncio
import io
from pathlib import Path

import pyzipper

from tests.botproc import BotProcess
from tests.conftest import COORDINATOR
from tests.emulator import BotApiEmulator
from tests.files import pdf_bytes
from tests.patient_driver import PatientDriver
from tests.test_e2e_patient import (
    coordinator_alerts,
    started,
    walk_first_items,
    walk_remaining_items,
)

pytestmark = __import__("pytest").mark.e2e


async def test_review_send_back_complete_again_and_export(
    emulator: BotApiEmulator, bot: BotProcess, tmp_path: Path
) -> None:
    await started(bot, emulator)
    coordinator = PatientDriver(emulator, emulator.users[COORDINATOR])  # sees from now on
    patient = PatientDriver(emulator, emulator.user(5101, first_name="Ann", language_code="en"))
    await walk_first_items(patient)
    await walk_remaining_items(patient)
    alert = await emulator.wait_for_text(COORDINATOR, "is complete", timeout=30)
    labels = [b["text"] for b in emulator.buttons(alert)]
    assert any("Open" in label for label in labels) and any("Export" in label for label in labels)

    # Someone else replaying the alert's buttons (data copied, no message of theirs) and a
    # review decision gets nothing at all.
    stranger = emulator.user(5999, first_name="Eve")
    mark = emulator.cursor()
    for label in ("Open", "Export"):
        emulator.press(stranger, alert["message_id"], emulator.button(alert, label), strict=False)
    await asyncio.sleep(2.0)
    assert [e for e in emulator.events[mark:] if e.get("chat_id") == stranger.id] == []

    await coordinator.tap("Open")
    await coordinator.tap("Review 1")
    preview = await emulator.wait_for(
        lambda e: e["chat_id"] == COORDINATOR and e.get("method") == "sendPhoto",
        timeout=60,
        since=coordinator.mark,
    )
    assert preview["params"].get("protect_content") and preview["file_bytes"][:4] == b"\x89PNG"
    await coordinator.tap("too blurred")
    await coordinator.expect("sent back")
    reason = await patient.expect("needs «Referral letter")
    assert "too blurred to read" in reason["text"]

    sharper = pdf_bytes(["Referral letter", "A sharper copy"])
    patient.send_file(sharper, "referral-sharper.pdf", "application/pdf")
    await patient.tap("Done with this item")
    await patient.expect("everything the hospital needs")
    await emulator.wait_for(
        lambda e: e["chat_id"] == COORDINATOR and len(coordinator_alerts(emulator)) == 2,
        timeout=30,
    )
    await asyncio.sleep(1.5)  # room for a wrong third alert
    alerts = coordinator_alerts(emulator)
    assert len(alerts) == 2

    coordinator._begin()
    emulator.press(coordinator.user, alerts[-1], emulator.button(alerts[-1], "Export"))
    archive = await emulator.wait_for(
        lambda e: e["chat_id"] == COORDINATOR and e.get("method") == "sendDocument",
        timeout=60,
        since=coordinator.mark,
    )
    password_message = await coordinator.expect("password of the hand-off bundle")
    password = password_message["text"].rsplit(": ", 1)[1].strip()
    assert password not in (archive.get("caption") or "")
    with pyzipper.AESZipFile(io.BytesIO(archive["file_bytes"])) as bundle:
        bundle.setpassword(password.encode())
        contents = {name: bundle.read(name) for name in bundle.namelist()}
    assert sharper in contents.values()
    assert any(name.endswith("Manifest.pdf") for name in contents)
    view = bot.cli_json("cases", "show", bot.cli_json("cases", "list")[0]["case_id"])
    assert view["complete"] is True
