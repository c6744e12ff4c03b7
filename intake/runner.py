"""Run a check in a worker process with a memory cap, a CPU-time cap and a wall-clock timeout.

A hostile file fails its own check, never the bot: a crash, a MemoryError, a CPU-limit signal
or a timeout all come back as a REJECTED verdict (`check_failed` / `check_timeout`).

Workers are fresh interpreters (``python -m intake._worker``, the equivalent of the ``spawn``
start method without re-importing the caller's ``__main__``), safe to start from any thread of an
asyncio program. Idle workers are kept in a small pool and reused, so a check costs a pipe round
trip, not a process start; a worker that breached a limit, timed out or crashed is killed and
replaced, and every worker is recycled after ``RECYCLE_AFTER`` jobs.

``open_stream`` must be picklable: a module-level function, a ``functools.partial`` of one, or a
small dataclass with ``__call__`` (see `OpenPath`). The child calls it to get its stream, so no
plaintext needs to touch the disk and no file content crosses the pipe.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, BinaryIO

from intake.verdict import Finding, Kind, Severity, Verdict, verdict_from

RECYCLE_AFTER = 200
_PACKAGE_ROOT = str(Path(__file__).resolve().parent.parent)
_CPU_SIGNALS = {signal.SIGXCPU}


@dataclass(frozen=True)
class OpenPath:
    """A picklable opener for a plain file path (tests, the CLI, the bench)."""

    path: str

    def __call__(self) -> BinaryIO:
        return open(self.path, "rb")


def _set_limit(which: int, soft: int) -> None:
    _, hard = resource.getrlimit(which)
    if hard != resource.RLIM_INFINITY:
        soft = min(soft, hard)
    resource.setrlimit(which, (soft, hard))


def _cpu_used() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run_check(
    open_stream: Callable[[], BinaryIO],
    declared_name: str | None,
    declared_mime: str | None,
    **kwargs: Any,
) -> dict[str, Any]:
    """The check job: open the stream in the worker, judge it, return the verdict as a dict."""
    from intake.check import check

    stream = open_stream()
    try:
        return check(stream, declared_name, declared_mime, **kwargs).to_dict()
    finally:
        with contextlib.suppress(Exception):
            stream.close()


def _worker_main(conn: Connection) -> None:
    """Worker loop: receive a job (a function and its arguments), run it under limits, send
    back its result, or why it failed."""
    while True:
        try:
            job = conn.recv()
        except (EOFError, OSError):
            return
        except Exception as exc:  # the job did not unpickle (an opener the worker cannot import)
            conn.send(("failed", type(exc).__name__))
            continue
        if job is None:
            return
        function, args, kwargs, memory_mb, cpu_s = job
        _set_limit(resource.RLIMIT_AS, memory_mb * 1024 * 1024)
        _set_limit(resource.RLIMIT_CPU, int(_cpu_used() + cpu_s) + 1)
        reply: tuple[str, Any]
        try:
            reply = ("ok", function(*args, **kwargs))
        except MemoryError:
            reply = ("memory", None)
        except BaseException as exc:  # any failure is an answer, not a crash
            reply = ("failed", (type(exc).__name__, getattr(exc, "code", None)))
        # Lift the memory cap before pickling the reply so a near-full worker can still answer.
        _set_limit(resource.RLIMIT_AS, resource.RLIM_INFINITY)
        try:
            conn.send(reply)
        except (OSError, ValueError):
            return
        if reply[0] == "memory":
            return  # a worker that hit its memory cap may be in a bad state: recycle it


class _Worker:
    """One worker: a fresh interpreter running `intake._worker`, talking over a socket pair.

    A plain subprocess (not multiprocessing's spawn/forkserver) so the caller's ``__main__``
    is never re-imported and nothing depends on the caller's start method or threads.
    """

    def __init__(self) -> None:
        parent, child = socket.socketpair()
        env = dict(os.environ)
        for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "OMP_THREAD_LIMIT"):
            env.setdefault(name, "1")
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH", "")) if p
        )
        try:
            self.process = subprocess.Popen(  # noqa: S603 - fixed argv, no shell
                [sys.executable, "-m", "intake._worker", str(child.fileno())],
                pass_fds=[child.fileno()],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                env=env,
                close_fds=True,
            )
        finally:
            child.close()
        self.conn = Connection(parent.detach())
        self.jobs = 0

    def alive(self) -> bool:
        return self.process.poll() is None

    def kill(self) -> None:
        with contextlib.suppress(Exception):
            self.process.kill()
        with contextlib.suppress(Exception):
            self.process.wait(5)
        with contextlib.suppress(Exception):
            self.conn.close()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.conn.send(None)
        try:
            self.process.wait(1)
        except subprocess.TimeoutExpired:
            self.kill()
        with contextlib.suppress(Exception):
            self.conn.close()


def _failed(code: str, **params: Any) -> Verdict:
    return verdict_from(Kind.OTHER, [Finding(code, Severity.ERROR, params)])


class WorkerFailed(RuntimeError):
    """A job that did not return: `reason` is timeout, memory, a crash's exit status, or the
    exception's type name; `code` is the exception's own code when it had one."""

    def __init__(self, reason: str, code: str | None = None, seconds: float = 0.0) -> None:
        super().__init__(reason if code is None else f"{reason} ({code})")
        self.reason = reason
        self.code = code
        self.seconds = seconds


class WorkerPool:
    """At most ``max_workers`` checks at a time; idle workers are kept warm for the next one."""

    def __init__(self, max_workers: int | None = None) -> None:
        self.max_workers = max_workers or max(2, os.cpu_count() or 2)
        self._idle: list[_Worker] = []
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(self.max_workers)
        self._closed = False

    def _take(self) -> _Worker:
        with self._lock:
            while self._idle:
                worker = self._idle.pop()
                if worker.alive():
                    return worker
                worker.kill()
        return _Worker()

    def _give_back(self, worker: _Worker) -> None:
        worker.jobs += 1
        if worker.jobs >= RECYCLE_AFTER or not worker.alive():
            worker.close()
            return
        with self._lock:
            if self._closed:
                worker.close()
            else:
                self._idle.append(worker)

    def call(
        self,
        function: Callable[..., Any],
        *args: Any,
        timeout_s: float = 20,
        memory_mb: int = 512,
        cpu_s: int = 20,
        **kwargs: Any,
    ) -> Any:
        """`function(*args, **kwargs)` in a worker under the limits; its result, or
        `WorkerFailed`. The function and its arguments must be picklable (module level)."""
        with self._slots:
            worker = self._take()
            started = time.monotonic()

            def failed(reason: str, code: str | None = None) -> WorkerFailed:
                return WorkerFailed(reason, code, round(time.monotonic() - started, 1))

            try:
                worker.conn.send((function, args, kwargs, memory_mb, cpu_s))
            except Exception as exc:  # an unpicklable argument is a caller bug
                worker.kill()
                raise failed(type(exc).__name__) from exc
            try:
                if not worker.conn.poll(timeout_s):
                    worker.kill()
                    raise failed("timeout")
                status, payload = worker.conn.recv()
            except (EOFError, OSError):
                with contextlib.suppress(subprocess.TimeoutExpired):
                    worker.process.wait(2)  # let it finish dying, to read its real exit status
                worker.kill()
                exitcode = worker.process.returncode
                if exitcode is not None and -exitcode in _CPU_SIGNALS:
                    raise failed("timeout") from None
                raise failed(f"exit {exitcode}") from None
            if status == "memory":
                worker.kill()
                raise failed("memory")
            self._give_back(worker)
            if status == "failed":
                raise failed(*payload)
            return payload

    def check(
        self,
        open_stream: Callable[[], BinaryIO],
        declared_name: str | None,
        declared_mime: str | None,
        *,
        timeout_s: float = 20,
        memory_mb: int = 512,
        cpu_s: int = 20,
        **check_kwargs: Any,
    ) -> Verdict:
        """`intake.check` under the limits: any failure of the worker is a rejected verdict."""
        try:
            result = self.call(
                run_check,
                open_stream,
                declared_name,
                declared_mime,
                timeout_s=timeout_s,
                memory_mb=memory_mb,
                cpu_s=cpu_s,
                **check_kwargs,
            )
        except WorkerFailed as failure:
            if failure.reason == "timeout":
                return _failed("check_timeout", seconds=failure.seconds)
            return _failed("check_failed", reason=failure.reason)
        return Verdict.from_dict(result)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for worker in idle:
            worker.close()


_pool: WorkerPool | None = None
_pool_lock = threading.Lock()


def default_pool() -> WorkerPool:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = WorkerPool()
            atexit.register(shutdown_pool)
        return _pool


def shutdown_pool() -> None:
    """Stop the idle workers of the default pool (called at exit; tests may call it)."""
    global _pool
    with _pool_lock:
        pool, _pool = _pool, None
    if pool is not None:
        pool.close()


def check_in_worker(
    open_stream: Callable[[], BinaryIO],
    declared_name: str | None = None,
    declared_mime: str | None = None,
    *,
    timeout_s: float = 20,
    memory_mb: int = 512,
    cpu_s: int = 20,
    **check_kwargs: Any,
) -> Verdict:
    """`intake.check` in a limited worker process. Synchronous; never raises for a bad file.

    Call it from a thread (``asyncio.to_thread``) in async code. Extra keyword arguments
    (``compressed_photo=True``) are passed on to `intake.check`.
    """
    return default_pool().check(
        open_stream,
        declared_name,
        declared_mime,
        timeout_s=timeout_s,
        memory_mb=memory_mb,
        cpu_s=cpu_s,
        **check_kwargs,
    )


def call_in_worker(
    function: Callable[..., Any],
    *args: Any,
    timeout_s: float = 20,
    memory_mb: int = 512,
    cpu_s: int = 20,
    **kwargs: Any,
) -> Any:
    """Any picklable function in a limited worker of the default pool (see `WorkerPool.call`):
    the coordinator's previews run here. Synchronous; call it from a thread in async code."""
    return default_pool().call(
        function, *args, timeout_s=timeout_s, memory_mb=memory_mb, cpu_s=cpu_s, **kwargs
    )
