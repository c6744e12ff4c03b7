"""What a hospital needs for a procedure: the checklist a case is collected against."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Accepts(StrEnum):
    """What an item can be answered with. Files are judged by content (see `intake`)."""

    PDF = "pdf"
    DICOM = "dicom"
    IMAGE = "image"
    OFFICE = "office"
    ZIP = "zip"  # a CD copied to a folder and zipped: judged by what is inside
    TEXT = "text"  # a typed answer instead of a file


@dataclass(frozen=True)
class ChecklistItem:
    key: str
    title: str  # English source text; also the gettext msgid
    why: str  # why the hospital needs it (msgid)
    how: str  # which format works and how to get it (msgid)
    required: bool
    accepts: frozenset[Accepts]
    max_files: int  # the item closes by itself once this many files are accepted
    translation_priority: bool

    @property
    def is_text_answer(self) -> bool:
        return self.accepts == frozenset({Accepts.TEXT})


@dataclass(frozen=True)
class Checklist:
    key: str
    title: str  # msgid
    hospital: str
    working_languages: tuple[str, ...]
    items: tuple[ChecklistItem, ...]

    def item(self, key: str) -> ChecklistItem:
        for item in self.items:
            if item.key == key:
                return item
        raise KeyError(key)

    @property
    def item_keys(self) -> tuple[str, ...]:
        return tuple(item.key for item in self.items)
