"""The coordinator's /cases, /case and "open" buttons, fed as real aiogram updates.

A Dispatcher holds the coordinator router then the patient router, as the bot does; the
store is a real database (SQLite file and PostgreSQL). Replies land in the outbox table;
the Bot's session records API calls and answers only answerCallbackQuery, so a handler
that tried to send anything directly would fail the test.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import pyzipper
from aiogram import Bot, Dispatcher
from aiogram.client.session.base import BaseSession
from aiogram.exceptions import TelegramNetworkError
from aiogram.methods import AnswerCallbackQuery, TelegramMethod
from aiogram.types import Update
from babel.messages.pofile import read_po
from sqlmodel import col, func, select

from adapters import audit
from adapters.directory import CaseDirectory, button_secret
from adapters.keys import load_or_create_master_key
from adapters.tables import AuditRow, CaseRow, FileRow, InboxRow, ItemRow, OutboxRow
from bot.app import App, build_app, prepare
from bot.settings import Settings
from core.coordination import LIST_LIMIT, CaseList, CaseSummary, Viewer, cases_reply, dynamic_keys
from core.events import Event, EventKind
from core.ports import Patient
from core.replies import Reply
from core.review import CALLBACK_DATA_MAX, parse_pressed
from handlers import coordinator, patient
from tests.files import pdf_bytes
from tests.scenario import IDENTITY_STEPS, apply_steps, default_steps, walk_to_complete

COORDINATOR = 900_001  # in COORDINATOR_IDS
COORDINATOR_CHAT = -100_500  # COORDINATOR_CHAT_ID
UNRELATED_GROUP = -100_777
DONE_PATIENT = 4242  # a complete case
WAITING_PATIENT = 4343  # a case still collecting
STRANGER = 5555  # never talked to the bot
GROUP_MEMBER = 6666  # in the coordinators' chat, not in COORDINATOR_IDS
TOKEN = "123456789:AAFakeTokenForCoordinatorTests000"
ENGLISH = Path(__file__).resolve().parent.parent / "locales" / "en" / "LC_MESSAGES" / "messages.po"


class RecordingSession(BaseSession):
    """A Bot API that is not there: records every call, answers only callback queries."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[TelegramMethod[Any]] = []

    async def make_request(
        self, bot: Bot, method: TelegramMethod[Any], timeout: int | None = None
    ) -> Any:
        self.calls.append(method)
        if isinstance(method, AnswerCallbackQuery):
            return True
        raise TelegramNetworkError(method=method, message="no network in this test")

    async def stream_content(
        self,
        url: str,
        headers: dict[str, Any] | None = None,
        timeout: int = 30,
        chunk_size: int = 65536,
        raise_for_status: bool = True,
    ) -> AsyncGenerator[bytes, None]:
        raise TelegramNetworkError(method=AnswerCallbackQuery(callback_query_id="-"), message="")
        yield b""  # pragma: no cover  # makes this an async generator

    async def close(self) -> None:
        return None


@dataclass
class World:
    app: App
    desk: CaseDirectory
    bot: Bot
    session: RecordingSession
    dispatcher: Dispatcher
    done_case: str
    waiting_case: str
    ids: Iterator[int] = field(default_factory=lambda: itertools.count(10_000))

    async def feed(self, update: Update) -> None:
        await self.dispatcher.feed_update(
            self.bot,
            update,
            service=self.app.service,
            file_source=patient.TelegramFileSource(self.bot),
            update_id=update.update_id,
            coordinator_desk=self.desk,
        )

    def message(self, user_id: int, chat_id: int, text: str) -> Update:
        return message_update(next(self.ids), user_id, chat_id, text)

    def press(self, user_id: int, chat_id: int, data: str) -> Update:
        return callback_update(next(self.ids), user_id, chat_id, data)

    def signed(self, unsigned: str) -> str:
        """Callback data as the bot would sign it."""
        return f"{unsigned}:{self.desk.sign(unsigned)}"

    def typed(self, user_id: int, chat_id: int, text: str) -> Update:
        """A plain text message (no command entity)."""
        update = message_update(next(self.ids), user_id, chat_id, text)
        assert update.message is not None
        return update.model_copy(
            update={"message": update.message.model_copy(update={"entities": None})}
        )

    def answers(self) -> list[AnswerCallbackQuery]:
        return [c for c in self.session.calls if isinstance(c, AnswerCallbackQuery)]


