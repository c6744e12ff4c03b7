"""Encrypted blob vault: patients' files stored as chunked AES-256-GCM on local disk.

Layout under the vault root::

    blobs/<first 2 chars of blob id>/<blob id>   committed blobs (mode 0600)
    tmp/<blob id>.<random>.tmp                   blobs being written

Plaintext never touches the disk, not even in ``tmp/``: the writer encrypts each chunk
in memory before writing it.  A committed blob is durable (file and directory fsynced)
unless its writer was asked for ``durable=False``, which only the web upload's parts are:
they are verified before use and never the durable record (see ``adapters.uploads``).
A writer asked for ``direct=True`` (the web upload's parts too) writes past the OS's page
cache (``O_DIRECT``) where the file system allows it, see :class:`BlobWriter`.

Blob file format, version 1::

    header  = b"CCV1" | version (u8 = 1) | chunk size (u32 big-endian, 1 MiB)
    chunk i = nonce (12 random bytes) | AES-256-GCM ciphertext | tag (16 bytes)

Every chunk holds exactly ``chunk size`` plaintext bytes except the last one, which
holds 1..chunk size bytes; an empty blob is a single empty final chunk.  The number of
chunks and the plaintext size therefore follow from the file size alone, which is what
lets :class:`BlobReader` seek without an index.

Associated data of chunk i = header | u16 length of blob id | blob id (ASCII) |
u64 chunk index | u8 final flag.  Hence:

* a flipped byte anywhere fails that chunk's tag (header bytes included);
* reordered chunks fail because the index differs;
* a blob file copied under another id fails because the id differs;
* a blob truncated at a chunk boundary fails because the new last chunk was not
  encrypted with the final flag; truncation mid-chunk gives an impossible file size.

The reader authenticates the last chunk when the blob is opened, so truncation and a
wrong key are reported by :meth:`Vault.reader` itself, before a parser sees any byte.

Chunk keys: the caller passes the 32-byte data key of the case (see
``adapters.keys``).  Random 96-bit nonces keep the GCM collision risk negligible far
beyond the data one case can hold (2**32 chunks = 4 PiB per key).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import fcntl
import hashlib
import io
import mmap
import os
import re
import secrets
import struct
import threading
import time
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Self

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from adapters.durable import fsync_dir, write_all

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer
    from cryptography.hazmat.primitives.ciphers import AEADEncryptionContext

__all__ = [
    "CHUNK_SIZE",
    "BlobInfo",
    "BlobIntegrityError",
    "BlobReader",
    "BlobWriter",
    "InvalidBlobIdError",
    "Vault",
    "validate_blob_id",
]

MAGIC = b"CCV1"
FORMAT_VERSION = 1
CHUNK_SIZE = 1 << 20  # 1 MiB: AES-GCM runs at ~16 GB/s at this size and releases the GIL
NONCE_SIZE = 12
TAG_SIZE = 16
CHUNK_OVERHEAD = NONCE_SIZE + TAG_SIZE
KEY_SIZE = 32

_HEADER = struct.Struct(">4sBI")
HEADER_SIZE = _HEADER.size
# Bound for chunk sizes read from a header: a hostile header must not make the reader
# allocate gigabytes before the first tag check fails.
_MAX_CHUNK_SIZE = 64 << 20
_CHUNK_TRAILER = struct.Struct(">QB")
# write_stream hands pieces to its worker thread in batches of this many chunks: few thread
# hops per blob, and at most two batches (one being stored, one being gathered) in memory.
_STREAM_BATCH_CHUNKS = 4
# Random nonces are drawn for this many chunks at once: one getrandom() call, and one
# hand-over of the GIL while it runs, per 64 chunks of a large blob instead of per chunk.
_NONCES_PER_DRAW = 64
# O_DIRECT writes must start, end and sit in memory at multiples of the device's logical
# block (512 or 4096 bytes): 4096 suits both.
_DIRECT_ALIGN = 4096
# Sealed records are written this many bytes at a time (at least one record): in a VM each
# write to the disk is an exit to the host, which cost more than encrypting a megabyte.
# 4 MiB is also the largest request the kernel usually sends to a disk in one go.
_WRITE_BYTES = 4 << 20
# A writer's two chunk buffers are kept for the next writer, up to this many pairs (the
# upload page sends 3 chunks at once): a new megabyte is fresh memory to fault in and
# zero, which cost as much as encrypting it.
_SPARE_BUFFERS = 4
# write_from receives into buffers of this size, two per blob (one filled while the other
# is sealed in a worker thread): one thread hop per 4 MiB, and memory the caller's stream
# fills directly, never a fresh allocation per piece.
_RECEIVE_BYTES = 4 << 20
_SPARE_RECEIVE = 8  # receive buffers kept for the next blobs: the page's 3 chunks at once

_BLOB_ID_RE = re.compile(r"[A-Za-z0-9_-]{8,128}")
_DIR_MODE = 0o700
_FILE_MODE = 0o600


class InvalidBlobIdError(ValueError):
    """A blob id is not 8..128 characters of ``[A-Za-z0-9_-]``."""


class BlobIntegrityError(OSError):
    """A blob failed authentication: tampered, truncated, swapped or wrong key.

    ``chunk_index`` is the chunk that failed, or None when the header itself is
    unreadable.  It subclasses OSError (errno EIO) so file parsers such as pydicom,
    zipfile and Pillow let it propagate as an I/O failure instead of masking it as a
    format error.  A wrong key cannot be told apart from tampering.
    """

    def __init__(self, blob_id: str, chunk_index: int | None, detail: str = "") -> None:
        where = "header" if chunk_index is None else f"chunk {chunk_index}"
        message = f"blob {blob_id} failed integrity check at {where}"
        if detail:
            message += f": {detail}"
        super().__init__(errno.EIO, message)
        self.blob_id = blob_id
        self.chunk_index = chunk_index


@dataclass(frozen=True, slots=True)
class BlobInfo:
    """What a committed or verified blob holds.

    ``size`` and ``sha256`` (hex) describe the plaintext; ``stored_size`` is the size
    of the encrypted file on disk. ``sha256`` is empty when the writer was asked not to
    hash (``digest=False``).
    """

    blob_id: str
    size: int
    sha256: str
    stored_size: int


def validate_blob_id(blob_id: str) -> str:
    """Return *blob_id* if it is a safe file name, else raise :class:`InvalidBlobIdError`.

    Checked before any file system access so an id can never name a path outside the
    vault (no separators, no dots, no NUL).
    """
    if not isinstance(blob_id, str) or _BLOB_ID_RE.fullmatch(blob_id) is None:
        raise InvalidBlobIdError(f"invalid blob id {blob_id!r}")
    return blob_id


def _wipe(buffer: bytearray | mmap.mmap, length: int | None = None) -> None:
    """Zero the start of a writable buffer in place (no zeroed copy allocated for it)."""
    length = len(buffer) if length is None else length
    if length:
        ctypes.memset(ctypes.addressof(ctypes.c_char.from_buffer(buffer)), 0, length)


def _check_key(key: bytes) -> None:
    # AESGCM also accepts 16/24-byte keys; refusing them catches a mixed-up key early.
    if not isinstance(key, bytes | bytearray) or len(key) != KEY_SIZE:
        raise ValueError(f"blob key must be {KEY_SIZE} bytes")


def _aad_prefix(header: bytes, blob_id: str) -> bytes:
    raw_id = blob_id.encode("ascii")
    return header + struct.pack(">H", len(raw_id)) + raw_id


class Vault:
    """Encrypted blob store rooted at a local directory.

    Blob ids are chosen by the caller (random hex or urlsafe strings, 8..128 chars of
    ``[A-Za-z0-9_-]``); keys are the 32-byte data keys of the owning case.  All
    methods are blocking; async code should use :meth:`write_stream` or run them via
    ``asyncio.to_thread``.
    """

    def __init__(self, root: Path, *, chunk_size: int = CHUNK_SIZE) -> None:
        """Open (creating if needed) the vault at *root*.

        *chunk_size* only affects newly written blobs (readers take it from each
        blob's header); the default 1 MiB should not be changed outside tests.
        """
        if not 1 <= chunk_size <= _MAX_CHUNK_SIZE:
            raise ValueError(f"chunk_size must be between 1 and {_MAX_CHUNK_SIZE}")
        self.root = Path(root)
        self.chunk_size = chunk_size
        self.blobs_dir = self.root / "blobs"
        self.tmp_dir = self.root / "tmp"
        for directory in (self.root, self.blobs_dir, self.tmp_dir):
            directory.mkdir(mode=_DIR_MODE, exist_ok=True)
        self._spare: list[tuple[bytearray, mmap.mmap]] = []
        self._spare_receive: list[mmap.mmap] = []
        self._spare_lock = threading.Lock()

    def _take_buffers(self) -> tuple[bytearray, mmap.mmap]:
        """A writer's plaintext chunk buffer and its page-aligned staging map for sealed
        records (_WRITE_BYTES of them, plus the unaligned end of the write before)."""
        with self._spare_lock:
            if self._spare:
                return self._spare.pop()
        record = NONCE_SIZE + self.chunk_size + TAG_SIZE
        staging = _DIRECT_ALIGN + max(1, _WRITE_BYTES // record) * record
        return bytearray(self.chunk_size), mmap.mmap(-1, staging)

    def _give_back(self, plain: bytearray, staging: mmap.mmap, used: bool = True) -> None:
        """Keep a finished writer's buffers for the next, the plaintext wiped first (unless
        the writer never `used` it: a sized writer seals straight from what it is given).
        Beyond _SPARE_BUFFERS they are dropped, not closed: a view of the map may still live
        in the traceback of the error that aborted the writer (close() would raise over it),
        and the map goes with the last reference."""
        if used:
            _wipe(plain)
        with self._spare_lock:
            if len(self._spare) < _SPARE_BUFFERS:
                self._spare.append((plain, staging))

    def _take_receive(self) -> mmap.mmap:
        """A buffer for write_from to receive plaintext into (page-aligned, reused)."""
        with self._spare_lock:
            if self._spare_receive:
                return self._spare_receive.pop()
        return mmap.mmap(-1, _RECEIVE_BYTES)

    def _give_back_receive(self, buffer: mmap.mmap, filled: int) -> None:
        """Keep a receive buffer for the next blob, its first `filled` bytes (plaintext)
        wiped; beyond _SPARE_RECEIVE dropped (not closed, as in _give_back)."""
        _wipe(buffer, filled)
        with self._spare_lock:
            if len(self._spare_receive) < _SPARE_RECEIVE:
                self._spare_receive.append(buffer)

    # ----------------------------------------------------------------- paths

    def _blob_path(self, blob_id: str) -> Path:
        validate_blob_id(blob_id)
        return self.blobs_dir / blob_id[:2] / blob_id

    # ----------------------------------------------------------------- writing

    def writer(
        self,
        blob_id: str,
        key: bytes,
        *,
        digest: bool = True,
        durable: bool = True,
        direct: bool = False,
        size: int | None = None,
    ) -> BlobWriter:
        """Start writing a new blob; see :class:`BlobWriter`.

        The blob becomes visible only when the writer is committed.  Committing fails
        with FileExistsError if a blob with this id already exists.  ``digest=False``
        skips the plaintext's SHA-256 (its BlobInfo.sha256 is then empty) for callers
        that never use it.  ``durable=False`` commits without any fsync (see
        :meth:`BlobWriter.commit`): only for blobs that are never the durable record.
        ``direct=True`` writes past the page cache (see :class:`BlobWriter`): for large
        blobs not read back soon.  ``size``, the plaintext's exact length when known
        beforehand, lets the writer seal the bytes as they come (see :class:`BlobWriter`).
        """
        validate_blob_id(blob_id)
        _check_key(key)
        return BlobWriter(
            self, blob_id, key, digest=digest, durable=durable, direct=direct, size=size
        )

    async def write_stream(
        self,
        blob_id: str,
        key: bytes,
        chunks: AsyncIterator[bytes] | AsyncIterable[bytes],
        *,
        digest: bool = True,
        durable: bool = True,
        direct: bool = False,
        size: int | None = None,
    ) -> BlobInfo:
        """Encrypt an async stream of byte pieces into a new blob and commit it.

        The event loop only gathers the incoming pieces (e.g. aiogram's 64 KiB download
        pieces, an upload's request body), without copying them, into batches of a few
        chunks; a worker thread copies, hashes, encrypts and writes each batch while the
        loop gathers the next, so receiving and storing overlap and the loop never blocks
        on disk or crypto.  At most two batches are held (one being stored, one being
        gathered).  The last batch, the fsync and the rename go in one more thread call.
        On any error or cancellation the temporary file is removed.  ``digest``,
        ``durable``, ``direct`` and ``size`` are as for :meth:`writer`.
        """
        writer = await asyncio.to_thread(
            self.writer, blob_id, key, digest=digest, durable=durable, direct=direct, size=size
        )
        batch_size = _STREAM_BATCH_CHUNKS * self.chunk_size
        storing: asyncio.Task[None] | None = None
        try:
            batch: list[bytes] = []
            gathered = 0
            async for piece in chunks:
                batch.append(piece)
                gathered += len(piece)
                if gathered >= batch_size:
                    if storing is not None:
                        await storing
                    storing = asyncio.create_task(asyncio.to_thread(writer.write_many, batch))
                    batch, gathered = [], 0
            if storing is not None:
                await storing
            return await asyncio.to_thread(writer.commit_after, batch)
        except BaseException:
            if storing is not None:
                storing.cancel()  # its thread runs on; abort() below waits for it
            # Shielded so a second cancellation cannot skip the cleanup; abort() takes
            # the writer lock, so it waits for a chunk write still running in a thread
            # instead of closing the descriptor under it.
            await asyncio.shield(asyncio.to_thread(writer.abort))
            raise

    async def write_from(
        self,
        blob_id: str,
        key: bytes,
        readinto: Callable[[memoryview], Awaitable[int]],
        size: int,
        *,
        digest: bool = True,
        durable: bool = True,
        direct: bool = False,
    ) -> BlobInfo:
        """Receive exactly `size` plaintext bytes into a new blob and commit it, the bytes
        written by the caller straight into buffers this vault reuses.

        `readinto(view)` puts the stream's next bytes at the start of `view` and returns
        how many (fewer than asked is fine; 0 means the stream ended: ValueError, as for a
        sized writer given too few bytes). It must not touch `view` once it has returned
        or been cancelled. Two buffers of 4 MiB: while the caller fills one, a worker
        thread seals and writes the other (as :meth:`write_stream` does with its batches),
        so the event loop only receives, and a network stream costs no allocation per
        piece and no copy but the one into the buffer. Each buffer is wiped before another
        blob uses it. On any error or cancellation the temporary file is removed (after the
        worker thread is done with the buffers). ``digest``, ``durable`` and ``direct`` are
        as for :meth:`writer`.
        """
        writer = await asyncio.to_thread(
            self.writer, blob_id, key, digest=digest, durable=durable, direct=direct, size=size
        )
        buffers = [self._take_receive(), self._take_receive()]
        offered = [0, 0]  # bytes of each buffer handed to readinto: plaintext, to wipe
        storing: asyncio.Task[int] | None = None
        idle = False  # no worker thread reads the buffers any more: they may be reused
        try:
            received, turn = 0, 0
            while True:
                index, turn = turn, turn ^ 1
                want = min(len(buffers[index]), size - received)
                # Not released here (no `with`): the worker thread may still read it.
                view = memoryview(buffers[index])[:want]
                offered[index] = max(offered[index], want)
                at = 0
                while at < want:
                    count = await readinto(view[at:])
                    if count <= 0:
                        raise ValueError(f"blob {blob_id} is shorter than its declared size")
                    at += count
                received += want
                if storing is not None:
                    await storing  # the other buffer is free again
                if received == size:
                    # The last piece, the commit and the wiping in one thread hop.
                    storing = None
                    info = await asyncio.to_thread(
                        self._commit_and_wipe, writer, view, buffers, offered
                    )
                    idle = True
                    return info
                storing = asyncio.ensure_future(asyncio.to_thread(writer.write, view))
        except BaseException:
            if storing is not None:
                storing.cancel()  # its thread runs on; abort() below waits for it
            # Shielded so a second cancellation cannot skip the cleanup; abort() takes the
            # writer lock, so once it returns no thread reads the buffers (a write that
            # starts later finds the writer aborted before it reads).
            await asyncio.shield(asyncio.to_thread(writer.abort))
            idle = True
            raise
        finally:
            if idle:  # else (cancelled again while aborting) they go with their references
                for buffer, used in zip(buffers, offered, strict=True):
                    self._give_back_receive(buffer, used)

    @staticmethod
    def _commit_and_wipe(
        writer: BlobWriter, last: memoryview, buffers: list[mmap.mmap], offered: list[int]
    ) -> BlobInfo:
        """write_from's last piece and commit, then its buffers wiped (in the worker thread:
        8 MiB of memset off the event loop). All under the writer's lock: an abort() from a
        cancelled write_from waits for the wiping too, so the buffers are never wiped once
        they may be another blob's (and if the abort comes first, nothing here reads or
        wipes them: the commit finds the writer aborted)."""
        with writer._lock:
            info = writer.commit_after([last])
            for index, buffer in enumerate(buffers):
                _wipe(buffer, offered[index])
                offered[index] = 0
            return info

    # ----------------------------------------------------------------- reading

    def reader(self, blob_id: str, key: bytes) -> BlobReader:
        """Open a blob for random-access reading; see :class:`BlobReader`.

        Raises FileNotFoundError if the blob does not exist and
        :class:`BlobIntegrityError` if its header, length or last chunk is invalid
        (which includes a wrong key).
        """
        path = self._blob_path(blob_id)
        _check_key(key)
        return BlobReader(path, blob_id, key)

    def verify(self, blob_id: str, key: bytes, *, digest: bool = True) -> BlobInfo:
        """Authenticate every chunk and return the plaintext size and SHA-256.

        Raises :class:`BlobIntegrityError` on the first chunk that fails.  Memory use
        is about two chunks regardless of blob size.  ``digest=False`` only
        authenticates (BlobInfo.sha256 is then empty).
        """
        sha = hashlib.sha256() if digest else None
        with self.reader(blob_id, key) as reader:
            for index in range(reader.chunk_count):
                plain = reader._decrypt_chunk(index)
                if sha is not None:
                    sha.update(plain)
            hexdigest = sha.hexdigest() if sha is not None else ""
            return BlobInfo(blob_id, reader.size, hexdigest, reader.stored_size)

    # ----------------------------------------------------------------- housekeeping

    def exists(self, blob_id: str) -> bool:
        """True if a committed blob with this id exists."""
        return self._blob_path(blob_id).is_file()

    def delete(self, blob_id: str) -> bool:
        """Remove a blob durably; returns False if it did not exist (idempotent)."""
        path = self._blob_path(blob_id)
        try:
            path.unlink()
        except FileNotFoundError:
            return False
        fsync_dir(path.parent)
        return True

    def iter_blob_ids(self) -> Iterator[str]:
        """Yield the ids of all committed blobs, sorted within each shard directory.

        Stray files that are not valid blob ids or sit in the wrong shard are skipped.
        """
        try:
            shards = sorted(os.scandir(self.blobs_dir), key=lambda e: e.name)
        except FileNotFoundError:
            return
        for shard in shards:
            if not shard.is_dir(follow_symlinks=False):
                continue
            for entry in sorted(os.scandir(shard.path), key=lambda e: e.name):
                name = entry.name
                if (
                    entry.is_file(follow_symlinks=False)
                    and _BLOB_ID_RE.fullmatch(name)
                    and name[:2] == shard.name
                ):
                    yield name

    def cleanup_temp(self, older_than: float = 0.0) -> int:
        """Remove leftover temporary files from writers that crashed or were killed.

        Call at startup before any writer runs; with ``older_than`` (seconds) it only
        removes files not modified for that long, which is safe while writers run.
        Temp files hold ciphertext only, so removing them leaks nothing.  Returns the
        number of files removed.
        """
        removed = 0
        cutoff = time.time() - older_than
        try:
            entries = list(os.scandir(self.tmp_dir))
        except FileNotFoundError:
            return 0
        for entry in entries:
            try:
                if not entry.is_file(follow_symlinks=False):
                    continue
                if older_than > 0 and entry.stat(follow_symlinks=False).st_mtime > cutoff:
                    continue
                os.unlink(entry.path)
                removed += 1
            except FileNotFoundError:
                continue
        return removed


class BlobWriter:
    """Write-only, non-seekable file-like object that encrypts into a new blob.

    Data is buffered up to one chunk; a full chunk is encrypted and written only
    when more data arrives, because the last chunk must carry the final flag and the
    writer cannot know a chunk is the last until :meth:`commit`.  Memory use is one
    chunk of plaintext plus 4 MiB of sealed chunks, in buffers the vault hands on from
    writer to writer.

    The sealed chunks are written 4 MiB at a time, in whole 4 KiB blocks (the last few
    bytes only at commit).  With
    ``direct=True`` it is opened ``O_DIRECT``, so those blocks go from the ciphertext
    buffer to the disk without a copy into the page cache: in a VM that returns free
    memory to its host, each page-cache page is fresh memory, and filling it cost more
    CPU than receiving and encrypting the bytes (bench/upload_bench.py).  Where the file
    system refuses O_DIRECT (tmpfs on older kernels), the writer writes through the page
    cache instead.  Either way every byte is in the kernel's hands before :meth:`commit`
    returns, so a committed blob survives a crash of this process.

    A writer told the plaintext's ``size`` up front knows which chunk is the last as it
    begins it, so it seals each piece as it is written (AES-GCM streaming into the
    staging map), without first copying it into the chunk buffer; more bytes than
    ``size`` are refused, and fewer make :meth:`commit` fail.  The blob is the same.

    ``flush()`` is a no-op kept for file-object compatibility (aiogram calls
    write()+flush() per piece); durability comes only from :meth:`commit`.  When
    passing the writer to aiogram's ``Bot.download(..., destination=writer)``, also
    pass ``seek=False``: the writer cannot seek.  Prefer :meth:`Vault.write_stream`
    in async code, since aiogram calls ``write()`` on the event loop.

    As a context manager it commits on a clean exit and aborts on an exception.
    Not safe for concurrent use from several threads.
    """

    def __init__(
        self,
        vault: Vault,
        blob_id: str,
        key: bytes,
        *,
        digest: bool = True,
        durable: bool = True,
        direct: bool = False,
        size: int | None = None,
    ) -> None:
        """Create the temp file and stage the header; use :meth:`Vault.writer`."""
        if size is not None and size < 0:
            raise ValueError("a blob's size cannot be negative")
        self._expected = size
        self._key = bytes(key)
        self._sealer: AEADEncryptionContext | None = None  # the open chunk (sized writers)
        self.blob_id = blob_id
        self._durable = durable
        self._vault = vault
        self._aead = AESGCM(bytes(key))
        self._chunk_size = vault.chunk_size
        self._header = _HEADER.pack(MAGIC, FORMAT_VERSION, self._chunk_size)
        self._aad_prefix = _aad_prefix(self._header, blob_id)
        # Fixed buffers (slice assignment never reallocates, which keeps peak memory at
        # one chunk), reused from writer to writer. Sealed records queue in `_out` until
        # written: an anonymous map is page-aligned, as O_DIRECT needs.
        self._buf, staging = vault._take_buffers()
        self._out: mmap.mmap | None = staging
        self._pending = 0  # bytes in _out not yet written
        self._filled = 0
        self._index = 0
        self._size = 0
        self._stored = 0
        self._sha = hashlib.sha256() if digest else None
        self._nonces, self._nonce_at = b"", 0
        self._info: BlobInfo | None = None
        self._aborted = False
        # Serialises chunk emission, commit and abort: write_stream may abort from the
        # event loop while a worker thread is still writing a chunk.
        self._lock = threading.RLock()
        self._final_path = vault._blob_path(blob_id)
        self._tmp_path = vault.tmp_dir / f"{blob_id}.{secrets.token_hex(8)}.tmp"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        self._direct = direct
        self._fd: int | None = os.open(self._tmp_path, flags, _FILE_MODE)
        if direct:
            try:
                self._set_direct(True)
            except OSError:
                self._direct = False  # the file system has no O_DIRECT: the page cache it is
        staging[: len(self._header)] = self._header
        self._pending = self._stored = len(self._header)

    # ----------------------------------------------------------- file protocol

    def writable(self) -> bool:
        """Always True."""
        return True

    def readable(self) -> bool:
        """Always False."""
        return False

    def seekable(self) -> bool:
        """Always False: chunks are encrypted and written as they fill."""
        return False

    @property
    def closed(self) -> bool:
        """True once committed or aborted."""
        return self._info is not None or self._aborted

    def tell(self) -> int:
        """Number of plaintext bytes written so far."""
        return self._size + self._filled

    @property
    def direct(self) -> bool:
        """True while whole blocks go to the disk past the page cache (O_DIRECT)."""
        return self._direct

    def write(self, data: bytes | bytearray | memoryview) -> int:
        """Buffer *data*, encrypting and writing each chunk once the next one starts."""
        view = memoryview(data).cast("B")
        total = len(view)
        # Under the lock: an abort from another thread hands the buffers to the next
        # writer, so it must wait until this one has stopped filling them.
        with self._lock:
            self._check_open()
            try:
                while view:
                    if self._expected is not None:
                        view = view[self._seal_piece(view) :]
                        continue
                    if self._buffer_full():
                        self._emit_buffer(False)
                    view = view[self._fill(view) :]
            except BaseException:
                self.abort()
                raise
        return total

    def write_many(self, pieces: Iterable[bytes | bytearray | memoryview]) -> None:
        """:meth:`write` each piece in turn (one worker-thread call for a batch)."""
        for piece in pieces:
            self.write(piece)

    def commit_after(self, pieces: Iterable[bytes | bytearray | memoryview]) -> BlobInfo:
        """Write the last pieces, then :meth:`commit`."""
        self.write_many(pieces)
        return self.commit()

    def flush(self) -> None:
        """No-op; present because aiogram calls it after every piece."""
        self._check_open()

    def commit(self) -> BlobInfo:
        """Write the final chunk, fsync, move the blob into place and fsync the directory.

        Returns the :class:`BlobInfo`; calling it again returns the same info.  Raises
        FileExistsError (after removing the temp file) if the blob id is already taken.

        A writer made with ``durable=False`` skips both fsyncs: the blob then survives a
        crash of this process (its pages stay in the OS's cache) but not necessarily one
        of the machine, after which it may be missing, short or hold zeros.  Its chunks'
        tags still tell (:meth:`Vault.verify`): the reader never returns a damaged byte.
        """
        with self._lock:
            if self._info is not None:
                return self._info
            self._check_open()
            try:
                if self._expected is None:
                    self._emit_buffer(True)
                elif self._size + self._filled != self._expected:
                    raise ValueError(f"blob {self.blob_id} is shorter than its declared size")
                elif self._expected == 0:
                    self._seal_piece(memoryview(b""))  # an empty blob: one empty last chunk
                assert self._fd is not None
                if self._durable:
                    os.fsync(self._fd)
                os.close(self._fd)
                self._fd = None
                self._publish()
            except BaseException:
                self.abort()
                raise
            digest = self._sha.hexdigest() if self._sha is not None else ""
            self._info = BlobInfo(self.blob_id, self._size, digest, self._stored)
            self._release_buffer()
            return self._info

    def close(self) -> BlobInfo | None:
        """Commit if still open (file-object convention); None if it was aborted."""
        if self._aborted:
            return None
        return self.commit()

    def abort(self) -> None:
        """Discard the blob: close and remove the temp file.  Idempotent; no-op after commit."""
        with self._lock:
            if self._info is not None or self._aborted:
                return
            self._aborted = True
            if self._fd is not None:
                try:
                    os.close(self._fd)
                finally:
                    self._fd = None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._tmp_path)
            self._release_buffer()

    def __enter__(self) -> Self:
        """Return the writer itself."""
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Commit on a clean exit, abort when the block raised."""
        if exc_type is None:
            self.commit()
        else:
            self.abort()

    def __del__(self) -> None:
        # A writer dropped without commit is abandoned: remove its temp file rather
        # than leave it for cleanup_temp.  Never commit here, the data may be partial.
        try:
            if not self.closed and hasattr(self, "_lock"):
                self.abort()
        except Exception:  # noqa: S110 - nothing sensible to do during finalisation
            pass

    # ----------------------------------------------------------- internals

    def _check_open(self) -> None:
        if self._aborted:
            raise ValueError(f"writer for blob {self.blob_id} was aborted")
        if self._info is not None:
            raise ValueError(f"writer for blob {self.blob_id} is already committed")

    def _buffer_full(self) -> bool:
        return self._filled == self._chunk_size

    def _fill(self, view: memoryview) -> int:
        """Copy as much of *view* as fits into the chunk buffer; returns bytes taken."""
        take = min(self._chunk_size - self._filled, len(view))
        self._buf[self._filled : self._filled + take] = view[:take]
        self._filled += take
        return take

    def _emit_buffer(self, final: bool) -> None:
        """Encrypt the buffered bytes as the next chunk and append it to the temp file."""
        with self._lock:
            self._check_open()
            assert self._fd is not None
            plain = memoryview(self._buf)[: self._filled]
            # Hash here, not in write(): this runs in a worker thread under
            # write_stream, and hashlib releases the GIL for large buffers.
            if self._sha is not None:
                self._sha.update(plain)
            nonce = self._next_nonce()
            aad = self._aad_prefix + _CHUNK_TRAILER.pack(self._index, 1 if final else 0)
            self._seal_whole(nonce, plain, aad)
            plain.release()
            self._sealed(final)

    def _seal_whole(self, nonce: bytes, plain: memoryview, aad: bytes) -> None:
        """A whole chunk sealed in one call: nonce, ciphertext and tag laid out in the one
        reused output buffer after what is still unwritten (one write per _WRITE_BYTES, and
        no fresh megabyte to allocate, and for the kernel to zero, per chunk)."""
        assert self._out is not None
        stored = NONCE_SIZE + len(plain) + TAG_SIZE
        with memoryview(self._out) as out:
            sealed = out[self._pending : self._pending + stored]
            sealed[:NONCE_SIZE] = nonce
            self._aead.encrypt_into(nonce, plain, aad, sealed[NONCE_SIZE:])
            sealed.release()

    def _seal_piece(self, view: memoryview) -> int:
        """Seal the start of *view* into the open chunk (a sized writer's write), opening
        and closing chunks as they fill; returns the bytes taken."""
        assert self._expected is not None and self._out is not None
        length = min(self._chunk_size, self._expected - self._size)
        if self._sealer is None:
            if length == 0 and self._index:
                raise ValueError(f"blob {self.blob_id} is longer than its declared size")
            nonce = self._next_nonce()
            final = self._size + length == self._expected
            aad = self._aad_prefix + _CHUNK_TRAILER.pack(self._index, 1 if final else 0)
            if len(view) >= length:
                # The whole chunk at hand (Vault.write_from's buffers hold whole chunks):
                # sealed in one call, as _emit_buffer does; the same record.
                piece = view[:length]
                if self._sha is not None:
                    self._sha.update(piece)
                self._seal_whole(nonce, piece, aad)
                piece.release()
                self._filled = length
                self._sealed(final)
                return length
            self._sealer = Cipher(algorithms.AES(self._key), modes.GCM(nonce)).encryptor()
            self._sealer.authenticate_additional_data(aad)
            self._out[self._pending : self._pending + NONCE_SIZE] = nonce
        take = min(length - self._filled, len(view))
        piece = view[:take]
        if self._sha is not None:
            self._sha.update(piece)
        at = self._pending + NONCE_SIZE + self._filled
        with memoryview(self._out) as out:
            # GCM output is as long as its input; the room left includes the tag's 16 bytes,
            # which covers the block of slack update_into asks for.
            self._sealer.update_into(piece, out[at:])
        self._filled += take
        if self._filled == length:
            self._sealer.finalize()
            self._out[at + take : at + take + TAG_SIZE] = self._sealer.tag
            self._sealer = None
            self._sealed(self._size + length == self._expected)
        return take

    def _next_nonce(self) -> bytes:
        if self._nonce_at == len(self._nonces):
            self._nonces, self._nonce_at = secrets.token_bytes(NONCE_SIZE * _NONCES_PER_DRAW), 0
        nonce = self._nonces[self._nonce_at : self._nonce_at + NONCE_SIZE]
        self._nonce_at += NONCE_SIZE
        return nonce

    def _sealed(self, final: bool) -> None:
        """Account for the chunk just sealed into `_out` (`_filled` plaintext bytes), and
        write when no other chunk fits or this was the last."""
        assert self._out is not None
        stored = NONCE_SIZE + self._filled + TAG_SIZE
        self._pending += stored
        if final or self._pending + NONCE_SIZE + self._chunk_size + TAG_SIZE > len(self._out):
            self._write_out(final)
        self._stored += stored
        self._size += self._filled
        self._index += 1
        self._filled = 0

    def _write_out(self, final: bool) -> None:
        """Write the staged bytes' whole blocks and keep the rest for the next record;
        with `final`, the rest too, past O_DIRECT (a file's unaligned end cannot use it)."""
        assert self._fd is not None and self._out is not None
        aligned = self._pending - self._pending % _DIRECT_ALIGN
        with memoryview(self._out) as out:
            if aligned:
                self._write_blocks(out[:aligned])
            rest = self._pending - aligned
            if final and rest:
                if self._direct:
                    self._set_direct(False)
                write_all(self._fd, out[aligned : self._pending])
                rest = 0
            elif rest and aligned:
                out[:rest] = out[aligned : self._pending]  # rest < aligned: no overlap
        self._pending = rest

    def _write_blocks(self, blocks: memoryview) -> None:
        assert self._fd is not None
        while blocks:
            try:
                blocks = blocks[os.write(self._fd, blocks) :]
            except OSError as exc:
                # Some file systems accept O_DIRECT at open but not these writes (a larger
                # block, a stricter alignment): the page cache then, from here on.
                if not self._direct or exc.errno != errno.EINVAL:
                    raise
                self._set_direct(False)

    def _set_direct(self, on: bool) -> None:
        assert self._fd is not None
        flags = fcntl.fcntl(self._fd, fcntl.F_GETFL)
        flags = flags | os.O_DIRECT if on else flags & ~os.O_DIRECT
        fcntl.fcntl(self._fd, fcntl.F_SETFL, flags)
        self._direct = on

    def _publish(self) -> None:
        """Move the (fsynced, if durable) temp file to its final name without replacing
        anything."""
        shard = self._final_path.parent
        if not shard.is_dir():
            shard.mkdir(mode=_DIR_MODE, exist_ok=True)
            if self._durable:
                fsync_dir(shard.parent)
        try:
            # link() fails if the name exists, unlike rename(): a colliding blob id
            # must never silently replace another patient's file.
            os.link(self._tmp_path, self._final_path)
        except FileExistsError:
            raise FileExistsError(
                errno.EEXIST, f"blob {self.blob_id} already exists", str(self._final_path)
            ) from None
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
                raise
            # File systems without hard links: check-then-rename; the window is tiny
            # and ids are random, so this only loses against a caller bug.
            if self._final_path.exists():
                raise FileExistsError(
                    errno.EEXIST, f"blob {self.blob_id} already exists", str(self._final_path)
                ) from None
            os.rename(self._tmp_path, self._final_path)
        else:
            os.unlink(self._tmp_path)
        if self._durable:
            fsync_dir(shard)

    def _release_buffer(self) -> None:
        if self._out is not None:
            self._vault._give_back(self._buf, self._out, used=self._expected is None)
        self._buf, self._out = bytearray(), None
        self._filled = self._pending = 0


class BlobReader(io.RawIOBase):
    """Seekable, read-only raw file over a blob, decrypting one chunk at a time.

    Libraries that want a binary file (pydicom, zipfile, Pillow, pypdfium2) can read
    it directly.  One decrypted chunk is cached, so sequential and nearby reads cost
    one decryption per chunk.  ``readinto`` fills the whole requested range across
    chunk boundaries (short reads only at end of blob), because some parsers treat a
    short read as end of file.

    Every chunk is authenticated before any of its bytes are returned; a failure
    raises :class:`BlobIntegrityError`.  The last chunk is authenticated when the
    reader is opened, so truncation and a wrong key surface immediately.  Not safe for
    concurrent use from several threads (like any file object with a position).
    """

    def __init__(self, path: Path, blob_id: str, key: bytes) -> None:
        """Open and check the blob at *path*; use :meth:`Vault.reader`."""
        super().__init__()
        self.blob_id = blob_id
        self._aead = AESGCM(bytes(key))
        self._pos = 0
        self._cache_index = -1
        self._cache: bytes = b""
        self._fd: int | None = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            self._open_layout()
            # Authenticating the last chunk now proves the length (its index and
            # final flag are bound) and the key before a parser sees any byte.
            self._chunk(self.chunk_count - 1)
        except BaseException:
            self.close()
            raise

    def _open_layout(self) -> None:
        assert self._fd is not None
        self.stored_size = os.fstat(self._fd).st_size
        header = os.pread(self._fd, HEADER_SIZE, 0)
        if len(header) != HEADER_SIZE:
            raise BlobIntegrityError(self.blob_id, None, "file shorter than the header")
        magic, version, chunk_size = _HEADER.unpack(header)
        if magic != MAGIC or version != FORMAT_VERSION:
            raise BlobIntegrityError(self.blob_id, None, "not a version 1 vault blob")
        if not 1 <= chunk_size <= _MAX_CHUNK_SIZE:
            raise BlobIntegrityError(self.blob_id, None, f"bad chunk size {chunk_size}")
        self.chunk_size = chunk_size
        self._aad_prefix = _aad_prefix(header, self.blob_id)
        stored_chunk = chunk_size + CHUNK_OVERHEAD
        body = self.stored_size - HEADER_SIZE
        full, rest = divmod(body, stored_chunk)
        if rest == 0 and full > 0:
            # The last chunk is a full one.
            self.chunk_count = full
            self.size = full * chunk_size
        elif rest > CHUNK_OVERHEAD or (rest == CHUNK_OVERHEAD and full == 0):
            # A short last chunk; an empty one only for an empty blob.
            self.chunk_count = full + 1
            self.size = full * chunk_size + rest - CHUNK_OVERHEAD
        else:
            raise BlobIntegrityError(
                self.blob_id, full, f"stored size {self.stored_size} is not a valid layout"
            )

    # ----------------------------------------------------------- io.RawIOBase

    def readable(self) -> bool:
        """Always True."""
        return True

    def seekable(self) -> bool:
        """Always True."""
        return True

    def writable(self) -> bool:
        """Always False."""
        return False

    def tell(self) -> int:
        """Current plaintext position."""
        self._check_not_closed()
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        """Move to a plaintext position; whence 0 (start), 1 (current) or 2 (end).

        Positions past the end are allowed (reads return b""); a negative position
        raises OSError(EINVAL) like a real file, which zipfile relies on.
        """
        self._check_not_closed()
        if whence == io.SEEK_SET:
            target = offset
        elif whence == io.SEEK_CUR:
            target = self._pos + offset
        elif whence == io.SEEK_END:
            target = self.size + offset
        else:
            raise ValueError(f"invalid whence {whence!r}")
        if target < 0:
            raise OSError(errno.EINVAL, "negative seek position")
        self._pos = target
        return target

    def readinto(self, buffer: WriteableBuffer) -> int:
        """Decrypt bytes at the current position into *buffer*; returns the count."""
        self._check_not_closed()
        with memoryview(buffer) as raw, raw.cast("B") as out:
            wanted = min(len(out), max(0, self.size - self._pos))
            done = 0
            while done < wanted:
                index, offset = divmod(self._pos, self.chunk_size)
                with memoryview(self._chunk(index)) as plain:
                    take = min(len(plain) - offset, wanted - done)
                    out[done : done + take] = plain[offset : offset + take]
                done += take
                self._pos += take
            return done

    def readall(self) -> bytes:
        """Read from the current position to the end."""
        self._check_not_closed()
        out = bytearray(max(0, self.size - self._pos))
        n = self.readinto(out)
        del out[n:]
        return bytes(out)

    def close(self) -> None:
        """Close the file descriptor and drop the cached plaintext."""
        fd, self._fd = getattr(self, "_fd", None), None
        self._cache = b""
        self._cache_index = -1
        if fd is not None:
            os.close(fd)
        super().close()

    # ----------------------------------------------------------- chunks

    def _check_not_closed(self) -> None:
        if self.closed:
            raise ValueError("I/O operation on closed blob reader")

    def _chunk(self, index: int) -> bytes:
        """Return decrypted chunk *index*, from the one-chunk cache when possible."""
        if index != self._cache_index:
            # Drop the old plaintext first so two chunks are never held at once.
            self._cache = b""
            self._cache_index = -1
            self._cache = self._decrypt_chunk(index)
            self._cache_index = index
        return self._cache

    def _decrypt_chunk(self, index: int) -> bytes:
        """Read and authenticate chunk *index* (no caching)."""
        assert self._fd is not None
        last = index == self.chunk_count - 1
        stored_chunk = self.chunk_size + CHUNK_OVERHEAD
        offset = HEADER_SIZE + index * stored_chunk
        length = (self.stored_size - offset) if last else stored_chunk
        data = os.pread(self._fd, length, offset)
        if len(data) != length:
            # The file shrank after it was opened.
            raise BlobIntegrityError(self.blob_id, index, "chunk is truncated")
        aad = self._aad_prefix + _CHUNK_TRAILER.pack(index, 1 if last else 0)
        try:
            return self._aead.decrypt(data[:NONCE_SIZE], memoryview(data)[NONCE_SIZE:], aad)
        except InvalidTag:
            raise BlobIntegrityError(self.blob_id, index, "authentication failed") from None
