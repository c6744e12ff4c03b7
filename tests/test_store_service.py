"""The conversation service on the real SQL store: SQLite files and PostgreSQL."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from sqlmodel import func, select

from adapters.tables import CaseRow, FileRow, InboxRow, OutboxRow
from bot.app import App, build_app, prepare
from bot.settings import Settings
from bot.shell import LocalFileSource, local_incoming
from core.events import Event, EventKind
from core.ports import Patient
from tests.files import dicom_path, document_photo, pdf_bytes
from tests.services import fresh_postgres_database

COORDINATOR = -100500
SECRET_ANSWER = "Zolpidem-7731 nightly; allergic to Quetzalcoatlin"


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'data' / 'cc.db'}"
    else:
        with fresh_postgres_database() as url:
            yield url


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
        (4, referral),
        (5, Event(EventKind.DONE, "referral")),
        (6, dicom_path()),
        (7, Event(EventKind.DONE, "imaging")),
        (8, Event(EventKind.SKIP, "reports")),
        (9, Event(EventKind.DONT_HAVE, "lab_results")),
        (10, Event(EventKind.TEXT, SECRET_ANSWER)),
        (11, Event(EventKind.SKIP, "past_records")),
        (12, photo),
        (13, Event(EventKind.DONE, "identity")),
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
    assert all(SECRET_ANSWER not in p for p in payloads)
    loaded = await _load(app, patient.chat_id)
    assert loaded.progress("medications").answer == SECRET_ANSWER


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
