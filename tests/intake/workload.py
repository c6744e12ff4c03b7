"""Openers the worker processes of the runner tests call (importable by module name)."""

from __future__ import annotations

import io
import time
from typing import BinaryIO


def sleeping_stream(seconds: float) -> BinaryIO:
    time.sleep(seconds)
    return io.BytesIO(b"%PDF-1.4")


def hungry_stream() -> BinaryIO:
    hoard = [bytearray(64 * 1024 * 1024) for _ in range(64)]
    return io.BytesIO(bytes(len(hoard)))


def spinning_stream() -> BinaryIO:
    while True:
        pass


def crashing_stream() -> BinaryIO:
    import os

    os._exit(3)


def text_stream() -> BinaryIO:
    return io.BytesIO(b"just some text, not a record\n" * 10)
