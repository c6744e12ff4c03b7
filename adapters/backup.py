"""Online backup and restore of the database and the encrypted vault.

A backup folder holds::

    manifest.json                     format, database kind, schema revision, SHA-256 of
                                      every other file
    database.sqlite | database.pgdump the database (SQLite online backup API, or pg_dump -Fc)
    vault/blobs/<2>/<blob id>         the encrypted blobs, copied as they are

The database is copied first and the blobs after: blobs are immutable once written, so
every row in the copy finds its blob, and blobs written meanwhile are harmless extras
(restore leaves out those no row points to). All but erasures: a case erased while the backup
runs is whole in the database copy, but its blobs may be gone before they are copied. The
manifest names the cases the live database says were erased since just before the backup
began, and restore completes their erasure before it brings back any blob: a patient's
erasure is never undone by a restore, and the restored files all check out. The master key is
never copied: a backup is ciphertext only, and useless without the key kept apart.
"""

from __future__ import annotations

import asyncio
import glob
import hashlib
import json
import os
import re
import shutil
import sqlite3
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import BinaryIO

from sqlalchemy import inspect
from sqlalchemy.engine import make_url
from sqlmodel import col, select

from adapters import keys
from adapters.audit import CASE_ID_RE
from adapters.database import create_engine, is_sqlite
from adapters.durable import fsync_dir
from adapters.erasure import Eraser
from adapters.keyops import VerifyReport, verify_all
from adapters.keyring import KeyRing
from adapters.migrate import current_revision, refuse_unknown, upgrade
from adapters.store import SqlStore
from adapters.tables import AuditRow, CaseRow, FileMemberRow, FileRow
from adapters.vault import Vault

Echo = Callable[[str], None]

FORMAT = "care-companion-backup/1"
MANIFEST = "manifest.json"
SQLITE_FILE = "database.sqlite"
PG_FILE = "database.pgdump"
BLOBS = "vault/blobs"
KEY_NOT_INCLUDED = (
    "the master key is not in the backup: keep it apart, without it nothing can be restored"
)
# The only names a manifest may give besides the database's: never a path outside the target.
_BLOB_PATH = re.compile(r"vault/blobs/([A-Za-z0-9_-]{2})/([A-Za-z0-9_-]{8,128})")
_COPY_PIECE = 1 << 20
# How long before the backup began an erasure counts as "while it ran": the audit's times come
# from the clocks of the machines that erased, which may be a little off this one's. A case
# erased before the copy is erased in it too (restore then has nothing to do for it).
ERASURE_SLACK = timedelta(minutes=10)
ERASED_DURING = "erased_during"  # the manifest's list of those cases


class BackupError(Exception):
    """One clear line: why the backup or restore was refused or failed."""


@dataclass(frozen=True)
class RestoreResult:
    files: int
    blobs: int
    left_out: int  # blobs in the backup that no row points to
    report: VerifyReport
    erased: int = 0  # cases erased while the backup ran, their erasure completed here


# ----------------------------------------------------------------------------- files


def _private_dirs(path: Path) -> None:
    """`mkdir -p` making every new folder 0700 (mkdir's parents=True uses the umask's mode)."""
    if not path.is_dir():
        _private_dirs(path.parent)
        path.mkdir(mode=0o700, exist_ok=True)


def _private_file(path: Path) -> BinaryIO:
    """A new file only we can read (0600); refuses to replace an existing one."""
    _private_dirs(path.parent)
    return os.fdopen(
        os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600), "wb"
    )


def _copy_private(source: Path, target: Path) -> str:
    """Copy *source* to a new 0600 *target*, fsynced; the SHA-256 of what was written."""
    digest = hashlib.sha256()
    with source.open("rb") as reader, _private_file(target) as writer:
        while piece := reader.read(_COPY_PIECE):
            digest.update(piece)
            writer.write(piece)
        writer.flush()
        os.fsync(writer.fileno())
    return digest.hexdigest()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as reader:
        while piece := reader.read(_COPY_PIECE):
            digest.update(piece)
    return digest.hexdigest()


def _fsync_tree(root: Path) -> None:
    """Make every file name created under *root* durable."""
    for directory, _, _ in os.walk(root):
        fsync_dir(Path(directory))


def _files_under(root: Path) -> Iterator[str]:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            yield path.relative_to(root).as_posix()


