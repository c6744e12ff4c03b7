"""A patient walking the default checklist through the real conversation service."""

from __future__ import annotations

from pathlib import Path

from bot.app import App
from bot.shell import LocalFileSource, local_incoming
from core.events import Event, EventKind
from core.ports import Patient
from tests.files import dicom_path, document_photo, pdf_bytes

Step = Event | Path

# Who the patient says they are, asked once after the procedure (core.engine, identity).
PATIENT_NAME = "Ann Example"
IDENTITY_STEPS: list[Step] = [
    Event(EventKind.TEXT, PATIENT_NAME),
    Event(EventKind.TEXT, "31.01.1980"),
]


def default_steps(tmp_path: Path, tag: str | int = "", answer: str = "None taken") -> list[Step]:
    """Consent, the general checklist, a PDF, a CT slice, an answer and a photo: complete."""
    referral = tmp_path / f"referral{tag}.pdf"
    referral.write_bytes(pdf_bytes([f"Referral {tag}"]))
    photo = tmp_path / f"id{tag}.jpg"
    photo.write_bytes(document_photo(f"Passport {tag}"))
    return [
        Event(EventKind.START),
        Event(EventKind.AGREE),
        Event(EventKind.CHOOSE_PROCEDURE, "general"),
        *IDENTITY_STEPS,
        referral,
        Event(EventKind.DONE, "referral"),
        dicom_path(),
        Event(EventKind.DONE, "imaging"),
        Event(EventKind.SKIP, "reports"),
        Event(EventKind.DONT_HAVE, "lab_results"),
        Event(EventKind.TEXT, answer),
        Event(EventKind.SKIP, "past_records"),
        photo,
        Event(EventKind.DONE, "identity"),
    ]


async def apply_steps(app: App, patient: Patient, steps: list[Step], first_update: int) -> int:
    """Each step as one update (files through the real ingest); returns the next update id."""
    update = first_update
    for step in steps:
        if isinstance(step, Path):
            incoming = local_incoming(step)
            await app.service.handle_file(patient, incoming, LocalFileSource(), update)
        else:
            await app.service.handle(patient, step, update)
        update += 1
    return update


async def walk_to_complete(
    app: App, patient: Patient, tmp_path: Path, first_update: int, answer: str = "None taken"
) -> int:
    steps = default_steps(tmp_path, first_update, answer)
    return await apply_steps(app, patient, steps, first_update)
