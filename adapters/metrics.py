"""Prometheus metrics, served at /metrics by bot.web, in a registry of our own.

Labels carry sources, outcomes, kinds and states only: never a chat id, a name or anything a
patient sent, so the numbers can go to any monitoring system. Counters are bumped where the
thing happens; the gauges (queue depths, cases by state) are counted in the database when
/metrics is scraped (`refresh`), so they are right however many processes share it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import ParamSpec

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from sqlalchemy import func
from sqlmodel import col, select

from adapters.store import SqlStore
from adapters.tables import CaseRow, InboxRow, OutboxRow
from core.model import State
from intake import Verdict

REGISTRY = CollectorRegistry()
ProcessCollector(registry=REGISTRY)  # memory, CPU time, open files of this process

UPDATES_RECEIVED = Counter(
    "care_companion_updates_received",
    "Updates taken from Telegram into the inbox, by source (polling, webhook)",
    ["source"],
    registry=REGISTRY,
)
UPDATES_PROCESSED = Counter(
    "care_companion_updates_processed",
    "Inbox updates processed, by outcome (handled; failed: retried later; parked: given up)",
    ["outcome"],
    registry=REGISTRY,
)
SEND_RETRIES = Counter(
    "care_companion_send_retries",
    "Outgoing messages put off for a retry, by reason "
    "(rate_limited: a 429 from Telegram; unavailable: a 5xx, a network error or a timeout)",
    ["reason"],
    registry=REGISTRY,
)
WEBHOOK_FORGED = Counter(
    "care_companion_webhook_forged_requests",
    "Webhook requests refused (401) for a missing or wrong secret token",
    registry=REGISTRY,
)
CHECK_SECONDS = Histogram(
    "care_companion_intake_check_seconds",
    "Time to check one file (format, integrity, legibility, in a limited worker)",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80),
    registry=REGISTRY,
)
VERDICTS = Counter(
    "care_companion_intake_verdicts",
    "Files checked, by kind (pdf, dicom, image...) and verdict status",
    ["kind", "status"],
    registry=REGISTRY,
)
INBOX_DEPTH = Gauge(
    "care_companion_inbox_depth",
    "Updates in the inbox not handled, by status (new: waiting; parked: given up)",
    ["status"],
    registry=REGISTRY,
)
OUTBOX_DEPTH = Gauge(
    "care_companion_outbox_depth", "Messages waiting to be sent", registry=REGISTRY
)
CASES_OPEN = Gauge(
    "care_companion_cases_open",
    "Cases held (not erased), by conversation state",
    ["state"],
    registry=REGISTRY,
)

INBOX_WAITING = ("new", "parked")
OPEN_STATES = tuple(state.value for state in State if state is not State.ERASED)

# Every series exists from the start at 0, so a rate() or an alert never sees a gap.
for _source in ("polling", "webhook"):
    UPDATES_RECEIVED.labels(_source)
for _outcome in ("handled", "failed", "parked"):
    UPDATES_PROCESSED.labels(_outcome)
for _reason in ("rate_limited", "unavailable"):
    SEND_RETRIES.labels(_reason)

P = ParamSpec("P")


def timed_check(checker: Callable[P, Verdict]) -> Callable[P, Verdict]:
    """`checker` timed into CHECK_SECONDS, its verdict counted by kind and status."""

    def check(*args: P.args, **kwargs: P.kwargs) -> Verdict:
        started = time.perf_counter()
        verdict = checker(*args, **kwargs)
        CHECK_SECONDS.observe(time.perf_counter() - started)
        VERDICTS.labels(verdict.kind.value, verdict.status.value).inc()
        return verdict

    return check


async def refresh(store: SqlStore) -> None:
    """Set the gauges from the database: three COUNTs over indexed columns."""
    async with store.reader() as session:
        inbox = dict(
            (
                await session.exec(
                    select(InboxRow.status, func.count())
                    .where(col(InboxRow.status).in_(INBOX_WAITING))
                    .group_by(col(InboxRow.status))
                )
            ).all()
        )
        outbox = (
            await session.exec(
                select(func.count()).select_from(OutboxRow).where(OutboxRow.status == "pending")
            )
        ).one()
        cases = dict(
            (
                await session.exec(
                    select(CaseRow.state, func.count())
                    .where(col(CaseRow.state).in_(OPEN_STATES))
                    .group_by(col(CaseRow.state))
                )
            ).all()
        )
    for status in INBOX_WAITING:
        INBOX_DEPTH.labels(status).set(inbox.get(status, 0))
    OUTBOX_DEPTH.set(outbox)
    for state in OPEN_STATES:  # a state no case is in any more goes back to 0
        CASES_OPEN.labels(state).set(cases.get(state, 0))