def _chat(chat_id: int) -> dict[str, Any]:
    if chat_id > 0:
        return {"id": chat_id, "type": "private", "first_name": "Someone"}
    return {"id": chat_id, "type": "supergroup", "title": "Some group"}


def message_update(update_id: int, user_id: int, chat_id: int, text: str) -> Update:
    command = text.split(maxsplit=1)[0]
    payload = {
        "update_id": update_id,
        "message": {
            "message_id": update_id,
            "date": int(time.time()),
            "chat": _chat(chat_id),
            "from": {"id": user_id, "is_bot": False, "first_name": "Someone"},
            "text": text,
            "entities": [{"type": "bot_command", "offset": 0, "length": len(command)}],
        },
    }
    return Update.model_validate(payload)


def callback_update(update_id: int, user_id: int, chat_id: int, data: str) -> Update:
    payload = {
        "update_id": update_id,
        "callback_query": {
            "id": f"q{update_id}",
            "from": {"id": user_id, "is_bot": False, "first_name": "Someone"},
            "chat_instance": str(chat_id),
            "data": data,
            "message": {
                "message_id": 1,
                "date": int(time.time()),
                "chat": _chat(chat_id),
                "from": {"id": 123456789, "is_bot": True, "first_name": "Bot"},
                "text": "an earlier list",
            },
        },
    }
    return Update.model_validate(payload)


async def _complete_case(app: App, tmp_path: Path, chat_id: int) -> None:
    who = Patient(chat_id=chat_id, user_id=chat_id, language_code="en")
    await walk_to_complete(app, who, tmp_path, chat_id * 100, answer="none")


async def _case_id(app: App, chat_id: int) -> str:
    async with app.store.session() as session:
        row = (await session.exec(select(CaseRow).where(CaseRow.chat_id == chat_id))).one()
    return row.id


@pytest.fixture
async def world(database_url: str, tmp_path: Path) -> AsyncIterator[World]:
    settings = Settings(
        data_dir=tmp_path / "data",
        database_url=database_url,
        coordinator_chat_id=COORDINATOR_CHAT,
        coordinator_ids=(COORDINATOR,),
    )
    await asyncio.to_thread(prepare, settings)
    app = build_app(settings)
    await _complete_case(app, tmp_path, DONE_PATIENT)
    waiting = Patient(WAITING_PATIENT, WAITING_PATIENT, "en")
    for update_id, event in enumerate(
        [
            Event(EventKind.START),
            Event(EventKind.AGREE),
            Event(EventKind.CHOOSE_PROCEDURE, "ivf"),
            *IDENTITY_STEPS,
        ],
        start=900,
    ):
        await app.service.handle(waiting, event, update_id)
    master, _ = load_or_create_master_key(settings.key_file, create=False)
    desk = CaseDirectory(
        app.store,
        app.store.keys,
        button_secret(master),
        checklists=app.checklists,
        locale=settings.coordinator_locale,
        context=app.context,
        ingest=app.ingest,
    )
    session = RecordingSession()
    bot = Bot(TOKEN, session=session)
    dispatcher = Dispatcher()
    dispatcher.include_router(
        coordinator.build_router(frozenset(settings.coordinator_ids), COORDINATOR_CHAT)
    )
    dispatcher.include_router(patient.build_router())
    yield World(
        app,
        desk,
        bot,
        session,
        dispatcher,
        done_case=await _case_id(app, DONE_PATIENT),
        waiting_case=await _case_id(app, WAITING_PATIENT),
    )
    await app.close()


