"""The hand-off bundle: a real case (SQLite and PostgreSQL) exported, opened and read back.

The case is filled through the real conversation service and ingest, so every file went
through the intake checks, the vault and the store as a patient's would; the archive is
then opened the way a hospital would: pyzipper with the password (and 7-Zip where
installed), pydicom's FileSet over the extracted DICOMDIR, PDFium over the manifest.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import shutil
import stat
import subprocess
import unicodedata
import zipfile
from collections.abc import Iterable
from pathlib import Path

import pydicom
import pypdfium2
import pytest
import pyzipper
from babel.messages.pofile import read_po
from pydicom.data import get_testdata_file
from pydicom.fileset import FileSet
from reportlab.lib.styles import ParagraphStyle
from sqlmodel import select

from adapters import audit
from adapters.export import (
    MANIFEST_NAME,
    MESSAGE_KEYS,
    Bundle,
    ExportError,
    _Case,
    _fonts,
    _manifest_pdf,
    _visual_lines,
    build_bundle,
    new_password,
    safe_component,
)
from adapters.tables import CaseRow, FileRow
from bot.app import App
from core.events import Event, EventKind
from core.ports import Patient
from tests import test_store_service
from tests.files import dicom_path, document_photo, pdf_bytes
from tests.scenario import IDENTITY_STEPS, apply_steps, walk_to_complete
from tests.test_shell_and_cli import run_cli

# The real store, vault and conversation service of the store tests, on SQLite and PostgreSQL.
app = test_store_service.app  # the fixture (database_url comes from conftest)

# The manifest reads as the English catalog says (any key it lacks would show up raw).
with (Path(__file__).resolve().parent.parent / "locales/en/LC_MESSAGES/messages.po").open(
    "rb"
) as po:
    ENGLISH = {str(m.id): str(m.string) for m in read_po(po) if m.id}
THAI_ANSWER = "แพ้ยาเพนิซิลลิน (penicillin allergy)"
CHINESE_NAME = "转诊信.pdf"
PASSWORD = re.compile(r"[A-HJ-NP-Za-km-z2-9]{5}(-[A-HJ-NP-Za-km-z2-9]{5}){3}")
rendered_keys: set[str] = set()


def render(key: str, params: dict[str, object]) -> str:
    rendered_keys.add(key)
    return (ENGLISH.get(key) or key).format_map(params)


def cd_copy(tmp_path: Path) -> tuple[Path, dict[str, bytes]]:
    """A CD copied to a folder and zipped: pydicom writes a real DICOMDIR tree (one scan is
    the CT also sent on its own), plus a PDF report and a readme a CD usually carries."""
    tree = tmp_path / "cd"
    file_set = FileSet()
    for name in ("liver_1frame.dcm", "CT_small.dcm"):
        file_set.add(str(get_testdata_file(name)))
    file_set.write(tree)
    report = pdf_bytes(["Radiology report on the CD"])
    archive = tmp_path / "cd.zip"
    kept: dict[str, bytes] = {}
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as cd:
        for path in sorted(p for p in tree.rglob("*") if p.is_file()):
            name = path.relative_to(tree).as_posix()
            cd.write(path, name)
            if name != "DICOMDIR":
                kept[name] = path.read_bytes()
        cd.writestr("REPORT.PDF", report)
        cd.writestr("README.TXT", "Insert the disc and run the viewer.\r\n")
    kept["REPORT.PDF"] = report
    return archive, kept


async def fill_case(app: App, tmp_path: Path, chat_id: int) -> tuple[str, dict[str, bytes]]:
    """A complete general case with a PDF (Chinese name), a rejected upload, two DICOM files,
    a CD copy, a typed answer in Thai and a photo; returns the case id and what was sent
    that must reach the hospital (name -> bytes)."""
    folder = tmp_path / f"sent-{chat_id}"
    folder.mkdir()
    referral = folder / CHINESE_NAME
    referral.write_bytes(pdf_bytes(["Referral for joint replacement", "Dr. Example"], pages=2))
    broken = folder / "scan-of-letter.pdf"
    broken.write_bytes(b"#!/bin/sh\necho not a pdf\n")
    photo = folder / "passport.jpg"
    photo.write_bytes(document_photo("Passport of Test Patient"))
    cd, on_cd = cd_copy(folder)
    steps: list[Event | Path] = [
        Event(EventKind.START),
        Event(EventKind.AGREE),
        Event(EventKind.CHOOSE_PROCEDURE, "general"),
        *IDENTITY_STEPS,
        referral,
        broken,
        Event(EventKind.DONE, "referral"),
        dicom_path("CT_small.dcm"),
        dicom_path("MR_small.dcm"),
        cd,
        Event(EventKind.DONE, "imaging"),
        Event(EventKind.SKIP, "reports"),
        Event(EventKind.DONT_HAVE, "lab_results"),
        Event(EventKind.TEXT, THAI_ANSWER),
        Event(EventKind.SKIP, "past_records"),
        photo,
        Event(EventKind.DONE, "identity"),
    ]
    patient = Patient(chat_id, chat_id, "en")
    await apply_steps(app, patient, steps, chat_id * 100)
    async with app.store.session() as session:
        case_id = (await session.exec(select(CaseRow.id).where(CaseRow.chat_id == chat_id))).one()
    sent = {
        CHINESE_NAME: referral.read_bytes(),
        "CT_small.dcm": dicom_path("CT_small.dcm").read_bytes(),
        "MR_small.dcm": dicom_path("MR_small.dcm").read_bytes(),
        "passport.jpg": photo.read_bytes(),
        **{f"cd:{name}": data for name, data in on_cd.items()},
    }
    return case_id, sent


def open_bundle(bundle: Bundle) -> dict[str, bytes]:
    with pyzipper.AESZipFile(bundle.path) as archive:
        archive.setpassword(bundle.password.encode())
        return {info.filename: archive.read(info) for info in archive.infolist()}


def pdf_text(data: bytes) -> str:
    document = pypdfium2.PdfDocument(data)
    try:
        return "".join(page.get_textpage().get_text_range() for page in document)
    finally:
        document.close()


def squeezed(text: str) -> str:
    """Text without whitespace: the manifest wraps long paths across lines."""
    return re.sub(r"\s+", "", text)


def read_files(paths: Iterable[Path]) -> list[bytes]:
    return [path.read_bytes() for path in paths]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def test_bundle_holds_every_counted_file_as_sent(app: App, tmp_path: Path) -> None:
    """Byte-identical records in numbered item folders, DICOM under one DICOMDIR pydicom
    reads back, a manifest naming every document, AES-256 on every entry, the export
    audited and the case itself untouched."""
    case_id, sent = await fill_case(app, tmp_path, 7101)
    async with app.store.session() as session:
        before = await session.get(CaseRow, case_id)
        rejected = (await session.exec(select(FileRow).where(FileRow.status == "rejected"))).all()
    assert before is not None and before.state == "complete" and len(rejected) == 1
    out = tmp_path / "exports"
    rendered_keys.clear()

    bundle = await build_bundle(
        app.store,
        app.vault,
        app.checklists,
        case_id,
        out,
        render=render,
        actor="operator",
        translations={},
    )

    # The archive: in place, 0600, nothing half-written left beside it.
    assert bundle.path.parent == out and bundle.path.name.startswith(f"case-{case_id}-")
    assert stat.S_IMODE(bundle.path.stat().st_mode) == 0o600
    assert [p.name for p in out.iterdir()] == [bundle.path.name]
    assert PASSWORD.fullmatch(bundle.password)
    entries = open_bundle(bundle)
    names = list(entries)
    assert names[0] == MANIFEST_NAME

    # Every file that reached the hospital's side is there byte for byte; the rejected
    # upload, the CD's ZIP, its old DICOMDIR and its readme are not.
    by_hash = {sha(data): name for name, data in entries.items()}
    assert {name: sha(data) in by_hash for name, data in sent.items()} == dict.fromkeys(sent, True)
    assert b"echo not a pdf" not in b"".join(entries.values())
    assert not [n for n in names if n.lower().endswith((".zip", ".txt"))]
    records = [n for n in names if n != MANIFEST_NAME and not n.endswith("/DICOMDIR")]
    assert bundle.file_count == len(records)
    assert bundle.total_bytes == sum(len(entries[n]) for n in records)

    # Folders numbered in checklist order and named from the title; files named neutrally
    # (entry names are readable without the password), the original name in the manifest.
    assert "01 Referral letter or doctor's summary/referral-1.pdf" in names
    assert "07 Passport or ID/identity-1.jpg" in names
    assert "02 Scans (MRI, CT, X-ray, ultrasound, PET)/imaging-6.pdf" in names
    dicomdirs = [n for n in names if n.endswith("/DICOMDIR")]
    assert dicomdirs == ["02 Scans (MRI, CT, X-ray, ultrasound, PET)/DICOM/DICOMDIR"]

    # The DICOMDIR indexes the three distinct scans; the CT sent twice is indexed once and
    # its second copy kept plain; every indexed file loads and is the original.
    extracted = tmp_path / "extracted"
    with pyzipper.AESZipFile(bundle.path) as archive:
        archive.setpassword(bundle.password.encode())
        archive.extractall(extracted)
    file_set = FileSet(pydicom.dcmread(extracted / dicomdirs[0]))
    uids = sorted(instance.load().SOPInstanceUID for instance in file_set)
    expected = sorted(
        pydicom.dcmread(dicom_path(n)).SOPInstanceUID
        for n in ("CT_small.dcm", "MR_small.dcm", "liver_1frame.dcm")
    )
    assert uids == expected
    indexed = {sha(data) for data in read_files(Path(i.path) for i in file_set)}
    assert indexed <= {sha(data) for data in sent.values()}
    plain_dicom = [n for n in records if "/DICOM/" not in n and n.endswith(".dcm")]
    assert len(plain_dicom) == 1

    # The manifest: a PDF naming every item, document and study folder, in Latin, Chinese
    # and Thai; rendered only through message keys.
    text = pdf_text(entries[MANIFEST_NAME])
    flat = squeezed(text)
    for entry in bundle.entries:
        assert squeezed(entry.path) in flat, entry.path
        assert squeezed(entry.item_title) in flat
    assert CHINESE_NAME in text and squeezed(THAI_ANSWER) in flat
    assert "passport.jpg" in text and "REPORT.PDF" in text
    assert "accepted" in text and case_id in text
    referral = next(e for e in bundle.entries if e.item_key == "referral")
    assert (referral.kind, referral.pages, referral.status) == ("pdf", 2, "accepted")
    scans = [e for e in bundle.entries if e.kind == "dicom" and "/DICOM/" in e.path]
    assert [(e.series, e.instances, e.date_is_study) for e in scans] == [(1, 1, True)] * 3
    assert "2004-01-19" in {e.date for e in scans}  # CT_small's study date
    (again,) = [e for e in bundle.entries if e.kind == "dicom" and e not in scans]
    assert again.notes[:2] == (
        ENGLISH["export.manifest.note.duplicate"],
        "From the CD copy cd.zip.",
    )
    assert all(ENGLISH.get(key) for key in MESSAGE_KEYS)
    assert {k for k in rendered_keys if k.startswith("export.")} <= set(MESSAGE_KEYS)

    # AES-256 (WinZip AE-2) on every entry; the bytes on disk hold no plaintext.
    with zipfile.ZipFile(bundle.path) as raw:
        assert {(i.flag_bits & 0x1, i.compress_type) for i in raw.infolist()} == {(1, 99)}
    with pyzipper.AESZipFile(bundle.path) as archive:
        assert {i.wz_aes_strength for i in archive.infolist()} == {3}
        archive.setpassword(b"not-the-password")
        with pytest.raises(RuntimeError, match=r"(?i)password"):
            archive.read(MANIFEST_NAME)
    on_disk = bundle.path.read_bytes()
    assert sent[CHINESE_NAME][200:264] not in on_disk
    assert b"CompressedSamples" not in on_disk
    for name in (CHINESE_NAME, "passport.jpg", "REPORT.PDF"):  # not even in the entry names
        assert name.encode() not in on_disk

    # Audited with ids only; the case is marked handed off and nothing else changed.
    last = (await audit.entries(app.store, case_id))[-1]
    assert (last.actor, last.action, last.case_id) == ("operator", "case.export", case_id)
    assert last.detail == f"files={bundle.file_count} bytes={bundle.total_bytes}"
    assert await audit.verify_chain(app.store) == []
    async with app.store.session() as session:
        after = await session.get(CaseRow, case_id)
    assert after is not None and after.handed_off_at is not None
    assert after.model_dump(exclude={"handed_off_at"}) == before.model_dump(
        exclude={"handed_off_at"}
    )


async def test_unknown_and_erased_cases_are_refused(app: App, tmp_path: Path) -> None:
    patient = Patient(7201, 7201, "en")
    steps: list[Event | Path] = [
        Event(EventKind.START),
        Event(EventKind.AGREE),
        Event(EventKind.CHOOSE_PROCEDURE, "general"),
        *IDENTITY_STEPS,
    ]
    await apply_steps(app, patient, steps, 1)
    async with app.store.session() as session:
        case_id = (await session.exec(select(CaseRow.id).where(CaseRow.chat_id == 7201))).one()
    out = tmp_path / "exports"
    for unknown in ("0" * 32, "../etc/passwd", ""):
        with pytest.raises(ExportError, match="no case"):
            await build_bundle(
                app.store, app.vault, app.checklists, unknown, out, render=render, actor="operator"
            )
    await apply_steps(app, patient, [Event(EventKind.DELETE_CONFIRM)], 10)
    with pytest.raises(ExportError, match="no case"):
        await build_bundle(
            app.store, app.vault, app.checklists, case_id, out, render=render, actor="operator"
        )
    assert not out.exists() or list(out.iterdir()) == []
    assert "case.export" not in {e.action for e in await audit.entries(app.store)}


async def test_an_erased_cases_bundles_go_with_it(app: App, tmp_path: Path) -> None:
    """A patient's erasure also deletes the case's hand-off bundles in DATA_DIR/exports
    (encrypted, but with a password the coordinators hold); another case's stay."""
    leaving, staying = Patient(7301, 7301, "en"), Patient(7302, 7302, "en")
    last = await walk_to_complete(app, leaving, tmp_path, 1)
    await walk_to_complete(app, staying, tmp_path, 100)
    out = app.settings.exports_dir
    bundles = {}
    for patient in (leaving, staying, leaving):  # the leaving case exported twice
        async with app.store.session() as session:
            query = select(CaseRow.id).where(CaseRow.chat_id == patient.chat_id)
            case_id = (await session.exec(query)).one()
        bundle = await build_bundle(
            app.store, app.vault, app.checklists, case_id, out, render=render, actor="operator"
        )
        bundles.setdefault(patient.chat_id, []).append(bundle.path)
    assert len(list(out.iterdir())) == 3

    await app.service.handle(leaving, Event(EventKind.DELETE_REQUEST), last)
    await app.service.handle(leaving, Event(EventKind.DELETE_CONFIRM), last + 1)

    assert sorted(out.iterdir()) == bundles[staying.chat_id]


