"""The conversation state machine: `handle(case, event, ctx) -> Outcome`.

Every transition is one row of `TRANSITIONS`: (state, event) -> action and the states the
action may lead to. `ANY` rows apply in every state unless a specific row exists. The
diagram in docs/state-machine.md is checked against this table by a test.

Actions mutate the case and return replies; the engine checks that the state an action
leaves the case in is one its row allows, so the table cannot silently drift from the code.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Final

from core import identity
from core.checklist import EXTRA_PREFIX, Accepts, Checklist, ChecklistItem
from core.events import (
    CaseCompleted,
    ConsentGiven,
    DomainEvent,
    ErasureRequested,
    Event,
    EventKind,
    FileRejected,
    ItemResolved,
    UploadLinkWanted,
)
from core.model import Case, FileRef, ItemProgress, ItemStatus, State
from core.replies import Button, Lines, Reply, Text, Verbatim, reply
from core.review import ACCEPTED

ANY: Final = "*"
# After this many rejected uploads for one item, the next file is taken with a warning for
# the coordinator, so no patient is ever stuck on a check they cannot pass.
REJECTIONS_BEFORE_LENIENCY: Final = 2
# Items whose files are often larger than the chat allows: they offer the upload page.
LARGE_KINDS: Final = frozenset({Accepts.DICOM, Accepts.ZIP})


@dataclass(frozen=True)
class Context:
    checklists: Mapping[str, Checklist]
    locales: tuple[str, ...]  # offered languages, in the order shown
    language_names: Mapping[str, str]  # each language in its own script
    privacy_version: str
    now: datetime
    web_uploads: bool = False  # the upload page is served (WEB_BASE_URL): large files go there


@dataclass
class Outcome:
    replies: list[Reply] = field(default_factory=list)
    events: list[DomainEvent] = field(default_factory=list)


Action = Callable[[Case, Event, Context, Outcome], None]


@dataclass(frozen=True)
class Transition:
    action: Action
    targets: frozenset[State]  # the states this action may leave the case in


class TransitionError(RuntimeError):
    """An action moved the case to a state its table row does not allow: a bug."""


# --- helpers ---------------------------------------------------------------------------


def case_checklist(case: Case, ctx: Context) -> Checklist:
    """The case's checklist with the extra records its coordinator asked for."""
    assert case.checklist_key is not None, "collecting without a checklist"
    return ctx.checklists[case.checklist_key].with_extras(case.extras)


_checklist = case_checklist


def _current(case: Case, ctx: Context) -> ChecklistItem:
    assert case.current_item is not None, "collecting without a current item"
    return _checklist(case, ctx).item(case.current_item)


def _language_buttons(ctx: Context) -> tuple[tuple[Button, ...], ...]:
    buttons = [
        Button(Verbatim(ctx.language_names[code]), EventKind.CHOOSE_LANGUAGE, code)
        for code in ctx.locales
    ]
    return tuple(tuple(buttons[i : i + 2]) for i in range(0, len(buttons), 2))


def _consent_prompt(ctx: Context) -> Reply:
    return reply(
        Text("privacy.notice", {"version": Verbatim(ctx.privacy_version)}),
        Text("consent.ask"),
        buttons=(
            (Button(Text("button.agree"), EventKind.AGREE),),
            (Button(Text("button.decline"), EventKind.DECLINE),),
            (Button(Text("button.language"), EventKind.LANGUAGE_MENU),),
        ),
    )


def _procedure_prompt(ctx: Context) -> Reply:
    rows = tuple(
        (Button(Text(checklist.title), EventKind.CHOOSE_PROCEDURE, key),)
        for key, checklist in ctx.checklists.items()
    )
    return reply(Text("procedure.ask"), buttons=rows)


def _item_prompt(case: Case, ctx: Context) -> Reply:
    checklist = _checklist(case, ctx)
    item = _current(case, ctx)
    position = checklist.item_keys.index(item.key) + 1
    parts = [
        Text(
            "item.ask",
            {"position": position, "total": len(checklist.items), "title": item.label},
        ),
        Text(item.why),
        Text(item.how),
        Text("item.required") if item.required else Text("item.optional"),
    ]
    return reply(*parts, buttons=_item_buttons(case, item, ctx))


