"""The coordinator's commands and buttons: /cases [filter], /case CASE_ID, open, review and
decide buttons, and the reason a coordinator types after "another reason".

Only users in COORDINATOR_IDS are served, and only where case contents may go: their own
private chat with the bot, or COORDINATOR_CHAT_ID. Replies go to the chat the request came
from, which is always one of those. Anyone else's /cases or /case falls through to the next
router untouched (for a patient it is an unknown command, answered with help); a "co:"
button pressed by anyone else, or carrying a bad signature, is answered with no text and
does nothing else.

Handlers send nothing themselves: the desk (`core.coordination.CoordinatorDesk`) queues the
reply in the outbox, audits the view and marks the update handled in one transaction.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

from aiogram import F, Router
from aiogram.exceptions import TelegramAPIError
from aiogram.filters import Command, CommandObject, Filter
from aiogram.types import CallbackQuery, Chat, Message, User

from core.coordination import CoordinatorDesk, UnknownFilter, Viewer, parse_filter
from core.ports import FileSource
from core.review import (
    ACTIONS,
    ATTACH_ACTION,
    DECIDE_ACTION,
    EXPORT_ACTION,
    EXTRA_ACTION,
    OPEN_ACTION,
    REVIEW_ACTION,
    TRANSLATE_ACTION,
    TRANSLATION_PROMPT,
    parse_pressed,
)
from handlers.filters import Where
from handlers.patient import incoming_file

log = logging.getLogger(__name__)


def viewer_for(
    user: User | None,
    chat: Chat | None,
    coordinator_ids: frozenset[int],
    coordinator_chat_id: int | None,
) -> Viewer | None:
    """The coordinator behind an update, or None when this user in this chat is not one."""
    if user is None or chat is None or user.is_bot or user.id not in coordinator_ids:
        return None
    private = chat.type == "private" and chat.id == user.id
    if private or (coordinator_chat_id is not None and chat.id == coordinator_chat_id):
        return Viewer(user_id=user.id, chat_id=chat.id)
    return None


class IsCoordinator(Filter):
    """Passes a listed coordinator in an allowed chat, handing the handler a `viewer`."""

    def __init__(self, coordinator_ids: frozenset[int], coordinator_chat_id: int | None) -> None:
        self._ids = coordinator_ids
        self._chat_id = coordinator_chat_id

    async def __call__(self, message: Message) -> bool | dict[str, Any]:
        viewer = viewer_for(message.from_user, message.chat, self._ids, self._chat_id)
        return False if viewer is None else {"viewer": viewer}


async def is_coordinator_button(query: CallbackQuery) -> bool:  # async: see handlers.filters
    """Callback data of a coordinator button (checked for its signature by the handler)."""
    return (query.data or "").split(":", 1)[0] in ACTIONS


class AwaitsReason(Filter):
    """Passes a coordinator's text when they were asked to type a reason or a description."""

    async def __call__(
        self, message: Message, viewer: Viewer, coordinator_desk: CoordinatorDesk
    ) -> bool:
        pending = await coordinator_desk.pending_prompt(viewer)
        return pending is not None and not pending[1].startswith(TRANSLATION_PROMPT)


class AwaitsTranslation(Filter):
    """Passes a coordinator's file when they were asked to send an item's translation."""

    async def __call__(
        self, message: Message, viewer: Viewer, coordinator_desk: CoordinatorDesk
    ) -> bool:
        pending = await coordinator_desk.pending_prompt(viewer)
        return pending is not None and pending[1].startswith(TRANSLATION_PROMPT)


def build_router(coordinator_ids: frozenset[int], coordinator_chat_id: int | None) -> Router:
    """A fresh router; include it before the patient router."""
    router = Router(name="coordinator")
    is_coordinator = IsCoordinator(frozenset(coordinator_ids), coordinator_chat_id)

    @router.message(Command("cases"), is_coordinator)
    async def cases(
        message: Message,
        command: CommandObject,
        viewer: Viewer,
        coordinator_desk: CoordinatorDesk,
        update_id: int,
    ) -> None:
        try:
            filter_name = parse_filter(command.args)
        except UnknownFilter:
            await coordinator_desk.usage(viewer=viewer, update_id=update_id)
            return
        await coordinator_desk.list_cases(filter_name, viewer=viewer, update_id=update_id)

    @router.message(Command("case"), is_coordinator)
    async def case(
        message: Message,
        command: CommandObject,
        viewer: Viewer,
        coordinator_desk: CoordinatorDesk,
        update_id: int,
    ) -> None:
        case_id = (command.args or "").strip().lower()
        if not case_id:
            await coordinator_desk.usage(viewer=viewer, update_id=update_id)
            return
        await coordinator_desk.case_view(case_id[:64], viewer=viewer, update_id=update_id)

    @router.message(Where(F.document), is_coordinator, AwaitsTranslation())
    async def translation(
        message: Message,
        viewer: Viewer,
        coordinator_desk: CoordinatorDesk,
        file_source: FileSource,
        update_id: int,
    ) -> None:
        incoming = incoming_file(message)
        if incoming is not None:
            await coordinator_desk.translation_file(
                incoming, file_source, viewer=viewer, update_id=update_id
            )

    @router.message(Where(F.text), Where(~F.text.startswith("/")), is_coordinator, AwaitsReason())
    async def reason(
        message: Message, viewer: Viewer, coordinator_desk: CoordinatorDesk, update_id: int
    ) -> None:
        await coordinator_desk.typed_reason(message.text or "", viewer=viewer, update_id=update_id)

    @router.callback_query(is_coordinator_button)
    async def pressed(
        query: CallbackQuery, coordinator_desk: CoordinatorDesk, update_id: int
    ) -> None:
        # An empty answer stops the button's spinner and says nothing to anyone.
        with contextlib.suppress(TelegramAPIError):  # a replayed, old query cannot be answered
            await query.answer()
        chat = query.message.chat if query.message is not None else None
        viewer = viewer_for(query.from_user, chat, coordinator_ids, coordinator_chat_id)
        parsed = parse_pressed(query.data or "")
        if (
            viewer is None
            or parsed is None
            or not coordinator_desk.verify(parsed[0].unsigned, parsed[1])
        ):
            log.warning(
                "refused coordinator button update=%s user=%s", update_id, query.from_user.id
            )
            return
        button = parsed[0]
        if button.action == OPEN_ACTION:
            await coordinator_desk.case_view(
                button.case_id, viewer=viewer, update_id=update_id, via="button"
            )
        elif button.action == REVIEW_ACTION and button.index is not None:
            await coordinator_desk.review_item(
                button.case_id, button.index, viewer=viewer, update_id=update_id
            )
        elif button.action == EXTRA_ACTION:
            await coordinator_desk.request_extra(button.case_id, viewer=viewer, update_id=update_id)
        elif button.action == TRANSLATE_ACTION and button.index is not None:
            await coordinator_desk.order_translation(
                button.case_id, button.index, viewer=viewer, update_id=update_id
            )
        elif button.action == ATTACH_ACTION and button.index is not None:
            await coordinator_desk.attach_translation(
                button.case_id, button.index, viewer=viewer, update_id=update_id
            )
        elif button.action == EXPORT_ACTION:
            await coordinator_desk.export(button.case_id, viewer=viewer, update_id=update_id)
        elif button.action == DECIDE_ACTION and button.index is not None and button.code:
            await coordinator_desk.decide(
                button.case_id, button.index, button.code, viewer=viewer, update_id=update_id
            )

    return router
