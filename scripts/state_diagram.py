"""Print docs/state-machine.md from the transition table (`python scripts/state_diagram.py`)."""

from __future__ import annotations

from core.engine import arrows

HEADER = """# The conversation state machine

The table is `core.engine.TRANSITIONS`; `tests/test_state_diagram.py` checks that this
diagram shows exactly its rows (one arrow per allowed target). `any` stands for rows that
apply in every state where no specific row exists: they answer and show the current step
again, and change no state except greeting a chat still in `new`. Regenerate with
`python scripts/state_diagram.py > docs/state-machine.md`.

```mermaid
stateDiagram-v2
    [*] --> new
"""

FOOTER = """```

- **new**: a chat we have not greeted yet; `/start` greets it in Telegram's language.
- **consent**: the privacy notice is shown; nothing can be uploaded before "I agree". A new
  notice version (`PRIVACY_VERSION`) sends a started case back here (`consent_outdated`);
  agreeing resumes where the patient was, and a complete case stays complete (no new alert).
- **procedure**: the patient picks a treatment (skipped when an invite set it).
- **name**, **birth_date**: who the patient is, asked once before the first item, so that
  records naming someone else are flagged for the coordinator (`core.identity`).
- **collecting**: one checklist item at a time: files, a typed answer, done, skip, or
  "I don't have this".
- **complete**: every required item has an accepted file, an answer, or a "don't have";
  the coordinator is alerted once per completion. The coordinator may send an item back
  (`sent_back`, with a reason the patient reads): the case collects that item again, and
  its next completion is alerted once more.
- **erased**: the patient confirmed `/delete` (or withdrew consent): the service destroys
  the case key, removes every blob and row, and keeps only a tombstone so that a late
  duplicate update cannot bring anything back.
"""


def main() -> None:
    lines = [f"    {source} --> {target} : {event}" for source, target, event in arrows()]
    print(HEADER + "\n".join(lines) + "\n" + FOOTER, end="")


if __name__ == "__main__":
    main()