async def _outbox_after(world: World, after: int) -> list[OutboxRow]:
    async with world.app.store.session() as session:
        query = select(OutboxRow).where(col(OutboxRow.id) > after).order_by(col(OutboxRow.id))
        return list((await session.exec(query)).all())


async def _last_outbox_id(world: World) -> int:
    async with world.app.store.session() as session:
        return (await session.exec(select(func.max(OutboxRow.id)))).one() or 0


async def _audit_count(world: World) -> int:
    async with world.app.store.session() as session:
        return (await session.exec(select(func.count()).select_from(AuditRow))).one()


async def _snapshot(world: World, except_chat: int | None = None) -> dict[str, list[Any]]:
    """Every row of every case not owned by `except_chat`, with its items and files."""
    async with world.app.store.session() as session:
        cases = [c for c in (await session.exec(select(CaseRow))).all() if c.chat_id != except_chat]
        ids = {c.id for c in cases}
        items = [i for i in (await session.exec(select(ItemRow))).all() if i.case_id in ids]
        files = [f for f in (await session.exec(select(FileRow))).all() if f.case_id in ids]

    def rows(found: list[Any]) -> list[str]:
        return sorted(json.dumps(r.model_dump(), default=str, sort_keys=True) for r in found)

    return {"cases": rows(cases), "case_items": rows(items), "case_files": rows(files)}


def _reply(world: World, row: OutboxRow) -> Reply:
    return Reply.from_dict(world.app.store.outbox_payload(row))


def _text(world: World, row: OutboxRow) -> str:
    """What a queued message holds, sealed or not (coordinator views are sealed)."""
    return json.dumps(world.app.store.outbox_payload(row), ensure_ascii=False)


async def test_coordinator_lists_cases_and_opens_one(world: World) -> None:
    """/cases, /cases ready, /case ID and an "open" button: replies only to the asking chat,
    each view audited with the coordinator's id, the chain intact, no case changed."""
    before_cases = await _snapshot(world)
    start = await _last_outbox_id(world)

    await world.feed(world.message(COORDINATOR, COORDINATOR, "/cases"))
    rows = await _outbox_after(world, start)
    assert [r.chat_id for r in rows] == [COORDINATOR]
    listing = _text(world, rows[0])
    assert world.done_case in listing and world.waiting_case in listing
    buttons = [b for row in _reply(world, rows[0]).buttons for b in row]
    assert {b.arg.split(":")[0] for b in buttons} == {world.done_case, world.waiting_case}
    for button in buttons:
        data = f"{button.action}:{button.arg}"
        assert button.action == "co" and len(data.encode()) <= CALLBACK_DATA_MAX
        opened = parse_pressed(data)
        assert opened is not None and world.desk.verify(opened[0].unsigned, opened[1])
    # most recent first: the waiting case was touched last
    assert buttons[0].arg.startswith(world.waiting_case)

    mark = await _last_outbox_id(world)
    await world.feed(world.message(COORDINATOR, COORDINATOR_CHAT, "/cases ready"))
    rows = await _outbox_after(world, mark)
    assert [r.chat_id for r in rows] == [COORDINATOR_CHAT]
    assert world.done_case in _text(world, rows[0]) and world.waiting_case not in _text(
        world, rows[0]
    )

    mark = await _last_outbox_id(world)
    await world.feed(world.message(COORDINATOR, COORDINATOR, f"/case {world.done_case}"))
    rows = await _outbox_after(world, mark)
    assert [r.chat_id for r in rows] == [COORDINATOR]
    view = _reply(world, rows[0])
    keys = {p.key for p in view.parts if hasattr(p, "key")}
    assert "coordinator.case_header" in keys
    assert '"coordinator.state.complete"' in _text(world, rows[0])
    assert '"coordinator.kind.dicom"' in _text(world, rows[0])

    mark = await _last_outbox_id(world)
    waiting_button = next(b for b in buttons if b.arg.startswith(world.waiting_case))
    press = world.press(COORDINATOR, COORDINATOR_CHAT, f"co:{waiting_button.arg}")
    await world.feed(press)
    rows = await _outbox_after(world, mark)
    assert [r.chat_id for r in rows] == [COORDINATOR_CHAT]
    assert world.waiting_case in _text(world, rows[0])
    assert '"coordinator.case_current"' in _text(world, rows[0])
    answer = world.answers()[-1]
    assert answer.callback_query_id == f"q{press.update_id}" and answer.text is None

    entries = await audit.entries(world.app.store)
    assert [(e.actor, e.action, e.case_id) for e in entries] == [
        (f"coordinator:{COORDINATOR}", "cases.list", None),
        (f"coordinator:{COORDINATOR}", "cases.list", None),
        (f"coordinator:{COORDINATOR}", "case.view", world.done_case),
        (f"coordinator:{COORDINATOR}", "case.view", world.waiting_case),
    ]
    assert entries[-1].detail == "via=button"
    assert await audit.verify_chain(world.app.store) == []
    assert await _snapshot(world) == before_cases
    every_row = await _outbox_after(world, start)
    assert {r.chat_id for r in every_row} <= {COORDINATOR, COORDINATOR_CHAT}
    assert not [c for c in world.session.calls if not isinstance(c, AnswerCallbackQuery)]


