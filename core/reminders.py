"""Reminders for missing required items: when one is due, and what it says.

A case that waits on the patient gets a reminder after each of the configured delays (days
since the last step of the conversation, default 1, 3 and 7), only at a reasonable local
hour, never once the case is complete, when the patient paused them, or after the last one.
A case that got every reminder and still waits is "stalled" for the coordinator.

Telegram does not tell a bot the patient's time zone: it is guessed from the language they
chose (most patients of a language live in one zone), or set for everyone by the operator.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Final
from zoneinfo import ZoneInfo

from core.engine import Context, case_checklist
from core.events import EventKind
from core.model import Case, State
from core.replies import Button, Reply, Text, reply

# The zone most patients writing in a language live in.
ZONE_BY_LANGUAGE: Final = {
    "zh": "Asia/Shanghai",
    "th": "Asia/Bangkok",
    "ru": "Europe/Moscow",
    "ar": "Asia/Riyadh",
    "es": "Europe/Madrid",
    "vi": "Asia/Ho_Chi_Minh",
    "id": "Asia/Jakarta",
    "en": "Europe/London",
}


@dataclass(frozen=True)
class ReminderPolicy:
    days: tuple[int, ...] = (1, 3, 7)
    first_hour: int = 9  # local time, inclusive
    last_hour: int = 20  # local time, exclusive
    timezone: str | None = None  # for every patient; None: guessed from the language

    @classmethod
    def parse(cls, days: tuple[int, ...], hours: str, timezone: str | None) -> ReminderPolicy:
        first, last = (int(part) for part in hours.split("-"))
        return cls(tuple(sorted(days)), first, last, timezone)

    @property
    def earliest(self) -> timedelta:
        """No reminder is due sooner after the last step than this."""
        return timedelta(days=self.days[0]) if self.days else timedelta.max

    def zone(self, case: Case) -> ZoneInfo:
        return ZoneInfo(self.timezone or ZONE_BY_LANGUAGE.get(case.locale, "UTC"))


def waiting_on_patient(case: Case) -> bool:
    return case.state is State.COLLECTING and not case.reminders_paused


def due(case: Case, policy: ReminderPolicy, now: datetime) -> bool:
    """The next reminder of this case is due now (its delay passed, at a local waking hour)."""
    if not waiting_on_patient(case) or case.active_at is None:
        return False
    if case.reminders_sent >= len(policy.days):
        return False
    if now < case.active_at + timedelta(days=policy.days[case.reminders_sent]):
        return False
    local = now.astimezone(policy.zone(case))
    return policy.first_hour <= local.hour < policy.last_hour


def stalled(case: Case, policy: ReminderPolicy) -> bool:
    """Every reminder went out and the patient still has not continued."""
    return case.state is State.COLLECTING and case.reminders_sent >= len(policy.days) > 0


def reminder(case: Case, ctx: Context) -> Reply:
    """The missing required items, and how to go on or to stop these messages."""
    checklist = case_checklist(case, ctx)
    missing = tuple(
        item.label
        for item in checklist.items
        if item.required and case.progress(item.key).status.is_open
    )
    return reply(
        Text("reminder.missing", {"count": len(missing), "items": missing}),
        Text("reminder.how"),
        buttons=(
            (Button(Text("button.continue"), EventKind.START),),
            (Button(Text("button.pause_reminders"), EventKind.PAUSE_REMINDERS),),
        ),
    )
