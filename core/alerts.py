"""The coordinator's "case complete" alert: what the case holds, what needs their eye.

Flags are what a coordinator must not miss before handing a case to the hospital: records
that name someone else (core.identity), files taken with a warning (a third retake, a note
from the checks), records the patient does not have, documents in a language the hospital
does not work in (for items where it matters), and PDFs or office files with active
content. The alert never carries a record's content; it names the patient, so it is sealed
(encrypted) while it waits in the outbox.
"""

from __future__ import annotations

from collections.abc import Callable

from core.checklist import Checklist, ChecklistItem
from core.engine import Context, case_checklist
from core.model import Case, FileRef, ItemStatus
from core.replies import Button, Lines, Reply, Text, Verbatim, reply
from core.review import EXPORT_ACTION, OPEN_ACTION, REVIEW_ACTION, signed_button

Signer = Callable[[str], str]


# When the detector only knows the script ("latin": too few words to tell English from
# Spanish), the document is flagged only if no working language is written in that script.
SCRIPT_LANGUAGES = {
    "latin": frozenset({"en", "es", "fr", "de", "id", "vi", "it", "pt", "ms", "tr"}),
    "cyrillic": frozenset({"ru", "uk", "bg", "sr", "kk"}),
}


def needs_translation(item: ChecklistItem, ref: FileRef, checklist: Checklist) -> bool:
    """A document of a translation-priority item whose detected language the hospital does
    not work in. Unknown language (a scan without text) is not flagged: the coordinator
    sees the file and decides."""
    if not item.translation_priority or ref.language is None:
        return False
    working = frozenset(checklist.working_languages)
    if ref.language in SCRIPT_LANGUAGES:
        return not (SCRIPT_LANGUAGES[ref.language] & working)
    return ref.language not in working


def _titles(items: list[ChecklistItem]) -> tuple[Text | Verbatim, ...]:
    return tuple(item.label for item in items)


def flags(case: Case, checklist: Checklist) -> list[Text]:
    """One line per kind of flag that applies, naming the items concerned."""
    noted: list[ChecklistItem] = []
    missing: list[ChecklistItem] = []
    translate: list[ChecklistItem] = []
    active: list[ChecklistItem] = []
    someone_else: list[ChecklistItem] = []
    for item in checklist.items:
        progress = case.progress(item.key)
        if progress.status is ItemStatus.DONT_HAVE:
            missing.append(item)
        if any(ref.status == "noted" for ref in progress.files):
            noted.append(item)
        if any(needs_translation(item, ref, checklist) for ref in progress.files):
            translate.append(item)
        if any("active_content" in ref.flags for ref in progress.files):
            active.append(item)
        if any("identity_mismatch" in ref.flags for ref in progress.files):
            someone_else.append(item)
    lines = []
    for key, items in (
        ("alert.flag_identity", someone_else),
        ("alert.flag_warnings", noted),
        ("alert.flag_dont_have", missing),
        ("alert.flag_translation", translate),
        ("alert.flag_active_content", active),
    ):
        if items:
            lines.append(Text(key, {"items": _titles(items)}))
    return lines


def case_ready_alert(case: Case, ctx: Context, sign: Signer | None) -> Reply:
    """The alert: which case, procedure and hospital, each item with its files, the flags,
    and buttons to open the case and to export the bundle (signed, see core.review)."""
    checklist = case_checklist(case, ctx)
    lines = tuple(
        Text(
            "coordinator.item_line",
            {
                "title": item.label,
                "status": Text(f"item_status.{case.progress(item.key).status.value}"),
                "files": len(case.progress(item.key).files),
            },
        )
        for item in checklist.items
    )
    header = Text(
        "coordinator.case_complete",
        {
            "case_id": Verbatim(case.id),
            "procedure": Text(checklist.title),
            "hospital": Verbatim(checklist.hospital),
        },
    )
    flagged = flags(case, checklist)
    parts: list[Text | Lines] = [header]
    if case.patient_name is not None:  # the alert is sealed in the outbox (core.service)
        born = case.birth_date.isoformat() if case.birth_date else "-"
        parts.append(Text("alert.patient", {"name": Verbatim(case.patient_name), "born": born}))
    parts.append(Lines(lines))
    parts.append(Lines(tuple(flagged)) if flagged else Text("alert.no_flags"))
    buttons: tuple[tuple[Button, ...], ...] = ()
    if sign is not None:
        open_label = Text("coordinator.open_button", {"case_id": Verbatim(case.id[:8])})
        first = next(
            (
                index
                for index, item in enumerate(checklist.items)
                if case.progress(item.key).files or case.progress(item.key).answer
            ),
            None,
        )
        row = [signed_button(open_label, sign, OPEN_ACTION, case.id)]
        if first is not None:  # review starts at the first item holding something
            label = Text("alert.review_button")
            row.append(signed_button(label, sign, REVIEW_ACTION, case.id, first))
        row.append(signed_button(Text("coordinator.export_button"), sign, EXPORT_ACTION, case.id))
        buttons = (tuple(row),)
    else:
        parts.append(Text("coordinator.case_show_hint", {"case_id": Verbatim(case.id)}))
    return reply(*parts, buttons=buttons)