def _item_buttons(case: Case, item: ChecklistItem, ctx: Context) -> tuple[tuple[Button, ...], ...]:
    rows: list[tuple[Button, ...]] = []
    if ctx.web_uploads and item.accepts & LARGE_KINDS:  # scans: often a CD's worth
        rows.append((Button(Text("button.upload_page"), EventKind.UPLOAD_PAGE, item.key),))
    if case.progress(item.key).files:
        rows.append((Button(Text("button.done"), EventKind.DONE, item.key),))
    if not item.required:
        rows.append((Button(Text("button.skip"), EventKind.SKIP, item.key),))
    rows.append((Button(Text("button.dont_have"), EventKind.DONT_HAVE, item.key),))
    return tuple(rows)


def _name_prompt() -> Reply:
    return reply(Text("identity.ask_name"))


def _birth_date_prompt() -> Reply:
    return reply(Text("identity.ask_birth_date"))


def _complete_message() -> Reply:
    return reply(Text("case.complete"), Text("case.next_steps"))


def prompt_for(case: Case, ctx: Context) -> Reply:
    """What the patient should see to continue from where the case stands."""
    if case.state in (State.NEW, State.CONSENT):
        return _consent_prompt(ctx)
    if case.state is State.PROCEDURE:
        return _procedure_prompt(ctx)
    if case.state is State.NAME:
        return _name_prompt()
    if case.state is State.BIRTH_DATE:
        return _birth_date_prompt()
    if case.state is State.COLLECTING:
        return _item_prompt(case, ctx)
    return _complete_message()


def card_state(case: Case) -> tuple[object, ...]:
    """What the checklist card shows: when it changes, the card is edited (core.service)."""
    items = tuple((key, p.status, len(p.files), p.review) for key, p in sorted(case.items.items()))
    return (case.state, case.checklist_key, items)


def shows_card(case: Case) -> bool:
    return case.state in (State.COLLECTING, State.COMPLETE) and case.checklist_key is not None


def status_reply(case: Case, ctx: Context, header: str = "status.header") -> Reply:
    """Every item with where it stands: received, still missing, skipped, not available;
    also the live card's content (with its own header)."""
    if case.checklist_key is None:
        return reply(Text("status.no_checklist"))
    lines = []
    for item in _checklist(case, ctx).items:
        progress = case.progress(item.key)
        lines.append(
            Text(
                "status.line",
                {
                    "mark": Verbatim(_STATUS_MARKS[progress.status]),
                    "title": item.label,
                    "status": _status_text(progress),
                    "files": len(progress.files),
                },
            )
        )
    missing = [
        item
        for item in _checklist(case, ctx).items
        if item.required and case.progress(item.key).status.is_open
    ]
    summary = Text("status.missing", {"count": len(missing)}) if missing else Text("status.all_in")
    return reply(Text(header), Lines(tuple(lines)), summary)


def _status_text(progress: ItemProgress) -> Text:
    """The item's status; "accepted" once the coordinator accepted it."""
    if progress.review == ACCEPTED and progress.status is ItemStatus.DONE:
        return Text("item_status.accepted")
    return Text(f"item_status.{progress.status.value}")


_STATUS_MARKS: Final = {
    ItemStatus.PENDING: "⬜",
    ItemStatus.RECEIVED: "🟨",
    ItemStatus.DONE: "✅",
    ItemStatus.SKIPPED: "➖",
    ItemStatus.DONT_HAVE: "🚫",
    ItemStatus.SENT_BACK: "🔁",
}


def _advance(case: Case, ctx: Context, out: Outcome) -> None:
    """Move to the next open item, or complete the case when nothing required is open."""
    case.password_file = None  # a password only ever belongs to the item it was asked for
    checklist = _checklist(case, ctx)
    keys = checklist.item_keys
    start = keys.index(case.current_item) + 1 if case.current_item in keys else 0
    for key in keys[start:] + keys[:start]:
        if case.progress(key).status.is_open:
            case.current_item = key
            out.replies.append(_item_prompt(case, ctx))
            return
    _complete(case, ctx, out)


def _complete(case: Case, ctx: Context, out: Outcome) -> None:
    case.state = State.COMPLETE
    case.current_item = None
    case.completed_at = ctx.now
    case.completions += 1
    out.events.append(CaseCompleted(case.id, case.completions))
    out.replies.append(_complete_message())