async def test_non_owners_get_nothing_of_any_case(world: World) -> None:
    """Every coordinator command and button (valid, forged, malformed), from every principal
    that is not an allowed coordinator-in-chat: no message names a case, no audit row is
    written, no case row changes; buttons are answered with no text."""
    principals = {
        "another patient": (WAITING_PATIENT, WAITING_PATIENT),
        "a stranger": (STRANGER, STRANGER),
        "a coordinator in an unrelated group": (COORDINATOR, UNRELATED_GROUP),
        "a non-coordinator in the coordinators' chat": (GROUP_MEMBER, COORDINATOR_CHAT),
        "a coordinator's id spoofed as a private chat of someone else": (GROUP_MEMBER, COORDINATOR),
    }
    targets = [world.done_case, world.waiting_case]
    commands = ["/cases", "/cases waiting", "/cases ready", "/cases all", "/cases nonsense"]
    commands += ["/case", *(f"/case {t}" for t in targets), "/case 0123"]
    buttons = [f"co:{t}:{world.desk.sign(f'co:{t}')}" for t in targets]  # genuine signatures
    buttons += [f"co:{t}:{'0' * 16}" for t in targets]  # forged
    buttons += [f"co:{t}:{world.desk.sign(f'co:{t}')[::-1]}" for t in targets]  # forged
    buttons += [f"co:{t}" for t in targets]  # unsigned
    buttons += ["co:", "co:x:y", f"co:{targets[0].upper()}:{world.desk.sign(f'co:{targets[0]}')}"]
    # review and decide buttons, genuinely signed, and one signed for another item
    buttons += [world.signed(f"cr:{t}:00") for t in targets]
    buttons += [world.signed(f"cd:{t}:00:{code}") for t in targets for code in ("ok", "bl", "tx")]
    buttons += [f"cd:{targets[0]}:01:bl:{world.desk.sign(f'cd:{targets[0]}:00:bl')}"]
    known_cases = set(targets)
    for name, (user_id, chat_id) in principals.items():
        for action in [*commands, *buttons]:
            is_button = action[:3] in ("co:", "cr:", "cd:", "ce:")
            update = (
                world.press(user_id, chat_id, action)
                if is_button
                else world.message(user_id, chat_id, action)
            )
            before = await _snapshot(world, except_chat=chat_id)
            audits = await _audit_count(world)
            mark = await _last_outbox_id(world)
            answered = len(world.answers())

            await world.feed(update)

            where = f"{name}: {action}"
            assert await _audit_count(world) == audits, where
            assert await _snapshot(world, except_chat=chat_id) == before, where
            async with world.app.store.session() as session:
                known_cases |= set((await session.exec(select(CaseRow.id))).all())
            for row in await _outbox_after(world, mark):
                assert row.chat_id == chat_id and chat_id > 0, where  # only their own chat
                assert not [c for c in known_cases if c in _text(world, row)], where
                assert '"coordinator.' not in _text(world, row), where
            if is_button:
                answers = world.answers()
                assert len(answers) == answered + 1, where
                assert answers[-1].text is None and not answers[-1].show_alert, where
    assert await audit.entries(world.app.store) == []
    # a listed coordinator's forged button in their own chat gets nothing either
    mark = await _last_outbox_id(world)
    await world.feed(world.press(COORDINATOR, COORDINATOR, f"co:{targets[0]}:{'f' * 16}"))
    assert await _outbox_after(world, mark) == []
    assert await audit.entries(world.app.store) == []


