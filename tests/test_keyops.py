"""Master key rotation (resumable under kill -9) and the vault-wide verify (adapters.keyops)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import signal
import stat
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from sqlalchemy import update
from sqlmodel import col, select

from adapters.database import create_engine
from adapters.keyops import rotate_keys, rotate_master_key_file, verify_all
from adapters.keyring import KeyRing
from adapters.keys import (
    FieldDecryptError,
    KeyUnwrapError,
    load_or_create_master_key,
    master_key_id,
    new_data_key,
    unwrap_key,
    wrap_key,
    wrapped_key_id,
)
from adapters.migrate import upgrade
from adapters.store import SqlStore, new_id, utcnow
from adapters.tables import CaseRow, FileRow, InboxRow
from adapters.vault import Vault
from core.ports import Patient

ROOT = Path(__file__).resolve().parent.parent
PATIENT_NAME = "Quetzalli Oyelaran-Brzezinska"
SMALL_CHUNK = 4096


@dataclass
class Seeded:
    """What was put in the database and the vault before rotating, to check it after."""

    case_ids: list[str] = field(default_factory=list)
    files: dict[str, tuple[str, str, str]] = field(default_factory=dict)  # id -> case, blob, sha
    inbox: dict[int, str] = field(default_factory=dict)  # update id -> payload


async def seed(
    url: str, master: bytes, vault: Vault, cases: int, files: int = 0, inbox: int = 0
) -> Seeded:
    """Cases made by the real store, blobs by the real vault, inbox rows by store_update."""
    await asyncio.to_thread(upgrade, url)
    ring = KeyRing(master)
    store = SqlStore(create_engine(url), ring)
    seeded = Seeded()
    try:
        for n in range(cases):
            async with store.transaction() as tx:
                case = await tx.create_case(Patient(1000 + n, 1000 + n, "en"), "en")
            seeded.case_ids.append(case.id)
        for n in range(files):
            case_id = seeded.case_ids[n % len(seeded.case_ids)]
            async with store.session() as session:
                wrapped = (await session.get(CaseRow, case_id)).wrapped_key  # type: ignore[union-attr]
            key = ring.case_key(case_id, wrapped)
            body = random.Random(n).randbytes(3 * SMALL_CHUNK + 100 + n)
            blob_id = new_id()

            async def pieces(data: bytes = body) -> object:
                yield data

            info = await vault.write_stream(blob_id, key, pieces())  # type: ignore[arg-type]
            file_id = new_id()
            async with store.session() as session:
                session.add(
                    FileRow(
                        id=file_id,
                        case_id=case_id,
                        item_key="referral",
                        unique_id=f"u{n}",
                        sha256=info.sha256,
                        blob_id=blob_id,
                        size=info.size,
                        kind="pdf",
                        status="accepted",
                        verdict_enc=ring.encrypt_field(case_id, wrapped, "{}", "verdict"),
                        name_enc=ring.encrypt_field(
                            case_id, wrapped, f"{PATIENT_NAME}.pdf", "file-name"
                        ),
                        created_at=utcnow(),
                    )
                )
            seeded.files[file_id] = (case_id, blob_id, hashlib.sha256(body).hexdigest())
        for n in range(inbox):
            payload = f'{{"message": {{"text": "{PATIENT_NAME} #{n}"}}}}'
            assert await store.store_update(5000 + n, 1000 + n, payload)
            seeded.inbox[5000 + n] = payload
    finally:
        await store.engine.dispose()
    return seeded


async def wrapped_keys(url: str) -> dict[str, bytes]:
    engine = create_engine(url)
    try:
        async with engine.connect() as connection:
            rows = (await connection.execute(select(CaseRow.id, CaseRow.wrapped_key))).all()
    finally:
        await engine.dispose()
    return {case_id: bytes(wrapped) for case_id, wrapped in rows}


async def inbox_payloads(url: str) -> dict[int, str]:
    engine = create_engine(url)
    try:
        async with engine.connect() as connection:
            rows = (
                await connection.execute(
                    select(InboxRow.update_id, InboxRow.payload_enc).where(
                        col(InboxRow.payload_enc).is_not(None)
                    )
                )
            ).all()
    finally:
        await engine.dispose()
    return {update_id: token for update_id, token in rows}


async def assert_fully_under(
    url: str, vault: Vault, seeded: Seeded, new: bytes, old: bytes
) -> None:
    """Everything reads with the new master key, nothing with the old one."""
    keys_now = await wrapped_keys(url)
    assert set(keys_now) == set(seeded.case_ids)
    for case_id, wrapped in keys_now.items():
        assert wrapped_key_id(wrapped) == master_key_id(new)
        unwrap_key(new, wrapped, case_id)
        with pytest.raises(KeyUnwrapError):
            unwrap_key(old, wrapped, case_id)
    new_ring, old_ring = KeyRing(new), KeyRing(old)
    for file_id, (case_id, blob_id, sha) in seeded.files.items():
        key = new_ring.case_key(case_id, keys_now[case_id])
        info = await asyncio.to_thread(vault.verify, blob_id, key)  # written before rotation
        assert info.sha256 == sha, file_id
    tokens = await inbox_payloads(url)
    assert set(tokens) == set(seeded.inbox)
    for update_id, token in tokens.items():
        assert new_ring.decrypt_inbox(update_id, token) == seeded.inbox[update_id]
        with pytest.raises(FieldDecryptError):
            old_ring.decrypt_inbox(update_id, token)
    # The whole check through verify_all, with a key ring on the new master only.
    store = SqlStore(create_engine(url), new_ring)
    try:
        engine = store.engine
        async with store.session() as session:
            names = (
                await session.exec(select(FileRow.id, FileRow.case_id, FileRow.name_enc))
            ).all()
        for _file_id, case_id, name_enc in names:
            assert name_enc is not None
            name = new_ring.decrypt_field(case_id, keys_now[case_id], name_enc, "file-name")
            assert name == f"{PATIENT_NAME}.pdf"
        report = await verify_all(store, vault, new_ring)
        assert report.ok, report.format()
        assert report.files_ok == len(seeded.files)
    finally:
        await engine.dispose()


def _key_file(path: Path) -> bytes:
    key, created = load_or_create_master_key(path)
    assert created
    return key


# ----------------------------------------------------------------------------- rotation


async def test_rotation_rewraps_without_touching_blobs(database_url: str, tmp_path: Path) -> None:
    vault = Vault(tmp_path / "vault", chunk_size=SMALL_CHUNK)
    old, new = new_data_key(), new_data_key()
    seeded = await seed(database_url, old, vault, cases=7, files=5, inbox=3)
    blob_bytes = {p: p.read_bytes() for p in vault.blobs_dir.rglob("*") if p.is_file()}

    seen: list[int] = []
    report = await rotate_keys(database_url, old, new, batch=3, progress=lambda r: seen.append(1))
    assert (report.rotated, report.already_rotated, report.failed) == (7, 0, {})
    assert (report.inbox_reencrypted, report.inbox_already, report.inbox_failed) == (3, 0, {})
    assert report.complete and seen
    assert {p: p.read_bytes() for p in vault.blobs_dir.rglob("*") if p.is_file()} == blob_bytes
    await assert_fully_under(database_url, vault, seeded, new, old)

    again = await rotate_keys(database_url, old, new, batch=3)  # idempotent
    assert (again.rotated, again.already_rotated, again.inbox_already) == (0, 7, 3)
    assert again.complete
    await assert_fully_under(database_url, vault, seeded, new, old)

    with pytest.raises(ValueError):
        await rotate_keys(database_url, new, new)


async def test_rotation_reports_foreign_and_erased_keys(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'cc.db'}"
    vault = Vault(tmp_path / "vault")
    old, new, stranger = new_data_key(), new_data_key(), new_data_key()
    seeded = await seed(url, old, vault, cases=4)
    foreign, erased, damaged = seeded.case_ids[:3]
    good = (await wrapped_keys(url))[damaged]
    engine = create_engine(url)
    async with engine.begin() as connection:
        await connection.execute(
            update(CaseRow)
            .where(col(CaseRow.id) == foreign)
            .values(wrapped_key=wrap_key(stranger, new_data_key(), foreign))
        )
        await connection.execute(
            update(CaseRow).where(col(CaseRow.id) == erased).values(wrapped_key=b"")
        )
        await connection.execute(
            update(CaseRow)
            .where(col(CaseRow.id) == damaged)
            .values(wrapped_key=good[:-1] + bytes([good[-1] ^ 1]))
        )
    await engine.dispose()
    report = await rotate_keys(url, old, new)
    assert report.rotated == 1 and report.erased == 1
    assert set(report.failed) == {foreign, damaged}
    assert master_key_id(stranger) in report.failed[foreign]
    assert not report.complete
    assert foreign in report.summary()


async def test_key_file_rotation_and_its_resumption_states(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'cc.db'}"
    vault = Vault(tmp_path / "vault", chunk_size=SMALL_CHUNK)
    key_file = tmp_path / "master.key"
    old = _key_file(key_file)
    seeded = await seed(url, old, vault, cases=5, files=2, inbox=2)
    said: list[str] = []

    result = await rotate_master_key_file(key_file, url, echo=said.append)
    assert result.status == "rotated" and result.ok
    new, _ = load_or_create_master_key(key_file, create=False)
    assert new != old
    assert load_or_create_master_key(tmp_path / "master.key.old", create=False)[0] == old
    assert not (tmp_path / "master.key.new").exists()
    for path in (key_file, tmp_path / "master.key.old"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert any("master.key.old" in line and "destroy" in line for line in said)
    assert not any(old.hex() in line or new.hex() in line for line in said)
    await assert_fully_under(url, vault, seeded, new, old)

    # Run again: the state says it is done; nothing changes, no new key appears.
    again = await rotate_master_key_file(key_file, url, echo=said.append)
    assert again.status == "already_complete"
    assert load_or_create_master_key(key_file, create=False)[0] == new
    assert not (tmp_path / "master.key.new").exists()

    # A new rotation waits until the operator has destroyed the old key.
    (tmp_path / "master.key.old").unlink()
    third = await rotate_master_key_file(key_file, url, echo=said.append)
    assert third.status == "rotated"
    newest, _ = load_or_create_master_key(key_file, create=False)
    await assert_fully_under(url, vault, seeded, newest, new)


async def test_killed_between_rotation_and_swap(tmp_path: Path) -> None:
    """The database already under the new key, the files not swapped yet (or half)."""
    url = f"sqlite:///{tmp_path / 'cc.db'}"
    vault = Vault(tmp_path / "vault", chunk_size=SMALL_CHUNK)
    key_file = tmp_path / "master.key"
    old = _key_file(key_file)
    new = _key_file(tmp_path / "master.key.new")
    seeded = await seed(url, old, vault, cases=4, files=2, inbox=1)
    await rotate_keys(url, old, new)
    # ...and killed after copying the key to .old, before renaming .new over it.
    (tmp_path / "master.key.old").write_bytes(key_file.read_bytes())
    (tmp_path / "master.key.old").chmod(0o600)
    result = await rotate_master_key_file(key_file, url, echo=lambda _: None)
    assert result.status == "rotated"
    assert result.report is not None and result.report.already_rotated == 4
    assert load_or_create_master_key(key_file, create=False)[0] == new
    assert load_or_create_master_key(tmp_path / "master.key.old", create=False)[0] == old
    await assert_fully_under(url, vault, seeded, new, old)


async def test_supplied_new_key_file_and_kill_after_swap(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'cc.db'}"
    vault = Vault(tmp_path / "vault")
    key_file = tmp_path / "master.key"
    old = _key_file(key_file)
    supplied = tmp_path / "from-the-secret-store.key"
    new = _key_file(supplied)
    seeded = await seed(url, old, vault, cases=3)
    result = await rotate_master_key_file(key_file, url, supplied, echo=lambda _: None)
    assert result.status == "rotated"
    assert supplied.exists()  # the operator's file is left alone
    assert load_or_create_master_key(key_file, create=False)[0] == new
    # Same command again (as after a kill right after the swap): recognised as done.
    again = await rotate_master_key_file(key_file, url, supplied, echo=lambda _: None)
    assert again.status == "already_complete"
    await assert_fully_under(url, vault, seeded, new, old)


async def test_cases_left_under_the_old_key_after_the_swap_are_finished(tmp_path: Path) -> None:
    """A bot left running during rotation wrote a case with the old key: the next run fixes it."""
    url = f"sqlite:///{tmp_path / 'cc.db'}"
    vault = Vault(tmp_path / "vault")
    key_file = tmp_path / "master.key"
    old = _key_file(key_file)
    seeded = await seed(url, old, vault, cases=2)
    assert (await rotate_master_key_file(key_file, url, echo=lambda _: None)).ok
    new, _ = load_or_create_master_key(key_file, create=False)
    late = await seed(url, old, vault, cases=0)  # migrations only
    store = SqlStore(create_engine(url), KeyRing(old))
    async with store.transaction() as tx:
        case = await tx.create_case(Patient(77, 77, "en"), "en")
    await store.engine.dispose()
    late.case_ids = [*seeded.case_ids, case.id]
    result = await rotate_master_key_file(key_file, url, echo=lambda _: None)
    assert result.status == "already_complete"
    assert result.report is not None and result.report.rotated == 1
    await assert_fully_under(url, vault, late, new, old)


async def test_failures_keep_the_old_key_file(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'cc.db'}"
    vault = Vault(tmp_path / "vault")
    key_file = tmp_path / "master.key"
    old = _key_file(key_file)
    seeded = await seed(url, old, vault, cases=3)
    engine = create_engine(url)
    async with engine.begin() as connection:
        await connection.execute(
            update(CaseRow)
            .where(col(CaseRow.id) == seeded.case_ids[0])
            .values(wrapped_key=b"\x01" + bytes(64))
        )
    await engine.dispose()
    result = await rotate_master_key_file(key_file, url, echo=lambda _: None)
    assert result.status == "incomplete" and not result.ok
    assert load_or_create_master_key(key_file, create=False)[0] == old
    assert (tmp_path / "master.key.new").exists()
    forced = await rotate_master_key_file(key_file, url, accept_failures=True, echo=lambda _: None)
    assert forced.status == "rotated"


# -------------------------------------------------------------------- kill -9 and resume

_ROTATE_SCRIPT = """
import asyncio, sys
from pathlib import Path
from adapters.keyops import rotate_master_key_file

