"""The conversation service on the real SQL store: SQLite files and PostgreSQL."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import pytest
from sqlmodel import func, select

from adapters import store as store_module
from adapters.store import utcnow
from adapters.tables import AuditRow, CaseRow, FileRow, InboxRow, ItemRow, OutboxRow
from bot.app import App, build_app, prepare
from bot.inbox import parked_updates, retry_parked
from bot.settings import Settings
from bot.shell import LocalFileSource, local_incoming
from core import service as service_module
from core.events import Event, EventKind
from core.ports import Patient
from tests.files import dicom_path, document_photo, pdf_bytes
from tests.scenario import IDENTITY_STEPS, walk_to_complete

COORDINATOR = -100500
SECRET_NAME = "Zhang Wei-Secretname"  # never in clear in the database
SECRET_ANSWER = "Zolpidem-7731 nightly; allergic to Quetzalcoatlin"


@pytest.fixture
async def app(database_url: str, tmp_path: Path) -> AsyncIterator[App]:
    settings = Settings(
        data_dir=tmp_path / "data", database_url=database_url, coordinator_chat_id=COORDINATOR
    )
    await asyncio.to_thread(prepare, settings)
    application = build_app(settings)
    yield application
    await application.close()


async def count(app: App, model: type, *where: object) -> int:
    async with app.store.session() as session:
        query = select(func.count()).select_from(model)
        for condition in where:
            query = query.where(condition)
        return (await session.exec(query)).one()


async def send(app: App, patient: Patient, path: Path, update_id: int) -> None:
    await app.service.handle_file(patient, local_incoming(path), LocalFileSource(), update_id)


async def test_full_case_and_replayed_updates_change_nothing(app: App, tmp_path: Path) -> None:
    """Each event once; a replay of any update id adds no row, no reply, no alert."""
    patient = Patient(chat_id=4242, user_id=4242, language_code="en")
    referral = tmp_path / "referral.pdf"
    referral.write_bytes(pdf_bytes(["Referral"]))
    photo = tmp_path / "id.jpg"
    photo.write_bytes(document_photo())
    steps: list[tuple[int, object]] = [
        (1, Event(EventKind.START)),
        (2, Event(EventKind.AGREE)),
        (3, Event(EventKind.CHOOSE_PROCEDURE, "general")),
        (4, Event(EventKind.TEXT, SECRET_NAME)),
        (5, Event(EventKind.TEXT, "31.01.1980")),
        (6, referral),
        (7, Event(EventKind.DONE, "referral")),
        (8, dicom_path()),
        (9, Event(EventKind.DONE, "imaging")),
        (10, Event(EventKind.SKIP, "reports")),
        (11, Event(EventKind.DONT_HAVE, "lab_results")),
        (12, Event(EventKind.TEXT, SECRET_ANSWER)),
        (13, Event(EventKind.SKIP, "past_records")),
        (14, photo),
        (15, Event(EventKind.DONE, "identity")),
    ]
    for update_id, step in steps:
        if isinstance(step, Path):
            await send(app, patient, step, update_id)
        else:
            assert isinstance(step, Event)
            await app.service.handle(patient, step, update_id)
    outbox_before = await count(app, OutboxRow)
    for update_id, step in steps:  # Telegram redelivers everything
        if isinstance(step, Path):
            await send(app, patient, step, update_id)
        else:
            assert isinstance(step, Event)
            await app.service.handle(patient, step, update_id)
    assert await count(app, OutboxRow) == outbox_before
    assert await count(app, FileRow) == 3
    assert await count(app, InboxRow, InboxRow.status == "done") == len(steps)
    assert await count(app, OutboxRow, OutboxRow.chat_id == COORDINATOR) == 1
    async with app.store.session() as session:
        case = (await session.exec(select(CaseRow))).one()
        assert case.state == "complete" and case.completions == 1
        payloads = [row.payload for row in (await session.exec(select(OutboxRow))).all()]
    assert all(SECRET_ANSWER not in p and SECRET_NAME not in p for p in payloads)
    loaded = await _load(app, patient.chat_id)
    assert loaded.progress("medications").answer == SECRET_ANSWER
    assert loaded.patient_name == SECRET_NAME and str(loaded.birth_date) == "1980-01-31"


async def _load(app: App, chat_id: int):  # type: ignore[no-untyped-def]
    async with app.store.transaction() as tx:
        case = await tx.load_case(chat_id)
    assert case is not None
    return case


async def test_same_file_twice_is_stored_once(app: App, tmp_path: Path) -> None:
    """Same file id, or the same bytes under another id: one row, one blob, patient told."""
    patient = Patient(7, 7, "en")
    for update_id, event in enumerate(
        [
            Event(EventKind.START, ""),
            Event(EventKind.AGREE),
            Event(EventKind.CHOOSE_PROCEDURE, "general"),
            *IDENTITY_STEPS,
        ],
        1,
    ):
        await app.service.handle(patient, event, update_id)
    original = tmp_path / "a.pdf"
    original.write_bytes(pdf_bytes(["Letter"]))
    copy = tmp_path / "b.pdf"
    copy.write_bytes(original.read_bytes())
    await send(app, patient, original, 10)
    await send(app, patient, original, 11)  # same unique id, new update
    await send(app, patient, copy, 12)  # same bytes, another unique id
    assert await count(app, FileRow) == 1
    assert len(list(app.vault.iter_blob_ids())) == 1
    async with app.store.session() as session:
        rows = (await session.exec(select(OutboxRow).order_by(OutboxRow.id))).all()
    duplicates = [r for r in rows if "file.duplicate" in r.payload]
    assert len(duplicates) == 2
    assert len((await _load(app, 7)).progress("referral").files) == 1


async def test_invite_binds_to_one_case_only(app: App) -> None:
    code = await app.store.create_invite("ivf")
    first, second = Patient(11, 11, "en"), Patient(12, 12, "en")
    await app.service.handle(first, Event(EventKind.START, code), 1)
    await app.service.handle(second, Event(EventKind.START, code), 2)
    assert (await _load(app, 11)).checklist_key == "ivf"
    assert (await _load(app, 12)).checklist_key is None


async def test_unreadable_file_is_rejected_with_reason(app: App, tmp_path: Path) -> None:
    patient = Patient(21, 21, "en")
    for update_id, event in enumerate(
        [
            Event(EventKind.START, ""),
            Event(EventKind.AGREE),
            Event(EventKind.CHOOSE_PROCEDURE, "general"),
            *IDENTITY_STEPS,
        ],
        1,
    ):
        await app.service.handle(patient, event, update_id)
    script = tmp_path / "referral.pdf"  # the name lies; the content decides
    script.write_bytes(b"#!/bin/sh\necho not a pdf\n")
    await send(app, patient, script, 9)
    async with app.store.session() as session:
        last = (await session.exec(select(OutboxRow).order_by(OutboxRow.id.desc()))).first()  # type: ignore[union-attr]
    assert last is not None and "finding.unsupported_type" in last.payload
    assert (await _load(app, 21)).progress("referral").files == []
    assert json.loads(last.payload)["buttons"]


async def test_locked_pdf_opens_with_the_typed_password(app: App, tmp_path: Path) -> None:
    """The password is checked against the file in the worker and kept only encrypted."""
    from reportlab.lib.pdfencrypt import StandardEncryption
    from reportlab.pdfgen import canvas

    patient = Patient(31, 31, "en")
    for update_id, event in enumerate(
        [
            Event(EventKind.START, ""),
            Event(EventKind.AGREE),
            Event(EventKind.CHOOSE_PROCEDURE, "general"),
            *IDENTITY_STEPS,
        ],
        1,
    ):
        await app.service.handle(patient, event, update_id)
    locked = tmp_path / "locked.pdf"
    pdf = canvas.Canvas(str(locked), encrypt=StandardEncryption("Tulip-4471", canPrint=1))
    pdf.drawString(72, 720, "Referral letter")
    pdf.save()
    await send(app, patient, locked, 10)
    assert (await _load(app, 31)).password_file is not None
    await app.service.handle(patient, Event(EventKind.TEXT, "wrong-one"), 11)
    assert (await _load(app, 31)).progress("referral").files == []
    await app.service.handle(patient, Event(EventKind.TEXT, "Tulip-4471"), 12)
    case = await _load(app, 31)
    assert case.password_file is None and len(case.progress("referral").files) == 1
    async with app.store.session() as session:
        row = (await session.exec(select(FileRow))).one()
        texts = [r.payload for r in (await session.exec(select(OutboxRow))).all()]
    assert row.password_enc and "Tulip-4471" not in row.password_enc
    assert any("file.password_wrong" in t for t in texts)
    assert any("file.password_accepted" in t for t in texts)


async def test_delete_crypto_erases_and_a_late_duplicate_brings_nothing_back(
    app: App, tmp_path: Path
) -> None:
    patient = Patient(41, 41, "en")
    update = await walk_to_complete(app, patient, tmp_path, 100, SECRET_ANSWER)
    assert await count(app, FileRow) == 3
    async with app.store.session() as session:  # updates given up on: this chat's, another's
        for update_id, chat_id in ((90, 41), (91, 42)):
            parked = InboxRow(update_id=update_id, chat_id=chat_id, payload_enc="sealed")
            parked.status, parked.received_at = "parked", utcnow()
            session.add(parked)
    await app.service.handle(patient, Event(EventKind.DELETE_REQUEST), update)
    await app.service.handle(patient, Event(EventKind.DELETE_CONFIRM), update + 1)
    assert await count(app, CaseRow) == 0 and await count(app, FileRow) == 0
    async with app.store.session() as session:
        still_parked = (
            await session.exec(select(InboxRow.chat_id).where(InboxRow.status == "parked"))
        ).all()
    assert still_parked == [42]
    assert list(app.vault.iter_blob_ids()) == []
    # Telegram redelivers an old update carrying a file, and an old text answer:
    late = tmp_path / "late.pdf"
    late.write_bytes(pdf_bytes(["late"]))
    await send(app, patient, late, 103)
    await app.service.handle(patient, Event(EventKind.TEXT, SECRET_ANSWER), 109)
    assert await count(app, CaseRow) == 0 and list(app.vault.iter_blob_ids()) == []
    async with app.store.session() as session:
        notices = [
            r for r in (await session.exec(select(OutboxRow))).all() if "case_erased" in r.payload
        ]
    assert len(notices) == 1 and notices[0].chat_id == COORDINATOR
    # Writing again later starts a fresh case.
    await app.service.handle(patient, Event(EventKind.START), update + 2)
    assert await count(app, CaseRow) == 1


async def test_retention_erases_cases_closed_long_ago(app: App, tmp_path: Path) -> None:
    old, recent = Patient(51, 51, "en"), Patient(52, 52, "en")
    await walk_to_complete(app, old, tmp_path, 200)
    await walk_to_complete(app, recent, tmp_path, 300)
    async with app.store.session() as session:
        row = (await session.exec(select(CaseRow).where(CaseRow.chat_id == 51))).one()
        row.completed_at = row.completed_at - timedelta(days=400)  # type: ignore[operator]
        session.add(row)
        old_case_id = row.id
    assert await app.service.erase_expired(365) == 1
    async with app.store.session() as session:
        chats = [r.chat_id for r in (await session.exec(select(CaseRow))).all()]
    assert chats == [52]
    assert await count(app, FileRow) == 3 and len(list(app.vault.iter_blob_ids())) == 3
    async with app.store.session() as session:
        to_coordinators = (
            await session.exec(select(OutboxRow.payload).where(OutboxRow.chat_id == COORDINATOR))
        ).all()
    summaries = [p for p in to_coordinators if "retention_erased" in p]
    assert len(summaries) == 1 and old_case_id in summaries[0]


async def test_retention_erases_an_intake_given_up_long_ago(
    app: App, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A case never completed whose last step (the patient's or a coordinator's; for a case
    from before steps were timed, its last change) nears the retention period's end gets a
    notice, once; it is erased, records and all, once its last step is older than the
    period and the notice RETENTION_NOTICE_DAYS old. The patient is told why, the
    coordinators get one message naming the cases a transaction erased. A step after the
    notice keeps the case; so does completing it; a case given up recently gets nothing."""
    given_up, untimed, nearly, stepped, recent = (Patient(n, n, "en") for n in range(54, 59))
    monkeypatch.setattr(service_module, "ERASE_TOGETHER", 1)  # a transaction, a message each
    steps = [
        Event(EventKind.START),
        Event(EventKind.AGREE),
        Event(EventKind.CHOOSE_PROCEDURE, "general"),
        *IDENTITY_STEPS,
    ]
    referral = tmp_path / "referral.pdf"
    referral.write_bytes(pdf_bytes(["Referral letter"]))
    for number, patient in enumerate((given_up, untimed, nearly, stepped, recent)):
        for update_id, event in enumerate(steps, 600 + 20 * number):
            await app.service.handle(patient, event, update_id)
        await send(app, patient, referral, 619 + 20 * number)
    await walk_to_complete(app, Patient(59, 59, "en"), tmp_path, 800)  # closed just now
    long_ago = utcnow() - timedelta(days=400)
    ids = {}
    async with app.store.session() as session:
        for row in (await session.exec(select(CaseRow))).all():
            ids[row.chat_id] = row.id
            if row.chat_id in (54, 57):
                row.active_at = long_ago
            elif row.chat_id == 55:
                row.active_at, row.updated_at = None, long_ago
            elif row.chat_id == 56:
                row.active_at = utcnow() - timedelta(days=360)  # in the notice's window
            elif row.chat_id == 58:
                row.active_at = utcnow() - timedelta(days=300)
            session.add(row)
    blobs_before = set(app.vault.iter_blob_ids())

    async def told(key: str) -> list[int]:
        async with app.store.session() as session:
            rows = (await session.exec(select(OutboxRow))).all()
        return sorted(row.chat_id for row in rows if key in row.payload)

    async def pass_notice_period() -> None:
        async with app.store.session() as session:
            for row in (await session.exec(select(CaseRow))).all():
                if row.retention_notice_at is not None:
                    row.retention_notice_at -= timedelta(days=15)
                    session.add(row)

    # First turn: notices, nothing erased; a second turn tells nobody twice.
    assert await app.service.erase_expired(365) == 0
    assert await app.service.erase_expired(365) == 0
    assert await told("retention.notice_inactive") == [54, 55, 56, 57]
    # The patient of 57 comes back (a step) after the notice.
    await app.service.handle(stepped, Event(EventKind.STATUS), 900)
    await pass_notice_period()

    assert await app.service.erase_expired(365) == 2

    async with app.store.session() as session:
        chats = sorted(r.chat_id for r in (await session.exec(select(CaseRow))).all())
        to_coordinators = (
            await session.exec(select(OutboxRow.payload).where(OutboxRow.chat_id == COORDINATOR))
        ).all()
    assert chats == [56, 57, 58, 59]
    assert len(set(app.vault.iter_blob_ids())) == len(blobs_before) - 2  # two referrals
    assert await told("retention.erased_inactive") == [54, 55]
    summaries = [p for p in to_coordinators if "coordinator.retention_erased" in p]
    assert len(summaries) == 2
    assert sorted(i for i in (ids[54], ids[55]) if any(i in s for s in summaries)) == sorted(
        [ids[54], ids[55]]
    )
    assert await app.service.erase_expired(365) == 0  # nothing more, nothing twice
    assert await told("retention.notice_inactive") == [54, 55, 56, 57]

    # Listed while given up, then completed before its turn came: kept (checked again).
    async def listed_before_completing(*_: object) -> list[tuple[str, int]]:
        return [(ids[59], 59)]

    monkeypatch.setattr(app.service._erasure, "expired_cases", listed_before_completing)
    assert await app.service.erase_expired(365) == 0
    assert await count(app, CaseRow, CaseRow.chat_id == 59) == 1