def _blob_ids(vault_root: Path) -> Iterator[str]:
    # Vault() would create a missing vault: nothing to list then.
    return Vault(vault_root).iter_blob_ids() if (vault_root / "blobs").is_dir() else iter(())


def _sqlite_path(database_url: str) -> Path:
    database = make_url(database_url).database
    if not database or database == ":memory:":
        raise BackupError("DATABASE_URL names no SQLite file to back up or restore")
    return Path(database)


# ------------------------------------------------------------------------- PostgreSQL


def find_pg_tool(name: str) -> str | None:
    """pg_dump / pg_restore on PATH, else the newest under /usr/lib/postgresql/*/bin (Debian
    installs them there; a newer client reads and writes older servers' dumps)."""
    found = shutil.which(name)
    if found:
        return found
    candidates = glob.glob(f"/usr/lib/postgresql/*/bin/{name}")

    def major(path: str) -> int:
        version = Path(path).parent.parent.name
        return int(version) if version.isdigit() else 0

    return max(candidates, key=major) if candidates else None


def _pg_tool(name: str) -> str:
    tool = find_pg_tool(name)
    if tool is None:
        raise BackupError(
            f"{name} is not installed (looked on PATH and in /usr/lib/postgresql/*/bin): install "
            "the PostgreSQL client tools of the server's major version (Debian: apt-get install "
            "postgresql-client), or follow the README's manual steps (pg_dump -Fc, then copy "
            "DATA_DIR/vault/blobs)"
        )
    return tool


def _pg_run(tool: str, args: list[str], database_url: str, stdout: BinaryIO | None) -> None:
    """Run a PostgreSQL client tool; the password goes in the environment, not in `ps`."""
    url = make_url(database_url).set(drivername="postgresql")
    env = {**os.environ, **({"PGPASSWORD": url.password} if url.password else {})}
    dsn = url.set(password=None).render_as_string(hide_password=False)
    result = subprocess.run(  # noqa: S603 - fixed tool, our arguments
        [_pg_tool(tool), *args, "--dbname", dsn],
        stdout=stdout,
        stderr=subprocess.PIPE,
        env=env,
        check=False,
    )
    if result.returncode != 0:
        lines = result.stderr.decode(errors="replace").strip().splitlines()
        raise BackupError(f"{tool} failed: {lines[-1] if lines else f'exit {result.returncode}'}")


async def _table_names(database_url: str) -> list[str]:
    engine = create_engine(database_url, readonly=True)
    try:
        async with engine.connect() as connection:
            return await connection.run_sync(lambda sync: inspect(sync).get_table_names())
    finally:
        await engine.dispose()


# ----------------------------------------------------------------------------- backup


def _dump_database(database_url: str, dest: Path) -> str:
    """A consistent copy of the database into *dest*; the file name it wrote."""
    if is_sqlite(database_url):
        source_path = _sqlite_path(database_url)
        if not source_path.is_file():
            raise BackupError(f"no database at {source_path}: nothing to back up")
        _private_file(dest / SQLITE_FILE).close()  # 0600 before SQLite writes into it
        source = sqlite3.connect(source_path)
        target = sqlite3.connect(dest / SQLITE_FILE)
        try:
            # One step (pages=-1) under one read transaction: a snapshot, while the bot
            # keeps writing through WAL.
            source.backup(target)
        finally:
            target.close()
            source.close()
        with (dest / SQLITE_FILE).open("rb+") as handle:
            os.fsync(handle.fileno())
        return SQLITE_FILE
    # pg_dump reads one snapshot (a repeatable-read transaction) while the bot runs.
    with _private_file(dest / PG_FILE) as out:
        _pg_run("pg_dump", ["--format=custom", "--no-owner", "--no-privileges"], database_url, out)
        out.flush()
        os.fsync(out.fileno())
    return PG_FILE