async def test_replayed_updates_show_and_audit_once(world: World) -> None:
    """Telegram redelivers: the same command or button shows the view once, audits once."""
    mark = await _last_outbox_id(world)
    signed = f"co:{world.done_case}:{world.desk.sign(f'co:{world.done_case}')}"
    updates = [
        world.message(COORDINATOR, COORDINATOR, "/cases"),
        world.message(COORDINATOR, COORDINATOR, f"/case {world.done_case}"),
        world.press(COORDINATOR, COORDINATOR, signed),
        world.message(COORDINATOR, COORDINATOR, "/cases bogus"),
    ]
    for _ in range(3):
        for update in updates:
            await world.feed(update)
    rows = await _outbox_after(world, mark)
    assert len(rows) == len(updates)
    entries = await audit.entries(world.app.store)
    assert [e.action for e in entries] == ["cases.list", "case.view", "case.view"]
    async with world.app.store.session() as session:
        for update in updates:
            inbox = await session.get(InboxRow, update.update_id)
            assert inbox is not None and inbox.status == "done"


async def test_a_view_that_cannot_be_audited_is_not_shown(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The audit row, the queued reply and the handled mark commit together or not at all."""

    async def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("audit store unavailable")

    monkeypatch.setattr(audit, "append", broken)
    mark = await _last_outbox_id(world)
    update = world.message(COORDINATOR, COORDINATOR, f"/case {world.done_case}")
    with pytest.raises(RuntimeError):
        await world.feed(update)
    assert await _outbox_after(world, mark) == []
    async with world.app.store.session() as session:
        assert await session.get(InboxRow, update.update_id) is None  # retried later
    monkeypatch.undo()
    await world.feed(update)  # the retry shows and audits it
    assert len(await _outbox_after(world, mark)) == 1
    assert [e.action for e in await audit.entries(world.app.store)] == ["case.view"]


def test_list_buttons_fit_telegram_and_the_list_is_bounded() -> None:
    """Callback data of a full-length id stays within 64 bytes; the list says when cut."""
    now = datetime.now(UTC)
    summaries = tuple(
        CaseSummary(f"{n:032x}", "complete", "general", "General review", now)
        for n in range(LIST_LIMIT)
    )
    message = cases_reply(CaseList("ready", summaries, more=True), lambda data: "f" * 16)
    datas = [f"{b.action}:{b.arg}" for row in message.buttons for b in row]
    assert len(datas) == LIST_LIMIT and max(len(d.encode()) for d in datas) <= 64
    assert any(getattr(p, "key", "") == "coordinator.cases_more" for p in message.parts)


def test_every_coordinator_key_has_english_text() -> None:
    """States, statuses, kinds, verdicts and filters are shown through keys built from values
    (which tests/test_catalog.py cannot see): each has English text with simple placeholders."""
    with ENGLISH.open("rb") as handle:
        catalog = {str(m.id): str(m.string) for m in read_po(handle) if m.id}
    assert sorted(k for k in dynamic_keys() if not catalog.get(k)) == []


async def _case_row(world: World, case_id: str) -> tuple[str, dict[str, tuple[str, str | None]]]:
    async with world.app.store.session() as session:
        case = await session.get(CaseRow, case_id)
        assert case is not None
        items = (await session.exec(select(ItemRow).where(ItemRow.case_id == case_id))).all()
    return case.state, {i.item_key: (i.status, i.review) for i in items}


async def _alerts(world: World, case_id: str) -> list[str | None]:
    async with world.app.store.session() as session:
        query = select(OutboxRow.dedup_key).where(
            col(OutboxRow.dedup_key).startswith(f"case-complete:{case_id}:")
        )
        return sorted((await session.exec(query)).all(), key=str)


async def test_a_study_preview_comes_with_the_legend_of_its_marks(world: World) -> None:
    """The CT's contact sheet carries only numbers and the files' own codes; its caption
    explains them in the coordinator's language (a PDF's preview needs no legend)."""
    case_id = world.done_case
    mark = await _last_outbox_id(world)
    await world.feed(world.press(COORDINATOR, COORDINATOR, world.signed(f"cr:{case_id}:01")))
    _, sheet = await _outbox_after(world, mark)
    assert json.loads(_text(world, sheet))["media"]["kind"] == "dicom"
    assert "coordinator.preview_legend_dicom" in _text(world, sheet)


async def test_send_back_reopens_the_item_and_the_new_completion_alerts_once(
    world: World, tmp_path: Path
) -> None:
    """Review the referral, send it back as blurred: the patient reads why in their language
    and is asked for it again; a new upload completes the case again, alerted once more."""
    case_id = world.done_case
    assert await _alerts(world, case_id) == [f"case-complete:{case_id}:1"]
    mark = await _last_outbox_id(world)
    await world.feed(world.press(COORDINATOR, COORDINATOR, world.signed(f"cr:{case_id}:00")))
    card, *previews = await _outbox_after(world, mark)
    # file by file: the referral PDF, its page count (the checks' findings would follow)
    assert "coordinator.file_line" in _text(world, card)
    assert "coordinator.file_pages" in _text(world, card)
    # the referral PDF's first page, made at send time: the row holds ids, never pixels
    assert [json.loads(_text(world, p))["media"]["kind"] for p in previews] == ["pdf"]
    assert all(p.chat_id == COORDINATOR for p in previews)
    assert "coordinator.preview_legend_dicom" not in _text(world, previews[0])
    decisions = {f"{b.action}:{b.arg}" for row in _reply(world, card).buttons for b in row}
    assert world.signed(f"cd:{case_id}:00:bl") in decisions
    assert world.signed(f"cd:{case_id}:00:ok") in decisions

    mark = await _last_outbox_id(world)
    decide = world.press(COORDINATOR, COORDINATOR, world.signed(f"cd:{case_id}:00:bl"))
    await world.feed(decide)
    await world.feed(decide)  # Telegram redelivers: nothing happens twice
    rows = await _outbox_after(world, mark)
    assert sorted(r.chat_id for r in rows) == sorted([DONE_PATIENT, COORDINATOR])
    to_patient = next(r for r in rows if r.chat_id == DONE_PATIENT)
    assert "review.sent_back" in _text(world, to_patient) and "review.reason.blurred" in _text(
        world, to_patient
    )
    assert '"item.ask"' in _text(world, to_patient)  # the referral is asked for at once
    state, items = await _case_row(world, case_id)
    assert state == "collecting" and items["referral"] == ("sent_back", "blurred")
    actions = [e.action for e in await audit.entries(world.app.store)]
    assert actions == ["item.view", "item.send_back"]

    patient = Patient(DONE_PATIENT, DONE_PATIENT, "en")
    again = tmp_path / "referral-again.pdf"
    again.write_bytes(pdf_bytes(["Referral, a sharper copy"]))
    await apply_steps(world.app, patient, [again, Event(EventKind.DONE, "referral")], 77_000)
    state, items = await _case_row(world, case_id)
    assert state == "complete" and items["referral"] == ("done", None)
    assert await _alerts(world, case_id) == [
        f"case-complete:{case_id}:1",
        f"case-complete:{case_id}:2",
    ]


async def test_a_typed_reason_reaches_the_patient_as_written(world: World) -> None:
    """ "Another reason": the coordinator's next message goes to the patient verbatim."""
    case_id = world.done_case
    await world.feed(world.press(COORDINATOR, COORDINATOR, world.signed(f"cd:{case_id}:01:tx")))
    assert await world.desk.pending_prompt(Viewer(COORDINATOR, COORDINATOR)) is not None
    assert await world.desk.pending_prompt(Viewer(COORDINATOR, COORDINATOR_CHAT)) is None
    mark = await _last_outbox_id(world)
    reason = "Only slice 3 of the CT arrived; please send the whole folder."
    await world.feed(world.typed(COORDINATOR, COORDINATOR, reason))
    rows = await _outbox_after(world, mark)
    to_patient = next(r for r in rows if r.chat_id == DONE_PATIENT)
    assert reason in _text(world, to_patient)
    state, items = await _case_row(world, case_id)
    assert state == "collecting" and items["imaging"] == ("sent_back", "other")
    assert await world.desk.pending_prompt(Viewer(COORDINATOR, COORDINATOR)) is None
    entries = await audit.entries(world.app.store)
    assert [e.action for e in entries] == ["item.send_back"]
    assert reason not in entries[0].detail  # the audit keeps the reason's name only
    # the coordinator's next message is ordinary again: nothing more reaches the patient
    mark = await _last_outbox_id(world)
    await world.feed(world.typed(COORDINATOR, COORDINATOR, "thanks"))
    assert all(r.chat_id != DONE_PATIENT for r in await _outbox_after(world, mark))


