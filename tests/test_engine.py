"""Unit tests of the conversation state machine: every row of the transition table."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from core.checklist import Accepts, Checklist, ChecklistItem
from core.engine import ANY, TRANSITIONS, Context, Outcome, handle, prompt_for, upload_target
from core.events import CaseCompleted, ConsentGiven, Event, EventKind, FileRejected
from core.model import Case, FileRef, ItemStatus, State
from core.replies import Text


def _item(
    key: str, accepts: set[Accepts], required: bool = True, max_files: int = 3
) -> ChecklistItem:
    return ChecklistItem(
        key=key,
        title=f"{key} title",
        why=f"{key} why",
        how=f"{key} how",
        required=required,
        accepts=frozenset(accepts),
        max_files=max_files,
        translation_priority=False,
    )


CHECKLIST = Checklist(
    key="general",
    title="General",
    hospital="H",
    working_languages=("en",),
    items=(
        _item("referral", {Accepts.PDF, Accepts.IMAGE}),
        _item("scans", {Accepts.DICOM, Accepts.ZIP}, max_files=1),
        _item("labs", {Accepts.PDF}, required=False),
        _item("medicines", {Accepts.TEXT}, max_files=1),
    ),
)
OTHER = Checklist("ivf", "IVF", "H2", ("th",), (_item("referral", {Accepts.PDF}),))


def ctx() -> Context:
    return Context(
        checklists={"general": CHECKLIST, "ivf": OTHER},
        locales=("en", "th"),
        language_names={"en": "English", "th": "ไทย"},
        privacy_version="v1",
        now=datetime(2026, 11, 28, tzinfo=UTC),
    )


def keys(outcome) -> list[str]:  # type: ignore[no-untyped-def]
    return [part.key for reply in outcome.replies for part in reply.parts if isinstance(part, Text)]


def button_actions(outcome) -> set[str]:  # type: ignore[no-untyped-def]
    return {b.action for r in outcome.replies for row in r.buttons for b in row}


def new_case() -> Case:
    return Case(id="c1", chat_id=1, locale="en")


def consented(procedure: str | None = "general") -> Case:
    """Consent given; with a procedure, the patient has also said who they are."""
    case = new_case()
    handle(case, Event(EventKind.START, procedure or ""), ctx())
    handle(case, Event(EventKind.AGREE), ctx())
    if procedure is not None:
        identified(case)
    return case


def identified(case: Case) -> Outcome:
    assert case.state is State.NAME
    handle(case, Event(EventKind.TEXT, "Ann Example"), ctx())
    return handle(case, Event(EventKind.TEXT, "31.01.1980"), ctx())


def pdf(
    file_id: str = "f1", status: str = "accepted", kind: str = "pdf", retake: bool = False
) -> FileRef:
    return FileRef(file_id, kind, status, (), retake)


def test_start_greets_and_asks_consent() -> None:
    case = new_case()
    out = handle(case, Event(EventKind.START), ctx())
    assert case.state is State.CONSENT
    assert keys(out)[:2] == ["welcome", "privacy.notice"]
    assert {"choose_language", "agree", "decline"} <= button_actions(out)


def test_start_with_invite_sets_procedure_and_consent_goes_straight_to_first_item() -> None:
    case = new_case()
    handle(case, Event(EventKind.START, "ivf"), ctx())
    out = handle(case, Event(EventKind.AGREE), ctx())
    assert case.checklist_key == "ivf" and case.state is State.NAME
    assert any(isinstance(e, ConsentGiven) and e.version == "v1" for e in out.events)
    assert keys(out)[-2:] == ["identity.why", "identity.ask_name"]
    out = identified(case)
    assert case.state is State.COLLECTING and case.current_item == "referral"
    assert "item.ask" in keys(out)
    assert case.consent_version == "v1" and case.consent_at is not None


def test_unknown_invite_procedure_is_ignored() -> None:
    case = new_case()
    handle(case, Event(EventKind.START, "nonsense"), ctx())
    assert case.checklist_key is None


def test_agree_without_procedure_asks_for_one() -> None:
    case = consented(procedure=None)
    assert case.state is State.PROCEDURE


def test_decline_keeps_asking_and_records_nothing() -> None:
    case = new_case()
    handle(case, Event(EventKind.START), ctx())
    out = handle(case, Event(EventKind.DECLINE), ctx())
    assert case.state is State.CONSENT and case.consent_version is None
    assert keys(out) == ["consent.declined"]


def test_files_before_consent_are_not_wanted() -> None:
    case = new_case()
    handle(case, Event(EventKind.START, "general"), ctx())
    assert upload_target(case, ctx()) is None
    out = handle(case, Event(EventKind.FILE), ctx())
    assert case.state is State.CONSENT and "not_now.consent" in keys(out)


def test_choose_procedure() -> None:
    case = consented(procedure=None)
    handle(case, Event(EventKind.CHOOSE_PROCEDURE, "general"), ctx())
    out = identified(case)
    assert case.state is State.COLLECTING and case.current_item == "referral"
    assert "collecting.intro" in keys(out)


def test_choose_unknown_procedure_asks_again() -> None:
    case = consented(procedure=None)
    out = handle(case, Event(EventKind.CHOOSE_PROCEDURE, "nope"), ctx())
    assert case.state is State.PROCEDURE and keys(out) == ["procedure.ask"]


def test_start_in_procedure_state_with_invite_begins_collecting() -> None:
    case = consented(procedure=None)
    handle(case, Event(EventKind.START, "ivf"), ctx())
    assert case.state is State.NAME and case.checklist_key == "ivf"


def test_accepted_file_counts_and_done_advances() -> None:
    case = consented()
    out = handle(case, Event(EventKind.FILE, file=pdf()), ctx())
    assert case.progress("referral").status is ItemStatus.RECEIVED
    assert "done" in button_actions(out)
    handle(case, Event(EventKind.DONE, "referral"), ctx())
    assert case.progress("referral").status is ItemStatus.DONE
    assert case.current_item == "scans"


def test_max_files_closes_item_by_itself() -> None:
    case = consented()
    handle(case, Event(EventKind.DONE, "referral"), ctx())  # nothing yet: stays
    assert case.current_item == "referral"
    handle(case, Event(EventKind.FILE, file=pdf()), ctx())
    handle(case, Event(EventKind.DONE, "referral"), ctx())
    out = handle(case, Event(EventKind.FILE, file=pdf("d1", kind="dicom")), ctx())
    assert case.progress("scans").status is ItemStatus.DONE and case.current_item == "labs"
    assert "file.received_last" in keys(out)


def test_wrong_kind_is_rejected_and_not_counted() -> None:
    case = consented()
    out = handle(case, Event(EventKind.FILE, file=pdf(kind="dicom")), ctx())
    assert case.progress("referral").files == []
    assert "file.wrong_kind" in keys(out)
    assert any(isinstance(e, FileRejected) for e in out.events)


def test_rejected_file_is_not_counted_and_third_retake_is_taken_with_warning() -> None:
    case = consented()
    for _ in range(2):
        out = handle(case, Event(EventKind.FILE, file=pdf(status="rejected", retake=True)), ctx())
        assert "file.rejected" in keys(out)
    assert case.progress("referral").files == []
    out = handle(case, Event(EventKind.FILE, file=pdf("f3", status="rejected", retake=True)), ctx())
    assert "file.accepted_after_retakes" in keys(out)
    assert [f.status for f in case.progress("referral").files] == ["noted"]


def test_hostile_file_is_never_taken_by_leniency() -> None:
    case = consented()
    for index in range(4):
        handle(case, Event(EventKind.FILE, file=pdf(f"x{index}", status="rejected")), ctx())
    assert case.progress("referral").files == []


def test_duplicate_file_is_acknowledged_not_counted() -> None:
    case = consented()
    out = handle(case, Event(EventKind.FILE, duplicate=True), ctx())
    assert keys(out)[0] == "file.duplicate" and case.progress("referral").files == []


def test_text_for_a_file_item_is_answered_and_text_item_saves_answer() -> None:
    case = consented()
    out = handle(case, Event(EventKind.TEXT, "hello"), ctx())
    assert "item.needs_file" in keys(out)
    case.current_item = "medicines"
    out = handle(case, Event(EventKind.TEXT, "   "), ctx())
    assert "item.answer_too_short" in keys(out)
    handle(case, Event(EventKind.TEXT, "Aspirin 100 mg"), ctx())
    assert case.progress("medicines").answer == "Aspirin 100 mg"


def test_file_for_a_text_item_asks_for_typing() -> None:
    case = consented()
    case.current_item = "medicines"
    assert upload_target(case, ctx()) is None
    out = handle(case, Event(EventKind.FILE), ctx())
    assert "item.needs_text" in keys(out)


def test_skip_only_optional_and_dont_have_any() -> None:
    case = consented()
    out = handle(case, Event(EventKind.SKIP, "referral"), ctx())
    assert "item.cannot_skip" in keys(out) and case.current_item == "referral"
    handle(case, Event(EventKind.DONT_HAVE, "referral"), ctx())
    assert case.progress("referral").status is ItemStatus.DONT_HAVE
    handle(case, Event(EventKind.DONT_HAVE, "scans"), ctx())
    handle(case, Event(EventKind.SKIP, "labs"), ctx())
    assert case.progress("labs").status is ItemStatus.SKIPPED


def test_stale_button_does_not_touch_the_current_item() -> None:
    case = consented()
    out = handle(case, Event(EventKind.DONT_HAVE, "labs"), ctx())
    assert "button.stale" in keys(out)
    assert case.current_item == "referral" and case.progress("labs").status is ItemStatus.PENDING


def complete(case: Case) -> object:
    handle(case, Event(EventKind.FILE, file=pdf()), ctx())
    handle(case, Event(EventKind.DONE, "referral"), ctx())
    handle(case, Event(EventKind.FILE, file=pdf("d", kind="zip")), ctx())
    handle(case, Event(EventKind.SKIP, "labs"), ctx())
    return handle(case, Event(EventKind.TEXT, "None taken"), ctx())


def test_last_required_item_completes_the_case_once() -> None:
    case = consented()
    out = complete(case)
    assert case.state is State.COMPLETE and case.current_item is None
    completions = [e for e in out.events if isinstance(e, CaseCompleted)]  # type: ignore[attr-defined]
    assert completions == [CaseCompleted("c1", 1)]
    assert "case.complete" in keys(out)
    again = handle(case, Event(EventKind.FILE, file=pdf("late")), ctx())
    assert "not_now.complete" in keys(again) and not again.events


def test_dont_have_on_required_items_still_completes() -> None:
    case = consented()
    for key in ("referral", "scans", "labs", "medicines"):
        out = handle(case, Event(EventKind.DONT_HAVE, key), ctx())
    assert case.state is State.COMPLETE
    assert any(isinstance(e, CaseCompleted) for e in out.events)


@pytest.mark.parametrize("state", sorted(set(State) - {State.ERASED}))
@pytest.mark.parametrize(
    "kind", [EventKind.STATUS, EventKind.HELP, EventKind.PRIVACY, EventKind.LANGUAGE_MENU]
)
def test_information_events_never_change_a_started_conversation(
    state: State, kind: EventKind
) -> None:
    case = consented()
    case.state = state
    before = (case.state, case.current_item, case.checklist_key)
    out = handle(case, Event(kind), ctx())
    assert out.replies
    if state is not State.NEW:
        assert (case.state, case.current_item, case.checklist_key) == before


def test_language_choice_is_stored_and_the_step_repeated() -> None:
    case = consented()
    out = handle(case, Event(EventKind.CHOOSE_LANGUAGE, "th"), ctx())
    assert case.locale == "th" and keys(out)[:2] == ["language.set", "item.ask"]
    handle(case, Event(EventKind.CHOOSE_LANGUAGE, "xx"), ctx())
    assert case.locale == "th"


def test_status_lists_every_item() -> None:
    case = consented()
    out = handle(case, Event(EventKind.STATUS), ctx())
    lines = [p for p in out.replies[0].parts if not isinstance(p, Text)]
    assert len(lines[0].items) == len(CHECKLIST.items)  # type: ignore[union-attr]


def test_unsupported_message_explains_and_repeats_the_step() -> None:
    case = consented()
    out = handle(case, Event(EventKind.UNSUPPORTED), ctx())
    assert keys(out)[:2] == ["message.unsupported", "item.ask"]


def test_every_state_and_event_has_a_row() -> None:
    for state in set(State) - {State.ERASED}:  # terminal, see handle()
        for kind in EventKind:
            assert (state, kind) in TRANSITIONS or (ANY, kind) in TRANSITIONS


@pytest.mark.parametrize("state", sorted(set(State) - {State.ERASED}))
def test_prompt_for_every_state(state: State) -> None:
    case = consented()
    case.state = state
    if state in (State.NEW, State.CONSENT, State.PROCEDURE, State.COMPLETE):
        case.current_item = None
    assert prompt_for(case, ctx()).parts


def test_new_privacy_version_asks_again_then_resumes_at_the_same_item() -> None:
    case = consented()
    handle(case, Event(EventKind.FILE, file=pdf()), ctx())
    newer = Context(**{**ctx().__dict__, "privacy_version": "v2"})
    assert upload_target(case, newer) is None
    out = handle(case, Event(EventKind.TEXT, "hello"), newer)
    assert case.state is State.CONSENT and keys(out)[:2] == [
        "consent.new_version",
        "privacy.notice",
    ]
    out = handle(case, Event(EventKind.AGREE), newer)
    assert case.state is State.COLLECTING and case.current_item == "referral"
    assert case.consent_version == "v2" and len(case.progress("referral").files) == 1


def test_new_privacy_version_on_a_complete_case_never_alerts_again() -> None:
    case = consented()
    complete(case)
    newer = Context(**{**ctx().__dict__, "privacy_version": "v2"})
    handle(case, Event(EventKind.STATUS), newer)
    out = handle(case, Event(EventKind.AGREE), newer)
    assert case.state is State.COMPLETE and case.completions == 1
    assert not any(isinstance(e, CaseCompleted) for e in out.events)


def test_protected_pdf_waits_for_its_password() -> None:
    """A locked PDF is not counted; typed text is tried as its password, then it counts."""
    case = consented()
    locked = FileRef("p1", "pdf", "rejected", (), needs_password=True)
    handle(case, Event(EventKind.FILE, file=locked), ctx())
    assert case.password_file == "p1" and case.progress("referral").files == []
    assert case.progress("referral").rejected_uploads == 0  # not a failed retake
    out = handle(case, Event(EventKind.UNLOCK_TRIED), ctx())
    assert "file.password_wrong" in keys(out) and case.password_file == "p1"
    out = handle(case, Event(EventKind.UNLOCK_TRIED, file=pdf("p1")), ctx())
    assert "file.password_accepted" in keys(out) and case.password_file is None
    assert [f.file_id for f in case.progress("referral").files] == ["p1"]


def test_moving_on_forgets_the_password_request() -> None:
    case = consented()
    handle(
        case,
        Event(EventKind.FILE, file=FileRef("p1", "pdf", "rejected", (), needs_password=True)),
        ctx(),
    )
    handle(case, Event(EventKind.DONT_HAVE, "referral"), ctx())
    assert case.password_file is None


def test_delete_asks_then_erases_or_keeps() -> None:
    case = consented()
    out = handle(case, Event(EventKind.DELETE_REQUEST), ctx())
    assert {"delete_confirm", "delete_cancel"} <= button_actions(
        out
    ) and case.state is State.COLLECTING
    out = handle(case, Event(EventKind.DELETE_CANCEL), ctx())
    assert case.state is State.COLLECTING and keys(out)[0] == "delete.cancelled"
    out = handle(case, Event(EventKind.DELETE_CONFIRM), ctx())
    assert case.state is State.ERASED and [type(e).__name__ for e in out.events] == [
        "ErasureRequested"
    ]
    assert handle(case, Event(EventKind.STATUS), ctx()).replies == []


def test_privacy_offers_withdrawal_once_consented() -> None:
    case = consented()
    assert "delete_request" in button_actions(handle(case, Event(EventKind.PRIVACY), ctx()))


@pytest.mark.parametrize(
    "typed",
    ["", "   ", "12345", "John Smith 1980", "x" * 201, "!!!"],
)
def test_a_name_must_be_letters(typed: str) -> None:
    case = consented(procedure=None)
    handle(case, Event(EventKind.CHOOSE_PROCEDURE, "general"), ctx())
    out = handle(case, Event(EventKind.TEXT, typed), ctx())
    assert case.state is State.NAME and case.patient_name is None
    assert keys(out) == ["identity.name_invalid", "identity.ask_name"]


@pytest.mark.parametrize("typed", ["王小明", "สมชาย ใจดี", "  José   O'Neil-Müller ", "Иван Петров"])
def test_names_in_any_script_are_kept_tidied(typed: str) -> None:
    case = consented(procedure=None)
    handle(case, Event(EventKind.CHOOSE_PROCEDURE, "general"), ctx())
    handle(case, Event(EventKind.TEXT, typed), ctx())
    assert case.state is State.BIRTH_DATE and case.patient_name == " ".join(typed.split())


@pytest.mark.parametrize(
    ("typed", "expected"),
    [
        ("31.01.1980", "1980-01-31"),
        ("1980-01-31", "1980-01-31"),
        ("1980年1月31日", "1980-01-31"),
        ("31/01/2523", "1980-01-31"),  # Thai Buddhist era
        ("31 Jan 1980", "1980-01-31"),
        ("yesterday", None),
        ("31.01.2090", None),  # in the future
        ("01.01.1850", None),  # implausible
    ],
)
def test_birth_date_is_read_in_common_forms(typed: str, expected: str | None) -> None:
    case = consented(procedure=None)
    handle(case, Event(EventKind.CHOOSE_PROCEDURE, "general"), ctx())
    handle(case, Event(EventKind.TEXT, "Ann Example"), ctx())
    out = handle(case, Event(EventKind.TEXT, typed), ctx())
    if expected is None:
        assert case.state is State.BIRTH_DATE and keys(out) == ["identity.birth_date_invalid"]
    else:
        assert case.state is State.COLLECTING and str(case.birth_date) == expected
        assert keys(out)[:2] == ["identity.thanks", "collecting.intro"]


def test_files_and_buttons_while_asked_who_you_are_are_answered_with_the_question() -> None:
    case = consented(procedure=None)
    handle(case, Event(EventKind.CHOOSE_PROCEDURE, "general"), ctx())
    assert upload_target(case, ctx()) is None
    out = handle(case, Event(EventKind.FILE), ctx())
    assert keys(out) == ["not_now.name", "identity.ask_name"] and case.state is State.NAME
    out = handle(case, Event(EventKind.START), ctx())
    assert keys(out) == ["identity.ask_name"]
    newer = Context(**{**ctx().__dict__, "privacy_version": "v2"})
    handle(case, Event(EventKind.TEXT, "Ann Example"), newer)  # asked to consent again first
    assert case.state is State.CONSENT and case.patient_name is None
    out = handle(case, Event(EventKind.AGREE), newer)
    assert case.state is State.NAME and keys(out)[-1] == "identity.ask_name"
