"""Tests for the encrypted blob vault (adapters.vault) and key handling (adapters.keys)."""

from __future__ import annotations

import asyncio
import errno
import fcntl
import hashlib
import io
import os
import random
import resource
import shutil
import stat
import tracemalloc
import zipfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from adapters.keys import (
    FieldDecryptError,
    KeyFileError,
    KeyUnwrapError,
    decrypt_field,
    encrypt_field,
    load_or_create_master_key,
    master_key_id,
    new_data_key,
    unwrap_key,
    wrap_key,
    wrapped_key_id,
)
from adapters.vault import (
    _RECEIVE_BYTES,
    _SPARE_BUFFERS,
    _SPARE_RECEIVE,
    CHUNK_OVERHEAD,
    CHUNK_SIZE,
    HEADER_SIZE,
    NONCE_SIZE,
    BlobIntegrityError,
    BlobReader,
    InvalidBlobIdError,
    Vault,
)
from tests.fsyncs import CAN_NAME_FDS, fsynced_paths

CS = CHUNK_SIZE
STORED_CHUNK = CS + CHUNK_OVERHEAD
MARKER = b"PATIENT-SECRET-MARKER-7f3a9c"


@pytest.fixture
def vault(tmp_path: Path) -> Vault:
    return Vault(tmp_path / "vault")


@pytest.fixture
def key() -> bytes:
    return new_data_key()


def payload(size: int, seed: int = 1) -> bytes:
    """Deterministic non-repeating bytes, so a misplaced slice cannot compare equal."""
    return random.Random(seed).randbytes(size)


def store(vault: Vault, blob_id: str, key: bytes, data: bytes, piece: int = 65536) -> None:
    with vault.writer(blob_id, key) as w:
        for start in range(0, len(data), piece):
            w.write(data[start : start + piece])
            w.flush()


def blob_file(vault: Vault, blob_id: str) -> Path:
    return vault.root / "blobs" / blob_id[:2] / blob_id