async def test_accepting_an_item_is_recorded_and_audited(world: World) -> None:
    case_id = world.done_case
    await world.feed(world.press(COORDINATOR, COORDINATOR, world.signed(f"cd:{case_id}:00:ok")))
    state, items = await _case_row(world, case_id)
    assert state == "complete" and items["referral"] == ("done", "accepted")
    assert [e.action for e in await audit.entries(world.app.store)] == ["item.accept"]
    # an item with nothing in it cannot be reviewed (reports were skipped)
    mark = await _last_outbox_id(world)
    await world.feed(world.press(COORDINATOR, COORDINATOR, world.signed(f"cd:{case_id}:02:bl")))
    [row] = await _outbox_after(world, mark)
    assert "coordinator.cannot_review" in _text(world, row)
    assert (await _case_row(world, case_id))[1]["reports"] == ("skipped", None)


async def test_an_extra_record_joins_the_checklist_and_completes_again(
    world: World, tmp_path: Path
) -> None:
    """ "Ask for another record": the typed description is asked of the patient, joins the
    checklist (and the case view, under the coordinator's words), and once sent the case
    completes again with one more alert."""
    case_id = world.done_case
    await world.feed(world.press(COORDINATOR, COORDINATOR, world.signed(f"ca:{case_id}")))
    assert await world.desk.pending_prompt(Viewer(COORDINATOR, COORDINATOR)) is not None
    mark = await _last_outbox_id(world)
    description = "Blood test from the last three months"
    await world.feed(world.typed(COORDINATOR, COORDINATOR, description))
    rows = await _outbox_after(world, mark)
    to_patient = next(r for r in rows if r.chat_id == DONE_PATIENT)
    assert "extra.requested" in _text(world, to_patient) and description in _text(world, to_patient)
    state, items = await _case_row(world, case_id)
    assert state == "collecting" and items["extra_1"] == ("pending", None)
    assert [e.action for e in await audit.entries(world.app.store)] == ["item.request_extra"]

    patient = Patient(DONE_PATIENT, DONE_PATIENT, "en")
    lab = tmp_path / "blood.pdf"
    lab.write_bytes(pdf_bytes(["Full blood count", "Haemoglobin 13.5 g/dL"]))
    await apply_steps(world.app, patient, [lab, Event(EventKind.DONE, "extra_1")], 78_000)
    state, items = await _case_row(world, case_id)
    assert state == "complete" and items["extra_1"] == ("done", None)
    assert len(await _alerts(world, case_id)) == 2
    mark = await _last_outbox_id(world)
    await world.feed(world.message(COORDINATOR, COORDINATOR, f"/case {case_id}"))
    [view] = await _outbox_after(world, mark)
    assert description in _text(world, view)
    assert "coordinator.file_line" in _text(world, view)  # each item's files, in detail
    assert "finding.study_summary" in _text(world, view)  # the CT slice: modality and date
    async with world.app.store.session() as session:  # the description is kept encrypted
        row = await session.get(CaseRow, case_id)
        assert row is not None and row.extras_enc and description not in row.extras_enc


