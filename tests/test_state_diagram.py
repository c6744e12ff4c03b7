"""The mermaid diagram in docs/ shows exactly the rows of the transition table."""

import re
from pathlib import Path

from core.engine import ANY, TRANSITIONS, arrows

DIAGRAM = Path(__file__).resolve().parent.parent / "docs" / "state-machine.md"
ARROW = re.compile(r"^\s*(\w+)\s*-->\s*(\w+)\s*:\s*(\w+)\s*$")


def _diagram_arrows() -> set[tuple[str, str, str]]:
    text = DIAGRAM.read_text(encoding="utf-8")
    block = text.split("```mermaid", 1)[1].split("```", 1)[0]
    return {m.groups() for line in block.splitlines() if (m := ARROW.match(line))}  # type: ignore[misc]


def _table_arrows() -> set[tuple[str, str, str]]:
    return set(arrows())


def test_diagram_matches_table() -> None:
    """Every table row is drawn, and nothing is drawn that the table does not have."""
    drawn, table = _diagram_arrows(), _table_arrows()
    assert drawn - table == set(), "arrows in the diagram but not in the table"
    assert table - drawn == set(), "rows in the table missing from the diagram"


def test_diagram_has_an_entry_point() -> None:
    assert "[*] --> new" in DIAGRAM.read_text(encoding="utf-8")


def test_every_table_row_is_drawn_at_least_once() -> None:
    drawn_events = {(src, event) for src, _, event in _diagram_arrows()}
    for state, kind in TRANSITIONS:
        assert ("any" if state == ANY else str(state), kind.value) in drawn_events
