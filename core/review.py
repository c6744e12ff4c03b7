"""The coordinator's review: accept an item, or send it back to the patient with a reason.

Every coordinator button carries signed callback data, `<action>:<fields...>:<signature>`,
where the signature is a keyed hash of everything before it (the adapter holds the key,
see `adapters.directory.ButtonSigner`). A button cannot be forged, and one signed for one
case or item cannot be edited to act on another. Items are named by their position in the
case view (two digits), which keeps the data inside Telegram's 64 bytes.

    co:<case>:<sig>            open the case
    cr:<case>:<n>:<sig>        review item n (its files, and the decision buttons)
    cd:<case>:<n>:<code>:<sig> decide: accept ("ok"), a preset reason, or "tx" (type one)
    ce:<case>:<sig>            export the hand-off bundle
    ca:<case>:<sig>            ask the patient for another record (the coordinator types it)
    ct:<case>:<n>:<sig>        item n's translation is ordered (the patient is told)
    cu:<case>:<n>:<sig>        attach item n's translation (the coordinator sends the file)
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final

from core.replies import Button, Text, Verbatim

OPEN_ACTION: Final = "co"
REVIEW_ACTION: Final = "cr"
DECIDE_ACTION: Final = "cd"
EXPORT_ACTION: Final = "ce"
EXTRA_ACTION: Final = "ca"
TRANSLATE_ACTION: Final = "ct"
ATTACH_ACTION: Final = "cu"
ITEM_ACTIONS: Final = frozenset({REVIEW_ACTION, TRANSLATE_ACTION, ATTACH_ACTION})  # + item n
ACTIONS: Final = frozenset({OPEN_ACTION, DECIDE_ACTION, EXPORT_ACTION, EXTRA_ACTION, *ITEM_ACTIONS})
# Translation of an item: ordered by the coordinator, then its file attached.
ORDERED: Final = "ordered"
ATTACHED: Final = "attached"
TRANSLATION_PROMPT: Final = "+tr:"  # prefix of a pending "send the translated file" prompt
# The pending prompt of a coordinator asked to describe an extra record (no item yet).
EXTRA_PROMPT: Final = "+extra"

ACCEPT: Final = "ok"
TYPED: Final = "tx"  # "another reason": the coordinator types it as their next message
# Preset reasons for sending an item back: button code -> reason name (review.reason.<name>).
REASONS: Final = {
    "bl": "blurred",
    "in": "incomplete",
    "wd": "wrong_document",
    "wp": "wrong_patient",
    "dc": "need_dicom",
    "nw": "need_newer",
}
DECISIONS: Final = frozenset({ACCEPT, TYPED, *REASONS})
# The review value stored on an item sent back with a typed reason (the text itself is
# not kept: the patient received it; the audit log holds only this name).
TYPED_REASON: Final = "other"
ACCEPTED: Final = "accepted"

SIGNATURE_HEX: Final = 16  # first 16 hex digits (64 bits) of HMAC-SHA256
CALLBACK_DATA_MAX: Final = 64  # Telegram's limit, in bytes
MAX_ITEMS: Final = 99  # item positions are two digits

Signer = Callable[[str], str]  # callback data without signature -> signature (hex)

_CASE_ID = re.compile(r"[0-9a-f]{32}")
_SIGNATURE = re.compile(rf"[0-9a-f]{{{SIGNATURE_HEX}}}")
_INDEX = re.compile(r"[0-9]{2}")


@dataclass(frozen=True)
class Pressed:
    """A coordinator button, parsed: still to be checked against its signature."""

    action: str
    case_id: str
    index: int | None = None  # the item's position in the case view
    code: str | None = None  # the decision

    @property
    def unsigned(self) -> str:
        return _unsigned(self.action, self.case_id, self.index, self.code)


def _unsigned(action: str, case_id: str, index: int | None, code: str | None) -> str:
    fields = [action, case_id]
    if index is not None:
        fields.append(f"{index:02d}")
    if code is not None:
        fields.append(code)
    return ":".join(fields)


def signed_button(
    label: Text | Verbatim,
    sign: Signer,
    action: str,
    case_id: str,
    index: int | None = None,
    code: str | None = None,
) -> Button:
    unsigned = _unsigned(action, case_id, index, code)
    arg = unsigned.partition(":")[2]
    button = Button(label, action, f"{arg}:{sign(unsigned)}")
    if len(f"{button.action}:{button.arg}".encode()) > CALLBACK_DATA_MAX:
        raise ValueError("callback data longer than Telegram allows")
    return button


def parse_pressed(data: str) -> tuple[Pressed, str] | None:
    """(button, signature) from callback data, or None when it is not well formed."""
    fields = data.split(":")
    if len(fields) < 3 or fields[0] not in ACTIONS:
        return None
    action, case_id, *middle, signature = fields
    if _CASE_ID.fullmatch(case_id) is None or _SIGNATURE.fullmatch(signature) is None:
        return None
    wanted = 2 if action == DECIDE_ACTION else int(action in ITEM_ACTIONS)
    if len(middle) != wanted:
        return None
    index = code = None
    if middle:
        if _INDEX.fullmatch(middle[0]) is None:
            return None
        index = int(middle[0])
    if len(middle) == 2:
        if middle[1] not in DECISIONS:
            return None
        code = middle[1]
    return Pressed(action, case_id, index, code), signature


def reason_for_patient(code: str, typed: str | None = None) -> Text | Verbatim:
    """What the patient reads as the reason: a preset in their language, or the typed text."""
    if code == TYPED:
        return Verbatim((typed or "").strip())
    return Text(f"review.reason.{REASONS[code]}")


def review_value(code: str) -> str:
    """What the item keeps as its review: "accepted", a reason name, or "other"."""
    if code == ACCEPT:
        return ACCEPTED
    return TYPED_REASON if code == TYPED else REASONS[code]


def review_label(value: str | None) -> Text | None:
    """The review as the coordinator and the patient see it next to the item."""
    if value is None:
        return None
    if value == ACCEPTED:
        return Text("review.state.accepted")
    return Text("review.state.sent_back", {"reason": Text(f"review.reason.{value}")})


def dynamic_keys() -> frozenset[str]:
    """Message keys built from values here: all need English text."""
    return frozenset(f"review.reason.{name}" for name in (*REASONS.values(), TYPED_REASON))


def decision_buttons(sign: Signer, case_id: str, index: int) -> tuple[tuple[Button, ...], ...]:
    """Accept; each preset reason; type another reason."""

    def button(label: Text, code: str) -> Button:
        return signed_button(label, sign, DECIDE_ACTION, case_id, index, code)

    presets = [
        button(Text("review.send_back_button", {"reason": Text(f"review.reason.{name}")}), code)
        for code, name in REASONS.items()
    ]
    rows: list[tuple[Button, ...]] = [(button(Text("review.accept_button"), ACCEPT),)]
    rows += [tuple(presets[i : i + 2]) for i in range(0, len(presets), 2)]
    rows.append((button(Text("review.typed_button"), TYPED),))
    rows.append((signed_button(Text("review.back_button"), sign, OPEN_ACTION, case_id),))
    return tuple(rows)


def review_rows(
    sign: Signer, case_id: str, reviewable: Sequence[tuple[int, Text | Verbatim]]
) -> tuple[tuple[Button, ...], ...]:
    """One "review" button per item that holds something, two per row."""
    buttons = [
        signed_button(
            Text("review.item_button", {"n": index + 1, "title": title}),
            sign,
            REVIEW_ACTION,
            case_id,
            index,
        )
        for index, title in reviewable
        if index <= MAX_ITEMS
    ]
    return tuple(tuple(buttons[i : i + 2]) for i in range(0, len(buttons), 2))
