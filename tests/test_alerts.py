"""The coordinator's case-complete alert: flags that must not be missed, signed buttons."""

from __future__ import annotations

from datetime import UTC, datetime

from checklists import load_all
from core.alerts import case_ready_alert, flags
from core.engine import Context
from core.model import Case, FileRef, ItemStatus, State
from core.replies import Text
from core.review import parse_pressed


def ctx() -> Context:
    """The shipped checklists: "general" works in English; referral and reports matter."""
    return Context(load_all(), ("en",), {"en": "English"}, "v1", datetime(2026, 11, 28, tzinfo=UTC))


def _case() -> Case:
    case = Case(id="a" * 32, chat_id=1, locale="en", state=State.COMPLETE, checklist_key="general")
    for item in ctx().checklists["general"].items:
        case.progress(item.key).status = ItemStatus.DONE
    return case


def _keys(parts: list[Text]) -> dict[str, int]:
    return {part.key: len(part.params["items"]) for part in parts}  # type: ignore[arg-type]


def test_a_clean_case_has_no_flags() -> None:
    case = _case()
    case.progress("referral").files = [
        FileRef("f1", "pdf", "accepted", language="en"),
        FileRef("f2", "pdf", "accepted", language="latin"),  # a short letter: script only
        FileRef("f3", "image", "accepted", language=None),  # a photo: no text to judge
    ]
    assert flags(case, ctx().checklists["general"]) == []
    case.progress("referral").files = [FileRef("f4", "pdf", "accepted", language="cyrillic")]
    assert _keys(flags(case, ctx().checklists["general"])) == {"alert.flag_translation": 1}


def test_each_flag_names_its_items() -> None:
    case = _case()
    checklist = ctx().checklists["general"]
    case.progress("referral").files = [
        FileRef("f1", "pdf", "accepted", language="zh"),  # the hospital works in English
        FileRef("f2", "image", "noted", retakeable=True),  # taken after two retakes
    ]
    case.progress("reports").files = [FileRef("f3", "pdf", "accepted", flags=("active_content",))]
    case.progress("lab_results").status = ItemStatus.DONT_HAVE
    # a non-priority item in another language is not flagged for translation
    case.progress("past_records").files = [FileRef("f4", "pdf", "accepted", language="ru")]
    assert _keys(flags(case, checklist)) == {
        "alert.flag_warnings": 1,
        "alert.flag_dont_have": 1,
        "alert.flag_translation": 1,
        "alert.flag_active_content": 1,
    }


def test_the_alert_carries_signed_open_and_export_buttons() -> None:
    case = _case()
    message = case_ready_alert(case, ctx(), lambda unsigned: "0" * 16)
    datas = [f"{b.action}:{b.arg}" for row in message.buttons for b in row]
    parsed = [parse_pressed(data) for data in datas]
    assert [p[0].action for p in parsed if p] == ["co", "ce"]  # nothing to review yet
    case.progress("referral").files = [FileRef("f1", "pdf", "accepted")]
    message = case_ready_alert(case, ctx(), lambda unsigned: "0" * 16)
    parsed = [parse_pressed(f"{b.action}:{b.arg}") for row in message.buttons for b in row]
    assert [(p[0].action, p[0].index) for p in parsed if p] == [
        ("co", None),
        ("cr", 0),
        ("ce", None),
    ]
    assert any(isinstance(p, Text) and p.key == "alert.no_flags" for p in message.parts)
    unsigned = case_ready_alert(case, ctx(), None)
    assert unsigned.buttons == ()
    hint = "coordinator.case_show_hint"
    assert any(isinstance(p, Text) and p.key == hint for p in unsigned.parts)