def _resolve(case: Case, status: ItemStatus, ctx: Context, out: Outcome, ack: str) -> None:
    item = _current(case, ctx)
    case.progress(item.key).status = status
    out.events.append(ItemResolved(case.id, item.key, status.value))
    out.replies.append(reply(Text(ack, {"title": item.label})))
    _advance(case, ctx, out)


def _answered_stale(case: Case, event: Event, ctx: Context, out: Outcome) -> bool:
    """A button pressed on an earlier step's message (its item is not the current one) is
    answered with where we are now, and changes nothing."""
    if not event.arg or event.arg == case.current_item:
        return False
    out.replies.append(reply(Text("button.stale")))
    out.replies.append(prompt_for(case, ctx))
    return True


# --- actions ---------------------------------------------------------------------------


def _start(case: Case, event: Event, ctx: Context, out: Outcome) -> None:
    if event.arg and event.arg in ctx.checklists and case.checklist_key is None:
        _set_checklist(case, event.arg, ctx)
    if case.state is State.NEW:
        case.state = State.CONSENT
        out.replies.append(reply(Text("welcome"), buttons=_language_buttons(ctx)))
    elif case.state is State.PROCEDURE and case.checklist_key is not None:
        _begin_collecting(case, ctx, out)
        return
    out.replies.append(prompt_for(case, ctx))


def _set_checklist(case: Case, key: str, ctx: Context) -> None:
    case.checklist_key = key
    case.items = {item.key: ItemProgress(item.key) for item in ctx.checklists[key].items}
    case.current_item = None


def _begin_collecting(case: Case, ctx: Context, out: Outcome) -> None:
    """The first item, once the patient has said who they are (asked once, before it)."""
    if case.patient_name is None:
        case.state = State.NAME
        out.replies.append(reply(Text("identity.why"), Text("identity.ask_name")))
        return
    if case.birth_date is None:
        case.state = State.BIRTH_DATE
        out.replies.append(_birth_date_prompt())
        return
    case.state = State.COLLECTING
    case.current_item = None
    out.replies.append(reply(Text("collecting.intro")))
    _advance(case, ctx, out)


def _resume_after_consent(case: Case, ctx: Context, out: Outcome) -> None:
    """Back to where the patient was before a new privacy notice interrupted them."""
    if case.current_item is not None and case.progress(case.current_item).status.is_open:
        case.state = State.COLLECTING
        out.replies.append(_item_prompt(case, ctx))
    elif any(p.status.is_open for p in case.items.values()):
        case.state = State.COLLECTING
        _advance(case, ctx, out)
    else:  # everything was already in: complete again, without a second alert
        case.state = State.COMPLETE
        out.replies.append(_complete_message())


def _agree(case: Case, event: Event, ctx: Context, out: Outcome) -> None:
    case.consent_version = ctx.privacy_version
    case.consent_at = ctx.now
    out.events.append(ConsentGiven(case.id, ctx.privacy_version))
    out.replies.append(reply(Text("consent.thanks")))
    if case.checklist_key is None:
        case.state = State.PROCEDURE
        out.replies.append(_procedure_prompt(ctx))
    elif case.items and any(p.status is not ItemStatus.PENDING for p in case.items.values()):
        _resume_after_consent(case, ctx, out)
    else:
        _begin_collecting(case, ctx, out)


def _consent_outdated(case: Case, event: Event, ctx: Context, out: Outcome) -> None:
    case.state = State.CONSENT
    out.replies.append(reply(Text("consent.new_version")))
    out.replies.append(_consent_prompt(ctx))


def _decline(case: Case, event: Event, ctx: Context, out: Outcome) -> None:
    out.replies.append(
        reply(Text("consent.declined"), buttons=((Button(Text("button.agree"), EventKind.AGREE),),))
    )


def _choose_procedure(case: Case, event: Event, ctx: Context, out: Outcome) -> None:
    if event.arg not in ctx.checklists:
        out.replies.append(_procedure_prompt(ctx))
        return
    _set_checklist(case, event.arg, ctx)
    _begin_collecting(case, ctx, out)


# A name is letters (any script), spaces, hyphens, apostrophes, dots; digits mean something
# else was typed (a date, a phone number).
MAX_NAME_LENGTH: Final = 200


