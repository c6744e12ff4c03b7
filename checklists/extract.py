"""Babel extractor: the translatable texts of checklist files (title, why, how).

Registered as the `checklist` extraction method in pyproject.toml, so `pybabel extract`
puts checklist texts in the same catalog as the bot's messages.
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterator
from typing import Any, BinaryIO

_TRANSLATABLE = ("title", "why", "how")


def extract_checklist(
    fileobj: BinaryIO, keywords: Any, comment_tags: Any, options: Any
) -> Iterator[tuple[int, str | None, str, list[str]]]:
    """Yield (line, funcname, message, comments) for every translatable field."""
    del keywords, comment_tags, options
    text = fileobj.read().decode("utf-8")
    data = tomllib.loads(text)
    lines = text.splitlines()

    def line_of(value: str) -> int:
        needle = value.splitlines()[0][:40]
        for number, line in enumerate(lines, start=1):
            if needle in line:
                return number
        return 0

    yield line_of(data["title"]), None, data["title"], [f"checklist {data['key']}: title"]
    for item in data.get("items", []):
        for field in _TRANSLATABLE:
            value = item.get(field)
            if value:
                comment = f"checklist {data['key']}, item {item['key']}: {field}"
                yield line_of(value), None, value, [comment]
