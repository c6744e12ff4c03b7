"""What a hospital needs for a procedure: the checklist a case is collected against."""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import StrEnum

from core.replies import Text, Verbatim


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
    typed_title: bool = False  # the title was typed by a coordinator: shown as written

    @property
    def is_text_answer(self) -> bool:
        return self.accepts == frozenset({Accepts.TEXT})

    @property
    def label(self) -> Text | Verbatim:
        """The title as shown: translated, or a coordinator's words as they wrote them."""
        return Verbatim(self.title) if self.typed_title else Text(self.title)


# What an extra record (asked for by the coordinator) may be: any document or scan.
EXTRA_ACCEPTS = frozenset({Accepts.PDF, Accepts.IMAGE, Accepts.OFFICE, Accepts.DICOM, Accepts.ZIP})
EXTRA_PREFIX = "extra_"


def extra_item(key: str, description: str) -> ChecklistItem:
    """A record the coordinator asked for by description; required until sent or declined."""
    return ChecklistItem(
        key=key,
        title=description,
        why="extra.why",
        how="extra.how",
        required=True,
        accepts=EXTRA_ACCEPTS,
        max_files=50,
        translation_priority=False,
        typed_title=True,
    )


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

    def with_extras(self, extras: dict[str, str]) -> Checklist:
        """This checklist and the records a coordinator added to one case, in that order."""
        if not extras:
            return self
        added = tuple(extra_item(key, description) for key, description in extras.items())
        return replace(self, items=self.items + added)