def _name(case: Case, event: Event, ctx: Context, out: Outcome) -> None:
    name = " ".join(event.arg.split())
    if (
        not any(char.isalpha() for char in name)
        or any(char.isdigit() for char in name)
        or len(name) > MAX_NAME_LENGTH
    ):
        out.replies.append(reply(Text("identity.name_invalid"), Text("identity.ask_name")))
        return
    case.patient_name = name
    case.state = State.BIRTH_DATE
    out.replies.append(_birth_date_prompt())


def _birth_date(case: Case, event: Event, ctx: Context, out: Outcome) -> None:
    born = identity.parse_date(event.arg)
    if born is None or born.year < EARLIEST_BIRTH_YEAR or born > ctx.now.date():
        out.replies.append(reply(Text("identity.birth_date_invalid")))
        return
    case.birth_date = born
    out.replies.append(reply(Text("identity.thanks")))
    _begin_collecting(case, ctx, out)


EARLIEST_BIRTH_YEAR: Final = 1900


def _file(case: Case, event: Event, ctx: Context, out: Outcome) -> None:
    item = _current(case, ctx)
    progress = case.progress(item.key)
    file = event.file
    if event.duplicate:
        out.replies.append(reply(Text("file.duplicate"), buttons=_item_buttons(case, item, ctx)))
        return
    if file is None:  # not downloaded: the item takes a typed answer (see upload_target)
        out.replies.append(reply(Text("item.needs_text"), buttons=_item_buttons(case, item, ctx)))
        return
    if file.status != "rejected" and file.kind not in item.accepts:
        _reject(case, item, file, ctx, out, Text("file.wrong_kind", _kinds_params(item, file)))
        return
    if file.status == "rejected":
        if not (file.retakeable and progress.rejected_uploads >= REJECTIONS_BEFORE_LENIENCY):
            _reject(case, item, file, ctx, out, Text("file.rejected", {"title": item.label}))
            return
        # Third try of a hard page: take it, and let the coordinator judge (see constant).
        file = FileRef(file.file_id, file.kind, "noted", file.notes, retakeable=True)
        out.replies.append(reply(Text("file.accepted_after_retakes")))
    progress.files.append(file)
    progress.status = ItemStatus.RECEIVED
    progress.review = None  # new files: the coordinator reviews the item afresh
    notes = file.notes  # notes of an accepted file: a CD's study summary, "send as File"...
    if len(progress.files) >= item.max_files:
        progress.status = ItemStatus.DONE
        out.events.append(ItemResolved(case.id, item.key, ItemStatus.DONE.value))
        out.replies.append(reply(Text("file.received_last", {"title": item.label}), *notes))
        _advance(case, ctx, out)
        return
    out.replies.append(
        reply(
            Text("file.received", {"count": len(progress.files), "title": item.label}),
            *notes,
            buttons=_item_buttons(case, item, ctx),
        )
    )


def _kinds_params(item: ChecklistItem, file: FileRef) -> dict[str, object]:
    accepted = tuple(Text(f"kind.{kind}") for kind in sorted(item.accepts))
    return {"kind": Text(f"kind.{file.kind}"), "accepted": accepted}


def _reject(
    case: Case, item: ChecklistItem, file: FileRef, ctx: Context, out: Outcome, why: Text
) -> None:
    if file.needs_password:  # the next typed message is tried as its password
        case.password_file = file.file_id
        out.events.append(FileRejected(case.id, item.key, file.file_id))
        out.replies.append(reply(why, *file.notes, buttons=_item_buttons(case, item, ctx)))
        return
    case.progress(item.key).rejected_uploads += 1
    out.events.append(FileRejected(case.id, item.key, file.file_id))
    out.replies.append(reply(why, *file.notes, buttons=_item_buttons(case, item, ctx)))


def _text(case: Case, event: Event, ctx: Context, out: Outcome) -> None:
    item = _current(case, ctx)
    if not item.is_text_answer:
        out.replies.append(reply(Text("item.needs_file"), buttons=_item_buttons(case, item, ctx)))
        return
    answer = event.arg.strip()
    if not answer:  # one character can be a whole answer: 无, "-"
        out.replies.append(
            reply(Text("item.answer_too_short"), buttons=_item_buttons(case, item, ctx))
        )
        return
    case.progress(item.key).answer = answer
    case.progress(item.key).review = None
    _resolve(case, ItemStatus.DONE, ctx, out, "item.answer_saved")