async def test_parked_updates_are_listed_and_put_back_in_line(app: App, tmp_path: Path) -> None:
    """`inbox list` and `inbox retry` on this store: a parked update of a chat with a case
    and one without; retried, it is new again with its tries counted afresh, audited."""
    await walk_to_complete(app, Patient(63, 63, "en"), tmp_path, 1)
    async with app.store.session() as session:
        case_id = (await session.exec(select(CaseRow.id).where(CaseRow.chat_id == 63))).one()
        for update_id, chat_id in ((70, 63), (71, None)):
            row = InboxRow(update_id=update_id, chat_id=chat_id, payload_enc="sealed")
            row.status, row.attempts, row.error = "parked", 5, "ValueError"
            row.received_at = utcnow()
            session.add(row)

    listed = await parked_updates(app.store)
    assert [(u["update_id"], u["case_id"], u["attempts"]) for u in listed] == [
        (70, case_id, 5),
        (71, None, 5),
    ]
    assert await retry_parked(app.store, [70, 99]) == [70]
    async with app.store.session() as session:
        again = await session.get(InboxRow, 70)
        assert again is not None and (again.status, again.attempts) == ("new", 0)
        entries = (
            await session.exec(select(AuditRow).where(AuditRow.action == "inbox.retry"))
        ).all()
    assert [(e.actor, e.case_id, e.detail) for e in entries] == [("operator", case_id, "update=70")]
    assert [u["update_id"] for u in await parked_updates(app.store)] == [71]
    assert await retry_parked(app.store, None) == [71]


