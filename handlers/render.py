"""Rendering of channel-neutral replies with gettext, in the reader's language."""

from __future__ import annotations

import logging
import re
import unicodedata
from dataclasses import dataclass
from datetime import date, datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

from babel import Locale
from babel.dates import format_date as babel_format_date
from babel.dates import format_datetime as babel_format_datetime
from babel.lists import format_list
from babel.numbers import format_decimal
from babel.support import NullTranslations, Translations
from babel.units import format_unit

from core.replies import Button, Lines, Reply, Text, Verbatim

log = logging.getLogger(__name__)

LOCALES_DIR = Path(__file__).resolve().parent.parent / "locales"
DOMAIN = "messages"
SOURCE_LOCALE = "en"
# Telegram rejects longer messages; long notices are split at paragraph breaks.
MAX_MESSAGE_LENGTH = 4000
# Unicode isolation marks: a value between them is laid out on its own, so an id, a number
# or a file name inside right-to-left text keeps its order (FIRST STRONG ISOLATE ... POP).
FSI = "\u2068"
PDI = "\u2069"
# Names Babel gives differently from what a reader picks on the picker: "zh" is shipped as
# Simplified Chinese, and Indonesians call their language "Bahasa Indonesia".
OWN_NAMES = {"zh": "简体中文", "id": "Bahasa Indonesia"}
# A date handed over as text (a scan's study date "20240305" or "2024-03-05").
_DATE_TEXT = re.compile(r"(\d{4})-?(\d{2})-?(\d{2})")
_SIZE_UNITS = (
    (1024**3, "digital-gigabyte"),
    (1024**2, "digital-megabyte"),
    (1024, "digital-kilobyte"),
    (1, "digital-byte"),
)


def available_locales(locales_dir: Path = LOCALES_DIR) -> tuple[str, ...]:
    """Languages with a compiled catalog, English first."""
    found = sorted(p.parent.parent.name for p in locales_dir.glob(f"*/LC_MESSAGES/{DOMAIN}.mo"))
    return tuple(sorted(found, key=lambda code: code != SOURCE_LOCALE))


def language_name(code: str) -> str:
    """A language's name in its own script, as shown on the picker."""
    name = OWN_NAMES.get(code) or Locale.parse(code).get_display_name(code) or code
    return name[:1].upper() + name[1:]


@lru_cache(maxsize=64)
def is_rtl(locale: str) -> bool:
    """Whether the language is written right to left (Arabic, Hebrew, Persian...)."""
    try:
        return Locale.parse(locale).text_direction == "rtl"
    except (ValueError, TypeError):
        return False


def isolate(value: str) -> str:
    """`value` wrapped in isolation marks, so bidirectional text cannot reorder it."""
    return f"{FSI}{value}{PDI}"


def needs_isolation(value: str) -> bool:
    """True for values that would scramble inside right-to-left text: anything holding
    left-to-right letters (Latin ids, file names) or digits, or no letters at all."""
    strong_rtl = False
    for char in value:
        kind = unicodedata.bidirectional(char)
        if kind in ("L", "EN", "AN"):
            return True
        strong_rtl = strong_rtl or kind in ("R", "AL")
    return not strong_rtl and bool(value.strip())


def format_date(value: date, locale: str) -> str:
    """A calendar date the way the reader's language writes it."""
    return babel_format_date(value, format="medium", locale=locale)


def format_datetime(value: datetime, locale: str) -> str:
    """A date and time the way the reader's language writes them (no time zone shift)."""
    return babel_format_datetime(value, format="medium", tzinfo=None, locale=locale)


def format_size(num_bytes: int, locale: str) -> str:
    """A file size in the largest fitting unit (1024-based), e.g. "1.5 MB", "1,5 МБ"."""
    for factor, unit in _SIZE_UNITS:
        if abs(num_bytes) >= factor or factor == 1:
            amount = round(num_bytes / factor, 1 if factor > 1 else 0)
            return format_unit(amount, unit, length="short", locale=locale)
    raise AssertionError("unreachable")  # pragma: no cover