async def backup(database_url: str, vault_root: Path, dest: Path, echo: Echo = print) -> int:
    """Back up the database, then the vault's blobs, into the empty folder *dest*.

    Returns the number of files written besides the manifest. Safe while the bot runs.
    """
    dest = Path(dest)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise BackupError(f"{dest} is not an empty folder: choose a new one")
    if not is_sqlite(database_url):
        _pg_tool("pg_dump")  # missing: say so before making anything
    _private_dirs(dest)
    dest.chmod(0o700)  # an empty folder the operator made
    revision = await current_revision(database_url)
    kind = "sqlite" if is_sqlite(database_url) else "postgresql"
    began = datetime.now(UTC)
    echo(f"copying the {kind} database (schema {revision})")
    database_file = await asyncio.to_thread(_dump_database, database_url, dest)
    files = {database_file: await asyncio.to_thread(_sha256, dest / database_file)}

    def copy_blobs() -> int:
        vanished = 0
        for blob_id in _blob_ids(vault_root):
            relative = f"{BLOBS}/{blob_id[:2]}/{blob_id}"
            try:
                files[relative] = _copy_private(
                    vault_root / "blobs" / blob_id[:2] / blob_id, dest / relative
                )
            except FileNotFoundError:
                vanished += 1  # erased since it was listed: its case was erased too
        return vanished

    vanished = await asyncio.to_thread(copy_blobs)
    blobs = len(files) - 1
    echo(f"copied {blobs} encrypted blob(s)")
    if vanished:
        echo(f"{vanished} blob(s) were erased while copying (their cases were being erased)")
    erased = await _erased_since(database_url, began - ERASURE_SLACK)
    if erased:
        echo(f"{len(erased)} case(s) were erased while the backup ran: restore erases them too")
    manifest = {
        "format": FORMAT,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "database": kind,
        "schema": revision,
        "files": files,
        ERASED_DURING: erased,
    }
    with _private_file(dest / MANIFEST) as out:
        out.write(json.dumps(manifest, indent=1, sort_keys=True).encode())
        out.flush()
        os.fsync(out.fileno())
    await asyncio.to_thread(_fsync_tree, dest)
    echo(f"backup written to {dest}: {len(files)} file(s), their SHA-256 in {MANIFEST}")
    echo(KEY_NOT_INCLUDED)
    return len(files)


async def _erased_since(database_url: str, since: datetime) -> list[str]:
    """Ids of the cases the live database's audit says were erased at or after `since`."""
    query = select(AuditRow.case_id).where(
        col(AuditRow.action) == "case.erase", col(AuditRow.at) >= since
    )
    engine = create_engine(database_url, readonly=True)
    try:
        async with engine.connect() as connection:
            rows = await connection.execute(query)
            return sorted({case_id for (case_id,) in rows if case_id})
    finally:
        await engine.dispose()


# ---------------------------------------------------------------------------- restore


def _read_manifest(src: Path, kind: str) -> tuple[dict[str, str], list[str]]:
    """The manifest's file list, every name safe and every file matching its checksum, and
    the cases erased while the backup ran."""
    try:
        manifest = json.loads((src / MANIFEST).read_text())
    except (OSError, ValueError) as exc:
        raise BackupError(f"{src / MANIFEST} is missing or unreadable: not a backup") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BackupError(f"{src / MANIFEST} is not a care-companion backup manifest")
    if manifest.get("database") != kind:
        raise BackupError(
            f"the backup holds a {manifest.get('database')} database but DATABASE_URL is {kind}"
        )
    refuse_unknown(manifest.get("schema"))
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise BackupError(f"{src / MANIFEST} lists no files")
    database_file = SQLITE_FILE if kind == "sqlite" else PG_FILE
    if database_file not in files:
        raise BackupError(f"the backup has no {database_file}")
    for name in files:
        if name != database_file and not _valid_blob_path(name):
            raise BackupError(f"the manifest names an unexpected file {name!r}: refused")
    unlisted = set(_files_under(src)) - set(files) - {MANIFEST}
    if unlisted:
        raise BackupError(f"{min(unlisted)} is in the backup but not in its manifest: refused")
    erased = manifest.get(ERASED_DURING, [])  # none in a backup made before they were listed
    if not isinstance(erased, list) or not all(
        isinstance(case_id, str) and CASE_ID_RE.fullmatch(case_id) for case_id in erased
    ):
        raise BackupError(f"{src / MANIFEST} lists erased cases that are not case ids: refused")
    for name, expected in sorted(files.items()):
        path = src / name
        if not path.is_file():
            raise BackupError(f"{name} is listed in the manifest but missing: refused")
        if _sha256(path) != expected:
            raise BackupError(f"{name} does not match its checksum in the manifest: refused")
    return files, erased


