"""Every message the bot can send has English text in the catalog."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from babel.messages.pofile import read_po

from bot.polling import COMMANDS
from checklists import load_all
from core.checklist import Accepts
from core.model import ItemStatus, State
from intake.verdict import Kind

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "locales" / "en" / "LC_MESSAGES" / "messages.po"
PLACEHOLDER = re.compile(r"\{(\w+)\}")


def english() -> dict[str, str]:
    with SOURCE.open("rb") as handle:
        return {str(m.id): str(m.string) for m in read_po(handle) if m.id}


def literal_keys(package: str) -> set[str]:
    """First arguments of Text("...") calls."""
    keys = set()
    for path in (ROOT / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id == "Text"
                and node.args
                and isinstance(node.args[0], ast.Constant)
                and isinstance(node.args[0].value, str)
            ):
                keys.add(node.args[0].value)
    return keys


def finding_codes() -> set[str]:
    """Codes passed to Finding(...) and to the checks' error classes."""
    codes = set()
    for path in (ROOT / "intake").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not (isinstance(node, ast.Call) and node.args):
                continue
            name = getattr(node.func, "id", getattr(node.func, "attr", ""))
            first = node.args[0]
            if (
                re.search(r"(Finding|Error|Rejected)$", name)
                and isinstance(first, ast.Constant)
                and isinstance(first.value, str)
                and re.fullmatch(r"[a-z]+(_[a-z0-9]+)+", first.value)
            ):
                codes.add(first.value)
    return codes


def test_every_literal_key_has_english_text() -> None:
    catalog = english()
    keys = literal_keys("core") | literal_keys("adapters") | literal_keys("handlers")
    missing = sorted(k for k in keys if not catalog.get(k))
    assert missing == []


def test_every_dynamic_key_family_is_complete() -> None:
    catalog = english()
    expected = (
        {f"item_status.{s.value}" for s in ItemStatus}
        | {f"kind.{k.value}" for k in Kind}
        | {f"kind.{a.value}" for a in Accepts}
        | {f"not_now.{s.value}" for s in State}
        | {f"command.{c}" for c in COMMANDS}
    )
    assert sorted(k for k in expected if not catalog.get(k)) == []


def test_every_finding_code_has_a_message() -> None:
    catalog = english()
    codes = finding_codes()
    assert len(codes) > 30, "the scan of intake/ found too few codes to be trusted"
    assert sorted(c for c in codes if not catalog.get(f"finding.{c}")) == []


def test_every_checklist_text_is_in_the_catalog() -> None:
    catalog = english()
    texts = set()
    for checklist in load_all().values():
        texts.add(checklist.title)
        for item in checklist.items:
            texts |= {item.title, item.why, item.how}
    assert sorted(t for t in texts if t not in catalog) == []


def test_placeholders_are_simple_names() -> None:
    """Only {name} placeholders: no attribute access or indexing a translator could break."""
    for key, text in english().items():
        for match in re.finditer(r"\{([^}]*)\}", text):
            assert PLACEHOLDER.fullmatch(match.group(0)), (key, match.group(0))
