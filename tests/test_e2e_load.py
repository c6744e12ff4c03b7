"""The load bench in a short form (bench/load_bench.py runs 500 patients): the real bot
process, two waves of patients walking text and button steps all at once."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from tests.load import HANDLED_RE, run_load

PATIENTS, STEPS = 12, 8
# RSS may grow between two equal waves by allocator slack, not by what a wave leaves
# behind: a leak of even 100 KiB per patient and step would show as ~10 MiB here.
GROWTH_LIMIT_KB = 8 * 1024


@pytest.mark.e2e
@pytest.mark.timeout(600)
async def test_many_patients_at_once_every_reply_arrives_within_the_limits(
    tmp_path: Path,
) -> None:
    """Two waves of patients answering the moment each reply arrives: every step of every
    patient is answered and handled once, no message goes out faster than Telegram's
    limits, and the second wave leaves the bot's memory where the first did."""
    run = await run_load(tmp_path, [PATIENTS, PATIENTS], STEPS, ramp=1.0, timeout=120.0)

    assert not run.failed(), [p.error for p in run.failed()]
    assert all(p.done == STEPS for p in run.patients)
    handled = [int(update_id) for update_id, _ in HANDLED_RE.findall(run.log)]
    assert sorted(handled) == sorted(run.updates) and len(handled) == 2 * PATIENTS * STEPS
    assert run.breaches() == []
    # The card is one message per patient, edited in place, never sent twice.
    cards = Counter(
        c.params["chat_id"] for c in run.replies() if "Your checklist" in str(c.params.get("text"))
    )
    assert all(count == 1 for count in cards.values()), cards
    first, second = run.waves
    assert second.rss_after_kb - first.rss_after_kb < GROWTH_LIMIT_KB, (
        first.rss_after_kb,
        second.rss_after_kb,
    )