def _password(case: Case, event: Event, ctx: Context, out: Outcome) -> None:
    """The service tried the typed text as the PDF's password; `event.file` is set if it opened."""
    item = _current(case, ctx)
    if event.file is None:
        out.replies.append(
            reply(Text("file.password_wrong"), buttons=_item_buttons(case, item, ctx))
        )
        return
    case.password_file = None
    out.replies.append(reply(Text("file.password_accepted")))
    _file(case, Event(EventKind.FILE, file=event.file), ctx, out)


def _done(case: Case, event: Event, ctx: Context, out: Outcome) -> None:
    if _answered_stale(case, event, ctx, out):
        return
    item = _current(case, ctx)
    if not case.progress(item.key).files:
        out.replies.append(reply(Text("item.nothing_yet"), buttons=_item_buttons(case, item, ctx)))
        return
    _resolve(case, ItemStatus.DONE, ctx, out, "item.done")


def _skip(case: Case, event: Event, ctx: Context, out: Outcome) -> None:
    if _answered_stale(case, event, ctx, out):
        return
    item = _current(case, ctx)
    if item.required:
        out.replies.append(reply(Text("item.cannot_skip"), buttons=_item_buttons(case, item, ctx)))
        return
    _resolve(case, ItemStatus.SKIPPED, ctx, out, "item.skipped")


def _dont_have(case: Case, event: Event, ctx: Context, out: Outcome) -> None:
    if _answered_stale(case, event, ctx, out):
        return
    _resolve(case, ItemStatus.DONT_HAVE, ctx, out, "item.dont_have_recorded")


def _sent_back(case: Case, event: Event, ctx: Context, out: Outcome) -> None:
    """The coordinator asked for an item again: its files no longer count, the patient reads
    why, and the item is asked now (the one they were on comes round again after it)."""
    checklist = _checklist(case, ctx)
    if event.arg not in checklist.item_keys:
        return  # checked by the caller; an item of an older checklist version is ignored
    item = checklist.item(event.arg)
    progress = case.progress(item.key)
    progress.files = []
    progress.answer = None
    progress.rejected_uploads = 0
    progress.status = ItemStatus.SENT_BACK
    case.password_file = None
    case.state = State.COLLECTING
    case.current_item = item.key
    reason = event.reason if event.reason is not None else Text("review.reason.other")
    out.replies.append(reply(Text("review.sent_back", {"title": item.label, "reason": reason})))
    out.replies.append(_item_prompt(case, ctx))


def _extra_requested(case: Case, event: Event, ctx: Context, out: Outcome) -> None:
    """The coordinator needs one more record: it joins the checklist and is asked now."""
    description = " ".join(event.arg.split())
    if not description:
        return  # checked by the caller
    key = f"{EXTRA_PREFIX}{len(case.extras) + 1}"
    case.extras[key] = description
    case.progress(key)
    case.password_file = None
    case.state = State.COLLECTING
    case.current_item = key
    out.replies.append(reply(Text("extra.requested", {"description": Verbatim(description)})))
    out.replies.append(_item_prompt(case, ctx))


def _upload_page(case: Case, event: Event, ctx: Context, out: Outcome) -> None:
    """A file too big for the chat, or "send large files": the upload page for this item
    (the service issues the one-time link), or what to do when there is no page."""
    if event.kind is EventKind.UPLOAD_PAGE and _answered_stale(case, event, ctx, out):
        return
    item = _current(case, ctx)
    too_big = event.kind is EventKind.LARGE_FILE
    if item.is_text_answer:
        out.replies.append(reply(Text("item.needs_text"), buttons=_item_buttons(case, item, ctx)))
    elif ctx.web_uploads:
        out.events.append(UploadLinkWanted(case.id, item.key, too_big))
    else:
        out.replies.append(
            reply(Text("file.too_big_for_chat"), buttons=_item_buttons(case, item, ctx))
        )


def _pause_reminders(case: Case, event: Event, ctx: Context, out: Outcome) -> None:
    case.reminders_paused = True
    out.replies.append(reply(Text("reminder.paused")))


def _language_menu(case: Case, event: Event, ctx: Context, out: Outcome) -> None:
    out.replies.append(reply(Text("language.ask"), buttons=_language_buttons(ctx)))


