"""End to end: the real `care-companion run` process against the Bot API emulator."""

from __future__ import annotations

import asyncio

import pytest

from tests.botproc import BotProcess
from tests.conftest import COORDINATOR
from tests.emulator import BotApiEmulator
from tests.files import dicom_path, document_photo, pdf_bytes
from tests.patient_driver import PatientDriver

pytestmark = pytest.mark.e2e


async def started(bot: BotProcess, emu: BotApiEmulator) -> None:
    mark = len(emu.calls)
    bot.start()
    await emu.wait_for_call("getUpdates", timeout=60, since=mark)


async def walk_first_items(patient: PatientDriver) -> None:
    """/start, consent, procedure, the referral PDF and the scan: two items complete."""
    patient.say("/start")
    await patient.expect("Care Companion")
    await patient.tap("I agree")
    await patient.tap("General medical review")
    await patient.introduce()
    await patient.expect("Step 1 of 7")
    patient.send_file(
        pdf_bytes(["Referral letter", "Dear colleague"]), "referral.pdf", "application/pdf"
    )
    await patient.tap("Done with this item")
    await patient.expect("Step 2 of 7")
    patient.send_file(dicom_path(), "IMG0001", "application/octet-stream")
    await patient.tap("Done with this item")
    await patient.expect("Step 3 of 7")


async def walk_remaining_items(patient: PatientDriver) -> None:
    await patient.tap("Skip")  # radiology reports: optional
    await patient.expect("Step 4 of 7")
    await patient.tap("I don't have this")  # lab results
    await patient.expect("Step 5 of 7")
    patient.say("Metformin 500 mg twice a day. Allergic to penicillin.")
    await patient.expect("Step 6 of 7")
    await patient.tap("Skip")  # past operation notes
    await patient.expect("Step 7 of 7")
    patient.send_photo(document_photo())
    await patient.tap("Done with this item")
    await patient.expect("everything the hospital needs")


def coordinator_alerts(emu: BotApiEmulator) -> list[dict]:
    return [m for m in emu.sent(COORDINATOR) if "is complete" in (m.get("text") or "")]


async def test_patient_completes_the_default_checklist(
    emulator: BotApiEmulator, bot: BotProcess
) -> None:
    """A patient goes from /start to a complete case with real files; one alert fires."""
    await started(bot, emulator)
    patient = PatientDriver(emulator, emulator.user(5001, first_name="Ann", language_code="en"))
    await walk_first_items(patient)
    await walk_remaining_items(patient)

    await emulator.wait_for_text(COORDINATOR, "is complete", timeout=30)
    await asyncio.sleep(1.5)  # room for a wrong second alert to show up
    alerts = coordinator_alerts(emulator)
    assert len(alerts) == 1
    patient.say("/status")
    status = await patient.expect("Your records so far")
    assert "Passport or ID: received" in status["text"]
    # The checklist card: one message, pinned, edited in place when the patient pauses (it
    # waits for a quiet chat: adapters.store.enqueue_card); it comes to say what /status says.
    summary = status["text"].split("\n", 1)[1]

    def current_card(event: dict) -> bool:
        text = event.get("text") or ""
        return event.get("chat_id") == 5001 and "Your checklist" in text and summary in text

    await emulator.wait_for(current_card, timeout=30)
    cards = [m for m in emulator.sent(5001) if "Your checklist" in (m.get("text") or "")]
    assert len(cards) == 1 and cards[0]["pinned"]
    assert cards[0]["text"].split("\n", 1)[1] == summary

    cases = bot.cli_json("cases", "list")
    assert len(cases) == 1
    case_id = cases[0]["case_id"]
    assert case_id in alerts[0]["text"]
    view = bot.cli_json("cases", "show", case_id)
    assert view["complete"] is True and view["current_item"] is None
    items = {item["key"]: item for item in view["items"]}
    assert [f["kind"] for f in items["referral"]["files"]] == ["pdf"]
    assert [f["kind"] for f in items["imaging"]["files"]] == ["dicom"]
    assert [f["kind"] for f in items["identity"]["files"]] == ["image"]
    assert items["lab_results"]["status"] == "dont_have"
    assert items["reports"]["status"] == "skipped"
    assert items["medications"]["status"] == "done" and items["medications"]["has_answer"]

    # The coordinator browses in their private chat; the patient typing the same gets help.
    coordinator = PatientDriver(emulator, emulator.users[COORDINATOR])
    coordinator.say("/cases")
    listing = await coordinator.expect(case_id[:8])
    await coordinator.tap("Open")
    view = await coordinator.expect("Referral letter")
    assert case_id in view["text"] and listing["params"].get("protect_content")
    patient.say("/cases")
    answer = await patient.expect("/status")
    assert case_id not in answer["text"]
    assert emulator.confirmed_update_id >= max(
        u["update_id"] for u in emulator.pending_updates() or [{"update_id": 0}]
    )


async def test_kill_between_items_resumes_at_the_same_item(
    emulator: BotApiEmulator, bot: BotProcess
) -> None:
    """SIGKILL between two items, restart: the same item is asked, nothing received is lost."""
    await started(bot, emulator)
    patient = PatientDriver(emulator, emulator.user(5002, first_name="Bo", language_code="en"))
    await walk_first_items(patient)
    bot.kill()
    await started(bot, emulator)
    patient.say("/start")
    await patient.expect("Step 3 of 7")
    await walk_remaining_items(patient)
    await emulator.wait_for_text(COORDINATOR, "is complete", timeout=30)
    await asyncio.sleep(1.5)
    assert len(coordinator_alerts(emulator)) == 1
    case_id = bot.cli_json("cases", "list")[0]["case_id"]
    view = bot.cli_json("cases", "show", case_id)
    items = {item["key"]: item for item in view["items"]}
    assert len(items["referral"]["files"]) == 1 and len(items["imaging"]["files"]) == 1
    assert view["complete"] is True


async def test_album_gets_one_answer(emulator: BotApiEmulator, bot: BotProcess) -> None:
    """Three pages sent as one album: three files stored, one reply."""
    await started(bot, emulator)
    patient = PatientDriver(emulator, emulator.user(5003, first_name="Cy", language_code="en"))
    patient.say("/start")
    await patient.tap("I agree")
    await patient.tap("General medical review")
    await patient.introduce()
    await patient.expect("Step 1 of 7")
    patient._begin()
    emulator.send_album(
        patient.user,
        [(pdf_bytes([f"Referral page {n}"]), f"page{n}.pdf", "application/pdf") for n in range(3)],
    )
    answer = await patient.expect("3 file(s) so far")
    await asyncio.sleep(2.5)  # any second answer would have arrived by now
    later = [e for e in emulator.events[patient.mark :] if e.get("chat_id") == 5003]
    # The checklist card may go out now too (it waits for a pause): it is no answer.
    replies = [e for e in later if "Your checklist" not in (e.get("text") or "")]
    assert [e["message_id"] for e in replies if e["event"] == "sent"] == [answer["message_id"]]
    view = bot.cli_json("cases", "show", bot.cli_json("cases", "list")[0]["case_id"])
    assert len(view["items"][0]["files"]) == 3
