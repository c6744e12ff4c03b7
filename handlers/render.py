"""Rendering of channel-neutral replies with gettext, in the reader's language."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from babel import Locale
from babel.lists import format_list
from babel.numbers import format_decimal
from babel.support import NullTranslations, Translations

from core.replies import Button, Lines, Reply, Text, Verbatim

log = logging.getLogger(__name__)

LOCALES_DIR = Path(__file__).resolve().parent.parent / "locales"
DOMAIN = "messages"
SOURCE_LOCALE = "en"
# Telegram rejects longer messages; long notices are split at paragraph breaks.
MAX_MESSAGE_LENGTH = 4000


def available_locales(locales_dir: Path = LOCALES_DIR) -> tuple[str, ...]:
    """Languages with a compiled catalog, English first."""
    found = sorted(p.parent.parent.name for p in locales_dir.glob(f"*/LC_MESSAGES/{DOMAIN}.mo"))
    return tuple(sorted(found, key=lambda code: code != SOURCE_LOCALE))


def language_name(code: str) -> str:
    """A language's name in its own script, as shown on the picker."""
    name = Locale.parse(code).get_display_name(code) or code
    return name[:1].upper() + name[1:]


@dataclass(frozen=True)
class RenderedButton:
    label: str
    data: str  # callback data: "<action>:<arg>"


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
        values = {name: self._param(locale, value) for name, value in text.params.items()}
        try:
            return template.format_map(values)
        except (KeyError, IndexError, ValueError):
            log.error("bad placeholders key=%s locale=%s", text.key, locale)
            return self.gettext(SOURCE_LOCALE, text.key).format_map(values)

    def _param(self, locale: str, value: Any) -> str:
        if isinstance(value, Text | Verbatim | Lines):
            return self.text(locale, value)
        if isinstance(value, tuple | list):
            return format_list([self._param(locale, v) for v in value], locale=locale)
        if isinstance(value, int | float) and not isinstance(value, bool):
            return format_decimal(value, locale=locale)
        return str(value)

    def button(self, locale: str, button: Button) -> RenderedButton:
        return RenderedButton(self.text(locale, button.label), f"{button.action}:{button.arg}")

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