def _choose_language(case: Case, event: Event, ctx: Context, out: Outcome) -> None:
    if event.arg in ctx.locales:
        case.locale = event.arg
        out.replies.append(reply(Text("language.set")))
    if case.state is State.NEW:
        _start(case, Event(EventKind.START), ctx, out)
    else:
        out.replies.append(prompt_for(case, ctx))


def _status(case: Case, event: Event, ctx: Context, out: Outcome) -> None:
    out.replies.append(status_reply(case, ctx))


def _help(case: Case, event: Event, ctx: Context, out: Outcome) -> None:
    out.replies.append(reply(Text("help"), Text("help.not_medical_advice")))


def _privacy(case: Case, event: Event, ctx: Context, out: Outcome) -> None:
    buttons: tuple[tuple[Button, ...], ...] = ()
    if case.consent_version is not None:  # withdrawing consent offers the same erasure
        buttons = ((Button(Text("button.withdraw"), EventKind.DELETE_REQUEST),),)
    notice = Text("privacy.notice", {"version": Verbatim(ctx.privacy_version)})
    out.replies.append(reply(notice, buttons=buttons))


def _delete_request(case: Case, event: Event, ctx: Context, out: Outcome) -> None:
    out.replies.append(
        reply(
            Text("delete.ask"),
            buttons=(
                (Button(Text("button.delete_confirm"), EventKind.DELETE_CONFIRM),),
                (Button(Text("button.delete_cancel"), EventKind.DELETE_CANCEL),),
            ),
        )
    )


def _delete_confirm(case: Case, event: Event, ctx: Context, out: Outcome) -> None:
    case.state = State.ERASED
    out.events.append(ErasureRequested(case.id))
    out.replies.append(reply(Text("delete.done")))


def _delete_cancel(case: Case, event: Event, ctx: Context, out: Outcome) -> None:
    out.replies.append(reply(Text("delete.cancelled")))
    out.replies.append(prompt_for(case, ctx))


def _unsupported(case: Case, event: Event, ctx: Context, out: Outcome) -> None:
    out.replies.append(reply(Text("message.unsupported")))
    if case.state is State.NEW:
        _start(case, event, ctx, out)
    else:
        out.replies.append(prompt_for(case, ctx))


def _ignored(case: Case, event: Event, ctx: Context, out: Outcome) -> None:
    """Nothing to do in this state (the caller refuses it first; the table stays total)."""


def _not_now(case: Case, event: Event, ctx: Context, out: Outcome) -> None:
    """An event that does not fit the current step: say why, then show the step again."""
    if case.state is State.NEW:
        _start(case, event, ctx, out)
        return
    out.replies.append(reply(Text(f"not_now.{case.state.value}")))
    out.replies.append(prompt_for(case, ctx))


# --- the table -------------------------------------------------------------------------

# `ANY` rows keep the state; the one exception is greeting a chat still in NEW.
_GREETS = frozenset({State.CONSENT})
_COLLECT_OR_DONE = frozenset({State.COLLECTING, State.COMPLETE})
_IDENTITY = frozenset({State.NAME, State.BIRTH_DATE})  # asked before the first item
_PROCEDURE_OR_COLLECT = frozenset({State.PROCEDURE, State.COLLECTING}) | _IDENTITY


def _stay(state: State) -> frozenset[State]:
    return frozenset({state})