def tick(report):
    print("batch", flush=True)

asyncio.run(rotate_master_key_file(
    Path(sys.argv[1]), sys.argv[2], batch=1, progress=tick, echo=lambda line: None
))
"""


def _run_and_kill(key_file: Path, url: str, rng: random.Random, target: int) -> bool:
    """Start a rotation, SIGKILL it after *target* batches; True if it had finished."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _ROTATE_SCRIPT, str(key_file), url],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    assert proc.stdout is not None
    for _ in range(target):
        if not proc.stdout.readline():
            break
    # Some kills land right after a commit, others inside the next transaction.
    if target == 0:
        time.sleep(rng.uniform(0.0, 0.8))  # during start-up and key generation
    proc.send_signal(signal.SIGKILL)
    proc.stdout.close()
    return proc.wait() == 0


async def _assert_consistent_midway(url: str, key_file: Path, old: bytes) -> set[str]:
    """After any kill: each case under the old or the new key, and it unwraps with it.

    Returns the key ids the cases carry.
    """
    current, _ = load_or_create_master_key(key_file, create=False)  # never a broken file
    pending = key_file.with_name(key_file.name + ".new")
    candidates = {master_key_id(old): old}
    for path in (key_file, pending):
        if path.exists():
            key, _ = load_or_create_master_key(path, create=False)
            assert stat.S_IMODE(path.stat().st_mode) == 0o600
            candidates[master_key_id(key)] = key
    assert current in candidates.values()
    carried = set()
    for case_id, wrapped in (await wrapped_keys(url)).items():
        carried.add(wrapped_key_id(wrapped))
        unwrap_key(candidates[wrapped_key_id(wrapped)], wrapped, case_id)
    rings = [KeyRing(k) for k in candidates.values()]
    for update_id, token in (await inbox_payloads(url)).items():
        assert any(_decrypts(ring, update_id, token) for ring in rings)
    return carried


