"""The coordinator's views of cases: plain data in, channel-neutral replies out.

The adapter (`adapters.directory.CaseDirectory`) reads cases, audits every view and queues
the reply in one transaction; this module only says what a view holds and how it reads.
Nothing here identifies a patient: a case is its random id, its procedure and the state
of its items (names are never stored in clear, and never shown here).

"Open" buttons carry the case id with a signature (`co:<case_id>:<sig>`), checked
server-side before anything is shown, so callback data cannot be forged or guessed.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from core.replies import Button, Lines, Reply, Text, Verbatim, reply

# Callback data of an "open" button: "co:<case_id>:<signature>".
OPEN_ACTION = "co"
SIGNATURE_HEX = 16  # first 16 hex digits (64 bits) of HMAC-SHA256
CALLBACK_DATA_MAX = 64  # Telegram's limit, in bytes
LIST_LIMIT = 30

# /cases filters: name -> case states. None (or "all") lists every live case.
FILTERS: dict[str, frozenset[str]] = {
    "waiting": frozenset({"new", "consent", "procedure", "collecting"}),
    "ready": frozenset({"complete"}),
}
ALL = "all"
LIVE_STATES = frozenset({"new", "consent", "procedure", "collecting", "complete"})

_CASE_ID = re.compile(r"[0-9a-f]{32}")
_SIGNATURE = re.compile(rf"[0-9a-f]{{{SIGNATURE_HEX}}}")
_STATES = frozenset({"new", "consent", "procedure", "collecting", "complete"})
_ITEM_STATUSES = frozenset({"pending", "received", "done", "skipped", "dont_have"})
_KINDS = frozenset({"pdf", "dicom", "image", "office", "zip", "other"})
_VERDICTS = ("accepted", "noted", "rejected")


def dynamic_keys() -> frozenset[str]:
    """Message keys built from values (states, statuses, kinds...): all need English text."""
    families = {
        "state": _STATES,
        "item_status": _ITEM_STATUSES,
        "kind": _KINDS,
        "verdict": frozenset(_VERDICTS),
        "filter": frozenset({ALL, *FILTERS}),
    }
    return frozenset(f"coordinator.{family}.{v}" for family, vs in families.items() for v in vs)


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


def parse_open_arg(arg: str) -> tuple[str, str] | None:
    """(case_id, signature) from the arg of an "open" button, or None when malformed."""
    case_id, sep, signature = arg.partition(":")
    if not sep or not is_case_id(case_id) or _SIGNATURE.fullmatch(signature) is None:
        return None
    return case_id, signature


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
    signature: str  # signs the "open" button's callback data


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


@dataclass(frozen=True)
class ItemView:
    key: str
    title: str | None  # the checklist item's title (a msgid); None if unknown
    required: bool | None
    status: str  # core.model.ItemStatus value
    has_answer: bool
    files: tuple[FileSummary, ...] = ()

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
    current_title: str | None
    completions: int
    items: tuple[ItemView, ...]


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

    async def usage(self, *, viewer: Viewer, update_id: int | None = None) -> None: ...

    def verify(self, case_id: str, signature: str) -> bool: ...


def open_button(case_id: str, signature: str) -> Button:
    button = Button(
        Text("coordinator.open_button", {"case_id": Verbatim(case_id[:8])}),
        OPEN_ACTION,
        f"{case_id}:{signature}",
    )
    data = f"{button.action}:{button.arg}"
    if len(data.encode()) > CALLBACK_DATA_MAX:
        raise ValueError("callback data longer than Telegram allows")
    return button


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


def cases_reply(listing: CaseList) -> Reply:
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
    buttons = tuple((open_button(c.case_id, c.signature),) for c in listing.cases)
    return reply(*parts, buttons=buttons)


def _item_title(item: ItemView) -> Text | Verbatim:
    return Text(item.title) if item.title is not None else Verbatim(item.key)


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


def item_line(item: ItemView) -> Text:
    params: dict[str, object] = {
        "title": _item_title(item),
        "status": _item_status(item.status),
    }
    if not item.files:
        key = "coordinator.case_item_answer" if item.has_answer else "coordinator.case_item"
        return Text(key, params)
    params |= {
        "counted": item.counted,
        "files": len(item.files),
        "kinds": tuple(_kind(k) for k in item.kinds) or Text("coordinator.none"),
        "verdicts": tuple(_verdict(v, n) for v, n in item.verdicts.items()),
    }
    return Text("coordinator.case_item_files", params)


def case_reply(view: CaseView) -> Reply:
    """The case view: state, procedure, the item asked now, each item with its files."""
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
    if view.current_item is not None:
        current = (
            Text(view.current_title)
            if view.current_title is not None
            else Verbatim(view.current_item)
        )
        parts.append(Text("coordinator.case_current", {"item": current}))
    if view.items:
        parts.append(Lines(tuple(item_line(item) for item in view.items)))
    else:
        parts.append(Text("coordinator.case_no_items"))
    return reply(*parts)


def not_found_reply() -> Reply:
    return reply(Text("coordinator.case_not_found"))


def usage_reply() -> Reply:
    return reply(Text("coordinator.usage"))
