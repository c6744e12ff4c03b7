"""Subprocess for the erasure kill test: confirm a patient's deletion, then exit.

`python -m tests.erase_worker DATA_DIR CHAT_ID UPDATE_ID`; prints "ready" just before the
erasure starts so the test can kill it at a chosen instant inside the erasure.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from bot.app import build_app
from bot.settings import Settings
from core.events import Event, EventKind
from core.ports import Patient


async def main(data_dir: Path, chat_id: int, update_id: int) -> None:
    app = build_app(Settings(data_dir=data_dir, coordinator_chat_id=-5))
    await app.eraser.finish_pending()  # what the bot does at start
    print("ready", flush=True)
    await app.service.handle(
        Patient(chat_id, chat_id, "en"), Event(EventKind.DELETE_CONFIRM), update_id
    )
    await app.close()
    print("done", flush=True)


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])))