async def test_album_is_stored_file_by_file_and_answered_once(app: App, tmp_path: Path) -> None:
    patient = Patient(61, 61, "en")
    for update_id, event in enumerate(
        [
            Event(EventKind.START),
            Event(EventKind.AGREE),
            Event(EventKind.CHOOSE_PROCEDURE, "general"),
            *IDENTITY_STEPS,
        ],
        1,
    ):
        await app.service.handle(patient, event, update_id)
    pages = []
    for number in range(3):
        page = tmp_path / f"page{number}.pdf"
        page.write_bytes(pdf_bytes([f"Referral page {number}"]))
        pages.append((local_incoming(page), 10 + number))
    outbox_before = await count(app, OutboxRow)
    await app.service.handle_album(patient, pages, LocalFileSource())
    await app.service.handle_album(patient, pages, LocalFileSource())  # redelivered: no-op
    assert await count(app, FileRow) == 3
    assert await count(app, OutboxRow) == outbox_before + 1
    async with app.store.session() as session:
        last = (await session.exec(select(OutboxRow).order_by(OutboxRow.id.desc()))).first()  # type: ignore[union-attr]
    assert last is not None and last.payload.count("file.received") == 1
    assert '"count": 3' in last.payload


async def test_zip_members_become_their_own_encrypted_blobs(app: App, tmp_path: Path) -> None:
    """A CD copied and zipped: each scan inside is its own blob, byte-identical, verified,
    and erased with the case; viewer programs are not kept."""
    import zipfile

    from adapters.keyops import verify_all
    from adapters.tables import FileMemberRow

    patient = Patient(81, 81, "en")
    for update_id, event in enumerate(
        [
            Event(EventKind.START),
            Event(EventKind.AGREE),
            Event(EventKind.CHOOSE_PROCEDURE, "general"),
            *IDENTITY_STEPS,
        ],
        1,
    ):
        await app.service.handle(patient, event, update_id)
    await app.service.handle(patient, Event(EventKind.DONT_HAVE, "referral"), 10)
    scans = {"DICOM/IMG0001": dicom_path(), "DICOM/IMG0002": dicom_path("MR_small.dcm")}
    cd = tmp_path / "cd.zip"
    with zipfile.ZipFile(cd, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, path in scans.items():
            archive.write(path, name)
        archive.writestr("VIEWER/viewer.exe", b"MZ\x90\x00" + b"\x00" * 2000)
        archive.writestr("AUTORUN.INF", "[autorun]\nopen=viewer.exe\n")
    await send(app, patient, cd, 11)
    async with app.store.session() as session:
        members = (await session.exec(select(FileMemberRow))).all()
    assert sorted(m.kind for m in members) == ["dicom", "dicom"]
    async with app.store.session() as session:
        answer = (await session.exec(select(OutboxRow).order_by(OutboxRow.id.desc()))).first()  # type: ignore[union-attr]
    # The patient hears what the CD holds, in plain words, and that the viewer was skipped.
    assert answer is not None and answer.payload.count("finding.study_summary") == 2
    assert "finding.zip_skipped_files" in answer.payload
    key = app.store.keys.case_key(members[0].case_id, await _wrapped(app, members[0].case_id))
    originals = sorted(path.read_bytes() for path in scans.values())
    with_reader = []
    for member in members:
        with app.vault.reader(member.blob_id, key) as reader:
            with_reader.append(reader.read())
    assert sorted(with_reader) == originals
    assert all(m.name_enc and "IMG000" not in m.name_enc for m in members)
    report = await verify_all(app.store, app.vault, app.store.keys)
    assert report.ok and report.files_checked == 3
    await app.service.handle(patient, Event(EventKind.DELETE_CONFIRM), 12)
    assert list(app.vault.iter_blob_ids()) == []
    assert await count(app, FileMemberRow) == 0


async def _wrapped(app: App, case_id: str) -> bytes:
    async with app.store.session() as session:
        row = await session.get(CaseRow, case_id)
    assert row is not None
    return row.wrapped_key


async def test_another_patient_replaying_every_button_reaches_only_their_own_case(
    app: App, tmp_path: Path
) -> None:
    """Cases are found by the chat an update comes from: whatever callback data another
    patient sends (copied or forged), the victim's case, items, files and outbox stay as
    they were, and nothing about the victim is queued for the other chat."""
    from core.events import BUTTON_EVENTS

    victim, other = Patient(91, 91, "en"), Patient(92, 92, "en")
    update = await walk_to_complete(app, victim, tmp_path, 900)
    async with app.store.session() as session:
        rows = (await session.exec(select(OutboxRow).where(OutboxRow.chat_id == 91))).all()
        victim_case = (await session.exec(select(CaseRow).where(CaseRow.chat_id == 91))).one()
    pressed = {
        (button["action"], button["arg"])
        for row in rows
        for line in json.loads(row.payload).get("buttons", [])
        for button in line
    }
    pressed |= {(kind.value, "") for kind in BUTTON_EVENTS}
    assert ("delete_confirm", "") in pressed and len(pressed) > 10

    async def snapshot() -> tuple[object, ...]:
        async with app.store.session() as session:
            case = await session.get(CaseRow, victim_case.id)
            items = (
                await session.exec(select(ItemRow).where(ItemRow.case_id == victim_case.id))
            ).all()
            files = (
                await session.exec(select(FileRow).where(FileRow.case_id == victim_case.id))
            ).all()
            outbox = (await session.exec(select(OutboxRow).where(OutboxRow.chat_id == 91))).all()
        assert case is not None
        return (
            case.state, case.current_item, case.completions, case.wrapped_key,
            sorted((i.item_key, i.status, i.files_json) for i in items),
            sorted(f.id for f in files), len(outbox),
        )  # fmt: skip

    before = await snapshot()
    for action, arg in sorted(pressed):
        await app.service.handle(other, Event(EventKind(action), arg), update)
        update += 1
    assert await snapshot() == before
    async with app.store.session() as session:
        leaked = (await session.exec(select(OutboxRow).where(OutboxRow.chat_id == 92))).all()
    assert all(victim_case.id not in row.payload for row in leaked)


def test_every_legibility_rejection_allows_the_lenient_third_try() -> None:
    """The retake rule follows the photo check's own list, OCR's `photo_unreadable` included."""
    from adapters.ingest import retakeable
    from intake.verdict import LEGIBILITY_ERRORS, Finding, Kind, Severity, verdict_from

    for code in (*LEGIBILITY_ERRORS, "pdf_pages_illegible"):
        assert retakeable(verdict_from(Kind.IMAGE, [Finding(code, Severity.ERROR)])), code
    assert not retakeable(verdict_from(Kind.PDF, [Finding("pdf_corrupt", Severity.ERROR)]))


async def test_the_store_knows_which_updates_its_commits_marked_done(app: App) -> None:
    """The inbox skips reading an update back when this process committed its "done"; a
    rolled-back mark is not taken for one, and each mark answers once."""
    store = app.store
    async with store.transaction() as tx:
        await tx.mark_update(71, 515)
        await tx.mark_update(72, 515)
    with pytest.raises(RuntimeError):
        async with store.transaction() as tx:
            await tx.mark_update(73, 515)
            raise RuntimeError("the handler failed: the transaction rolls back")
    assert not store.marked_here([71, 73])  # 73 rolled back
    assert store.marked_here([71, 72])
    assert not store.marked_here([71])  # asked once already: the database answers now
    assert await count(app, InboxRow, InboxRow.status == "done") == 2


async def test_old_handled_updates_and_sent_messages_are_pruned(
    app: App, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Inbox rows done more than INBOX_KEEP ago and outbox rows sent or given up more than
    OUTBOX_KEEP ago are deleted, a few at a time; newer ones, parked and new updates, and
    messages still to send stay."""
    monkeypatch.setattr(store_module, "PRUNE_BATCH", 3)  # several batches, one partly full
    now = utcnow()
    long_ago, lately = now - timedelta(days=400), now - timedelta(days=1)
    async with app.store.session() as session:
        for update_id in range(7):
            done_at = now - store_module.INBOX_KEEP - timedelta(minutes=update_id + 1)
            session.add(
                InboxRow(update_id=update_id, status="done", received_at=long_ago, done_at=done_at)
            )
        session.add(InboxRow(update_id=100, status="done", received_at=lately, done_at=lately))
        session.add(InboxRow(update_id=101, status="parked", received_at=long_ago, payload_enc="x"))
        session.add(InboxRow(update_id=102, status="new", received_at=long_ago, payload_enc="x"))
        old_sends = [("sent", timedelta(days=31 + n)) for n in range(5)] + [
            ("failed", timedelta(days=40)),
            ("sent", timedelta(days=29)),  # newer than OUTBOX_KEEP
            ("pending", None),
        ]
        for status, age in old_sends:
            sent_at = None if age is None else now - age
            session.add(
                OutboxRow(
                    chat_id=5,
                    locale="en",
                    payload="{}",
                    status=status,
                    created_at=long_ago,
                    sent_at=sent_at,
                )
            )
    assert timedelta(days=30) == store_module.OUTBOX_KEEP
    assert await app.store.prune_handled(now) == (7, 6)
    async with app.store.reader() as session:
        inbox = (await session.exec(select(InboxRow.update_id, InboxRow.status))).all()
        outbox = (await session.exec(select(OutboxRow.status))).all()
    assert sorted(inbox) == [(100, "done"), (101, "parked"), (102, "new")]
    assert sorted(outbox) == ["pending", "sent"]
    assert await app.store.prune_handled(now) == (0, 0)


async def test_retention_erases_a_second_case_of_the_same_chat(app: App, tmp_path: Path) -> None:
    """Each erasure by the retention rule leaves a tombstone of the chat "up to update 0":
    the chat's next case, erased in its turn, must not trip over the first one's."""
    patient = Patient(53, 53, "en")

    async def age_and_erase() -> int:
        async with app.store.session() as session:
            row = (await session.exec(select(CaseRow).where(CaseRow.chat_id == 53))).one()
            row.completed_at = row.completed_at - timedelta(days=400)  # type: ignore[operator]
            session.add(row)
        return await app.service.erase_expired(365)

    await walk_to_complete(app, patient, tmp_path, 400)
    assert await age_and_erase() == 1
    await walk_to_complete(app, patient, tmp_path, 500)
    assert await count(app, CaseRow) == 1
    assert await age_and_erase() == 1
    assert await count(app, CaseRow) == 0 and list(app.vault.iter_blob_ids()) == []
    async with app.store.session() as session:
        query = select(AuditRow).where(AuditRow.action == "case.erase")
        erasures = (await session.exec(query)).all()
    assert [entry.actor for entry in erasures] == ["system", "system"]