TRANSITIONS: Final[dict[tuple[State | str, EventKind], Transition]] = {
    (State.NEW, EventKind.START): Transition(_start, _stay(State.CONSENT)),
    (State.CONSENT, EventKind.START): Transition(_start, _stay(State.CONSENT)),
    (State.CONSENT, EventKind.AGREE): Transition(
        _agree, frozenset({State.PROCEDURE, State.COLLECTING, State.COMPLETE}) | _IDENTITY
    ),
    (State.CONSENT, EventKind.DECLINE): Transition(_decline, _stay(State.CONSENT)),
    (State.PROCEDURE, EventKind.START): Transition(_start, _PROCEDURE_OR_COLLECT),
    (State.PROCEDURE, EventKind.CHOOSE_PROCEDURE): Transition(
        _choose_procedure, _PROCEDURE_OR_COLLECT
    ),
    (State.NAME, EventKind.START): Transition(_start, _stay(State.NAME)),
    (State.NAME, EventKind.TEXT): Transition(_name, _stay(State.BIRTH_DATE)),
    (State.BIRTH_DATE, EventKind.START): Transition(_start, _stay(State.BIRTH_DATE)),
    (State.BIRTH_DATE, EventKind.TEXT): Transition(_birth_date, _stay(State.COLLECTING)),
    (State.COLLECTING, EventKind.START): Transition(_start, _stay(State.COLLECTING)),
    (State.COLLECTING, EventKind.FILE): Transition(_file, _COLLECT_OR_DONE),
    (State.COLLECTING, EventKind.TEXT): Transition(_text, _COLLECT_OR_DONE),
    (State.COLLECTING, EventKind.UNLOCK_TRIED): Transition(_password, _COLLECT_OR_DONE),
    (State.COLLECTING, EventKind.DONE): Transition(_done, _COLLECT_OR_DONE),
    (State.COLLECTING, EventKind.SKIP): Transition(_skip, _COLLECT_OR_DONE),
    (State.COLLECTING, EventKind.DONT_HAVE): Transition(_dont_have, _COLLECT_OR_DONE),
    (State.COMPLETE, EventKind.START): Transition(_start, _stay(State.COMPLETE)),
    # The coordinator sends an item back (core.review): it reopens; a complete case too.
    (State.COLLECTING, EventKind.SENT_BACK): Transition(_sent_back, _stay(State.COLLECTING)),
    (State.COMPLETE, EventKind.SENT_BACK): Transition(_sent_back, _stay(State.COLLECTING)),
    (State.COLLECTING, EventKind.LARGE_FILE): Transition(_upload_page, _stay(State.COLLECTING)),
    (State.COLLECTING, EventKind.UPLOAD_PAGE): Transition(_upload_page, _stay(State.COLLECTING)),
    (State.COLLECTING, EventKind.EXTRA_REQUESTED): Transition(
        _extra_requested, _stay(State.COLLECTING)
    ),
    (State.COMPLETE, EventKind.EXTRA_REQUESTED): Transition(
        _extra_requested, _stay(State.COLLECTING)
    ),
    # A new privacy notice version: consent again before anything else (see `handle`).
    (State.PROCEDURE, EventKind.CONSENT_OUTDATED): Transition(
        _consent_outdated, _stay(State.CONSENT)
    ),
    (State.NAME, EventKind.CONSENT_OUTDATED): Transition(_consent_outdated, _stay(State.CONSENT)),
    (State.BIRTH_DATE, EventKind.CONSENT_OUTDATED): Transition(
        _consent_outdated, _stay(State.CONSENT)
    ),
    (State.COLLECTING, EventKind.CONSENT_OUTDATED): Transition(
        _consent_outdated, _stay(State.CONSENT)
    ),
    (State.COMPLETE, EventKind.CONSENT_OUTDATED): Transition(
        _consent_outdated, _stay(State.CONSENT)
    ),
    # In every state: menus and information change the language at most, never the step.
    (ANY, EventKind.LANGUAGE_MENU): Transition(_language_menu, _GREETS),
    (ANY, EventKind.CHOOSE_LANGUAGE): Transition(_choose_language, _GREETS),
    (ANY, EventKind.STATUS): Transition(_status, _GREETS),
    (ANY, EventKind.HELP): Transition(_help, _GREETS),
    (ANY, EventKind.PRIVACY): Transition(_privacy, _GREETS),
    (ANY, EventKind.UNSUPPORTED): Transition(_unsupported, _GREETS),
    # Erasure: asked and confirmed in any state; the service then crypto-erases the case.
    (ANY, EventKind.DELETE_REQUEST): Transition(_delete_request, _GREETS),
    (ANY, EventKind.DELETE_CONFIRM): Transition(_delete_confirm, _stay(State.ERASED)),
    (ANY, EventKind.DELETE_CANCEL): Transition(_delete_cancel, _GREETS),
    # Anything else out of place is answered and the current step shown again.
    (ANY, EventKind.AGREE): Transition(_not_now, _GREETS),
    (ANY, EventKind.DECLINE): Transition(_not_now, _GREETS),
    (ANY, EventKind.CHOOSE_PROCEDURE): Transition(_not_now, _GREETS),
    (ANY, EventKind.FILE): Transition(_not_now, _GREETS),
    (ANY, EventKind.TEXT): Transition(_not_now, _GREETS),
    (ANY, EventKind.DONE): Transition(_not_now, _GREETS),
    (ANY, EventKind.SKIP): Transition(_not_now, _GREETS),
    (ANY, EventKind.DONT_HAVE): Transition(_not_now, _GREETS),
    (ANY, EventKind.CONSENT_OUTDATED): Transition(_not_now, _GREETS),
    (ANY, EventKind.UNLOCK_TRIED): Transition(_not_now, _GREETS),
    (ANY, EventKind.SENT_BACK): Transition(_ignored, _GREETS),
    (ANY, EventKind.EXTRA_REQUESTED): Transition(_ignored, _GREETS),
    (ANY, EventKind.LARGE_FILE): Transition(_not_now, _GREETS),
    (ANY, EventKind.UPLOAD_PAGE): Transition(_not_now, _GREETS),
    (ANY, EventKind.PAUSE_REMINDERS): Transition(_pause_reminders, _GREETS),
}


