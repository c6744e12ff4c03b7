"""Web uploads: one-time links bound to a case and an item, chunks streamed into the vault.

A link carries a random token; only its SHA-256 is stored (`upload_sessions.token_hash`), so
the database alone cannot open anyone's upload page. The patient's file list (names are
personal data) is stored encrypted with the case key, bound to the session id.

An upload is one byte stream: the declared files one after the other, in the order given.
It travels in chunks of the session's part size (PART_SIZE unless UPLOAD_PART_BYTES says
otherwise; the last chunk shorter), whatever the files' sizes: a CD of 5,000 small scans is a
few hundred large requests, not 5,000 small ones, and a chunk may hold the end of one file
and the start of the next. Each chunk becomes its own vault blob, encrypted by the vault
and in place (written, renamed) before the chunk is acknowledged, but not fsynced: a part is
never the durable record of a patient's file (the hand-over copies it into the case's own
fsynced blobs before the patient is told anything), and an fsync per chunk would bind the
upload to the disk's durable write speed. A crash of the bot's process keeps every
acknowledged part (its pages stay in the OS's cache); only a crash of the machine can lose or
damage one, so a part this store did not write itself (or has not checked since it began) is
trusted only once every one of its chunks' tags verifies: when the page asks what is stored
(status, the file list, a chunk sent again, finish) and before the hand-over. A part that is
missing, short or fails its tags is deleted and reported missing, so the page sends it again;
a hand-over that finds one puts the session back to waiting for it. The vault is thus the
progress record: a chunk was received exactly when its blob exists and is trusted, so a
restart, a dropped connection or a reload can never disagree with what is on disk, and there
is no write to the database per chunk.

Part blob ids are ``u<session id>-<layout>-<chunk>``. The layout number changes whenever the
declared list does (then the stream's bytes move, and the old parts are dropped); a chunk
sent for an older layout is refused, or at worst stored under the old number and never
read. All parts of a session share a prefix (and a shard directory), so they can be found
and removed even when the manifest can no longer be read (the case was crypto-erased).

When every chunk is in, the files are handed to the normal intake (bot.upload does that with
`ConversationService.handle_file`) as streams that decrypt the parts in 1 MiB pieces: a
folder (a CD copy) becomes one ZIP built on the fly, so the intake sees it exactly as a
zipped CD sent in the chat; single files go as they are. Nothing is ever held whole in
memory and no plaintext touches the disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import re
import threading
import zipfile
from collections import OrderedDict
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from sqlalchemy import update
from sqlmodel import col, func, select

from adapters.keyring import KeyRing
from adapters.store import SqlStore, aware, token_hash, utcnow
from adapters.tables import CaseRow, FileRow, UploadSessionRow
from adapters.vault import BlobIntegrityError, BlobReader, Vault
from intake import limits

log = logging.getLogger(__name__)

# Plaintext per chunk: a PUT body, and one blob (one authorisation, one rename) each. 16 MiB
# keeps those few per byte (bench/upload_bench.py) and every request well under a reverse
# proxy's usual body limit (nginx: client_max_body_size 20m); the page holds only slices of
# the picked files, never a chunk's bytes, and sends 3 chunks at a time.
PART_SIZE = 16 * 1024 * 1024
MIN_PART_SIZE, MAX_PART_SIZE = 16 * 1024, 64 * 1024 * 1024  # UPLOAD_PART_BYTES bounds
PIECE = 1 << 20  # request bodies are read, and parts decrypted, in pieces of this size
MAX_FILES = limits.MAX_ZIP_ENTRIES  # a folder becomes one ZIP: the intake's own limits apply
MAX_PATH = limits.MAX_ZIP_NAME
MAX_MIME = 128
# More single files than this are handed over as one ZIP too: 300 scans picked one by one are
# still one CD to the intake, not 300 chat messages (and the imaging item takes 200 at most).
MAX_LOOSE_FILES = 10
# Finished and expired sessions stay this long, so their link shows "used" or "expired"
# instead of "not valid"; the file list is scrubbed as soon as they finish.
LINGER = timedelta(days=30)
MANIFEST_CACHE = 32  # decrypted file lists kept in memory (uploads going on at once)
# Part ids this store wrote or verified, the newest kept: a 4 GiB upload in 16 MiB parts is
# 256 of them. One forgotten is only verified again when next asked about.
TRUSTED_PARTS = 65_536
# A hand-over that found a part damaged reopens its session for at least this long, even
# past the link's time: the patient did nothing wrong and must be able to send it again.
REOPEN_GRACE = timedelta(hours=24)

OPEN, FINISHING, COMPLETE, EXPIRED = "open", "finishing", "complete", "expired"

_TOKEN = re.compile(r"[A-Za-z0-9_-]{32,64}")
_PART_ID = re.compile(r"u([0-9a-f]{1,32})-\d+-\d+")  # part_blob_id
_MIME = re.compile(r"[A-Za-z0-9!#$&^_.+-]+/[A-Za-z0-9!#$&^_.+-]+")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class UploadRefused(Exception):  # a refusal shown to the patient, not a fault
    """A request the upload cannot take. `reason` picks the message the patient sees
    (invalid, expired, used, too_big, not_ready, bad_request); `locale` is the case's
    language when the session was found, so a refusal page can speak it."""

    def __init__(self, reason: str, detail: str = "", locale: str | None = None) -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.locale = locale


class ChunkBody(Protocol):
    """A chunk's request body, read into the caller's buffers (see bot.upload)."""

    async def readinto(self, buffer: memoryview) -> int:
        """Put the body's next bytes at the start of `buffer` and return how many (at least
        one, at most len(buffer)); 0 once the body has ended. UploadRefused if the body
        is longer than the request declared."""
        ...


@dataclass(frozen=True)
class ManifestFile:
    """One file the page declared, at `offset` in the upload's stream. `path` is the
    browser's relative path: data only, never used as a path on disk."""

    path: str
    size: int
    mime: str | None
    modified: int  # milliseconds since the epoch, as the browser reports it
    offset: int

    @property
    def in_folder(self) -> bool:
        return "/" in self.path

    def fingerprint(self) -> tuple[str, int, int]:
        """The same file picked again after a reload: same path, size and modification time."""
        return self.path, self.size, self.modified


