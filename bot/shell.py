"""`care-companion shell`: the same conversation offline, in a terminal, with no token.

Type to answer, a number to press a button of the last message, `/send PATH` to upload a
file, `/quit` to leave. Coordinator alerts are printed as they would be sent.
"""

from __future__ import annotations

import asyncio
import hashlib
import mimetypes
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TextIO

from sqlmodel import col, select

from adapters.store import utcnow
from adapters.tables import OutboxRow
from bot.app import App
from core.events import Event, EventKind
from core.ports import IncomingFile, Patient
from core.replies import Reply
from handlers.render import RenderedButton

SHELL_CHAT_ID = 1  # Telegram never gives a real user this id
SHELL_COORDINATOR_CHAT_ID = -1
_COMMANDS = {
    "/start": EventKind.START,
    "/status": EventKind.STATUS,
    "/help": EventKind.HELP,
    "/privacy": EventKind.PRIVACY,
    "/language": EventKind.LANGUAGE_MENU,
    "/delete": EventKind.DELETE_REQUEST,
}


class LocalFileSource:
    """Reads a local file in pieces, like a download."""

    async def chunks(self, incoming: IncomingFile) -> AsyncIterator[bytes]:
        with open(incoming.source_ref, "rb") as handle:  # noqa: ASYNC230  # reads run in a thread
            while piece := await asyncio.to_thread(handle.read, 1 << 20):
                yield piece


def local_incoming(path: Path) -> IncomingFile:
    stat = path.stat()
    # Same path, size and time: the same file sent twice, as Telegram's file_unique_id.
    unique = hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    mime, _ = mimetypes.guess_type(path.name)
    return IncomingFile(unique.hexdigest()[:32], str(path), path.name, mime, stat.st_size)


class Shell:
    def __init__(self, app: App, out: TextIO, chat_id: int = SHELL_CHAT_ID) -> None:
        self._app = app
        self._out = out
        self._patient = Patient(chat_id, chat_id, app.settings.default_locale)
        self._coordinator = app.settings.coordinator_chat_id or SHELL_COORDINATOR_CHAT_ID
        self._buttons: list[RenderedButton] = []

    async def handle_line(self, line: str) -> bool:
        """Act on one typed line; False when the user wants to leave."""
        line = line.strip()
        if not line:
            return True
        if line in {"/quit", "/exit"}:
            return False
        if line.startswith("/send "):
            path = await asyncio.to_thread(lambda: Path(line[6:].strip()).expanduser())
            if not await asyncio.to_thread(path.is_file):
                self._print("(shell) no such file")
                return True
            incoming = await asyncio.to_thread(local_incoming, path)
            await self._app.service.handle_file(self._patient, incoming, LocalFileSource(), None)
        elif line.isdigit() and 1 <= int(line) <= len(self._buttons):
            action, _, arg = self._buttons[int(line) - 1].data.partition(":")
            await self._app.service.handle(self._patient, Event(EventKind(action), arg))
        else:
            command, _, rest = line.partition(" ")
            if command in _COMMANDS:
                await self._app.service.handle(self._patient, Event(_COMMANDS[command], rest))
            else:
                await self._app.service.handle(self._patient, Event(EventKind.TEXT, line))
        await self.flush()
        return True

    async def flush(self) -> None:
        """Print every queued message for this chat and the coordinator, then mark it sent."""
        async with self._app.store.session() as session:
            rows = (
                await session.exec(
                    select(OutboxRow)
                    .where(OutboxRow.status == "pending")
                    .where(col(OutboxRow.chat_id).in_([self._patient.chat_id, self._coordinator]))
                    .order_by(col(OutboxRow.id))
                )
            ).all()
            for row in rows:
                self._show(row)
                row.status, row.sent_at = "sent", utcnow()
                session.add(row)

    def _show(self, row: OutboxRow) -> None:
        payload = self._app.store.outbox_payload(row)
        if "delete_message" in payload or "card" in payload:
            return  # the terminal keeps no messages to delete or edit; /status shows the card
        message = payload["caption"] if "media" in payload else payload  # a picture's caption
        rendered = self._app.translator.render(row.locale, Reply.from_dict(message))
        prefix = "[coordinator] " if row.chat_id == self._coordinator else ""
        for text in rendered.texts:
            self._print(prefix + text)
        if row.chat_id == self._coordinator:
            return
        if rendered.buttons:
            self._buttons = [b for line in rendered.buttons for b in line]
            for number, button in enumerate(self._buttons, start=1):
                self._print(f"  [{number}] {button.label}")
        self._print("")

    def _print(self, text: str) -> None:
        print(text, file=self._out, flush=True)


async def run_shell(app: App, stdin: TextIO = sys.stdin, out: TextIO = sys.stdout) -> None:
    shell = Shell(app, out)
    print("Care Companion shell: type to answer, a number presses a button,", file=out)
    print("/send PATH uploads a file, /quit leaves.\n", file=out, flush=True)
    await shell.handle_line("/start")
    while True:
        line = await asyncio.to_thread(stdin.readline)
        if not line or not await shell.handle_line(line):
            break
