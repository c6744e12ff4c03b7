"""Operator key operations: master key rotation and a full integrity check of the vault.

Rotation (``care-companion keys rotate``)
=========================================

Envelope encryption makes rotation cheap: blobs and encrypted columns are under the
per-case data keys, which do not change; only each case's ``wrapped_key`` (65 bytes)
is unwrapped with the old master key and wrapped again with the new one.

* **Resumable and idempotent.**  Each wrapped key names the master key that made it
  (:func:`adapters.keys.wrapped_key_id`), so a case is always either still under the
  old key or already under the new one; cases are re-wrapped in small batches, one
  transaction each (rows locked with ``FOR UPDATE`` on PostgreSQL; SQLite transactions
  are ``BEGIN IMMEDIATE``).  A run killed at any instant is simply run again with the
  same two keys; rows already under the new key are counted, not touched.
* **The inbox.**  Raw updates waiting in ``inbox.payload_enc`` are encrypted under a key
  derived from the master key (see :class:`adapters.keyring.KeyRing`).  They are
  re-encrypted under the new derived key rather than "drained first": draining needs
  the bot running (which rotation must not), and parked rows may never drain.  Field
  tokens carry no key id, so a row counts as done when it decrypts with the new key.
* **Erased cases** (an empty ``wrapped_key``: the key was destroyed) have nothing to
  rotate and are counted as ``erased``.
* **Stop the bot first.**  A running bot holds the old master key in memory: it could
  not unwrap the cases already rotated and would wrap new cases with the old key.

Key files (:func:`rotate_master_key_file`), with ``K`` the key file, ``N`` the new key
(``K.new`` by default, or a file the operator supplies) and ``O = K.old``:

1. ``N`` absent, ``O`` absent: generate ``N`` (mode 0600, atomically).
2. Rotate every row from ``K``'s key to ``N``'s key (resumable, see above).
3. Swap: copy ``K`` to ``O`` (temp file, fsync, rename), then rename ``N`` over ``K``
   (a supplied ``N`` is copied instead and left in place).  ``K`` is therefore always a
   complete key file: the old key until the rename, the new one after.

A later run tells where the previous one stopped from the files and the key ids the
rows carry: ``N`` present with a key different from ``K`` means steps 2-3 are to be
(re)done; ``N`` equal to ``K`` means the swap happened; ``N`` absent and ``O`` present
means the rotation completed (rows still under ``O``'s key, which only a bot running
during the rotation can produce, are re-wrapped to ``K``).  A new rotation is refused
while ``O`` exists: the operator destroys it first, once backups are sorted out.

Verification (``care-companion verify``)
========================================

:func:`verify_all` authenticates every chunk of every blob a ``case_files`` row points
to, with its case key, compares plaintext size and SHA-256 with the row, and lists
vault blobs no row points to.  Reports carry ids, kinds and chunk indexes only, never
names or contents.  Run it with the bot stopped, or expect a file being received at
that moment to show up as an orphan (its blob is written before its row).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

from sqlalchemy.ext.asyncio import AsyncEngine
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from adapters import keys
from adapters.database import create_engine
from adapters.durable import fsync_dir
from adapters.keyring import KeyRing
from adapters.keys import FieldDecryptError, KeyHandlingError
from adapters.store import SqlStore
from adapters.tables import CaseRow, FileMemberRow, FileRow, InboxRow, UploadSessionRow
from adapters.uploads import part_session
from adapters.vault import BlobIntegrityError, InvalidBlobIdError, Vault

__all__ = [
    "KeyFileRotation",
    "RotationReport",
    "VerifyProblem",
    "VerifyReport",
    "rotate_keys",
    "rotate_master_key_file",
    "verify_all",
]

Echo = Callable[[str], None]


# ============================================================================ rotation


@dataclass
class RotationReport:
    """Counts of one rotation run; ids only (case ids and update ids are random/opaque)."""

    old_key_id: str
    new_key_id: str
    rotated: int = 0
    already_rotated: int = 0
    erased: int = 0
    failed: dict[str, str] = field(default_factory=dict)  # case id -> reason
    inbox_reencrypted: int = 0
    inbox_already: int = 0
    inbox_failed: dict[int, str] = field(default_factory=dict)  # update id -> reason

    @property
    def complete(self) -> bool:
        """True when nothing is left that needs the old key."""
        return not self.failed and not self.inbox_failed

    def summary(self) -> str:
        lines = [
            f"master key {self.old_key_id} -> {self.new_key_id}: "
            f"cases rotated {self.rotated}, already rotated {self.already_rotated}, "
            f"erased {self.erased}, failed {len(self.failed)}; "
            f"inbox re-encrypted {self.inbox_reencrypted}, already {self.inbox_already}, "
            f"failed {len(self.inbox_failed)}"
        ]
        lines += [f"  case {case_id}: {why}" for case_id, why in sorted(self.failed.items())]
        lines += [f"  inbox update {uid}: {why}" for uid, why in sorted(self.inbox_failed.items())]
        return "\n".join(lines)


def _engine(target: AsyncEngine | str) -> tuple[AsyncEngine, bool]:
    if isinstance(target, AsyncEngine):
        return target, False
    return create_engine(target), True


async def rotate_keys(
    target: AsyncEngine | str,
    old_master: bytes,
    new_master: bytes,
    batch: int = 100,
    *,
    progress: Callable[[RotationReport], None] | None = None,
) -> RotationReport:
    """Re-wrap every case key and re-encrypt pending inbox payloads from old to new master.

    *target* is an engine or a database URL (an engine made here is disposed of).
    Resumable and idempotent (see the module docstring); blobs are never touched.
    *progress*, if given, is called after every committed batch.
    """
    if batch < 1:
        raise ValueError("batch must be at least 1")
    old_id, new_id = keys.master_key_id(old_master), keys.master_key_id(new_master)
    if old_id == new_id:
        raise ValueError("the old and the new master key are the same key")
    report = RotationReport(old_id, new_id)
    engine, owned = _engine(target)
    try:
        # A second pass catches cases created behind the first one's position (only a
        # bot left running can do that); it rotates them but does not recount.
        for first in (True, False):
            if not await _rotate_cases(
                engine, old_master, new_master, batch, report, first, progress
            ):
                break
        old_ring, new_ring = KeyRing(old_master), KeyRing(new_master)
        await _rotate_inbox(engine, old_ring, new_ring, batch, report, progress)
    finally:
        if owned:
            await engine.dispose()
    return report


async def _rotate_cases(
    engine: AsyncEngine,
    old_master: bytes,
    new_master: bytes,
    batch: int,
    report: RotationReport,
    count_all: bool,
    progress: Callable[[RotationReport], None] | None,
) -> int:
    """One pass over the cases; returns how many were re-wrapped."""
    postgres = engine.dialect.name == "postgresql"
    after = ""
    total = 0
    while True:
        rotated = already = erased = 0
        failed: dict[str, str] = {}
        async with AsyncSession(engine, expire_on_commit=False) as session, session.begin():
            query = (
                select(CaseRow)
                .where(col(CaseRow.id) > after)
                .order_by(col(CaseRow.id))
                .limit(batch)
            )
            if postgres:
                query = query.with_for_update()
            rows = (await session.exec(query)).all()
            if not rows:
                return total
            for row in rows:
                after = row.id
                wrapped = bytes(row.wrapped_key)
                if not wrapped:
                    erased += 1
                    continue
                try:
                    key_id = keys.wrapped_key_id(wrapped)
                except KeyHandlingError:
                    failed[row.id] = "wrapped key is malformed"
                    continue
                if key_id == report.new_key_id:
                    try:
                        keys.unwrap_key(new_master, wrapped, row.id)
                    except KeyHandlingError:
                        failed[row.id] = "wrapped key names the new master key but does not unwrap"
                    else:
                        already += 1
                    continue
                if key_id != report.old_key_id:
                    failed[row.id] = f"wrapped by another master key ({key_id})"
                    continue
                try:
                    data_key = keys.unwrap_key(old_master, wrapped, row.id)
                except KeyHandlingError:
                    failed[row.id] = "does not unwrap with the old master key (damaged?)"
                    continue
                rewrapped = keys.wrap_key(new_master, data_key, row.id)
                if keys.unwrap_key(new_master, rewrapped, row.id) != data_key:  # paranoia
                    raise RuntimeError(f"re-wrapped key of case {row.id} does not round-trip")
                row.wrapped_key = rewrapped
                session.add(row)
                rotated += 1
        # Counted only once the batch is committed.
        total += rotated
        report.rotated += rotated
        for case_id, why in failed.items():
            report.failed[case_id] = why
        if count_all:
            report.already_rotated += already
            report.erased += erased
        if progress is not None:
            progress(report)


async def _rotate_inbox(
    engine: AsyncEngine,
    old_ring: KeyRing,
    new_ring: KeyRing,
    batch: int,
    report: RotationReport,
    progress: Callable[[RotationReport], None] | None,
) -> None:
    postgres = engine.dialect.name == "postgresql"
    after: int | None = None
    while True:
        done = already = 0
        failed: dict[int, str] = {}
        async with AsyncSession(engine, expire_on_commit=False) as session, session.begin():
            query = select(InboxRow).where(col(InboxRow.payload_enc).is_not(None))
            if after is not None:
                query = query.where(col(InboxRow.update_id) > after)
            query = query.order_by(col(InboxRow.update_id)).limit(batch)
            if postgres:
                query = query.with_for_update()
            rows = (await session.exec(query)).all()
            if not rows:
                return
            for row in rows:
                after = row.update_id
                token = row.payload_enc
                assert token is not None
                try:
                    payload = old_ring.decrypt_inbox(row.update_id, token)
                except FieldDecryptError:
                    try:
                        new_ring.decrypt_inbox(row.update_id, token)
                    except FieldDecryptError:
                        failed[row.update_id] = "payload decrypts with neither key"
                    else:
                        already += 1
                    continue
                row.payload_enc = new_ring.encrypt_inbox(row.update_id, payload)
                session.add(row)
                done += 1
        report.inbox_reencrypted += done
        report.inbox_already += already
        report.inbox_failed.update(failed)
        if progress is not None:
            progress(report)


async def _key_ids_in_use(engine: AsyncEngine, batch: int = 1000) -> dict[str, int]:
    """How many cases each master key id wraps ("" for erased, "?" for malformed)."""
    counts: dict[str, int] = {}
    after = ""
    while True:
        async with AsyncSession(engine) as session:
            rows = (
                await session.exec(
                    select(CaseRow.id, CaseRow.wrapped_key)
                    .where(col(CaseRow.id) > after)
                    .order_by(col(CaseRow.id))
                    .limit(batch)
                )
            ).all()
        if not rows:
            return counts
        for case_id, wrapped in rows:
            after = case_id
            try:
                key_id = keys.wrapped_key_id(bytes(wrapped)) if wrapped else ""
            except KeyHandlingError:
                key_id = "?"
            counts[key_id] = counts.get(key_id, 0) + 1


# ----------------------------------------------------------------------- key files


@dataclass
class KeyFileRotation:
    """Outcome of :func:`rotate_master_key_file`.

    ``status`` is "rotated" (this run swapped the key file), "already_complete"
    (nothing left to do), "incomplete" (failures: the key file was left unchanged, fix
    and run again) or "refused" (see ``message``).
    """

    status: str
    message: str
    report: RotationReport | None = None
    old_key_file: Path | None = None

    @property
    def ok(self) -> bool:
        return self.status in {"rotated", "already_complete"}


def _sibling(path: Path, suffix: str) -> Path:
    return path.with_name(path.name + suffix)


def _read_key(path: Path) -> bytes | None:
    """The key in *path*, None if absent; KeyFileError if malformed or unsafe."""
    if not path.exists():
        return None
    key, _ = keys.load_or_create_master_key(path, create=False)
    return key


def _copy_key_file(source: Path, target: Path) -> None:
    """Atomically make *target* a 0600 copy of *source* (replacing *target*)."""
    data = source.read_bytes()
    tmp = target.with_name(f".{target.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        try:
            os.fchmod(fd, 0o600)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    fsync_dir(target.parent)


def _swap_key_files(key_file: Path, new_file: Path, old_file: Path, new_is_ours: bool) -> None:
    """Keep the current key as *old_file*, then make the new key the key file.

    Each step is atomic and repeatable, so a kill between them leaves a state the next
    run recognises (see the module docstring).
    """
    _copy_key_file(key_file, old_file)
    if new_is_ours:
        os.replace(new_file, key_file)
        fsync_dir(key_file.parent)
    else:
        _copy_key_file(new_file, key_file)


async def rotate_master_key_file(
    key_file: Path,
    database_url: str,
    new_key_file: Path | None = None,
    *,
    batch: int = 100,
    accept_failures: bool = False,
    echo: Echo = print,
    progress: Callable[[RotationReport], None] | None = None,
) -> KeyFileRotation:
    """Rotate to a new master key and swap the key file; resumable at any point.

    The new key comes from *new_key_file* if given (left in place afterwards), else it
    is generated into ``<key_file>.new``.  The previous key is kept as
    ``<key_file>.old`` for the operator to destroy.  With failures (cases that do not
    unwrap) the key file is not swapped unless *accept_failures*.  Run with the bot
    stopped.  Prints key ids and counts only, never key material.
    """
    key_file = Path(key_file)
    old_file = _sibling(key_file, ".old")
    new_is_ours = new_key_file is None
    new_file = _sibling(key_file, ".new") if new_key_file is None else Path(new_key_file)

    current = await asyncio.to_thread(_read_key, key_file)
    if current is None:
        message = f"master key file {key_file} does not exist: nothing to rotate"
        echo(message)
        return KeyFileRotation("refused", message)
    current_id = keys.master_key_id(current)
    previous = await asyncio.to_thread(_read_key, old_file)
    incoming = await asyncio.to_thread(_read_key, new_file)

    engine = create_engine(database_url)
    try:
        if incoming is not None and keys.master_key_id(incoming) == current_id:
            # A kill after the swap but before the new file was removed.
            if new_is_ours:
                await asyncio.to_thread(new_file.unlink)
            return await _finish_check(engine, current, previous, old_file, batch, echo, progress)

        if incoming is None:
            if previous is not None:
                # The last rotation completed (or was killed after its swap).
                return await _finish_check(
                    engine, current, previous, old_file, batch, echo, progress
                )
            if not new_is_ours:
                message = f"new master key file {new_file} does not exist"
                echo(message)
                return KeyFileRotation("refused", message)
            await asyncio.to_thread(keys.load_or_create_master_key, new_file)
            incoming = await asyncio.to_thread(_read_key, new_file)
            assert incoming is not None
            echo(
                f"generated the new master key {keys.master_key_id(incoming)} in {new_file} "
                "(mode 0600)"
            )
        elif previous is not None and keys.master_key_id(previous) != current_id:
            message = (
                f"{old_file} still holds the key of an earlier rotation: destroy it (once no "
                "backup you keep needs it) before rotating again"
            )
            echo(message)
            return KeyFileRotation("refused", message)

        echo(
            f"rotating master key {current_id} -> {keys.master_key_id(incoming)}; "
            "the bot must be stopped"
        )
        report = await rotate_keys(engine, current, incoming, batch, progress=progress)
        echo(report.summary())
        if not report.complete and not accept_failures:
            message = (
                f"key file NOT swapped: {len(report.failed) + len(report.inbox_failed)} "
                f"row(s) failed; {key_file} still holds the old key and {new_file} the new "
                "one. Cases already rotated need the new key: do not start the bot; fix the "
                "failures (or accept them) and run again"
            )
            echo(message)
            return KeyFileRotation("incomplete", message, report)
        await asyncio.to_thread(_swap_key_files, key_file, new_file, old_file, new_is_ours)
        message = (
            f"{key_file} now holds the new master key {keys.master_key_id(incoming)}; the old "
            f"key is in {old_file}: back up the new key, then destroy {old_file} "
            "(nothing needs it any more)"
        )
        echo(message)
        return KeyFileRotation("rotated", message, report, old_file)
    finally:
        await engine.dispose()


async def _finish_check(
    engine: AsyncEngine,
    current: bytes,
    previous: bytes | None,
    old_file: Path,
    batch: int,
    echo: Echo,
    progress: Callable[[RotationReport], None] | None,
) -> KeyFileRotation:
    """After a swap: re-wrap stragglers still under the previous key, then report."""
    current_id = keys.master_key_id(current)
    report = None
    in_use = await _key_ids_in_use(engine)
    if previous is not None and keys.master_key_id(previous) != current_id:
        previous_id = keys.master_key_id(previous)
        if in_use.get(previous_id):
            echo(f"{in_use[previous_id]} case(s) still under the old key {previous_id}: rotating")
        # Also re-encrypts inbox rows left under the previous derived key, if any.
        report = await rotate_keys(engine, previous, current, batch, progress=progress)
        in_use = await _key_ids_in_use(engine)
    strangers = {kid: n for kid, n in in_use.items() if kid not in {current_id, ""}}
    if strangers or (report is not None and not report.complete):
        detail = ", ".join(f"{n} under {kid}" for kid, n in sorted(strangers.items()))
        message = f"rotation incomplete: cases not under the current key {current_id}: {detail}"
        if report is not None:
            message += "\n" + report.summary()
        echo(message)
        return KeyFileRotation("incomplete", message, report)
    message = f"rotation complete: every case is under the master key {current_id}"
    if previous is not None:
        message += f"; destroy {old_file} (nothing needs it any more)"
    echo(message)
    return KeyFileRotation("already_complete", message, report, old_file if previous else None)


# ============================================================================ verify


@dataclass(frozen=True, slots=True)
class VerifyProblem:
    """One mismatch.  ``kind``: missing, orphan, integrity, size_mismatch,
    hash_mismatch, case_key (the case key does not unwrap), unverifiable (a file of
    such a case) or unreadable (an I/O error)."""

    kind: str
    blob_id: str | None = None
    case_id: str | None = None
    file_id: str | None = None
    chunk_index: int | None = None
    detail: str = ""

    def __str__(self) -> str:
        parts = [self.kind]
        if self.case_id:
            parts.append(f"case {self.case_id}")
        if self.file_id:
            parts.append(f"file {self.file_id}")
        if self.blob_id:
            parts.append(f"blob {self.blob_id}")
        if self.chunk_index is not None:
            parts.append(f"chunk {self.chunk_index}")
        if self.detail:
            parts.append(self.detail)
        return f"{parts[0]}: {', '.join(parts[1:])}" if parts[1:] else parts[0]


@dataclass
class VerifyReport:
    cases_checked: int = 0
    files_checked: int = 0
    files_ok: int = 0
    blobs_in_vault: int = 0
    upload_chunks: int = 0  # blobs of web uploads still going on: theirs, not orphans
    problems: list[VerifyProblem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def format(self) -> str:
        head = (
            f"{self.cases_checked} case(s), {self.files_checked} file(s) checked, "
            f"{self.files_ok} intact; {self.blobs_in_vault} blob(s) in the vault "
            f"({self.upload_chunks} of uploads under way); {len(self.problems)} problem(s)"
        )
        return "\n".join([head, *(f"  {p}" for p in self.problems)])


async def verify_all(
    store: SqlStore,
    vault: Vault,
    keyring: KeyRing,
    *,
    batch: int = 500,
    echo: Echo | None = None,
) -> VerifyReport:
    """Check every file row against its blob and every blob against the rows.

    Never raises for a damaged or missing blob: each is reported as a
    :class:`VerifyProblem` (and passed to *echo* as it is found, if given).
    """
    report = VerifyReport()

    def found(problem: VerifyProblem) -> None:
        report.problems.append(problem)
        if echo is not None:
            echo(str(problem))

    # Case keys first: a case whose key does not unwrap makes its files unverifiable.
    bad_cases: set[str] = set()
    after = ""
    while True:
        async with store.session() as session:
            rows = (
                await session.exec(
                    select(CaseRow.id, CaseRow.wrapped_key)
                    .where(col(CaseRow.id) > after)
                    .order_by(col(CaseRow.id))
                    .limit(batch)
                )
            ).all()
        if not rows:
            break
        for case_id, wrapped in rows:
            after = case_id
            report.cases_checked += 1
            if not wrapped:
                continue  # erased: its files must be gone too (checked below)
            try:
                keyring.case_key(case_id, bytes(wrapped))
            except KeyHandlingError as exc:
                bad_cases.add(case_id)
                found(VerifyProblem("case_key", case_id=case_id, detail=str(exc)))

    referenced: set[str] = set()

    async def check_rows(model: type[FileRow] | type[FileMemberRow]) -> None:
        """Every row of `model` (uploaded files, then files unpacked from ZIPs) in batches."""
        after = ""
        while True:
            async with store.session() as session:
                rows = (
                    await session.exec(
                        select(model, CaseRow.wrapped_key)
                        .join(CaseRow, col(CaseRow.id) == col(model.case_id))
                        .where(col(model.id) > after)
                        .order_by(col(model.id))
                        .limit(batch)
                    )
                ).all()
            if not rows:
                return
            for selected, wrapped in rows:
                row = cast(FileRow | FileMemberRow, selected)  # select() loses the union
                after = row.id
                referenced.add(row.blob_id)
                report.files_checked += 1
                problems = await _verify_file(vault, keyring, row, wrapped, bad_cases)
                for problem in problems:
                    found(problem)
                report.files_ok += not problems

    await check_rows(FileRow)
    await check_rows(FileMemberRow)

    # A web upload's chunks are blobs with no file row until its hand-over: they belong to
    # their session while it exists (the upload sweep removes them with it).
    async with store.reader() as session:
        uploads = set((await session.exec(select(UploadSessionRow.id))).all())

    def _orphans() -> tuple[int, int, list[str]]:
        count, chunks, orphans = 0, 0, []
        for blob_id in vault.iter_blob_ids():
            count += 1
            if blob_id in referenced:
                continue
            if part_session(blob_id) in uploads:
                chunks += 1
            else:
                orphans.append(blob_id)
        return count, chunks, orphans

    report.blobs_in_vault, report.upload_chunks, orphans = await asyncio.to_thread(_orphans)
    for blob_id in orphans:
        found(VerifyProblem("orphan", blob_id=blob_id, detail="no case_files row points to it"))
    return report


async def _verify_file(
    vault: Vault,
    keyring: KeyRing,
    row: FileRow | FileMemberRow,
    wrapped: bytes,
    bad_cases: set[str],
) -> list[VerifyProblem]:
    """The problems of one file row (none if its blob is intact and matches the row)."""

    def problem(kind: str, detail: str = "", chunk: int | None = None) -> VerifyProblem:
        return VerifyProblem(kind, row.blob_id, row.case_id, row.id, chunk, detail)

    if row.case_id in bad_cases:
        return [problem("unverifiable", "case key does not unwrap")]
    if not wrapped:
        return [problem("unverifiable", "case was erased")]
    key = keyring.case_key(row.case_id, bytes(wrapped))
    try:
        info = await asyncio.to_thread(vault.verify, row.blob_id, key)
    except FileNotFoundError:
        return [problem("missing")]
    except BlobIntegrityError as exc:
        detail = "authentication failed (tampered, truncated, swapped or wrong key)"
        return [problem("integrity", detail, exc.chunk_index)]
    except InvalidBlobIdError:
        return [problem("unreadable", "invalid blob id")]
    except OSError as exc:
        return [problem("unreadable", type(exc).__name__)]
    problems = []
    if info.size != row.size:
        problems.append(problem("size_mismatch", f"row {row.size}, blob {info.size}"))
    if info.sha256 != row.sha256:
        problems.append(problem("hash_mismatch"))
    return problems
