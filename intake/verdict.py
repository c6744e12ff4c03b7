"""The verdict a check returns: codes and parameters only, never English text.

`handlers` renders each finding code with gettext in the patient's language
(`finding.<code>` in the catalogs), so a new code needs a catalog entry too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

# The codes by which a photo check says a picture cannot be read (intake.image); kept here,
# with no imaging library imported, for the bot that acts on them.
LEGIBILITY_ERRORS = (
    "photo_low_resolution",
    "photo_too_dark",
    "photo_washed_out",
    "photo_low_contrast",
    "photo_blurred",
    "photo_glare",
    "photo_cut_off",
    "image_blank",
    "photo_unreadable",
)


class Kind(StrEnum):
    """What a file is, judged by its content (never by its name or declared MIME type)."""

    PDF = "pdf"
    DICOM = "dicom"
    IMAGE = "image"
    OFFICE = "office"
    ZIP = "zip"
    OTHER = "other"


class Status(StrEnum):
    ACCEPTED = "accepted"
    NOTED = "noted"  # accepted, with a note for the patient or a warning for the coordinator
    REJECTED = "rejected"


class Severity(StrEnum):
    INFO = "info"  # shown to the coordinator only
    NOTE = "note"  # accepted, but the patient hears a suggestion
    ERROR = "error"  # the file is not accepted


@dataclass(frozen=True)
class Finding:
    code: str
    severity: Severity
    params: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "severity": self.severity.value, "params": dict(self.params)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Finding:
        return cls(data["code"], Severity(data["severity"]), dict(data.get("params", {})))


@dataclass(frozen=True)
class Verdict:
    kind: Kind
    status: Status
    findings: tuple[Finding, ...] = ()
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def accepted(self) -> bool:
        return self.status is not Status.REJECTED

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind.value,
            "status": self.status.value,
            "findings": [f.to_dict() for f in self.findings],
            "metadata": dict(self.metadata),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Verdict:
        return cls(
            Kind(data["kind"]),
            Status(data["status"]),
            tuple(Finding.from_dict(f) for f in data.get("findings", ())),
            dict(data.get("metadata", {})),
        )


def verdict_from(
    kind: Kind, findings: list[Finding], metadata: dict[str, Any] | None = None
) -> Verdict:
    """The status follows from the worst finding, so no check can forget to set it."""
    severities = {f.severity for f in findings}
    if Severity.ERROR in severities:
        status = Status.REJECTED
    elif Severity.NOTE in severities:
        status = Status.NOTED
    else:
        status = Status.ACCEPTED
    return Verdict(kind, status, tuple(findings), metadata or {})