async def test_cli_exports_and_prints_the_password_apart(
    app: App,
    database_url: str,
    tmp_path: Path,
) -> None:
    """`care-companion export CASE_ID --out DIR`: the path and the password on their own
    labelled lines; an unknown case is one line on stderr and a non-zero exit."""
    patient = Patient(7301, 7301, "en")
    letter = tmp_path / "letter.pdf"
    letter.write_bytes(pdf_bytes(["Referral letter"]))
    steps: list[Event | Path] = [
        Event(EventKind.START),
        Event(EventKind.AGREE),
        Event(EventKind.CHOOSE_PROCEDURE, "general"),
        *IDENTITY_STEPS,
        letter,
    ]
    await apply_steps(app, patient, steps, 1)
    async with app.store.session() as session:
        case_id = (await session.exec(select(CaseRow.id).where(CaseRow.chat_id == 7301))).one()
    out = tmp_path / "handoff"
    env = {"DATABASE_URL": database_url}

    done = await asyncio.to_thread(run_cli, tmp_path, "export", case_id, "--out", str(out), env=env)

    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert (
        len(lines) == 2 and lines[0].startswith("archive: ") and lines[1].startswith("password: ")
    )
    path, password = Path(lines[0].removeprefix("archive: ")), lines[1].removeprefix("password: ")
    assert path.parent == out and PASSWORD.fullmatch(password)
    bundle = Bundle(path, password, 1, 0, ())
    assert letter.read_bytes() in open_bundle(bundle).values()

    unknown = "f" * 32
    refused = await asyncio.to_thread(
        run_cli, tmp_path, "export", unknown, "--out", str(out), env=env
    )
    assert refused.returncode != 0 and refused.stdout == ""
    assert refused.stderr.strip().splitlines() == [
        f"care-companion: no case {unknown} (unknown or erased)"
    ]
    assert [p.name for p in out.iterdir()] == [path.name]


