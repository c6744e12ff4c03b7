"""End to end in Thai and in Arabic: the real bot process, a patient whose Telegram speaks
that language, from /start to a complete case. Every message and every button the bot shows
that patient must be in the patient's language: no English beyond names and format codes."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from babel.messages.pofile import read_po

from handlers.render import FSI, PDI, language_name
from tests.botproc import BotProcess
from tests.emulator import BotApiEmulator
from tests.files import pdf_bytes
from tests.patient_driver import PatientDriver

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parent.parent
# Latin words a translation may keep: file formats, brands, scan and test abbreviations.
ALLOWED_LATIN = {
    "Care", "Companion", "Telegram", "PDF", "ZIP", "DICOM", "DICOMDIR", "JPEG", "PNG", "HEIC",
    "Word", "Office", "USB", "CD", "CT", "MRI", "PET", "ECG", "CBCT", "AMH", "FSH", "IVF",
    "GB", "UTC",
}  # fmt: skip
COMMAND = re.compile(r"/[a-z_]+")
LATIN_WORD = re.compile(r"[A-Za-z]{2,}")
PICKER = {language_name(code) for code in ("en", "zh", "th", "ru", "ar", "es", "vi", "id")}
SCRIPT = {"th": re.compile(r"[\u0e00-\u0e7f]"), "ar": re.compile(r"[\u0600-\u06ff]")}


@pytest.fixture
def bot(emulator: BotApiEmulator, tmp_path: Path) -> Iterator[BotProcess]:
    process = BotProcess(emulator, tmp_path)
    yield process
    process.stop()
    assert "Traceback" not in process.log(), process.log()[-3000:]


def english_sentences() -> set[str]:
    """Pieces of the English texts long enough to be recognisable (placeholders cut out)."""
    with (ROOT / "locales" / "en" / "LC_MESSAGES" / "messages.po").open("rb") as handle:
        catalog = read_po(handle, locale="en")
    pieces = set()
    for message in catalog:
        if not message.id:
            continue
        text = str(message.string or message.id)
        for piece in re.split(r"\{\w*\}|[\n.:;!?()“”\"]", text):
            if len(piece.strip()) >= 14:
                pieces.add(piece.strip())
    return pieces


def plain(text: str) -> str:
    return text.replace(FSI, "").replace(PDI, "")


def english_in(text: str, english: set[str]) -> list[str]:
    """English words or sentences in a text shown to the patient."""
    bare = COMMAND.sub(" ", plain(text))
    words = [w for w in LATIN_WORD.findall(bare) if w not in ALLOWED_LATIN]
    return words + [piece for piece in english if piece in bare]


def assert_all_in(emu: BotApiEmulator, chat_id: int, locale: str) -> int:
    """Every message and button label sent to the chat is in `locale`; returns the count."""
    english = english_sentences()
    messages = emu.sent(chat_id)
    problems: list[tuple[str, Any]] = []
    for message in messages:
        text = message.get("text") or message.get("caption") or ""
        if not SCRIPT[locale].search(text):
            problems.append(("not in the language", text))
        if found := english_in(text, english):
            problems.append((text[:80], found))
        for button in emu.buttons(message):
            label = button["text"]
            if label in PICKER:  # the language picker names each language in its own script
                continue
            if not SCRIPT[locale].search(label) or english_in(label, english):
                problems.append(("button", label))
    assert problems == []
    return len(messages)


async def expect(patient: PatientDriver, fragment: str) -> dict[str, Any]:
    """The first message since the last action containing `fragment` (isolation marks aside)."""

    def matches(event: dict[str, Any]) -> bool:
        return event.get("chat_id") == patient.chat_id and fragment in plain(
            event.get("text") or event.get("caption") or ""
        )

    return await patient.emu.wait_for(matches, timeout=30, since=patient.mark)


async def converse(emu: BotApiEmulator, bot: BotProcess, locale: str, t: dict[str, str]) -> int:
    """The whole conversation; `t` holds the texts the patient sees in that language."""
    mark = len(emu.calls)
    bot.start()
    await emu.wait_for_call("getUpdates", timeout=60, since=mark)
    user = emu.user(7100 + len(locale), first_name="Patient", language_code=locale)
    patient = PatientDriver(emu, user)

    patient.say("/start")
    await expect(patient, "Care Companion")
    await patient.tap(t["agree"])
    await patient.tap(t["procedure"])
    await patient.introduce(t["name"], "31.01.1980")
    await expect(patient, t["step"].format(1))
    letter = pdf_bytes(["Referral letter", "Dear colleague"])
    patient.send_file(letter, "referral.pdf", "application/pdf")
    await expect(patient, t["received"])
    await patient.tap(t["done"])
    await expect(patient, t["step"].format(2))
    await patient.tap(t["dont_have"])  # scans
    await expect(patient, t["step"].format(3))
    await patient.tap(t["skip"])  # radiology reports: optional
    await expect(patient, t["step"].format(4))
    await patient.tap(t["skip"])  # lab results: optional
    await expect(patient, t["step"].format(5))
    patient.say(t["answer"])  # medicines and allergies, typed
    await expect(patient, t["step"].format(6))
    await patient.tap(t["dont_have"])  # past operation notes
    await expect(patient, t["step"].format(7))
    passport = pdf_bytes(["Passport", "Test Patient"])
    patient.send_file(passport, "passport.pdf", "application/pdf")
    await expect(patient, t["received"])
    await patient.tap(t["done"])
    await expect(patient, t["complete"])
    patient.say("/status")
    await expect(patient, t["status"])
    return assert_all_in(emu, user.id, locale)


async def test_a_thai_patient_sees_only_thai(emulator: BotApiEmulator, bot: BotProcess) -> None:
    texts = {
        "agree": "ฉันยินยอม",
        "procedure": "การตรวจประเมินทางการแพทย์ทั่วไป",
        "name": "สมชาย ใจดี",
        "step": "ขั้นตอนที่ {} จาก 7",
        "received": "ได้รับ",
        "done": "ส่งรายการนี้ครบแล้ว",
        "skip": "ข้าม",
        "dont_have": "ฉันไม่มีเอกสารนี้",
        "answer": "เมตฟอร์มิน 500 มก. วันละ 2 ครั้ง แพ้เพนิซิลลิน",
        "complete": "ครบทุกอย่างที่โรงพยาบาลต้องการแล้ว",
        "status": "เอกสารของคุณจนถึงตอนนี้",
    }
    assert await converse(emulator, bot, "th", texts) >= 12


async def test_an_arabic_patient_sees_only_arabic(
    emulator: BotApiEmulator, bot: BotProcess
) -> None:
    texts = {
        "agree": "أوافق",
        "procedure": "مراجعة طبية عامة",
        "name": "أحمد الحسن",
        "step": "الخطوة {} من 7",
        "received": "تم الاستلام",
        "done": "انتهيت من هذا البند",
        "skip": "تخطي",
        "dont_have": "ليس لدي هذا",
        "answer": "ميتفورمين 500 ملغ مرتين يوميًا. حساسية من البنسلين.",
        "complete": "هذا كل ما يحتاجه المستشفى",
        "status": "سجلاتك حتى الآن",
    }
    assert await converse(emulator, bot, "ar", texts) >= 12
    # Numbers inside Arabic text are isolated so they keep their place.
    steps = [m["text"] for m in emulator.sent() if "الخطوة" in (m.get("text") or "")]
    assert steps and all(f"{FSI}7{PDI}" in text for text in steps)
