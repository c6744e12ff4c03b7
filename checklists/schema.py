"""Load and validate the checklist files; an error names the file and the field."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from core.checklist import Accepts, Checklist, ChecklistItem

CHECKLIST_DIR = Path(__file__).parent
DEFAULT_CHECKLIST = "general"
_KEY_PATTERN = r"^[a-z][a-z0-9_]{1,40}$"


class ChecklistError(ValueError):
    """A checklist file is missing, unreadable or invalid; the message names file and field."""


class _Item(BaseModel):
    model_config = ConfigDict(extra="forbid")

    key: Annotated[str, Field(pattern=_KEY_PATTERN)]
    title: Annotated[str, Field(min_length=3, max_length=80)]
    why: Annotated[str, Field(min_length=10, max_length=400)]
    how: Annotated[str, Field(min_length=10, max_length=700)]
    required: bool
    accepts: Annotated[list[Accepts], Field(min_length=1)]
    max_files: Annotated[int, Field(ge=1, le=500)] = 20
    translation_priority: bool = False

    @field_validator("accepts")
    @classmethod
    def _text_stands_alone(cls, accepts: list[Accepts]) -> list[Accepts]:
        if Accepts.TEXT in accepts and len(accepts) > 1:
            raise ValueError("'text' cannot be combined with file kinds")
        return accepts


class _Checklist(BaseModel):
    model_config = ConfigDict(extra="forbid")

    key: Annotated[str, Field(pattern=_KEY_PATTERN)]
    title: Annotated[str, Field(min_length=3, max_length=80)]
    hospital: Annotated[str, Field(min_length=2, max_length=120)]
    working_languages: Annotated[list[str], Field(min_length=1)]
    items: Annotated[list[_Item], Field(min_length=1)]

    @model_validator(mode="after")
    def _unique_keys_and_one_required(self) -> _Checklist:
        keys = [item.key for item in self.items]
        duplicates = sorted({k for k in keys if keys.count(k) > 1})
        if duplicates:
            raise ValueError(f"duplicate item keys: {', '.join(duplicates)}")
        if not any(item.required for item in self.items):
            raise ValueError("at least one item must be required")
        return self


def _describe(error: ValidationError) -> str:
    first = error.errors()[0]
    where = ".".join(str(part) for part in first["loc"]) or "(top level)"
    return f"field '{where}': {first['msg']}"


def load_checklist(path: Path) -> Checklist:
    """Read one checklist file; raise ChecklistError naming the file and the bad field."""
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ChecklistError(f"{path.name}: cannot read: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ChecklistError(f"{path.name}: not valid TOML: {exc}") from exc
    try:
        parsed = _Checklist.model_validate(raw)
    except ValidationError as exc:
        raise ChecklistError(f"{path.name}: {_describe(exc)}") from exc
    if parsed.key != path.stem:
        raise ChecklistError(f"{path.name}: field 'key': must equal the file name ({path.stem!r})")
    return Checklist(
        key=parsed.key,
        title=parsed.title,
        hospital=parsed.hospital,
        working_languages=tuple(parsed.working_languages),
        items=tuple(
            ChecklistItem(
                key=item.key,
                title=item.title,
                why=item.why,
                how=item.how,
                required=item.required,
                accepts=frozenset(item.accepts),
                max_files=1 if Accepts.TEXT in item.accepts else item.max_files,
                translation_priority=item.translation_priority,
            )
            for item in parsed.items
        ),
    )


def load_all(directory: Path = CHECKLIST_DIR) -> dict[str, Checklist]:
    """Every checklist in the directory, keyed by its key; the default, `general`, first."""
    paths = sorted(directory.glob("*.toml"), key=lambda p: (p.stem != DEFAULT_CHECKLIST, p.stem))
    checklists = {path.stem: load_checklist(path) for path in paths}
    if not checklists:
        raise ChecklistError(f"{directory}: no checklist files (*.toml)")
    return checklists