def arrows() -> list[tuple[str, str, str]]:
    """The table as diagram arrows (source, target, event): what docs/state-machine.md draws.

    `ANY` rows that keep the state are drawn `any --> any`; others to their targets.
    """
    drawn = []
    for (state, kind), transition in TRANSITIONS.items():
        if state == ANY:
            targets = ["any"] if transition.targets == _GREETS else sorted(transition.targets)
            drawn += [("any", str(target), kind.value) for target in targets]
        else:
            drawn += [
                (str(state), target.value, kind.value) for target in sorted(transition.targets)
            ]
    return drawn


def transition_for(state: State, kind: EventKind) -> Transition:
    return TRANSITIONS.get((state, kind)) or TRANSITIONS[(ANY, kind)]


# Events a patient may still use while asked to consent again to a new notice.
_ALLOWED_BEFORE_RECONSENT = frozenset(
    {
        EventKind.LANGUAGE_MENU,
        EventKind.CHOOSE_LANGUAGE,
        EventKind.HELP,
        EventKind.PRIVACY,
        EventKind.SENT_BACK,  # the coordinator's decision, not the patient's step
        EventKind.EXTRA_REQUESTED,
        EventKind.PAUSE_REMINDERS,
    }
)


def _needs_new_consent(case: Case, event: Event, ctx: Context) -> bool:
    return (
        case.state in (State.PROCEDURE, State.COLLECTING, State.COMPLETE, *_IDENTITY)
        and case.consent_version != ctx.privacy_version
        and event.kind not in _ALLOWED_BEFORE_RECONSENT
    )


def handle(case: Case, event: Event, ctx: Context) -> Outcome:
    """Apply one event to the case (mutating it) and return what to say and announce."""
    if case.state is State.ERASED:  # terminal: the service removes the case in the same commit
        return Outcome()
    if _needs_new_consent(case, event, ctx):
        event = Event(EventKind.CONSENT_OUTDATED)
    transition = transition_for(case.state, event.kind)
    before = case.state
    # Any step, the patient's or the coordinator's, starts the reminder count afresh.
    case.active_at, case.reminders_sent = ctx.now, 0
    out = Outcome()
    transition.action(case, event, ctx, out)
    if case.state is not before and case.state not in transition.targets:
        raise TransitionError(f"{before} --{event.kind}--> {case.state} is not in the table")
    return out


def awaiting_password(case: Case) -> str | None:
    """The file id of a protected PDF whose password the next typed message is tried as."""
    return case.password_file if case.state is State.COLLECTING else None


def upload_target(case: Case, ctx: Context) -> ChecklistItem | None:
    """The item an incoming file would count toward, or None when no upload is wanted now.

    Nothing is downloaded before consent, and not for an item that takes a typed answer.
    """
    if case.state is not State.COLLECTING or case.consent_version != ctx.privacy_version:
        return None
    item = _current(case, ctx)
    return None if item.is_text_answer else item


def focus(case: Case, item_key: str | None) -> None:
    """Make an open item the current one (a file sent for it from the upload page)."""
    if (
        item_key is not None
        and case.state is State.COLLECTING
        and item_key in case.items
        and case.progress(item_key).status.is_open
    ):
        case.password_file = None if case.current_item != item_key else case.password_file
        case.current_item = item_key


def lenient_retake(case: Case, ctx: Context) -> bool:
    """True when the current item has been rejected often enough to take the next file."""
    if case.current_item is None:
        return False
    return case.progress(case.current_item).rejected_uploads >= REJECTIONS_BEFORE_LENIENCY