@dataclass(frozen=True)
class UploadSession:
    id: str
    case_id: str
    item_key: str
    chat_id: int
    state: str
    expires_at: datetime
    handed: int
    files: tuple[ManifestFile, ...]
    layout: int  # changes with the declared list; part blob ids carry it
    part_size: int
    key: bytes  # the case's data key: parts and manifest are encrypted under it
    locale: str
    checklist_key: str | None

    @property
    def total_bytes(self) -> int:
        """The stream's length: every declared file once."""
        return self.files[-1].offset + self.files[-1].size if self.files else 0

    @property
    def chunks(self) -> int:
        return -(-self.total_bytes // self.part_size) if self.files else 0

    def chunk_length(self, index: int) -> int:
        return min(self.part_size, self.total_bytes - index * self.part_size)

    def part(self, index: int) -> str:
        return part_blob_id(self.id, self.layout, index)


@dataclass(frozen=True)
class _Manifest:
    files: tuple[ManifestFile, ...]
    layout: int
    part_size: int


@dataclass(frozen=True)
class HandoverUnit:
    """What the intake receives as one file: a single file, or several as one ZIP."""

    index: int
    name: str
    mime: str | None
    files: tuple[ManifestFile, ...]
    zipped: bool


def part_blob_id(session_id: str, layout: int, index: int) -> str:
    return f"u{session_id}-{layout}-{index}"


def part_session(blob_id: str) -> str | None:
    """The upload session a blob is a chunk of (see part_blob_id), None for a case file's."""
    match = _PART_ID.fullmatch(blob_id)
    return match.group(1) if match else None


def _clean_path(raw: object) -> str:
    """The browser's relative path, normalised as text: forward slashes, no empty, "." or
    ".." segments, no control characters. It names a ZIP member at most, never a file."""
    if not isinstance(raw, str):
        raise UploadRefused("bad_request", "path")
    parts = [
        _CONTROL.sub("", part).strip()
        for part in raw.replace("\\", "/").split("/")
        if part not in ("", ".", "..")
    ]
    path = "/".join(part for part in parts if part)
    if not path or len(path) > MAX_PATH:
        raise UploadRefused("bad_request", "path")
    return path


def parse_manifest(entries: object) -> list[tuple[str, int, str | None, int]]:
    """(path, size, mime, modified) of each declared file; UploadRefused if malformed."""
    if not isinstance(entries, list) or not 0 < len(entries) <= MAX_FILES:
        raise UploadRefused("bad_request", "files")
    parsed = []
    for entry in entries:
        if not isinstance(entry, dict):
            raise UploadRefused("bad_request", "entry")
        size, modified, mime = entry.get("size"), entry.get("modified", 0), entry.get("type")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise UploadRefused("bad_request", "size")
        if not isinstance(modified, int | float) or isinstance(modified, bool):
            raise UploadRefused("bad_request", "modified")
        if not -1e14 < modified < 1e14:  # milliseconds: about 3,000 years either way
            raise UploadRefused("bad_request", "modified")
        if not (isinstance(mime, str) and len(mime) <= MAX_MIME and _MIME.fullmatch(mime)):
            mime = None  # the intake sniffs the content anyway
        parsed.append((_clean_path(entry.get("path")), size, mime, int(modified)))
    return parsed


def plan_handover(files: Sequence[ManifestFile]) -> list[HandoverUnit]:
    """How the files reach the intake: each picked folder as one ZIP named after it (the CD
    copy, as if zipped and sent in the chat); single files one by one, or as one ZIP when
    there are more than MAX_LOOSE_FILES of them. Deterministic, so a resumed hand-over
    numbers the units the same way."""
    folders: dict[str, list[ManifestFile]] = {}
    loose: list[ManifestFile] = []
    for file in files:
        if file.in_folder:
            folders.setdefault(file.path.split("/", 1)[0], []).append(file)
        else:
            loose.append(file)
    units: list[HandoverUnit] = []
    for folder, members in folders.items():
        units.append(
            HandoverUnit(len(units), f"{folder}.zip", "application/zip", tuple(members), True)
        )
    if len(loose) > MAX_LOOSE_FILES:
        units.append(HandoverUnit(len(units), "files.zip", "application/zip", tuple(loose), True))
    else:
        for file in loose:
            units.append(HandoverUnit(len(units), file.path, file.mime, (file,), False))
    return units


def _member_name(file: ManifestFile, taken: set[str]) -> str:
    """The file's name inside the ZIP: its path below the picked folder, made unique."""
    name = file.path.split("/", 1)[1] if file.in_folder else file.path
    candidate, n = name, 1
    while candidate in taken:
        candidate, n = f"{n}_{name}", n + 1
    taken.add(candidate)
    return candidate


def _zip_time(modified_ms: int) -> tuple[int, int, int, int, int, int]:
    seconds = min(max(modified_ms / 1000, 315_532_800), 4_354_819_199)  # ZIP: 1980..2107
    moment = datetime.fromtimestamp(seconds, UTC)
    return moment.year, moment.month, moment.day, moment.hour, moment.minute, moment.second


class _Spool:
    """Where zipfile writes: a buffer drained after every piece. No seek(), so zipfile
    writes data descriptors instead of going back to patch headers."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._position = 0

    def write(self, data: bytes) -> int:
        self._buffer += data
        self._position += len(data)
        return len(data)

    def tell(self) -> int:
        return self._position

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass

    def take(self) -> bytes:
        data = bytes(self._buffer)
        self._buffer.clear()
        return data


class UploadStore:
    """Upload sessions in the SQL store, their chunks in the vault."""

    def __init__(
        self, store: SqlStore, vault: Vault, keys: KeyRing, part_size: int = PART_SIZE
    ) -> None:
        if not MIN_PART_SIZE <= part_size <= MAX_PART_SIZE:
            raise ValueError(f"part size must be {MIN_PART_SIZE}..{MAX_PART_SIZE} bytes")
        self._store = store
        self._vault = vault
        self._keys = keys
        self._part_size = part_size  # for a newly declared list; a session keeps its own
        self._manifests: OrderedDict[str, tuple[str, _Manifest]] = OrderedDict()
        # Parts known good (see the module's docstring): touched from worker threads too.
        self._trusted: OrderedDict[str, None] = OrderedDict()
        self._trusted_lock = threading.Lock()
        # One check of an untrusted part at a time, so a check that found a part damaged
        # never deletes a good copy another request wrote under its name meanwhile.
        self._checking = threading.Lock()

    # -- sessions --------------------------------------------------------------------

    async def create(self, case_id: str, item_key: str, chat_id: int, ttl: timedelta) -> str:
        """A new session for this case and item; returns the link's token (stored hashed)."""
        async with self._store.transaction() as tx:
            token = await tx.open_upload(case_id, item_key, chat_id, ttl)
        if token is None:
            raise UploadRefused("invalid", "no such case for this chat")
        return token

    async def by_token(self, token: str, complete_ok: bool = False) -> UploadSession:
        """The session of a link; UploadRefused unless it is open (or `complete_ok` and
        complete: the page asks how its own hand-over ended)."""
        if not _TOKEN.fullmatch(token):
            raise UploadRefused("invalid")
        query = self._joined().where(UploadSessionRow.token_hash == token_hash(token))
        async with self._store.reader() as session:
            found = (await session.exec(query)).first()
        if found is None:
            raise UploadRefused("invalid")
        row, case = found
        return self._session(row, case, complete_ok=complete_ok)

    async def for_chat(
        self, case_id: str, chat_id: int, complete_ok: bool = False
    ) -> UploadSession:
        """The chat's newest usable session for the case (the Mini App has no token)."""
        query = (
            self._joined()
            .where(UploadSessionRow.case_id == case_id, UploadSessionRow.chat_id == chat_id)
            .order_by(col(UploadSessionRow.created_at).desc())
        )
        async with self._store.reader() as session:
            rows = (await session.exec(query)).all()
        refusal = UploadRefused("invalid")
        for row, case in rows:
            try:
                return self._session(row, case, complete_ok=complete_ok)
            except UploadRefused as exc:  # the newest refusal says why ("used", "expired")
                refusal = refusal if refusal.reason != "invalid" else exc
        raise refusal

    async def get(self, session_id: str) -> UploadSession:
        query = self._joined().where(UploadSessionRow.id == session_id)
        async with self._store.reader() as session:
            found = (await session.exec(query)).first()
        if found is None:
            raise UploadRefused("invalid")
        row, case = found
        return self._session(row, case, check=False)

    def _joined(self) -> Any:
        return select(UploadSessionRow, CaseRow).join(
            CaseRow, col(CaseRow.id) == col(UploadSessionRow.case_id), isouter=True
        )

    def _session(
        self,
        row: UploadSessionRow,
        case: CaseRow | None,
        check: bool = True,
        complete_ok: bool = False,
    ) -> UploadSession:
        if case is None or case.chat_id != row.chat_id or not case.wrapped_key:
            raise UploadRefused("invalid", "case gone")
        if check:
            if row.state == COMPLETE and not complete_ok:
                raise UploadRefused("used", locale=case.locale)
            expired = row.state == OPEN and aware(row.expires_at) <= utcnow()
            if row.state == EXPIRED or expired:
                raise UploadRefused("expired", locale=case.locale)
        key = self._keys.case_key(case.id, case.wrapped_key)
        manifest = self._manifest(row, case)
        return UploadSession(
            row.id,
            row.case_id,
            row.item_key,
            row.chat_id,
            row.state,
            aware(row.expires_at),
            row.handed,
            manifest.files,
            manifest.layout,
            manifest.part_size,
            key,
            case.locale,
            case.checklist_key,
        )

    def _manifest(self, row: UploadSessionRow, case: CaseRow) -> _Manifest:
        """The decrypted file list. Every chunk's request needs it, and a CD's list runs to
        thousands of names: the last few are kept decrypted, keyed by their ciphertext."""
        if not row.manifest_enc:
            return _Manifest((), 0, self._part_size)
        cached = self._manifests.get(row.id)
        if cached is not None and cached[0] == row.manifest_enc:
            self._manifests.move_to_end(row.id)
            return cached[1]
        context = _field(row.id)
        plain = json.loads(
            self._keys.decrypt_field(case.id, case.wrapped_key, row.manifest_enc, context)
        )
        if "layout" in plain:
            files = tuple(ManifestFile(*entry) for entry in plain["files"])
            manifest = _Manifest(files, plain["layout"], plain["part"])
        else:
            # A list declared before uploads were one stream: the page declares it again.
            # Its parts were u<session>-<file id>-<chunk>, file ids below "next": the new
            # layout numbers start above them, so an old part never passes for a new one
            # (and declaring drops them all).
            manifest = _Manifest((), plain["next"], self._part_size)
        self._manifests[row.id] = (row.manifest_enc, manifest)
        while len(self._manifests) > MANIFEST_CACHE:
            self._manifests.popitem(last=False)
        return manifest

    async def set_files(
        self, upload: UploadSession, entries: object, max_case_bytes: int
    ) -> tuple[UploadSession, list[int]]:
        """Declare the files to upload (again, after a reload); returns the session and the
        offset of each entry in the stream, in the order given. The same list again (the
        same files, by path, size and time, in the same order) keeps the layout and every
        chunk already stored; any other list is a new layout, and the old chunks go."""
        files: dict[tuple[str, int, int], ManifestFile] = {}
        offset = 0
        parsed = parse_manifest(entries)
        for path, size, mime, modified in parsed:
            fingerprint = (path, size, modified)
            if fingerprint not in files:  # the same file twice in one pick is sent once
                files[fingerprint] = ManifestFile(path, size, mime, modified, offset)
                offset += size
        listing = tuple(files.values())
        offsets = [files[(path, size, modified)].offset for path, size, _, modified in parsed]
        same = listing == upload.files
        layout = upload.layout if same else upload.layout + 1
        part_size = upload.part_size if same else self._part_size
        async with self._store.transaction() as tx:
            query = select(UploadSessionRow).where(UploadSessionRow.id == upload.id)
            if tx.for_update:
                query = query.with_for_update()
            row = (await tx.session.exec(query)).one()
            if row.state != OPEN:
                raise UploadRefused("used" if row.state == COMPLETE else "not_ready")
            if row.handed and not same:
                # Some files reached the intake before a damaged part reopened the session:
                # their numbering must hold, so only the same files may be sent again.
                raise UploadRefused("not_ready", "files already handed over")
            if await self._case_bytes(tx.session, upload) + offset > max_case_bytes:
                raise UploadRefused("too_big")
            case = await tx.session.get(CaseRow, upload.case_id)
            assert case is not None
            manifest = json.dumps(
                {
                    "layout": layout,
                    "part": part_size,
                    "files": [dataclasses.astuple(file) for file in listing],
                }
            )
            row.manifest_enc = self._keys.encrypt_field(
                case.id, case.wrapped_key, manifest, _field(row.id)
            )
            row.total_bytes = offset
            tx.session.add(row)
        if not same:
            await asyncio.to_thread(self.delete_parts, upload.id, keep_layout=layout)
        log.info(
            "upload files declared upload=%s files=%d bytes=%d layout=%d",
            upload.id[:8],
            len(listing),
            offset,
            layout,
        )
        return await self.get(upload.id), offsets

    async def _case_bytes(self, session: Any, upload: UploadSession) -> int:
        """What the case already holds, plus what its other open uploads declared."""
        stored = (
            await session.exec(
                select(func.sum(FileRow.size)).where(FileRow.case_id == upload.case_id)
            )
        ).one()
        pending = (
            await session.exec(
                select(func.sum(UploadSessionRow.total_bytes)).where(
                    UploadSessionRow.case_id == upload.case_id,
                    col(UploadSessionRow.state).in_((OPEN, FINISHING)),
                    UploadSessionRow.id != upload.id,
                )
            )
        ).one()
        return int(stored or 0) + int(pending or 0)

    # -- chunks ----------------------------------------------------------------------

    def received(self, upload: UploadSession) -> list[int]:
        """Indexes of the chunks stored and trusted (blocking: a stat per chunk, and a full
        check of each part this store has not written or checked, see `_check_part`)."""
        return [index for index in range(upload.chunks) if self._check_part(upload, index)]

    def _check_part(self, upload: UploadSession, index: int) -> bool:
        """Whether the chunk's part is stored and good (blocking). One this store wrote or
        checked is; another (written before a restart) only once its size is the chunk's and
        every chunk tag verifies: a machine crash can leave an unsynced part missing, short
        or zeroed. A damaged part is deleted, so the chunk reads as missing and is sent
        again."""
        blob_id = upload.part(index)
        if not self._vault.exists(blob_id):
            return False
        with self._trusted_lock:
            if blob_id in self._trusted:
                self._trusted.move_to_end(blob_id)
                return True
        with self._checking:
            try:
                size = self._vault.verify(blob_id, upload.key, digest=False).size
            except FileNotFoundError:
                return False  # deleted meanwhile (a new layout, a check before this one)
            except BlobIntegrityError:
                size = -1
            if size != upload.chunk_length(index):
                self._vault.delete(blob_id)
                log.warning("upload part damaged, deleted upload=%s chunk=%d", upload.id[:8], index)
                return False
        self._trust(blob_id)
        return True

    def _trust(self, blob_id: str) -> None:
        with self._trusted_lock:
            self._trusted[blob_id] = None
            self._trusted.move_to_end(blob_id)
            while len(self._trusted) > TRUSTED_PARTS:
                self._trusted.popitem(last=False)

    async def write_chunk(
        self, upload: UploadSession, layout: int, index: int, body: ChunkBody
    ) -> bool:
        """Stream one chunk into its own encrypted blob, in place (not fsynced, see the
        module's docstring) when this returns.

        False when the chunk was already stored and is good (a retry after a lost answer):
        the body is not read. UploadRefused when the chunk is not part of the session's
        current layout or its length is not exactly the chunk's (then nothing is kept).
        """
        if upload.state != OPEN:
            raise UploadRefused("not_ready")
        if layout != upload.layout or not upload.files:
            raise UploadRefused("not_ready", "the file list changed")
        if not 0 <= index < upload.chunks:
            raise UploadRefused("bad_request", "no such chunk")
        blob_id = upload.part(index)
        if await asyncio.to_thread(self._check_part, upload, index):
            return False
        expected = upload.chunk_length(index)
        received = 0

        async def exactly(buffer: memoryview) -> int:
            # Raising here, inside the stream, makes the vault discard the partial blob.
            nonlocal received
            count = await body.readinto(buffer)
            received += count
            if not count:
                raise UploadRefused("bad_request", "chunk too short")
            if received == expected and await body.readinto(memoryview(bytearray(1))):
                raise UploadRefused("bad_request", "chunk too long")
            return count

        try:
            # No digest: nobody reads a part's hash; the intake hashes the files it is given.
            # Not durable: see the module's docstring. Direct: past the page cache, whose
            # fresh pages cost more CPU than the rest of storing a chunk; a part is read
            # once, at the hand-over. Received into the vault's own reused buffers, and
            # sealed from there in a worker thread while the next buffer fills.
            await self._vault.write_from(
                blob_id,
                upload.key,
                exactly,
                expected,
                digest=False,
                durable=False,
                direct=True,
            )
        except FileExistsError:
            return False  # the same chunk arrived twice at once; one copy won (and is trusted)
        self._trust(blob_id)
        return True

    # -- hand-over -------------------------------------------------------------------

    async def missing(self, upload: UploadSession) -> list[int]:
        """Indexes of the chunks not stored or not good (damaged ones are deleted)."""
        received = set(await asyncio.to_thread(self.received, upload))
        return [index for index in range(upload.chunks) if index not in received]

    async def start_finishing(self, upload: UploadSession) -> list[int]:
        """Every chunk is in: close the session to new chunks (once; idempotent). Returns
        the chunks still missing (then the session stays open), as `missing`."""
        if upload.state in (FINISHING, COMPLETE):
            return []
        if not upload.files:
            raise UploadRefused("not_ready", "no files")
        if missing := await self.missing(upload):
            return missing
        async with self._store.session() as session:
            await session.exec(
                update(UploadSessionRow)
                .where(col(UploadSessionRow.id) == upload.id, col(UploadSessionRow.state) == OPEN)
                .values(state=FINISHING)
            )
        return []

    async def reopen(self, upload: UploadSession) -> None:
        """A finishing session found a part damaged: wait for chunks again (the page sends
        what `missing` reports), for REOPEN_GRACE at least."""
        expires = max(upload.expires_at, utcnow() + REOPEN_GRACE)
        async with self._store.session() as session:
            await session.exec(
                update(UploadSessionRow)
                .where(
                    col(UploadSessionRow.id) == upload.id,
                    col(UploadSessionRow.state) == FINISHING,
                )
                .values(state=OPEN, expires_at=expires)
            )
        log.info("upload reopened for damaged parts upload=%s", upload.id[:8])

    async def mark_handed(self, session_id: str, count: int) -> None:
        async with self._store.session() as session:
            await session.exec(
                update(UploadSessionRow)
                .where(col(UploadSessionRow.id) == session_id)
                .values(handed=count)
            )

    async def complete(self, session_id: str) -> None:
        """The intake has everything: drop the parts and the file list, spend the link."""
        await asyncio.to_thread(self.delete_parts, session_id)
        await self._close(session_id, COMPLETE)

    async def expire(self, session_id: str) -> None:
        await asyncio.to_thread(self.delete_parts, session_id)
        await self._close(session_id, EXPIRED)

    async def _close(self, session_id: str, state: str) -> None:
        async with self._store.session() as session:
            await session.exec(
                update(UploadSessionRow)
                .where(col(UploadSessionRow.id) == session_id)
                .values(state=state, manifest_enc=None, completed_at=utcnow())
            )
        log.info("upload %s upload=%s", state, session_id[:8])

    async def case_locale(self, case_id: str) -> str | None:
        """The case's language (the Mini App page is drawn before anyone is verified)."""
        query = select(CaseRow.locale).where(CaseRow.id == case_id, CaseRow.state != "erased")
        async with self._store.reader() as session:
            return (await session.exec(query)).first()

    async def finishing(self) -> list[str]:
        """Sessions whose hand-over a stop interrupted (resumed at start)."""
        query = select(UploadSessionRow.id).where(UploadSessionRow.state == FINISHING)
        async with self._store.reader() as session:
            return list((await session.exec(query)).all())

    def unit_pieces(self, upload: UploadSession, unit: HandoverUnit) -> Generator[bytes]:
        """The unit's bytes: the single file, or a ZIP (stored, not compressed: scans do
        not shrink) of its files built on the fly (blocking)."""
        with _StreamReader(self._vault, upload) as stream:
            if not unit.zipped:
                yield from stream.pieces(unit.files[0])
                return
            spool = _Spool()
            taken: set[str] = set()
            with zipfile.ZipFile(spool, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
                for file in unit.files:
                    info = zipfile.ZipInfo(_member_name(file, taken), _zip_time(file.modified))
                    info.file_size = file.size  # lets zipfile choose ZIP64 up front
                    with archive.open(info, "w") as member:
                        for piece in stream.pieces(file):
                            member.write(piece)
                            yield spool.take()
                    yield spool.take()
            yield spool.take()

    # -- housekeeping ----------------------------------------------------------------

    def delete_parts(self, session_id: str, keep_layout: int | None = None) -> int:
        """Remove every part of a session, found by its id prefix, or every part but those
        of `keep_layout` (blocking)."""
        prefix = f"u{session_id}-"
        kept = f"{prefix}{keep_layout}-" if keep_layout is not None else None
        shard = self._vault.blobs_dir / prefix[:2]
        removed = 0
        with contextlib.suppress(FileNotFoundError), os.scandir(shard) as entries:
            names = [
                entry.name
                for entry in entries
                if entry.name.startswith(prefix) and not (kept and entry.name.startswith(kept))
            ]
            for name in names:
                removed += self._vault.delete(name)
        return removed

    async def sweep(self) -> int:
        """Expire open sessions past their time and remove what erased cases left; drop rows
        long finished. Returns the number of sessions changed. Safe to run at any time."""
        now = utcnow()
        async with self._store.reader() as session:
            rows = (await session.exec(self._joined())).all()
        changed = 0
        for row, case in rows:
            gone = case is None or not case.wrapped_key or case.chat_id != row.chat_id
            if gone:
                await self._delete_row(row.id)
            elif row.state == OPEN and aware(row.expires_at) <= now:
                await self.expire(row.id)
            elif row.state in (COMPLETE, EXPIRED) and aware(row.expires_at) + LINGER <= now:
                await self._delete_row(row.id)
            else:
                continue
            changed += 1
        return changed

    async def _delete_row(self, session_id: str) -> None:
        await asyncio.to_thread(self.delete_parts, session_id)  # any a late request left
        async with self._store.session() as session:
            row = await session.get(UploadSessionRow, session_id)
            if row is not None:
                await session.delete(row)


class _StreamReader:
    """Reads stretches of an upload's stream across its part blobs, decrypting as it goes
    and keeping the current part open (files follow each other through the parts)."""

    def __init__(self, vault: Vault, upload: UploadSession) -> None:
        self._vault = vault
        self._upload = upload
        self._open: tuple[int, BlobReader] | None = None

    def pieces(self, file: ManifestFile) -> Generator[bytes]:
        """The file's bytes, in pieces of at most PIECE."""
        upload = self._upload
        position, end = file.offset, file.offset + file.size
        while position < end:
            index, skip = divmod(position, upload.part_size)
            reader = self._part(index)
            reader.seek(skip)
            piece = reader.read(min(PIECE, end - position, reader.size - skip))
            if not piece:
                raise UploadRefused("bad_request", "stored chunk is short")
            position += len(piece)
            yield piece

    def _part(self, index: int) -> BlobReader:
        if self._open is not None and self._open[0] == index:
            return self._open[1]
        self.close()
        reader = self._vault.reader(self._upload.part(index), self._upload.key)
        if reader.size != self._upload.chunk_length(index):
            reader.close()
            raise UploadRefused("bad_request", "stored chunk has the wrong size")
        self._open = (index, reader)
        return reader

    def close(self) -> None:
        if self._open is not None:
            self._open[1].close()
            self._open = None

    def __enter__(self) -> _StreamReader:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def _field(session_id: str) -> str:
    """The manifest's encryption context: it cannot be moved to another session."""
    return f"upload-manifest/{session_id}"
