"""Plays one patient against the emulator: send, wait for the bot's answer, press buttons."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.emulator import BotApiEmulator, SimUser

TIMEOUT = 30.0


class PatientDriver:
    def __init__(self, emulator: BotApiEmulator, user: SimUser) -> None:
        self.emu = emulator
        self.user = user
        self.mark = emulator.cursor()

    @property
    def chat_id(self) -> int:
        return self.user.id

    def _begin(self) -> None:
        self.mark = self.emu.cursor()

    async def expect(self, fragment: str, timeout: float = TIMEOUT) -> dict[str, Any]:
        """The first message from the bot since the last action that contains `fragment`."""
        return await self.emu.wait_for_text(
            self.chat_id, fragment, timeout=timeout, since=self.mark
        )

    async def expect_button(self, label: str, timeout: float = TIMEOUT) -> dict[str, Any]:
        """The first message since the last action that carries a button labelled `label`."""

        def has_button(event: dict[str, Any]) -> bool:
            if event.get("chat_id") != self.chat_id:
                return False
            return any(label.lower() in b["text"].lower() for b in self.emu.buttons(event))

        return await self.emu.wait_for(has_button, timeout=timeout, since=self.mark)

    async def next_message(self, timeout: float = TIMEOUT) -> dict[str, Any]:
        """The first message from the bot in this chat since the last action, whatever it says."""
        return await self.emu.wait_for(
            lambda event: event.get("chat_id") == self.chat_id, timeout=timeout, since=self.mark
        )

    async def introduce(self, name: str = "Ann Example", born: str = "31.01.1980") -> None:
        """Say who you are: asked once, right after the procedure, in the patient's language."""
        await self.next_message()  # the name question
        self.say(name)
        await self.next_message()  # the date of birth question
        self.say(born)

    def say(self, text: str) -> int:
        self._begin()
        return self.emu.send_text(self.user, text)

    def send_file(self, data: bytes | Path, name: str, mime: str) -> int:
        self._begin()
        return self.emu.send_document(self.user, data, file_name=name, mime_type=mime)

    def send_photo(self, data: bytes) -> int:
        self._begin()
        return self.emu.send_photo(self.user, data)

    async def tap(self, label: str, timeout: float = TIMEOUT) -> int:
        """Press the button labelled `label` on the newest message since the last action."""
        await self.expect_button(label, timeout)
        # The newest such message: after a restart an earlier prompt may arrive twice.
        message = [
            event
            for event in self.emu.events[self.mark :]
            if event.get("chat_id") == self.chat_id
            and any(label.lower() in b["text"].lower() for b in self.emu.buttons(event))
        ][-1]
        self._begin()
        return self.emu.press(self.user, message, self.emu.button(message, label))