SPANISH_REFERRAL = [
    "Informe de derivación",
    "El paciente presenta dolor en la rodilla derecha desde hace dos años y no mejora con "
    "la fisioterapia. Se considera la cirugía de reemplazo de la articulación para el paciente.",
]


async def test_a_translation_is_ordered_told_attached_and_bundled(
    world: World, tmp_path: Path
) -> None:
    """A Spanish referral for an English-speaking hospital: flagged, the translation marked
    ordered (the patient is told, nothing is asked of them), the translated file attached
    beside the original and both in the bundle."""
    from adapters.export import build_bundle
    from bot.shell import LocalFileSource, local_incoming

    patient = Patient(4646, 4646, "en")
    steps = default_steps(tmp_path, "es")
    referral = tmp_path / "referral-es.pdf"
    referral.write_bytes(pdf_bytes(SPANISH_REFERRAL))
    steps[steps.index(tmp_path / "referrales.pdf")] = referral
    await apply_steps(world.app, patient, steps, 79_000)
    case_id = await _case_id(world.app, 4646)
    mark = await _last_outbox_id(world)
    await world.feed(world.message(COORDINATOR, COORDINATOR, f"/case {case_id}"))
    [view] = await _outbox_after(world, mark)
    assert "coordinator.flag.needs_translation" in _text(world, view)
    datas = {f"{b.action}:{b.arg}" for row in _reply(world, view).buttons for b in row}
    assert world.signed(f"ct:{case_id}:00") in datas

    mark = await _last_outbox_id(world)
    await world.feed(world.press(COORDINATOR, COORDINATOR, world.signed(f"ct:{case_id}:00")))
    rows = await _outbox_after(world, mark)
    to_patient = [r for r in rows if r.chat_id == 4646]
    assert len(to_patient) == 1 and "translation.ordered" in _text(world, to_patient[0])
    assert (await _case_row(world, case_id))[1]["referral"][0] == "done"

    await world.feed(world.press(COORDINATOR, COORDINATOR, world.signed(f"cu:{case_id}:00")))
    translated = tmp_path / "referral-en.pdf"
    translated.write_bytes(pdf_bytes(["Referral letter (translation)", "Knee pain for two years."]))
    viewer = Viewer(COORDINATOR, COORDINATOR)
    await world.desk.translation_file(
        local_incoming(translated), LocalFileSource(), viewer=viewer, update_id=79_500
    )
    async with world.app.store.session() as session:
        files = (await session.exec(select(FileRow).where(FileRow.case_id == case_id))).all()
        item = await session.get(ItemRow, (case_id, "referral"))
    assert [f.role for f in files].count("translation") == 1
    assert item is not None and item.translation == "attached"
    assert [e.action for e in await audit.entries(world.app.store)][-2:] == [
        "item.translation",
        "item.translated",
    ]
    bundle = await build_bundle(
        world.app.store,
        world.app.vault,
        world.app.checklists,
        case_id,
        tmp_path / "out",
        render=lambda key, params: key,
        actor="operator",
    )
    with pyzipper.AESZipFile(bundle.path) as archive:
        archive.setpassword(bundle.password.encode())
        contents = [archive.read(name) for name in archive.namelist()]
    assert translated.read_bytes() in contents and referral.read_bytes() in contents
    assert "export.manifest.is_translation" in [e.translation for e in bundle.entries]
