"""Channel-neutral output of the core: message keys with parameters, and buttons.

A `Text` is a gettext msgid plus parameters; a parameter may itself be a `Text` (an item
title inside a sentence), which the renderer translates first. No English lives here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Text:
    key: str
    params: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "params": {k: _encode(v) for k, v in self.params.items()}}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Text:
        return cls(data["key"], {k: _decode(v) for k, v in data.get("params", {}).items()})


@dataclass(frozen=True)
class Verbatim:
    """A parameter shown as is (a language's own name, a case id): never translated."""

    value: str


@dataclass(frozen=True)
class Lines:
    """Several texts shown one per line, as one paragraph (a status list)."""

    items: tuple[Text, ...]


def _encode(value: Any) -> Any:
    if isinstance(value, Lines):
        return {"$lines": [_encode(v) for v in value.items]}
    if isinstance(value, Text):
        return {"$text": value.to_dict()}
    if isinstance(value, Verbatim):
        return {"$verbatim": value.value}
    if isinstance(value, list | tuple):
        return {"$list": [_encode(v) for v in value]}
    return value


def _decode(value: Any) -> Any:
    if isinstance(value, dict):
        if "$text" in value:
            return Text.from_dict(value["$text"])
        if "$verbatim" in value:
            return Verbatim(value["$verbatim"])
        if "$lines" in value:
            return Lines(tuple(_decode(v) for v in value["$lines"]))
        if "$list" in value:
            return tuple(_decode(v) for v in value["$list"])
    return value


@dataclass(frozen=True)
class Button:
    """An inline button; `action` and `arg` come back as a `Pressed` event when pressed."""

    label: Text | Verbatim
    action: str
    arg: str = ""
    link: str | None = None  # a web address the button opens instead (no action comes back)
    mini_app: bool = False  # open `link` inside Telegram as a Mini App

    def to_dict(self) -> dict[str, Any]:
        data = {"label": _encode(self.label), "action": self.action, "arg": self.arg}
        if self.link is not None:
            data |= {"link": self.link, "mini_app": self.mini_app}
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Button:
        return cls(
            _decode(data["label"]),
            data["action"],
            data.get("arg", ""),
            data.get("link"),
            bool(data.get("mini_app", False)),
        )


@dataclass(frozen=True)
class Reply:
    """One message to one chat: paragraphs joined by blank lines, buttons in rows."""

    parts: tuple[Text | Lines, ...]
    buttons: tuple[tuple[Button, ...], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "parts": [_encode(p) for p in self.parts],
            "buttons": [[b.to_dict() for b in row] for row in self.buttons],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Reply:
        return cls(
            tuple(_decode(p) for p in data["parts"]),
            tuple(tuple(Button.from_dict(b) for b in row) for row in data.get("buttons", ())),
        )


def reply(*parts: Text | Lines, buttons: tuple[tuple[Button, ...], ...] = ()) -> Reply:
    return Reply(tuple(parts), buttons)