def all_files(directory: Path) -> list[Path]:
    return [p for p in directory.rglob("*") if p.is_file()]


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("size", [0, 1, CS - 1, CS, CS + 1, CS * 7 // 2])
def test_round_trip(vault: Vault, key: bytes, size: int) -> None:
    data = payload(size, seed=size)
    blob_id = f"blob{size:08d}"
    with vault.writer(blob_id, key) as w:
        w.write(data)
    info = w.commit()  # idempotent after the context manager committed
    assert info.size == size
    assert info.sha256 == hashlib.sha256(data).hexdigest()
    expected_chunks = max(1, -(-size // CS))
    assert info.stored_size == HEADER_SIZE + expected_chunks * CHUNK_OVERHEAD + size
    assert blob_file(vault, blob_id).stat().st_size == info.stored_size
    assert stat.S_IMODE(blob_file(vault, blob_id).stat().st_mode) == 0o600

    with vault.reader(blob_id, key) as r:
        assert r.size == size
        assert r.chunk_count == expected_chunks
        assert r.read() == data
        assert r.read(10) == b""
    assert vault.verify(blob_id, key) == info
    assert all_files(vault.root / "tmp") == []


def test_round_trip_odd_write_sizes(vault: Vault, key: bytes) -> None:
    data = payload(3 * CS + 12345)
    rng = random.Random(5)
    with vault.writer("oddsizes", key) as w:
        pos = 0
        while pos < len(data):
            n = rng.choice([1, 7, 4096, 65536, CS - 3, CS, 2 * CS + 1])
            assert w.write(memoryview(data)[pos : pos + n]) == len(data[pos : pos + n])
            pos += n
        assert w.tell() == len(data)
    with vault.reader("oddsizes", key) as r:
        assert r.read() == data


def test_random_seeks_and_reads(vault: Vault, key: bytes) -> None:
    data = payload(CS * 7 // 2, seed=9)
    store(vault, "seektest", key, data)
    rng = random.Random(42)
    with vault.reader("seektest", key) as r:
        assert r.seekable() and r.readable() and not r.writable()
        for _ in range(300):
            whence = rng.choice([io.SEEK_SET, io.SEEK_CUR, io.SEEK_END])
            if whence == io.SEEK_SET:
                target = rng.randrange(0, len(data) + 100)
                assert r.seek(target) == target
            elif whence == io.SEEK_CUR:
                delta = rng.randrange(-r.tell(), len(data) - r.tell() + 50)
                target = r.tell() + delta
                assert r.seek(delta, io.SEEK_CUR) == target
            else:
                delta = -rng.randrange(0, len(data) + 1)
                target = len(data) + delta
                assert r.seek(delta, io.SEEK_END) == target
            assert r.tell() == target
            n = rng.choice([0, 1, 100, 4096, CS - 1, CS + 7, 2 * CS])
            assert r.read(n) == data[target : target + n]
            assert r.tell() == min(len(data), target + n) if target <= len(data) else target
        # readinto across chunk boundaries fills the whole buffer.
        r.seek(CS - 10)
        buf = bytearray(CS + 20)
        assert r.readinto(buf) == CS + 20
        assert bytes(buf) == data[CS - 10 : 2 * CS + 10]
        with pytest.raises(OSError):
            r.seek(-1)
        with pytest.raises(OSError):
            r.seek(-len(data) - 1, io.SEEK_END)
        r.seek(0)
        assert io.BufferedReader(r).read() == data
    with pytest.raises(ValueError):
        r.read(1)


def test_zipfile_reads_from_blob(vault: Vault, key: bytes) -> None:
    members = {
        "report.txt": MARKER * 1000,
        "scan/raw.bin": payload(CS + 4321, seed=3),
        "scan/zeros.bin": bytes(2 * CS),
    }
    raw = io.BytesIO()
    with zipfile.ZipFile(raw, "w") as zf:
        zf.writestr("report.txt", members["report.txt"], compress_type=zipfile.ZIP_DEFLATED)
        zf.writestr("scan/raw.bin", members["scan/raw.bin"], compress_type=zipfile.ZIP_STORED)
        zf.writestr("scan/zeros.bin", members["scan/zeros.bin"], zipfile.ZIP_DEFLATED)
    store(vault, "zipblob1", key, raw.getvalue())
    with vault.reader("zipblob1", key) as r, zipfile.ZipFile(r) as zf:
        assert zf.testzip() is None
        for name in reversed(zf.namelist()):  # out of order: random access
            assert zf.read(name) == members[name]


def test_pydicom_reads_from_blob(vault: Vault, key: bytes) -> None:
    pydicom = pytest.importorskip("pydicom")
    from pydicom.data import get_testdata_file

    path = get_testdata_file("CT_small.dcm")
    assert path is not None
    reference = pydicom.dcmread(path)
    store(vault, "dicomblob", key, Path(path).read_bytes())
    with vault.reader("dicomblob", key) as r:
        ds = pydicom.dcmread(r)
        assert ds.PatientName == reference.PatientName
        assert ds.SOPInstanceUID == reference.SOPInstanceUID
        assert ds.PixelData == reference.PixelData


def test_pillow_reads_from_blob(vault: Vault, key: bytes) -> None:
    image_mod = pytest.importorskip("PIL.Image")
    img = image_mod.frombytes("RGB", (64, 48), payload(64 * 48 * 3))
    raw = io.BytesIO()
    img.save(raw, format="PNG")
    store(vault, "pngblob01", key, raw.getvalue())
    with vault.reader("pngblob01", key) as r, image_mod.open(r) as loaded:
        assert loaded.size == (64, 48)
        assert loaded.tobytes() == img.tobytes()


def test_pypdfium2_reads_from_blob(vault: Vault, key: bytes) -> None:
    pdfium = pytest.importorskip("pypdfium2")
    doc = pdfium.PdfDocument.new()
    for _ in range(3):
        doc.new_page(595, 842)
    raw = io.BytesIO()
    doc.save(raw)
    doc.close()
    store(vault, "pdfblob01", key, raw.getvalue())
    with vault.reader("pdfblob01", key) as r:
        pdf = pdfium.PdfDocument(r)
        try:
            assert len(pdf) == 3
        finally:
            pdf.close()


@pytest.mark.parametrize("size", [CS * 5 // 2 + 17, CS * 19 // 2 + 5])  # one batch, several
async def test_write_stream(vault: Vault, key: bytes, size: int) -> None:
    data = payload(size, seed=11)

    async def pieces() -> AsyncIterator[bytes]:
        for start in range(0, len(data), 65536):
            yield data[start : start + 65536]
            await asyncio.sleep(0)

    info = await vault.write_stream("streamed", key, pieces())
    assert info.size == len(data)
    assert info.sha256 == hashlib.sha256(data).hexdigest()
    with vault.reader("streamed", key) as r:
        assert r.read() == data
    # Without the digest: the same blob, no hash computed.
    unhashed = await vault.write_stream("unhashed", key, pieces(), digest=False)
    assert (unhashed.size, unhashed.sha256) == (len(data), "")
    assert vault.verify("unhashed", key).sha256 == info.sha256


async def test_write_stream_failure_and_cancel_clean_up(vault: Vault, key: bytes) -> None:
    async def failing() -> AsyncIterator[bytes]:
        yield payload(CS + 5)
        raise ConnectionError("download broke")

    with pytest.raises(ConnectionError):
        await vault.write_stream("brokenstream", key, failing())
    assert not vault.exists("brokenstream")
    assert all_files(vault.root) == []

    started = asyncio.Event()

    async def endless() -> AsyncIterator[bytes]:
        piece = payload(65536)
        while True:
            started.set()
            yield piece
            await asyncio.sleep(0)

    task = asyncio.create_task(vault.write_stream("cancelled", key, endless()))
    await started.wait()
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert all_files(vault.root) == []


def feeder(data: bytes, sizes: list[int]) -> tuple[list[int], Any]:
    """A readinto over `data` that puts at most the next of `sizes` (cycled) bytes in each
    view it is given, yielding to the loop each time; and the lengths of the views."""
    asked: list[int] = []
    position = 0

    async def readinto(view: memoryview) -> int:
        nonlocal position
        asked.append(len(view))
        await asyncio.sleep(0)
        count = min(len(view), sizes[len(asked) % len(sizes)], len(data) - position)
        view[:count] = data[position : position + count]
        position += count
        return count

    return asked, readinto


@pytest.mark.parametrize("size", [1, CS * 3 + 5, _RECEIVE_BYTES, _RECEIVE_BYTES * 3 + CS + 7])
@pytest.mark.parametrize("direct", [False, True])
async def test_write_from_receives_into_reused_buffers_the_same_blob(
    vault: Vault, key: bytes, size: int, direct: bool
) -> None:
    """Bytes received straight into the vault's buffers, in odd pieces, make the same blob
    as a sized writer's (hash, stored size, contents). Never asked for more than the blob's
    size, nor more than a buffer; the two buffers go back wiped, and the next blob takes
    them again instead of new ones."""
    data = payload(size, seed=size)
    asked, readinto = feeder(data, [65536, 1, 3 * CS + 11, 250_000])
    info = await vault.write_from("recv0001", key, readinto, size, direct=direct)
    assert (info.size, info.sha256) == (size, hashlib.sha256(data).hexdigest())
    with vault.writer("sized001", key, size=size) as writer:
        writer.write(data)
    assert info.stored_size == vault.verify("sized001", key).stored_size
    with vault.reader("recv0001", key) as reader:
        assert reader.read() == data
    assert sum(asked) >= size and max(asked) <= min(size, _RECEIVE_BYTES)
    buffers = list(vault._spare_receive)
    assert len(buffers) == 2 and all(buffer[:] == bytes(_RECEIVE_BYTES) for buffer in buffers)
    _, readinto = feeder(data[::-1], [1 << 30])
    await vault.write_from("recv0002", key, readinto, size, digest=False, durable=False)
    with vault.reader("recv0002", key) as reader:
        assert reader.read() == data[::-1]
    assert sorted(map(id, vault._spare_receive)) == sorted(map(id, buffers))
    assert all_files(vault.tmp_dir) == []


async def test_write_from_short_failing_or_cancelled_stores_nothing(
    vault: Vault, key: bytes
) -> None:
    """A stream that ends early (ValueError), raises, or is cancelled while a buffer is being
    sealed leaves no blob and no temp file; the buffers go back only once no thread reads
    them, wiped, and at most _SPARE_RECEIVE of them are kept."""
    size = _RECEIVE_BYTES * 2 + 5
    data = payload(size, seed=5)
    _, short = feeder(data[:-1], [CS])
    with pytest.raises(ValueError, match="shorter"):
        await vault.write_from("short001", key, short, size)

    async def failing(view: memoryview) -> int:
        view[:CS] = data[:CS]
        raise ConnectionResetError("connection lost mid-body")

    with pytest.raises(ConnectionResetError):
        await vault.write_from("broken01", key, failing, size)
    started = asyncio.Event()
    _, feed = feeder(data, [CS])

    async def slow(view: memoryview) -> int:
        count = await feed(view)
        started.set()
        await asyncio.sleep(0.01)
        return count

    task = asyncio.create_task(vault.write_from("cancel01", key, slow, size, direct=True))
    await started.wait()
    await asyncio.sleep(0.08)  # the first buffer is full and in a worker thread by now
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not any(vault.exists(b) for b in ("short001", "broken01", "cancel01"))
    assert all_files(vault.root) == []
    assert 0 < len(vault._spare_receive) <= _SPARE_RECEIVE
    assert all(buffer[:] == bytes(_RECEIVE_BYTES) for buffer in vault._spare_receive)
    many = [vault._take_receive() for _ in range(_SPARE_RECEIVE + 3)]
    for buffer in many:
        vault._give_back_receive(buffer, 0)
    assert len(vault._spare_receive) == _SPARE_RECEIVE


# --------------------------------------------------------------------------- tampering

TAMPER_DATA = payload(CS * 7 // 2, seed=77)


@pytest.fixture
def stored(vault: Vault, key: bytes) -> tuple[Vault, bytes, Path]:
    store(vault, "victim01", key, TAMPER_DATA)
    return vault, key, blob_file(vault, "victim01")


def assert_rejected(vault: Vault, blob_id: str, key: bytes, chunk_index: int | None = None) -> None:
    """Every way of reading the blob raises BlobIntegrityError; no plaintext escapes."""
    with pytest.raises(BlobIntegrityError) as excinfo:
        vault.verify(blob_id, key)
    assert excinfo.value.blob_id == blob_id
    if chunk_index is not None:
        assert excinfo.value.chunk_index == chunk_index
    assert isinstance(excinfo.value, OSError)
    with pytest.raises(BlobIntegrityError), vault.reader(blob_id, key) as r:
        got = r.read()
        pytest.fail(f"read returned {len(got)} bytes from a damaged blob")


def test_flipped_byte_in_ciphertext(stored: tuple[Vault, bytes, Path]) -> None:
    vault, key, path = stored
    raw = bytearray(path.read_bytes())
    raw[HEADER_SIZE + STORED_CHUNK + 12 + 1000] ^= 0x01  # inside chunk 1's ciphertext
    path.write_bytes(raw)
    assert_rejected(vault, "victim01", key, chunk_index=1)
    # Chunks before the damage still read; the damaged one never returns bytes.
    with vault.reader("victim01", key) as r:
        assert r.read(CS) == TAMPER_DATA[:CS]
        with pytest.raises(BlobIntegrityError) as excinfo:
            r.read(10)
        assert excinfo.value.chunk_index == 1


@pytest.mark.parametrize("offset", [0, 4, 5, HEADER_SIZE, HEADER_SIZE + STORED_CHUNK - 1, -1])
def test_flipped_byte_elsewhere(stored: tuple[Vault, bytes, Path], offset: int) -> None:
    """Header, nonce, tag and the last chunk are all covered."""
    vault, key, path = stored
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0x80
    path.write_bytes(raw)
    assert_rejected(vault, "victim01", key)


@pytest.mark.parametrize("cut", [1, CHUNK_OVERHEAD, CS // 2 + CHUNK_OVERHEAD + 1, CS])
def test_truncated(stored: tuple[Vault, bytes, Path], cut: int) -> None:
    vault, key, path = stored
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - cut)
    with pytest.raises(BlobIntegrityError):
        vault.reader("victim01", key)  # detected at open time
    assert_rejected(vault, "victim01", key)


def test_dropped_last_chunk(stored: tuple[Vault, bytes, Path]) -> None:
    vault, key, path = stored
    with open(path, "r+b") as f:
        f.truncate(HEADER_SIZE + 3 * STORED_CHUNK)  # exactly three whole chunks remain
    with pytest.raises(BlobIntegrityError) as excinfo:
        vault.reader("victim01", key)
    assert excinfo.value.chunk_index == 2
    assert_rejected(vault, "victim01", key)


def test_header_only_and_empty_file(stored: tuple[Vault, bytes, Path]) -> None:
    vault, key, path = stored
    raw = path.read_bytes()
    path.write_bytes(raw[:HEADER_SIZE])
    assert_rejected(vault, "victim01", key)
    path.write_bytes(b"")
    assert_rejected(vault, "victim01", key, chunk_index=None)


def test_swapped_chunks(stored: tuple[Vault, bytes, Path]) -> None:
    vault, key, path = stored
    raw = path.read_bytes()
    c0 = raw[HEADER_SIZE : HEADER_SIZE + STORED_CHUNK]
    c1 = raw[HEADER_SIZE + STORED_CHUNK : HEADER_SIZE + 2 * STORED_CHUNK]
    path.write_bytes(raw[:HEADER_SIZE] + c1 + c0 + raw[HEADER_SIZE + 2 * STORED_CHUNK :])
    assert_rejected(vault, "victim01", key, chunk_index=0)


def test_blob_copied_under_another_id(stored: tuple[Vault, bytes, Path]) -> None:
    vault, key, path = stored
    other = blob_file(vault, "intruder")
    other.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(path, other)
    assert_rejected(vault, "intruder", key)
    # Same for a one-chunk blob, where only the final chunk exists.
    store(vault, "smallone", key, MARKER)
    shutil.copyfile(blob_file(vault, "smallone"), other)
    assert_rejected(vault, "intruder", key)


def test_wrong_key(stored: tuple[Vault, bytes, Path]) -> None:
    vault, _key, _path = stored
    with pytest.raises(BlobIntegrityError):
        vault.reader("victim01", new_data_key())
    assert_rejected(vault, "victim01", new_data_key())


def test_no_plaintext_on_disk(vault: Vault, key: bytes) -> None:
    data = (MARKER + b" Ivanova, diagnosis: ") * (CS // 20)
    with vault.writer("markerblob", key) as w:
        w.write(data)
        w.write(data)  # at least one full chunk is now in the temp file
        temp_files = all_files(vault.root / "tmp")
        assert len(temp_files) == 1
        assert temp_files[0].stat().st_size > CS
        assert MARKER not in temp_files[0].read_bytes()
    for path in all_files(vault.root):
        content = path.read_bytes()
        assert MARKER not in content
        assert MARKER[:12] not in content
    with vault.reader("markerblob", key) as r:
        assert r.read() == data + data


# --------------------------------------------------------------------------- lifecycle


def test_writer_aborts_on_exception(vault: Vault, key: bytes) -> None:
    with pytest.raises(RuntimeError), vault.writer("aborted1", key) as w:
        w.write(payload(CS * 2 + 1))
        raise RuntimeError("boom")
    assert not vault.exists("aborted1")
    assert all_files(vault.root / "blobs") == []
    assert all_files(vault.root / "tmp") == []
    with pytest.raises(ValueError):
        w.write(b"more")
    w.abort()  # idempotent
    assert w.close() is None


def test_writer_explicit_abort_and_gc(vault: Vault, key: bytes) -> None:
    w = vault.writer("aborted2", key)
    w.write(payload(CS + 1))
    w.abort()
    assert all_files(vault.root) == []
    w2 = vault.writer("abandoned", key)
    w2.write(b"x" * 100)
    del w2  # dropped without commit: its temp file goes away, nothing is published
    assert all_files(vault.root) == []


def test_writer_file_protocol(vault: Vault, key: bytes) -> None:
    w = vault.writer("protocol", key)
    assert not w.seekable() and w.writable() and not w.readable() and not w.closed
    w.write(b"abc")
    w.flush()
    info = w.close()
    assert info is not None and info.size == 3
    assert w.closed
    assert w.close() == info
    with pytest.raises(ValueError):
        w.write(b"x")


def test_duplicate_id_refused(vault: Vault, key: bytes) -> None:
    store(vault, "duplicate", key, b"first")
    with pytest.raises(FileExistsError), vault.writer("duplicate", key) as w:
        w.write(b"second")
    with vault.reader("duplicate", key) as r:
        assert r.read() == b"first"
    assert all_files(vault.root / "tmp") == []


@pytest.mark.skipif(not CAN_NAME_FDS, reason="needs /proc to name a descriptor")
async def test_only_a_writer_asked_not_to_be_durable_skips_fsync(
    vault: Vault, key: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A durable blob fsyncs its file, then its new shard's parent and the shard; one
    written with durable=False fsyncs nothing, and reads back the same all the same."""
    data = payload(CS * 2 + 5)
    calls = fsynced_paths(monkeypatch)

    async def pieces() -> AsyncIterator[bytes]:
        yield data

    await vault.write_stream("nd000001", key, pieces(), durable=False)
    with vault.writer("nd000002", key, durable=False) as writer:
        writer.write(data)
    assert calls == []
    store(vault, "du000001", key, data)
    tmp, blobs = str(vault.tmp_dir), str(vault.blobs_dir)
    assert [call.startswith(f"{tmp}/du000001.") for call in calls] == [True, False, False]
    assert calls[1:] == [blobs, f"{blobs}/du"]
    for blob_id in ("nd000001", "nd000002", "du000001"):
        assert vault.verify(blob_id, key).size == len(data)
        with vault.reader(blob_id, key) as reader:
            assert reader.read() == data


def accepts_o_direct(directory: Path) -> bool:
    """Whether the file system under `directory` takes O_DIRECT (tmpfs on older kernels
    does not)."""
    try:
        fd = os.open(directory / "probe", os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o600)
    except OSError:
        return False
    os.close(fd)
    os.unlink(directory / "probe")
    return True


def write_direct(vault: Vault, blob_id: str, key: bytes, data: bytes, piece: int) -> bool:
    """Store `data` with direct=True in pieces; whether blocks went past the page cache."""
    with vault.writer(blob_id, key, durable=False, direct=True) as writer:
        for start in range(0, len(data), piece):
            writer.write(data[start : start + piece])
        went_direct = writer.direct
    assert all_files(vault.tmp_dir) == []
    return went_direct


@pytest.mark.parametrize(
    ("chunk_size", "size"),
    [
        (CS, 0),
        (CS, 1),
        (CS, 4096 - HEADER_SIZE - CHUNK_OVERHEAD),  # one record filling one block exactly
        (CS, CS),
        (CS, CS * 3 + 17),  # one write, at commit
        (CS, CS * 9 + 17),  # writes of 4 records, each leaving an unaligned end for the next
        (1000, 50_017),  # records straddling the 4 KiB blocks over and over
        (1000, 5_000_017),  # and a write (of 4 MiB) before the commit
    ],
)
def test_a_direct_writer_stores_the_same_blob(
    tmp_path: Path, key: bytes, chunk_size: int, size: int
) -> None:
    """A blob written past the page cache (whole blocks, the unaligned end at commit) is
    byte for byte the format every reader knows: it reads back, verifies, and has the
    size the layout promises."""
    vault = Vault(tmp_path / "vault", chunk_size=chunk_size)
    data = payload(size, seed=size)
    went_direct = write_direct(vault, "direct01", key, data, piece=65521)
    assert went_direct == accepts_o_direct(vault.tmp_dir)
    assert vault.verify("direct01", key).size == size
    with vault.reader("direct01", key) as reader:
        assert reader.read() == data
    store(vault, "buffered", key, data)  # the same bytes through the page cache
    records = max(1, -(-size // chunk_size))
    for blob_id in ("direct01", "buffered"):
        stored_size = blob_file(vault, blob_id).stat().st_size
        assert stored_size == HEADER_SIZE + records * CHUNK_OVERHEAD + size


def test_damage_to_a_direct_written_blob_is_detected(vault: Vault, key: bytes) -> None:
    """A flipped byte in a block written past the page cache, and the loss of the end
    written through it (a machine crash before its writeback), fail the tags."""
    data = payload(CS * 3 + 5000, seed=5)
    write_direct(vault, "direct02", key, data, piece=1 << 20)
    path = blob_file(vault, "direct02")
    raw = bytearray(path.read_bytes())
    raw[HEADER_SIZE + STORED_CHUNK + 4096] ^= 0x40  # inside chunk 1
    path.write_bytes(raw)
    assert_rejected(vault, "direct02", key, chunk_index=1)
    raw[HEADER_SIZE + STORED_CHUNK + 4096] ^= 0x40
    path.write_bytes(raw[: len(raw) - len(raw) % 4096])  # only the whole blocks
    assert_rejected(vault, "direct02", key)


def test_a_direct_writer_falls_back_to_the_page_cache(
    vault: Vault, key: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where the kernel refuses the O_DIRECT writes (here: blocks of 1000 bytes, which no
    device takes), the writer goes on through the page cache, nothing written twice."""
    monkeypatch.setattr("adapters.vault._DIRECT_ALIGN", 1000)
    data = payload(CS * 5 + 3, seed=6)  # more than one write's worth
    assert not write_direct(vault, "direct03", key, data, piece=1 << 16)
    with vault.reader("direct03", key) as reader:
        assert reader.read() == data


def test_a_file_system_without_o_direct_gets_a_buffered_blob(
    vault: Vault, key: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file system without direct I/O refuses O_DIRECT with EINVAL (every one here
    takes it, so the refusal is staged): the blob is written through the page cache."""
    real = fcntl.fcntl

    def no_direct(fd: int, command: int, arg: int = 0) -> int:
        if command == fcntl.F_SETFL and arg & os.O_DIRECT:
            raise OSError(errno.EINVAL, "no O_DIRECT here")
        return real(fd, command, arg)

    monkeypatch.setattr(fcntl, "fcntl", no_direct)
    data = payload(CS + 9000, seed=7)
    assert not write_direct(vault, "direct04", key, data, piece=1 << 16)
    with vault.reader("direct04", key) as reader:
        assert reader.read() == data


@pytest.mark.parametrize(
    ("chunk_size", "size"),
    [(CS, 0), (CS, 1), (CS, CS), (CS, CS * 9 + 17), (1000, 50_017), (1000, 5_000_017)],
)
@pytest.mark.parametrize("direct", [False, True])
def test_a_sized_writer_seals_as_it_goes_into_the_same_blob(
    tmp_path: Path, key: bytes, chunk_size: int, size: int, direct: bool
) -> None:
    """Told the size up front, the writer seals pieces as they come (no chunk buffer):
    the blob reads back and verifies like any other, hash and stored size included, and
    a flipped byte in it fails its chunk's tag."""
    vault = Vault(tmp_path / "vault", chunk_size=chunk_size)
    data = payload(size, seed=size + 3)
    with vault.writer("sized001", key, direct=direct, size=size) as writer:
        for start in range(0, size, 65521):  # pieces straddling chunks
            writer.write(data[start : start + 65521])
        assert writer._filled == 0  # the last chunk sealed with its last byte, not at commit
    info = vault.verify("sized001", key)
    assert (info.size, info.sha256) == (size, hashlib.sha256(data).hexdigest())
    with vault.reader("sized001", key) as reader:
        assert reader.read() == data
    records = max(1, -(-size // chunk_size))
    assert info.stored_size == HEADER_SIZE + records * CHUNK_OVERHEAD + size
    if size:
        path = blob_file(vault, "sized001")
        raw = bytearray(path.read_bytes())
        middle = size // 2 // chunk_size
        raw[HEADER_SIZE + middle * (chunk_size + CHUNK_OVERHEAD) + NONCE_SIZE] ^= 1
        path.write_bytes(raw)
        assert_rejected(vault, "sized001", key, chunk_index=middle)


def test_a_sized_writer_refuses_more_or_fewer_bytes(vault: Vault, key: bytes) -> None:
    """A byte more than declared is refused as it comes; one fewer fails the commit. Either
    way nothing is stored, not even a temp file."""
    data = payload(CS * 2, seed=9)
    with pytest.raises(ValueError, match="longer"), vault.writer("long0001", key, size=CS * 2) as w:
        w.write(data)
        w.write(b"x")
    with (
        pytest.raises(ValueError, match="shorter"),
        vault.writer("short001", key, size=CS * 2) as w,
    ):
        w.write(data[:-1])
    with pytest.raises(ValueError, match="longer"), vault.writer("empty001", key, size=0) as w:
        w.write(b"x")
    assert not vault.exists("long0001") and not vault.exists("short001")
    assert all_files(vault.root) == []


def test_writers_reuse_wiped_buffers_and_keep_only_a_few(vault: Vault, key: bytes) -> None:
    """A finished writer's buffers go to the next one (no fresh megabytes per blob), with
    no plaintext left in them meanwhile, and only a few pairs are kept."""
    data = payload(CS + 100, seed=8)
    store(vault, "reuse001", key, data)
    [(plain, staging)] = vault._spare
    assert plain == bytes(CS)
    with vault.writer("reuse002", key, direct=True) as writer:
        assert vault._spare == [] and writer._buf is plain and writer._out is staging
        writer.write(data[::-1])
    with vault.reader("reuse002", key) as reader:
        assert reader.read() == data[::-1]
    writers = [vault.writer(f"many{n:04d}", key) for n in range(6)]
    for writer in writers[:3]:
        writer.write(data)
        writer.commit()
    for writer in writers[3:]:
        writer.abort()
    assert len(vault._spare) == _SPARE_BUFFERS
    assert all(plain == bytes(CS) for plain, _ in vault._spare)


def test_a_failed_write_is_reported_as_itself_with_every_spare_kept(
    vault: Vault, key: bytes
) -> None:
    """A write the kernel refuses (here: past the file size limit, EFBIG) aborts the
    writer with that error, even when its buffers are one pair too many to keep; no temp
    file stays, and the next writer works."""
    spares = [vault._take_buffers() for _ in range(_SPARE_BUFFERS)]
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    data = payload(CS * 6, seed=10)
    try:
        resource.setrlimit(resource.RLIMIT_FSIZE, (CS, hard))  # Python ignores SIGXFSZ
        for blob_id, direct, size in (("efbig001", True, None), ("efbig002", False, len(data))):
            writer = vault.writer(blob_id, key, direct=direct, size=size)  # a new pair
            for pair in spares:
                vault._give_back(*pair)  # the pool full again meanwhile
            with pytest.raises(OSError) as excinfo:
                writer.write(data)
            assert excinfo.value.errno == errno.EFBIG
            assert writer.closed and len(vault._spare) == _SPARE_BUFFERS
            spares = [vault._take_buffers() for _ in range(_SPARE_BUFFERS)]
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert all_files(vault.root) == []
    store(vault, "after001", key, data)
    with vault.reader("after001", key) as reader:
        assert reader.read() == data


def test_delete_exists_iter_and_cleanup(vault: Vault, key: bytes) -> None:
    ids = ["aa000001", "aa000002", "b-_Z0000", "zz" + "x" * 126]
    for blob_id in ids:
        store(vault, blob_id, key, blob_id.encode())
    (vault.root / "blobs" / "aa" / "not.a.blob").write_bytes(b"")
    (vault.root / "blobs" / "aa" / "zz999999").write_bytes(b"")  # wrong shard
    assert sorted(vault.iter_blob_ids()) == sorted(ids)
    assert vault.exists("aa000001")
    assert vault.delete("aa000001") is True
    assert vault.delete("aa000001") is False
    assert not vault.exists("aa000001")
    with pytest.raises(FileNotFoundError):
        vault.reader("aa000001", key)

    # A crashed writer leaves a temp file behind; cleanup_temp removes it.
    crashed = vault.writer("crashed1", key)
    crashed.write(payload(CS + 1))
    assert len(all_files(vault.root / "tmp")) == 1
    assert vault.cleanup_temp(older_than=3600) == 0
    assert vault.cleanup_temp() == 1
    assert all_files(vault.root / "tmp") == []
    crashed.abort()  # temp already gone: still fine


@pytest.mark.parametrize(
    "bad_id",
    [
        "",
        "short",
        "x" * 129,
        "../../etc/passwd",
        "aaaa/bbbb",
        "aaaa\\bbbb",
        "abc.defgh",
        "..abcdefgh",
        "abcdefg\x00h",
        "abcdefgh\n",
        "ábcdefgh",
        12345678,
    ],
)
def test_bad_blob_ids_refused(vault: Vault, key: bytes, bad_id: object) -> None:
    for call in (
        lambda: vault.writer(bad_id, key),  # type: ignore[arg-type]
        lambda: vault.reader(bad_id, key),  # type: ignore[arg-type]
        lambda: vault.exists(bad_id),  # type: ignore[arg-type]
        lambda: vault.delete(bad_id),  # type: ignore[arg-type]
        lambda: vault.verify(bad_id, key),  # type: ignore[arg-type]
    ):
        with pytest.raises(InvalidBlobIdError):
            call()
    assert all_files(vault.root) == []


def test_bad_key_length_refused(vault: Vault) -> None:
    with pytest.raises(ValueError):
        vault.writer("goodid01", b"k" * 16)
    with pytest.raises(ValueError):
        vault.reader("goodid01", b"k" * 31)


def test_reader_is_raw_io(vault: Vault, key: bytes) -> None:
    store(vault, "rawiotest", key, b"hello")
    with vault.reader("rawiotest", key) as r:
        assert isinstance(r, io.RawIOBase) and isinstance(r, BlobReader)
        assert r.read(2) == b"he"
        assert r.readall() == b"llo"
    assert r.closed


@pytest.mark.parametrize("direct", [False, True])
def test_writer_memory_stays_bounded(vault: Vault, key: bytes, direct: bool) -> None:
    """Python's allocations stay near one chunk; the staging map holds four records."""
    piece = payload(65536, seed=123)
    total = 64 << 20
    tracemalloc.start()
    try:
        with vault.writer("bigblob1", key, direct=direct) as w:
            assert w._out is not None and len(w._out) <= 4096 + 4 * STORED_CHUNK  # not traced
            for _ in range(total // len(piece)):
                w.write(piece)
                w.flush()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, f"peak {peak / 2**20:.1f} MiB"
    info = vault.verify("bigblob1", key)
    assert info.size == total
    assert info.sha256 == hashlib.sha256(piece * (total // len(piece))).hexdigest()


# --------------------------------------------------------------------------- keys


def test_master_key_created_0600_and_reloaded(tmp_path: Path) -> None:
    path = tmp_path / "master.key"
    master, created = load_or_create_master_key(path)
    assert created is True
    assert len(master) == 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text().startswith("ccmk1:")
    assert [p.name for p in tmp_path.iterdir()] == ["master.key"]  # no temp left
    again, created_again = load_or_create_master_key(path)
    assert (again, created_again) == (master, False)
    assert load_or_create_master_key(path, create=False) == (master, False)


def test_master_key_refusals(tmp_path: Path) -> None:
    path = tmp_path / "master.key"
    load_or_create_master_key(path)
    os.chmod(path, 0o644)
    with pytest.raises(KeyFileError, match="chmod 600"):
        load_or_create_master_key(path)
    os.chmod(path, 0o640)
    with pytest.raises(KeyFileError):
        load_or_create_master_key(path)

    short = tmp_path / "short.key"
    short.write_text("ccmk1:" + "ab" * 16 + "\n")
    os.chmod(short, 0o600)
    with pytest.raises(KeyFileError, match="32 bytes"):
        load_or_create_master_key(short)
    for bad in (b"", os.urandom(32), b"ccmk1:zz" + b"0" * 62, b"ccmk2:" + b"00" * 32):
        short.write_bytes(bad)
        with pytest.raises(KeyFileError):
            load_or_create_master_key(short)

    with pytest.raises(KeyFileError):
        load_or_create_master_key(tmp_path / "missing.key", create=False)
    with pytest.raises(KeyFileError):
        load_or_create_master_key(tmp_path / "no" / "such" / "dir.key")


def test_wrap_unwrap(tmp_path: Path) -> None:
    master = load_or_create_master_key(tmp_path / "m.key")[0]
    data_key = new_data_key()
    assert data_key != new_data_key() and len(data_key) == 32
    wrapped = wrap_key(master, data_key, "case-123")
    assert wrapped != wrap_key(master, data_key, "case-123")  # random nonce
    assert data_key not in wrapped
    assert unwrap_key(master, wrapped, "case-123") == data_key
    assert wrapped_key_id(wrapped) == master_key_id(master)
    assert len(master_key_id(master)) == 8

    with pytest.raises(KeyUnwrapError):
        unwrap_key(master, wrapped, "case-124")
    other = new_data_key()
    with pytest.raises(KeyUnwrapError, match=master_key_id(other)):
        unwrap_key(other, wrapped, "case-123")
    for i in range(len(wrapped)):
        damaged = bytearray(wrapped)
        damaged[i] ^= 0x01
        with pytest.raises(KeyUnwrapError):
            unwrap_key(master, bytes(damaged), "case-123")
    with pytest.raises(KeyUnwrapError):
        unwrap_key(master, wrapped[:-1], "case-123")


def test_field_encryption() -> None:
    k = new_data_key()
    text = "Иванова Мария, 12.03.1961 — ☤ diagnosis"
    token = encrypt_field(k, text, "patient.name:case-1")
    assert token.isascii() and token.startswith("f1:")
    assert "Иванова" not in token
    assert token != encrypt_field(k, text, "patient.name:case-1")
    assert decrypt_field(k, token, "patient.name:case-1") == text
    assert decrypt_field(k, encrypt_field(k, "", "c"), "c") == ""

    with pytest.raises(FieldDecryptError):
        decrypt_field(k, token, "patient.name:case-2")
    with pytest.raises(FieldDecryptError):
        decrypt_field(new_data_key(), token, "patient.name:case-1")
    # Tamper in the middle: the last base64 characters may only carry padding bits.
    middle = len(token) // 2
    flipped = token[:middle] + ("A" if token[middle] != "A" else "B") + token[middle + 1 :]
    for bad in (flipped, "f1:", "x" + token):
        with pytest.raises(FieldDecryptError):
            decrypt_field(k, bad, "patient.name:case-1")
    # A wrapped key or a field token is never accepted in the other role.
    with pytest.raises(KeyUnwrapError):
        unwrap_key(k, token.encode(), "patient.name:case-1")