def _decrypts(ring: KeyRing, update_id: int, token: str) -> bool:
    try:
        ring.decrypt_inbox(update_id, token)
    except FieldDecryptError:
        return False
    return True


async def test_rotation_killed_at_random_points_then_resumed(
    database_url: str, tmp_path: Path
) -> None:
    vault = Vault(tmp_path / "vault", chunk_size=SMALL_CHUNK)
    key_file = tmp_path / "master.key"
    old = _key_file(key_file)
    seeded = await seed(database_url, old, vault, cases=20, files=4, inbox=8)
    rng = random.Random(int.from_bytes(os.urandom(4), "big"))
    # The first kill lands inside the pass over the cases (one line per batch of one);
    # the others anywhere: start-up, key generation, cases, inbox, swap, or after the end.
    targets = [rng.randint(2, 12), *(rng.randint(0, 30) for _ in range(3))]
    mixed = 0
    for target in targets:
        finished = await asyncio.to_thread(_run_and_kill, key_file, database_url, rng, target)
        carried = await _assert_consistent_midway(database_url, key_file, old)
        mixed += len(carried) == 2 and not finished
    assert mixed >= 1  # at least one kill left some cases under each key
    said: list[str] = []
    result = await rotate_master_key_file(key_file, database_url, echo=said.append)
    assert result.ok, "\n".join(said)
    new, _ = load_or_create_master_key(key_file, create=False)
    assert new != old
    assert not key_file.with_name("master.key.new").exists()
    assert load_or_create_master_key(key_file.with_name("master.key.old"), create=False)[0] == old
    await assert_fully_under(database_url, vault, seeded, new, old)


