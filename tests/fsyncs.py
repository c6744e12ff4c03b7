"""Which files and directories the code under test fsyncs, for the durability tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# A descriptor is named through /proc (Linux): without it the tests that use this skip.
CAN_NAME_FDS = Path("/proc/self/fd").is_dir()


def fsynced_paths(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """What each os.fsync from now on is called on (the real fsync still runs), by the
    path its descriptor names: a directory or a blob's temp file."""
    calls: list[str] = []
    real = os.fsync

    def recording(fd: int) -> None:
        calls.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", recording)
    return calls
