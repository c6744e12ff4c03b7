"""Reminders for missing items (core.reminders) and the live checklist card, on a real store.

Time is moved by setting the case's last step back in the database; the service runs with
the real clock, so the policy's hours span the whole day where the hour is not the point.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlmodel import col, select

from adapters.tables import CaseRow, OutboxRow
from bot.app import App
from core.events import Event, EventKind
from core.model import Case, State
from core.ports import Patient
from core.reminders import ReminderPolicy, due, stalled
from core.replies import Reply
from tests import test_store_service
from tests.scenario import IDENTITY_STEPS
from tests.test_store_service import count

app = test_store_service.app  # the fixture (database_url comes from conftest)

ALL_DAY = ReminderPolicy(days=(1, 3, 7), first_hour=0, last_hour=24)
PATIENT = Patient(chat_id=515, user_id=515, language_code="en")


async def _collecting(app: App) -> None:
    steps = [
        Event(EventKind.START),
        Event(EventKind.AGREE),
        Event(EventKind.CHOOSE_PROCEDURE, "general"),
        *IDENTITY_STEPS,
    ]
    for update_id, step in enumerate(steps, 1):
        assert isinstance(step, Event)
        await app.service.handle(PATIENT, step, update_id)


async def _idle_for(app: App, days: float) -> None:
    async with app.store.session() as session:
        row = (await session.exec(select(CaseRow).where(CaseRow.chat_id == PATIENT.chat_id))).one()
        row.active_at = datetime.now(UTC) - timedelta(days=days)
        session.add(row)


async def _reminders(app: App) -> list[OutboxRow]:
    async with app.store.session() as session:
        query = select(OutboxRow).where(col(OutboxRow.dedup_key).startswith("reminder:"))
        return list((await session.exec(query)).all())


async def test_reminders_follow_the_delays_once_each_and_stop(app: App) -> None:
    await _collecting(app)
    assert await app.service.send_reminders(ALL_DAY) == 0  # just active
    await _idle_for(app, 1.1)
    assert await app.service.send_reminders(ALL_DAY) == 1
    assert await app.service.send_reminders(ALL_DAY) == 0  # the next one waits for day 3
    await _idle_for(app, 3.1)
    assert await app.service.send_reminders(ALL_DAY) == 1
    await _idle_for(app, 7.1)
    assert await app.service.send_reminders(ALL_DAY) == 1
    await _idle_for(app, 30)
    assert await app.service.send_reminders(ALL_DAY) == 0  # after the last one: stalled
    rows = await _reminders(app)
    assert len(rows) == 3
    message = Reply.from_dict(app.store.outbox_payload(rows[0]))
    assert [getattr(part, "key", None) for part in message.parts] == [
        "reminder.missing",
        "reminder.how",
    ]
    assert {b.action for line in message.buttons for b in line} == {"start", "pause_reminders"}


async def test_a_step_of_the_patient_starts_the_count_afresh_and_pause_stops_it(app: App) -> None:
    await _collecting(app)
    await _idle_for(app, 1.1)
    assert await app.service.send_reminders(ALL_DAY) == 1
    await app.service.handle(PATIENT, Event(EventKind.STATUS), 50)  # the patient is back
    await _idle_for(app, 1.1)
    assert await app.service.send_reminders(ALL_DAY) == 1  # the first delay again
    await app.service.handle(PATIENT, Event(EventKind.PAUSE_REMINDERS), 51)
    await _idle_for(app, 8)
    assert await app.service.send_reminders(ALL_DAY) == 0
    assert len(await _reminders(app)) == 2


def _case(locale: str = "th", idle: timedelta = timedelta(days=2)) -> Case:
    case = Case(id="c", chat_id=1, locale=locale, state=State.COLLECTING)
    case.active_at = datetime(2026, 11, 20, 0, 0, tzinfo=UTC)
    return case


@pytest.mark.parametrize(
    ("utc_hour", "expected"),
    [(1, False), (2, True), (12, True), (13, False), (23, False)],  # Bangkok is UTC+7
)
def test_only_at_a_waking_hour_in_the_patients_zone(utc_hour: int, expected: bool) -> None:
    policy = ReminderPolicy(days=(1,), first_hour=9, last_hour=20)
    now = datetime(2026, 11, 22, utc_hour, 0, tzinfo=UTC)
    assert due(_case("th"), policy, now) is expected


def test_an_operator_zone_overrides_the_language_guess() -> None:
    now = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)  # 19:00 in Bangkok, 07:00 in New York
    assert due(_case("th"), ReminderPolicy(days=(1,)), now)
    assert not due(_case("th"), ReminderPolicy(days=(1,), timezone="America/New_York"), now)


def test_complete_paused_and_exhausted_cases_get_nothing() -> None:
    now = datetime(2026, 11, 22, 5, 0, tzinfo=UTC)
    policy = ReminderPolicy(days=(1, 3), first_hour=0, last_hour=24)
    complete = _case()
    complete.state = State.COMPLETE
    paused = _case()
    paused.reminders_paused = True
    exhausted = _case()
    exhausted.reminders_sent = 2
    assert not any(due(c, policy, now) for c in (complete, paused, exhausted))
    assert stalled(exhausted, policy) and not stalled(_case(), policy)


async def test_the_card_is_one_message_kept_up_to_date(app: App) -> None:
    """Each change queues the newest card; a card not yet sent is replaced, not added."""
    await _collecting(app)
    async with app.store.session() as session:
        cards = (
            await session.exec(
                select(OutboxRow).where(col(OutboxRow.payload).startswith('{"card"'))
            )
        ).all()
    assert len(cards) == 1  # the card of the collecting step, still pending
    before = app.store.outbox_payload(cards[0])
    await app.service.handle(PATIENT, Event(EventKind.DONT_HAVE, "referral"), 60)
    await app.service.handle(PATIENT, Event(EventKind.STATUS), 61)  # changes nothing shown
    async with app.store.session() as session:
        cards = (
            await session.exec(
                select(OutboxRow).where(col(OutboxRow.payload).startswith('{"card"'))
            )
        ).all()
    assert len(cards) == 1 and app.store.outbox_payload(cards[0]) != before
    card = Reply.from_dict(app.store.outbox_payload(cards[0])["card"])
    assert getattr(card.parts[0], "key", None) == "card.header"
    assert await count(app, OutboxRow) > 1
