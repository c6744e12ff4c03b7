"""Layering rules that keep the core framework-free and the checks pure."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FRAMEWORKS = {"aiogram", "sqlmodel", "sqlalchemy", "cryptography", "aiohttp", "pydantic"}
FORBIDDEN = {
    "core": FRAMEWORKS | {"adapters", "handlers", "bot", "intake", "checklists"},
    "intake": {
        "aiogram",
        "sqlmodel",
        "sqlalchemy",
        "aiohttp",
        "adapters",
        "handlers",
        "bot",
        "core",
    },
    "handlers": {"adapters", "bot", "sqlmodel", "sqlalchemy"},
    "adapters": {"bot"},
}


def imported_roots(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_layer_imports_only_what_it_may(package: str) -> None:
    """core imports no framework; intake imports nothing of the bot; no layer imports up."""
    offenders = {
        str(path.relative_to(ROOT)): sorted(imported_roots(path) & FORBIDDEN[package])
        for path in (ROOT / package).rglob("*.py")
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_the_rule_catches_a_framework_import(tmp_path: Path) -> None:
    """The check itself can fail: a file importing aiogram is reported."""
    bad = tmp_path / "bad.py"
    bad.write_text("from aiogram import Bot\nimport sqlmodel.main\n")
    assert imported_roots(bad) & FORBIDDEN["core"] == {"aiogram", "sqlmodel"}