async def test_7zip_opens_the_bundle(app: App, tmp_path: Path) -> None:
    seven = shutil.which("7z") or shutil.which("7za") or shutil.which("7zz")
    if seven is None:
        pytest.skip("7-Zip (7z, 7za or 7zz) is not installed on this machine")
    case_id, sent = await fill_case(app, tmp_path, 7401)
    bundle = await build_bundle(
        app.store,
        app.vault,
        app.checklists,
        case_id,
        tmp_path / "out",
        render=render,
        actor="operator",
    )
    target = tmp_path / "by-7zip"
    listing = await asyncio.to_thread(
        subprocess.run,
        [seven, "x", f"-p{bundle.password}", f"-o{target}", str(bundle.path)],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert listing.returncode == 0, listing.stdout + listing.stderr
    extracted = {sha(p.read_bytes()) for p in target.rglob("*") if p.is_file()}
    assert {sha(data) for data in sent.values()} <= extracted
    assert (target / MANIFEST_NAME).is_file()


def test_names_are_safe_on_every_system() -> None:
    assert safe_component("Referral: GP/clinic?", "x") == "Referral_ GP_clinic_"
    assert safe_component("report\u202efdp.exe", "x") == "reportfdp.exe"  # no RTL override
    assert safe_component("  ..hidden. ", "x") == "hidden"
    assert safe_component("con.pdf", "x") == "_con.pdf"
    assert safe_component("\x00\x07/", "referral-1.pdf") == "referral-1.pdf"
    assert safe_component("转诊信 2024.pdf", "x") == "转诊信 2024.pdf"
    long = safe_component("诊" * 300 + ".pdf", "x")
    assert long.endswith(".pdf") and len(long.encode()) <= 200
    assert safe_component("a\tb\nc.pdf", "x") == "a b c.pdf"


def test_passwords_are_fresh_and_unambiguous() -> None:
    passwords = {new_password() for _ in range(200)}
    assert len(passwords) == 200
    assert all(PASSWORD.fullmatch(p) for p in passwords)
    assert not set("".join(passwords)) & set("0O1lI")


ARABIC_ANSWER = (
    "أتناول دواء الميتفورمين مرتين يوميا بعد الأكل، ولدي حساسية من البنسلين والأسبرين منذ "
    "الطفولة، وأعاني من ارتفاع ضغط الدم منذ خمس سنوات، وأجريت عملية استئصال الزائدة الدودية "
    "قبل عشر سنوات في مستشفى المدينة، ولا أدخن ولا أشرب الكحول، وأمارس المشي كل صباح لمدة "
    "نصف ساعة، وآخر فحص للدم كان في الشهر الماضي وكانت النتائج طبيعية"
)
MIXED_ANSWER = "Metformin 500 mg مرتين يوميا بعد الأكل"


def test_arabic_in_the_manifest_reads_in_order_with_its_letters_joined() -> None:
    """Arabic (the Arabic catalog's words, a patient's typed answers) is drawn as a reader
    expects: letters in their joined forms, which the manifest's font has, right to left,
    a long answer's lines top to bottom. PDFium, Chrome's PDF reader, reads the answer back
    as the very text typed (unjoined letters in the order stored came back reversed).
    Latin and digits inside keep their own order: a case id in an Arabic title, an Arabic
    note in a Latin answer."""
    with (Path(__file__).resolve().parent.parent / "locales/ar/LC_MESSAGES/messages.po").open(
        "rb"
    ) as po:
        arabic = {str(m.id): str(m.string) for m in read_po(po) if m.id and m.string}

    def render_arabic(key: str, params: dict[str, object]) -> str:
        return (arabic.get(key) or key).format_map(params)

    case = _Case(
        case_id="0123456789abcdef0123456789abcdef",
        key=b"",
        checklist=None,
        sources=[],
        answers=[("Medication", ARABIC_ANSWER), ("Allergies", MIXED_ANSWER)],
    )
    text = pdf_text(_manifest_pdf(case, [], None, render_arabic))
    assert squeezed(ARABIC_ANSWER) in squeezed(text)
    wrapped = [line for line in text.splitlines() if set(line) & set("البنسلينالطفولة")]
    assert len(wrapped) >= 3  # the answer's lines, each in its place

    style = ParagraphStyle("body", fontName=_fonts()[0].name, fontSize=8)

    def laid_out(text: str, width: float) -> tuple[str, bool]:
        result = _visual_lines(text, style, width)
        assert result is not None
        return result

    assert _visual_lines("Metformin 500 mg", style, 1000) is None  # nothing to do
    drawn, rtl = laid_out(ARABIC_ANSWER, 400)
    assert rtl and drawn.count("\n") >= 2
    letters = [char for char in drawn if unicodedata.category(char) == "Lo"]
    assert all("\ufb50" <= char <= "\ufeff" for char in letters)  # each in its joined form
    assert all(_fonts()[0].covers(ord(char)) for char in drawn if not char.isspace())
    title = render_arabic("export.manifest.title", {"case_id": case.case_id})
    drawn, rtl = laid_out(title, 1000)
    assert rtl and drawn.startswith(case.case_id)  # read last, so leftmost, and intact
    drawn, rtl = laid_out(MIXED_ANSWER, 1000)
    assert not rtl and drawn.startswith("Metformin 500 mg ")