def _valid_blob_path(name: str) -> bool:
    match = _BLOB_PATH.fullmatch(name)
    return match is not None and match[2][:2] == match[1]  # the shard the vault expects


def _restore_file(src: Path, name: str, target: Path, expected: str) -> None:
    """Copy one checked file into place, checking it again as it is read (the backup
    folder could have changed since the manifest check)."""
    if _copy_private(src / name, target) != expected:
        raise BackupError(f"{name} changed while it was restored: clear DATA_DIR and run again")


async def _referenced_blobs(store: SqlStore) -> set[str]:
    async with store.session() as session:
        files = (await session.exec(select(FileRow.blob_id))).all()
        members = (await session.exec(select(FileMemberRow.blob_id))).all()
    return {*files, *members}


async def _complete_erasures(store: SqlStore, vault: Vault, case_ids: list[str]) -> int:
    """Erase the cases erased while the backup ran (whole in its database copy), then
    finish every erasure under way in the copy: none of their blobs is brought back.
    Returns how many cases were erased here."""
    erased = 0
    for case_id in case_ids:
        async with store.transaction() as tx:
            case = await tx.session.get(CaseRow, case_id)
            if case is None or case.state == "erased":
                continue  # erased before the copy was taken (the slack), or never restored
            await tx.erase_case(case_id, None, operator="erased while the backup ran")
            erased += 1
    await Eraser(store, vault).finish_pending()
    return erased


async def restore(
    database_url: str, vault_root: Path, key_file: Path, src: Path, echo: Echo = print
) -> RestoreResult:
    """Restore the backup in *src* into an empty database and vault, then verify it all."""
    src = Path(src)
    kind = "sqlite" if is_sqlite(database_url) else "postgresql"
    try:
        master, _ = keys.load_or_create_master_key(key_file, create=False)
    except keys.KeyFileError as exc:
        raise BackupError(str(exc)) from None  # put the key in place first, then restore
    if kind == "sqlite":
        target = _sqlite_path(database_url)
        if target.exists():
            raise BackupError(f"a database already exists at {target}: restore needs none")
    else:
        _pg_tool("pg_restore")  # missing: say so before anything else
        if await _table_names(database_url):
            raise BackupError(
                "the configured PostgreSQL database is not empty: restore needs it empty"
            )
    if next(_blob_ids(vault_root), None) is not None:
        raise BackupError(f"{vault_root} already holds blobs: restore needs an empty vault")

    files, erased_during = await asyncio.to_thread(_read_manifest, src, kind)
    echo(f"checked {len(files)} file(s) against the manifest: all match")

    # The database first: its rows say which blobs to bring back.
    if kind == "sqlite":
        await asyncio.to_thread(_restore_file, src, SQLITE_FILE, target, files[SQLITE_FILE])
    else:
        args = ["--exit-on-error", "--single-transaction", "--no-owner", "--no-privileges"]
        await asyncio.to_thread(
            _pg_run, "pg_restore", [*args, str(src / PG_FILE)], database_url, None
        )
    await asyncio.to_thread(upgrade, database_url)  # an older backup: bring it to this code

    ring = KeyRing(master)
    store = SqlStore(create_engine(database_url), ring)
    try:
        _private_dirs(vault_root.parent)  # Vault() makes only its own folders
        vault = Vault(vault_root)
        erased = await _complete_erasures(store, vault, erased_during)
        if erased:
            echo(f"erased {erased} case(s) again: they were erased while the backup ran")
        wanted = await _referenced_blobs(store)
        in_backup = {m[2]: name for name in files if (m := _BLOB_PATH.fullmatch(name))}

        def copy_blobs() -> int:
            count = 0
            for blob_id, name in sorted(in_backup.items()):
                if blob_id not in wanted:
                    continue
                _restore_file(src, name, vault.blobs_dir / blob_id[:2] / blob_id, files[name])
                count += 1
            _fsync_tree(vault.blobs_dir)
            return count

        blobs = await asyncio.to_thread(copy_blobs)
        left_out = len(in_backup) - blobs
        echo(f"restored the database and {blobs} encrypted blob(s)")
        if left_out:
            echo(f"left out {left_out} blob(s) no record points to (written during the backup)")
        report = await verify_all(store, vault, ring)
    finally:
        await store.engine.dispose()
    return RestoreResult(len(files), blobs, left_out, report, erased)
