"""The coordinator's views of cases: plain data in, channel-neutral replies out.

The adapter (`adapters.directory.CaseDirectory`) reads cases, audits every view and queues
the reply in one transaction; this module only says what a view holds and how it reads.
Nothing here identifies a patient: a case is its random id, its procedure and the state
of its items (names are never stored in clear, and never shown here).

Every button carries signed callback data (see `core.review`), checked server-side before
anything is shown or done, so callback data cannot be forged or guessed.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from core import review
from core.ports import FileSource, IncomingFile
from core.replies import Button, Lines, Reply, Text, Verbatim, reply
from core.review import OPEN_ACTION, Signer, signed_button

LIST_LIMIT = 30

# /cases filters: name -> case states. None (or "all") lists every live case.
FILTERS: dict[str, frozenset[str]] = {
    "waiting": frozenset({"new", "consent", "procedure", "name", "birth_date", "collecting"}),
    "ready": frozenset({"complete"}),
    "sent_back": frozenset({"collecting"}),  # and an item sent back (adapter narrows)
    "stalled": frozenset({"collecting"}),  # and every reminder sent (adapter narrows)
    "handed_off": frozenset({"complete"}),  # and exported (adapter narrows; "ready" excludes)
}
ALL = "all"
LIVE_STATES = frozenset(
    {"new", "consent", "procedure", "name", "birth_date", "collecting", "complete"}
)

_CASE_ID = re.compile(r"[0-9a-f]{32}")
_STATES = LIVE_STATES
_ITEM_STATUSES = frozenset({"pending", "received", "done", "skipped", "dont_have", "sent_back"})
_KINDS = frozenset({"pdf", "dicom", "image", "office", "zip", "other"})
_VERDICTS = ("accepted", "noted", "rejected")
# File flags shown next to an item in the case view.
_FLAGS = {
    "identity_mismatch": "coordinator.flag.identity_mismatch",
    "active_content": "coordinator.flag.active_content",
    "needs_translation": "coordinator.flag.needs_translation",
}
NEEDS_TRANSLATION = "needs_translation"


def dynamic_keys() -> frozenset[str]:
    """Message keys built from values (states, statuses, kinds...): all need English text."""
    families = {
        "state": _STATES,
        "item_status": _ITEM_STATUSES,
        "kind": _KINDS,
        "verdict": frozenset(_VERDICTS),
        "filter": frozenset({ALL, *FILTERS}),
    }
    families["translation"] = frozenset({review.ORDERED, review.ATTACHED})
    built = {f"coordinator.{family}.{v}" for family, vs in families.items() for v in vs}
    return frozenset(built | review.dynamic_keys())


class UnknownFilter(ValueError):
    """A /cases filter that does not exist; the coordinator gets the usage line."""


def parse_filter(arg: str | None) -> str | None:
    """The filter a coordinator typed: None for all, a key of FILTERS, or UnknownFilter."""
    name = (arg or "").strip().lower()
    if name in ("", ALL):
        return None
    if name not in FILTERS:
        raise UnknownFilter(name)
    return name


def states_for(filter_name: str | None) -> frozenset[str]:
    return LIVE_STATES if filter_name is None else FILTERS[filter_name]


def is_case_id(value: str) -> bool:
    return _CASE_ID.fullmatch(value) is not None


@dataclass(frozen=True)
class Viewer:
    """A coordinator looking from one chat (their private chat or the coordinators' chat)."""

    user_id: int
    chat_id: int

    @property
    def actor(self) -> str:
        """Who, in the audit log: a role and a Telegram id, nothing else."""
        return f"coordinator:{self.user_id}"


@dataclass(frozen=True)
class CaseSummary:
    case_id: str
    state: str
    procedure: str | None  # checklist key
    procedure_title: str | None  # the checklist's title (a msgid); None if unknown
    updated_at: datetime


@dataclass(frozen=True)
class CaseList:
    filter: str | None
    cases: tuple[CaseSummary, ...]
    more: bool = False  # more cases matched than LIST_LIMIT


@dataclass(frozen=True)
class FileSummary:
    kind: str  # intake Kind value
    verdict: str  # intake Status value: accepted, noted, rejected
    counted: bool  # the case counts it towards its item (the engine accepted it)
    file_id: str = ""


@dataclass(frozen=True)
class FileDetail:
    """What the checks found in one file, for the review card (from its encrypted verdict)."""

    kind: str
    verdict: str
    pages: int | None = None  # PDF
    language: str | None = None  # detected from the text
    studies: tuple[dict[str, object], ...] = ()  # DICOM: modality, date, series, images
    findings: tuple[tuple[str, dict[str, object]], ...] = ()  # (code, params) worth a look


@dataclass(frozen=True)
class ItemView:
    key: str
    title: str | None  # the checklist item's title (a msgid); None if unknown
    required: bool | None
    status: str  # core.model.ItemStatus value
    has_answer: bool
    files: tuple[FileSummary, ...] = ()
    review: str | None = None  # core.model.ItemProgress.review
    typed_title: bool = False  # an extra record: its title is the coordinator's words
    translation: str | None = None  # core.review ORDERED / ATTACHED
    flags: tuple[str, ...] = ()  # of its files: identity_mismatch, active_content...

    @property
    def reviewable(self) -> bool:
        """Something to accept or send back: files or an answer, or an item sent back."""
        return bool(self.files) or self.has_answer

    @property
    def counted(self) -> int:
        return sum(1 for f in self.files if f.counted)

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(sorted({f.kind for f in self.files if f.counted}))

    @property
    def verdicts(self) -> dict[str, int]:
        counts = Counter(f.verdict for f in self.files)
        ordered = [v for v in _VERDICTS if v in counts] + sorted(set(counts) - set(_VERDICTS))
        return {verdict: counts[verdict] for verdict in ordered}


@dataclass(frozen=True)
class CaseView:
    case_id: str
    state: str
    procedure: str | None
    procedure_title: str | None
    hospital: str | None
    current_item: str | None
    completions: int
    items: tuple[ItemView, ...]
    handed_off: bool = False
    patient_name: str | None = None  # decrypted for the view; the message is sealed
    birth_date: str | None = None  # ISO

    def item_at(self, index: int) -> ItemView | None:
        return self.items[index] if 0 <= index < len(self.items) else None


class CoordinatorDesk(Protocol):
    """What the coordinator's handlers need; `adapters.directory.CaseDirectory` provides it.

    Each call with an `update_id` is idempotent: a replayed update returns None and
    queues, audits and changes nothing.
    """

    async def list_cases(
        self, filter_name: str | None, *, viewer: Viewer, update_id: int | None = None
    ) -> CaseList | None: ...

    async def case_view(
        self, case_id: str, *, viewer: Viewer, update_id: int | None = None, via: str = "command"
    ) -> CaseView | None: ...

    async def review_item(
        self, case_id: str, index: int, *, viewer: Viewer, update_id: int | None = None
    ) -> None: ...

    async def decide(
        self,
        case_id: str,
        index: int,
        code: str,
        *,
        viewer: Viewer,
        update_id: int | None = None,
        typed: str | None = None,
    ) -> None: ...

    async def pending_prompt(self, viewer: Viewer) -> tuple[str, str] | None: ...

    async def request_extra(
        self, case_id: str, *, viewer: Viewer, update_id: int | None = None
    ) -> None: ...

    async def order_translation(
        self, case_id: str, index: int, *, viewer: Viewer, update_id: int | None = None
    ) -> None: ...

    async def attach_translation(
        self, case_id: str, index: int, *, viewer: Viewer, update_id: int | None = None
    ) -> None: ...

    async def translation_file(
        self, incoming: IncomingFile, source: FileSource, *, viewer: Viewer, update_id: int
    ) -> None: ...

    async def typed_reason(self, text: str, *, viewer: Viewer, update_id: int) -> None: ...

    async def export(
        self, case_id: str, *, viewer: Viewer, update_id: int | None = None
    ) -> None: ...

    async def usage(self, *, viewer: Viewer, update_id: int | None = None) -> None: ...

    def verify(self, unsigned: str, signature: str) -> bool: ...


def open_button(case_id: str, sign: Signer) -> Button:
    return signed_button(
        Text("coordinator.open_button", {"case_id": Verbatim(case_id[:8])}),
        sign,
        OPEN_ACTION,
        case_id,
    )


def _state(state: str) -> Text | Verbatim:
    return Text(f"coordinator.state.{state}") if state in _STATES else Verbatim(state)


def _procedure(key: str | None, title: str | None) -> Text | Verbatim:
    if title is not None:
        return Text(title)
    if key is not None:
        return Verbatim(key)
    return Text("coordinator.no_procedure")


def _filter_label(filter_name: str | None) -> Text:
    return Text(f"coordinator.filter.{filter_name or ALL}")


def _when(at: datetime) -> Verbatim:
    return Verbatim(at.strftime("%Y-%m-%d %H:%M"))


def cases_reply(listing: CaseList, sign: Signer) -> Reply:
    """The /cases answer: one line per case, most recent first, an "open" button each."""
    header = Text(
        "coordinator.cases_header",
        {"filter": _filter_label(listing.filter), "count": len(listing.cases)},
    )
    if not listing.cases:
        return reply(header, Text("coordinator.cases_empty"))
    lines = Lines(
        tuple(
            Text(
                "coordinator.cases_line",
                {
                    "case_id": Verbatim(case.case_id),
                    "state": _state(case.state),
                    "procedure": _procedure(case.procedure, case.procedure_title),
                    "updated": _when(case.updated_at),
                },
            )
            for case in listing.cases
        )
    )
    parts: list[Text | Lines] = [header, lines]
    if listing.more:
        parts.append(Text("coordinator.cases_more", {"limit": LIST_LIMIT}))
    buttons = tuple((open_button(c.case_id, sign),) for c in listing.cases)
    return reply(*parts, buttons=buttons)


def _item_title(item: ItemView) -> Text | Verbatim:
    if item.title is None or item.typed_title:
        return Verbatim(item.title or item.key)
    return Text(item.title)


def _item_status(status: str) -> Text | Verbatim:
    if status in _ITEM_STATUSES:
        return Text(f"coordinator.item_status.{status}")
    return Verbatim(status)


def _kind(kind: str) -> Text | Verbatim:
    return Text(f"coordinator.kind.{kind}") if kind in _KINDS else Verbatim(kind)


def _verdict(verdict: str, count: int) -> Text:
    label: Text | Verbatim = (
        Text(f"coordinator.verdict.{verdict}") if verdict in _VERDICTS else Verbatim(verdict)
    )
    return Text("coordinator.verdict_count", {"count": count, "verdict": label})


def item_line(item: ItemView, position: int | None = None) -> Text:
    params: dict[str, object] = {
        "title": _item_title(item),
        "status": _item_status(item.status),
    }
    if not item.files:
        key = "coordinator.case_item_answer" if item.has_answer else "coordinator.case_item"
        line = Text(key, params)
    else:
        params |= {
            "counted": item.counted,
            "files": len(item.files),
            "kinds": tuple(_kind(k) for k in item.kinds) or Text("coordinator.none"),
            "verdicts": tuple(_verdict(v, n) for v, n in item.verdicts.items()),
        }
        line = Text("coordinator.case_item_files", params)
    for flag in item.flags:
        if flag in _FLAGS:
            line = Text("coordinator.item_with_flag", {"line": line, "flag": Text(_FLAGS[flag])})
    if item.translation is not None:
        state = Text(f"coordinator.translation.{item.translation}")
        line = Text("coordinator.item_with_flag", {"line": line, "flag": state})
    label = review.review_label(item.review)
    if label is not None:
        line = Text("coordinator.item_with_review", {"line": line, "review": label})
    if position is not None:
        line = Text("coordinator.numbered", {"n": position, "line": line})
    return line


def _reviewable(view: CaseView) -> list[tuple[int, Text | Verbatim]]:
    if view.state not in ("collecting", "complete"):
        return []
    return [(i, _item_title(item)) for i, item in enumerate(view.items) if item.reviewable]


def case_reply(
    view: CaseView, sign: Signer, details: dict[str, tuple[FileDetail, ...]] | None = None
) -> Reply:
    """The case view: state, procedure, the item asked now, each item with its files;
    a review button per item that holds something, and export once the case is complete."""
    parts: list[Text | Lines] = [
        Text(
            "coordinator.case_header",
            {
                "case_id": Verbatim(view.case_id),
                "state": _state(view.state),
                "procedure": _procedure(view.procedure, view.procedure_title),
                "hospital": Verbatim(view.hospital or "-"),
            },
        )
    ]
    if view.patient_name is not None:
        born = view.birth_date or "-"
        parts.append(Text("alert.patient", {"name": Verbatim(view.patient_name), "born": born}))
    current = next((item for item in view.items if item.key == view.current_item), None)
    if current is not None:
        parts.append(Text("coordinator.case_current", {"item": _item_title(current)}))
    if view.items:
        lines: list[Text] = []
        for i, item in enumerate(view.items):
            lines.append(item_line(item, i + 1))
            lines += _details(details.get(item.key, ()) if details else ())
        parts.append(Lines(tuple(lines)))
    else:
        parts.append(Text("coordinator.case_no_items"))
    if view.handed_off:
        parts.append(Text("coordinator.handed_off"))
    rows = review.review_rows(sign, view.case_id, _reviewable(view))
    rows += translation_rows(view, sign)
    if view.state in ("collecting", "complete"):
        label = Text("coordinator.extra_button")
        rows += ((signed_button(label, sign, review.EXTRA_ACTION, view.case_id),),)
    if view.state == "complete":
        rows += ((export_button(view.case_id, sign),),)
    return reply(*parts, buttons=rows)


def translation_rows(view: CaseView, sign: Signer) -> tuple[tuple[Button, ...], ...]:
    """Per item that needs translating: "ordered" first, then "attach the translation"."""
    rows = []
    for index, item in enumerate(view.items):
        params = {"n": index + 1, "title": _item_title(item)}
        if NEEDS_TRANSLATION in item.flags and item.translation is None:
            label = Text("coordinator.translation_ordered_button", params)
            rows.append((signed_button(label, sign, review.TRANSLATE_ACTION, view.case_id, index),))
        elif item.translation == review.ORDERED:
            label = Text("coordinator.attach_translation_button", params)
            rows.append((signed_button(label, sign, review.ATTACH_ACTION, view.case_id, index),))
    return tuple(rows)


def translation_ordered_reply(view: CaseView, index: int, sign: Signer) -> Reply:
    params = {"case_id": Verbatim(view.case_id[:8]), "title": _item_title(view.items[index])}
    attach = Text("coordinator.attach_translation_button", {"n": index + 1, **params})
    return reply(
        Text("coordinator.translation_ordered", params),
        buttons=((signed_button(attach, sign, review.ATTACH_ACTION, view.case_id, index),),),
    )


def ask_translation_reply(view: CaseView, index: int) -> Reply:
    params = {"case_id": Verbatim(view.case_id[:8]), "title": _item_title(view.items[index])}
    return reply(Text("coordinator.send_translation", params))


def translation_attached_reply(view: CaseView, key: str, accepted: bool, sign: Signer) -> Reply:
    item = next(i for i in view.items if i.key == key)
    params = {"case_id": Verbatim(view.case_id[:8]), "title": _item_title(item)}
    text = "coordinator.translation_attached" if accepted else "coordinator.translation_unreadable"
    return reply(Text(text, params), buttons=((open_button(view.case_id, sign),),))


def export_button(case_id: str, sign: Signer) -> Button:
    return signed_button(Text("coordinator.export_button"), sign, review.EXPORT_ACTION, case_id)


def item_review_reply(
    view: CaseView, index: int, sign: Signer, details: tuple[FileDetail, ...] = ()
) -> Reply:
    """One item up for review: what it holds, file by file, then accept or send back."""
    item = view.items[index]
    header = Text(
        "coordinator.review_header",
        {"case_id": Verbatim(view.case_id[:8]), "line": item_line(item, index + 1)},
    )
    parts: list[Text | Lines] = [header]
    if details:
        parts.append(Lines(tuple(line for n, d in enumerate(details, 1) for line in _detail(n, d))))
    return reply(*parts, buttons=review.decision_buttons(sign, view.case_id, index))


# Files detailed per item in the case view; the review card of the item lists them all.
DETAILS_PER_ITEM = 5


def _details(files: tuple[FileDetail, ...]) -> list[Text]:
    lines = [line for n, d in enumerate(files[:DETAILS_PER_ITEM], 1) for line in _detail(n, d)]
    if len(files) > DETAILS_PER_ITEM:
        lines.append(Text("coordinator.more_files", {"count": len(files) - DETAILS_PER_ITEM}))
    return lines


def _detail(n: int, detail: FileDetail) -> list[Text]:
    """A file's line (kind, verdict, pages, language), then its studies and its findings."""
    facts: list[Text] = []
    if detail.pages is not None:
        facts.append(Text("coordinator.file_pages", {"pages": detail.pages}))
    if detail.language is not None:
        facts.append(Text("coordinator.file_language", {"language": Verbatim(detail.language)}))
    verdict: Text | Verbatim = Verbatim(detail.verdict)
    if detail.verdict in _VERDICTS:
        verdict = Text(f"coordinator.verdict.{detail.verdict}")
    params = {
        "n": n,
        "kind": _kind(detail.kind),
        "verdict": verdict,
        "facts": Text("coordinator.file_facts", {"facts": tuple(facts)}) if facts else Verbatim(""),
    }
    lines = [Text("coordinator.file_line", params)]
    for study in detail.studies:
        lines.append(
            Text("coordinator.file_study", {"study": Text("finding.study_summary", study)})
        )
    for code, found in detail.findings:
        lines.append(Text("coordinator.file_finding", {"finding": Text(f"finding.{code}", found)}))
    return lines


def decided_reply(view: CaseView, index: int, code: str, sign: Signer) -> Reply:
    """What the coordinator reads after deciding: accepted, or sent back (the patient told)."""
    item = view.items[index]
    key = "coordinator.accepted" if code == review.ACCEPT else "coordinator.sent_back"
    params = {"case_id": Verbatim(view.case_id[:8]), "title": _item_title(item)}
    return reply(Text(key, params), buttons=((open_button(view.case_id, sign),),))


def ask_reason_reply(view: CaseView, index: int) -> Reply:
    """ "Type the reason": the coordinator's next message in this chat is sent to the patient."""
    title = _item_title(view.items[index])
    return reply(
        Text("coordinator.type_reason", {"case_id": Verbatim(view.case_id[:8]), "title": title})
    )


# Pictures per item when it is opened for review: a DICOM study is one contact sheet,
# each PDF and photo one picture; more would flood the chat (the case view lists all).
MAX_PREVIEWS = 4
PREVIEW_KINDS = frozenset({"pdf", "image"})
STUDY_KINDS = frozenset({"dicom", "zip"})  # a CD's ZIP is previewed through its DICOM files


def preview_groups(item: ItemView) -> list[tuple[str, list[str]]]:
    """(preview kind, file ids) for the pictures of an item: the study first, then files."""
    kept = [f for f in item.files if f.verdict != "rejected" and f.file_id]
    groups: list[tuple[str, list[str]]] = []
    study = [f.file_id for f in kept if f.kind in STUDY_KINDS]
    if study:
        groups.append(("dicom", study))
    groups += [(f.kind, [f.file_id]) for f in kept if f.kind in PREVIEW_KINDS]
    return groups[:MAX_PREVIEWS]


def preview_caption(view: CaseView, index: int, kind: str, n: int, of: int) -> Reply:
    title = _item_title(view.items[index])
    params = {"case_id": Verbatim(view.case_id[:8]), "title": title, "kind": _kind(kind)}
    caption = Text("coordinator.preview_caption", {**params, "n": n, "of": of})
    if kind == "dicom":  # the contact sheet's marks, explained in the coordinator's language
        return reply(caption, Text("coordinator.preview_legend_dicom"))
    return reply(caption)


def export_ready_reply(case_id: str, files: int) -> Reply:
    return reply(
        Text("coordinator.export_ready", {"case_id": Verbatim(case_id[:8]), "files": files})
    )


def export_password_reply(case_id: str, password: str) -> Reply:
    """Sent apart from the archive: forward the two to the hospital by different ways."""
    params = {"case_id": Verbatim(case_id[:8]), "password": Verbatim(password)}
    return reply(Text("coordinator.export_password", params))


def export_failed_reply() -> Reply:
    return reply(Text("coordinator.export_failed"))


def ask_extra_reply(view: CaseView) -> Reply:
    """ "Describe the record": the coordinator's next message is what the patient is asked."""
    return reply(Text("coordinator.type_extra", {"case_id": Verbatim(view.case_id[:8])}))


def extra_requested_reply(view: CaseView, description: str, sign: Signer) -> Reply:
    params = {"case_id": Verbatim(view.case_id[:8]), "description": Verbatim(description)}
    return reply(
        Text("coordinator.extra_requested", params),
        buttons=((open_button(view.case_id, sign),),),
    )


def cannot_review_reply() -> Reply:
    """The item or case changed since the button was shown (or holds nothing to review)."""
    return reply(Text("coordinator.cannot_review"))


def not_found_reply() -> Reply:
    return reply(Text("coordinator.case_not_found"))


def usage_reply() -> Reply:
    return reply(Text("coordinator.usage"))
