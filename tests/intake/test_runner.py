"""The worker runner: limits, timeouts and crashes come back as verdicts, never exceptions."""

from __future__ import annotations

import asyncio
import functools
import io
import time

import pytest
from workload import (
    crashing_stream,
    hungry_stream,
    sleeping_stream,
    spinning_stream,
    text_stream,
)

from intake import Status
from intake.runner import OpenPath, WorkerPool, check_in_worker


def test_timeout_kills_the_worker() -> None:
    """A check over the wall-clock budget is `check_timeout`, and the caller is not held."""
    started = time.monotonic()
    verdict = check_in_worker(functools.partial(sleeping_stream, 30), timeout_s=1)
    assert time.monotonic() - started < 3
    assert [f.code for f in verdict.findings] == ["check_timeout"]


def test_memory_cap_gives_check_failed() -> None:
    """Allocating past RLIMIT_AS is `check_failed`, and the next check still works."""
    verdict = check_in_worker(hungry_stream, memory_mb=256)
    assert verdict.status is Status.REJECTED
    assert [f.code for f in verdict.findings] == ["check_failed"]
    after = check_in_worker(text_stream)
    assert [f.code for f in after.findings] == ["unsupported_type"]


def test_cpu_cap_gives_check_timeout() -> None:
    """A busy loop is stopped by RLIMIT_CPU even with a generous wall-clock budget."""
    verdict = check_in_worker(spinning_stream, timeout_s=30, cpu_s=1)
    assert [f.code for f in verdict.findings] == ["check_timeout"]


def test_crash_gives_check_failed() -> None:
    """A worker that dies mid-check is `check_failed`."""
    verdict = check_in_worker(crashing_stream)
    assert [f.code for f in verdict.findings] == ["check_failed"]


def test_unpicklable_opener_gives_check_failed() -> None:
    """A caller bug (a lambda opener) is a verdict too, not an exception."""
    verdict = check_in_worker(lambda: io.BytesIO(b""))
    assert [f.code for f in verdict.findings] == ["check_failed"]


def test_warm_pool_overhead_is_small(tmp_path) -> None:
    """Once warm, a check of a tiny file costs a pipe round trip (well under 50 ms)."""
    path = tmp_path / "note.txt"
    path.write_bytes(b"hello")
    pool = WorkerPool(max_workers=1)
    try:
        pool.check(OpenPath(str(path)), None, None)
        started = time.monotonic()
        for _ in range(20):
            pool.check(OpenPath(str(path)), None, None)
        per_check = (time.monotonic() - started) / 20
    finally:
        pool.close()
    assert per_check < 0.05


def test_callable_from_asyncio_threads(tmp_path) -> None:
    """Several checks at once from asyncio.to_thread all get their verdicts."""
    path = tmp_path / "note.txt"
    path.write_bytes(b"hello")

    async def main() -> list:
        return await asyncio.gather(
            *(asyncio.to_thread(check_in_worker, OpenPath(str(path))) for _ in range(6))
        )

    verdicts = asyncio.run(main())
    assert all(v.findings[0].code == "unsupported_type" for v in verdicts)


def test_any_function_runs_in_a_worker_and_its_failures_come_back_typed(tmp_path) -> None:
    """`call` returns the function's result; an error keeps its code; a hang is a timeout."""
    from PIL import Image

    from intake import preview
    from intake.runner import WorkerFailed

    photo = tmp_path / "page.png"
    Image.new("RGB", (2400, 1600), "white").save(photo)
    pool = WorkerPool(max_workers=1)
    try:
        mime, data = pool.call(preview.preview, "image", OpenPath(str(photo)))
        assert mime == "image/jpeg" and data[:2] == b"\xff\xd8"
        broken = tmp_path / "broken.png"
        broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
        with pytest.raises(WorkerFailed) as failure:
            pool.call(preview.preview, "image", OpenPath(str(broken)))
        assert failure.value.reason == "PreviewError" and failure.value.code
        with pytest.raises(WorkerFailed) as slow:
            pool.call(time.sleep, 30, timeout_s=1)
        assert slow.value.reason == "timeout"
        assert pool.call(sum, [1, 2, 3]) == 6  # the pool replaced the killed worker
    finally:
        pool.close()