# ------------------------------------------------------------------------------- verify


async def test_verify_reports_every_kind_of_damage(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'cc.db'}"
    vault = Vault(tmp_path / "vault", chunk_size=SMALL_CHUNK)
    master = new_data_key()
    seeded = await seed(url, master, vault, cases=3, files=7)
    ring = KeyRing(master)
    store = SqlStore(create_engine(url), ring)
    try:
        clean = await verify_all(store, vault, ring)
        assert clean.ok and clean.files_ok == 7 and clean.blobs_in_vault == 7

        files = list(seeded.files.items())
        path = {fid: vault.blobs_dir / blob[:2] / blob for fid, (_, blob, _) in files}
        flipped, truncated, swap_a, swap_b, deleted, resized, intact = (f for f, _ in files)
        assert seeded.files[swap_a][0] != seeded.files[swap_b][0]  # two different cases

        raw = bytearray(path[flipped].read_bytes())
        raw[20 + SMALL_CHUNK + 28 + 100] ^= 0x01  # inside chunk 1
        path[flipped].write_bytes(bytes(raw))
        with path[truncated].open("r+b") as handle:
            handle.truncate(path[truncated].stat().st_size - 50)
        a, b = path[swap_a].read_bytes(), path[swap_b].read_bytes()
        path[swap_a].write_bytes(b)
        path[swap_b].write_bytes(a)
        path[deleted].unlink()
        async with store.session() as session:
            row = await session.get(FileRow, resized)
            assert row is not None
            row.size += 1
            session.add(row)
        orphan = new_id()

        async def one() -> object:
            yield b"stray ciphertext nobody points to"

        await vault.write_stream(orphan, new_data_key(), one())  # type: ignore[arg-type]

        printed: list[str] = []
        report = await verify_all(store, vault, ring, echo=printed.append)
        found = {(p.kind, p.file_id or p.blob_id) for p in report.problems}
        assert found == {
            ("integrity", flipped),
            ("integrity", truncated),
            ("integrity", swap_a),
            ("integrity", swap_b),
            ("missing", deleted),
            ("size_mismatch", resized),
            ("orphan", orphan),
        }
        by_file = {p.file_id: p for p in report.problems}
        assert by_file[flipped].chunk_index == 1
        assert report.files_checked == 7 and report.files_ok == 1 and not report.ok
        assert report.blobs_in_vault == 7  # six rows' blobs remain, plus the orphan
        text = report.format()
        assert intact not in text
        assert len(printed) == 7
        assert PATIENT_NAME not in text and "stray" not in text
    finally:
        await store.engine.dispose()


async def test_verify_reports_a_case_key_that_does_not_unwrap(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'cc.db'}"
    vault = Vault(tmp_path / "vault", chunk_size=SMALL_CHUNK)
    master = new_data_key()
    seeded = await seed(url, master, vault, cases=1, files=1)
    other = KeyRing(new_data_key())  # the wrong master key
    store = SqlStore(create_engine(url), other)
    try:
        report = await verify_all(store, vault, other)
    finally:
        await store.engine.dispose()
    assert {p.kind for p in report.problems} == {"case_key", "unverifiable"}
    assert {p.case_id for p in report.problems} == set(seeded.case_ids)