def _date_from_text(value: str) -> date | None:
    match = _DATE_TEXT.fullmatch(value.strip())
    if match is None:
        return None
    try:
        return date(*(int(part) for part in match.groups()))
    except ValueError:
        return None


@dataclass(frozen=True)
class RenderedButton:
    label: str
    data: str  # callback data: "<action>:<arg>"
    url: str | None = None  # a link button instead
    mini_app: bool = False


@dataclass(frozen=True)
class Rendered:
    texts: tuple[str, ...]  # one or more messages (split when too long)
    buttons: tuple[tuple[RenderedButton, ...], ...]


class Translator:
    def __init__(self, locales_dir: Path = LOCALES_DIR) -> None:
        self._dir = locales_dir

    @lru_cache(maxsize=32)  # noqa: B019  # one translator per process; catalogs are immutable
    def _catalog(self, locale: str) -> NullTranslations:
        catalog = Translations.load(str(self._dir), [locale], DOMAIN)
        if locale != SOURCE_LOCALE:
            catalog.add_fallback(self._catalog(SOURCE_LOCALE))
        return catalog

    def gettext(self, locale: str, key: str) -> str:
        message = self._catalog(locale).gettext(key)
        if message == key and "." in key and " " not in key:
            log.warning("missing message key=%s locale=%s", key, locale)
        return message

    def text(self, locale: str, text: Text | Verbatim | Lines) -> str:
        if isinstance(text, Verbatim):
            return text.value
        if isinstance(text, Lines):
            return "\n".join(self.text(locale, item) for item in text.items)
        template = self.gettext(locale, text.key)
        if not text.params:
            return template
        values = {name: self._value(locale, name, value) for name, value in text.params.items()}
        try:
            return template.format_map(values)
        except (KeyError, IndexError, ValueError):
            log.error("bad placeholders key=%s locale=%s", text.key, locale)
            return self.gettext(SOURCE_LOCALE, text.key).format_map(values)

    def _value(self, locale: str, name: str, value: Any) -> str:
        """A parameter rendered for the reader, isolated when the text runs right to left."""
        if name == "date" and isinstance(value, str) and (day := _date_from_text(value)):
            value = day
        rendered = self._param(locale, value)
        if is_rtl(locale) and needs_isolation(rendered):
            return isolate(rendered)
        return rendered

    def _param(self, locale: str, value: Any) -> str:
        if isinstance(value, Text | Verbatim | Lines):
            return self.text(locale, value)
        if isinstance(value, tuple | list):
            return format_list([self._param(locale, v) for v in value], locale=locale)
        if isinstance(value, datetime):
            return format_datetime(value, locale)
        if isinstance(value, date):
            return format_date(value, locale)
        if isinstance(value, int | float) and not isinstance(value, bool):
            return format_decimal(value, locale=locale)
        return str(value)

    def button(self, locale: str, button: Button) -> RenderedButton:
        label = self.text(locale, button.label)
        return RenderedButton(label, f"{button.action}:{button.arg}", button.link, button.mini_app)

    def render(self, locale: str, reply: Reply) -> Rendered:
        paragraphs = [self.text(locale, part) for part in reply.parts]
        buttons = tuple(tuple(self.button(locale, b) for b in row) for row in reply.buttons)
        return Rendered(_split(paragraphs), buttons)


def _split(paragraphs: list[str]) -> tuple[str, ...]:
    messages: list[str] = []
    current = ""
    for paragraph in paragraphs:
        candidate = f"{current}\n\n{paragraph}" if current else paragraph
        if len(candidate) <= MAX_MESSAGE_LENGTH:
            current = candidate
            continue
        if current:
            messages.append(current)
        while len(paragraph) > MAX_MESSAGE_LENGTH:
            messages.append(paragraph[:MAX_MESSAGE_LENGTH])
            paragraph = paragraph[MAX_MESSAGE_LENGTH:]
        current = paragraph
    if current or not messages:
        messages.append(current)
    return tuple(messages)
