"""Master key file, per-case data keys, key wrapping and column encryption.

Key hierarchy:

* One **master key** (32 random bytes) lives in a file on the server, outside the
  database and outside the blob vault.  It never encrypts records directly; it only
  wraps data keys.  Losing it makes every record unreadable, which is why
  :func:`load_or_create_master_key` reports when it has just created one so the caller
  can log a loud "back up this key" line.
* Each case gets its own random **data key** (:func:`new_data_key`).  The data key is
  stored in the database only in wrapped form (:func:`wrap_key`), bound to the case id,
  so a wrapped key copied onto another case row does not unwrap.  Deleting a case's
  wrapped key crypto-shreds its blobs even if a backup of the blob files survives.
* Sensitive database columns are encrypted with the case's data key through
  :func:`encrypt_field` / :func:`decrypt_field`.

Master key file format (version 1), one ASCII line::

    ccmk1:<64 lowercase hex digits>\\n

The ``ccmk1:`` prefix names the format so a later version can change it, and a text
file survives copy-paste into a password manager or a secrets store.  The file must be
a regular file with no group/other permission bits (mode 0600 or 0400); anything else
is refused rather than "repaired", because a key that has been readable by others may
have leaked and an operator should decide what to do about that.

Wrapped key format (version 1), 65 bytes::

    version (1 byte, 0x01) | master key id (4 bytes) | nonce (12) | AES-256-GCM(data key) + tag (48)

Field token format (version 1), ASCII::

    "f1:" + urlsafe-base64(nonce (12) | AES-256-GCM ciphertext + tag (16))

All AES-GCM uses a fresh random 96-bit nonce.  Associated data always starts with a
purpose label, so a wrapped key, a field token and a vault chunk can never be
substituted for one another even when the same key is involved.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import os
import secrets
import stat
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from adapters.durable import fsync_dir, write_all

__all__ = [
    "KEY_SIZE",
    "FieldDecryptError",
    "KeyFileError",
    "KeyHandlingError",
    "KeyUnwrapError",
    "decrypt_field",
    "encrypt_field",
    "load_or_create_master_key",
    "master_key_id",
    "new_data_key",
    "unwrap_key",
    "wrap_key",
    "wrapped_key_id",
]

KEY_SIZE = 32  # AES-256
NONCE_SIZE = 12  # the GCM standard nonce; other sizes go through GHASH and are slower
TAG_SIZE = 16

_KEY_FILE_PREFIX = "ccmk1:"
# Large enough for the one line plus generous whitespace; bounded so a wrong path
# (say, a database file) is not slurped into memory.
_KEY_FILE_MAX_READ = 4096

_WRAP_VERSION = 1
_KEY_ID_SIZE = 4
_WRAP_HEADER_SIZE = 1 + _KEY_ID_SIZE
_WRAPPED_SIZE = _WRAP_HEADER_SIZE + NONCE_SIZE + KEY_SIZE + TAG_SIZE
_WRAP_AAD_LABEL = b"care-companion/wrap-key/v1\x00"

_FIELD_PREFIX = "f1:"
_FIELD_AAD_LABEL = b"care-companion/field/v1\x00"


class KeyHandlingError(Exception):
    """Base class for every error raised by this module."""


class KeyFileError(KeyHandlingError):
    """The master key file is missing, malformed or has unsafe permissions."""


class KeyUnwrapError(KeyHandlingError):
    """A wrapped data key does not unwrap: wrong master key, wrong context or damaged."""


class FieldDecryptError(KeyHandlingError):
    """An encrypted field does not decrypt: wrong key, wrong context or damaged token."""


# --------------------------------------------------------------------------- master key


def load_or_create_master_key(path: Path, *, create: bool = True) -> tuple[bytes, bool]:
    """Load the master key from *path*, creating it first if the file does not exist.

    Returns ``(key, created)``.  ``created`` is True only when this call generated a
    new key; the caller must then log a loud message telling the operator to back the
    file up, because without it every stored record is unreadable.

    Creation is atomic: the key is written and fsynced under a temporary name with
    mode 0600, then hard-linked to *path* (which fails if another process created the
    file meanwhile, in which case that process's key is loaded instead), and the
    directory is fsynced.  A crash therefore never leaves a half-written key file.

    Pass ``create=False`` once a deployment holds data: a missing key file is then an
    error instead of a silently generated new key that cannot read the old records.

    Raises :class:`KeyFileError` if the file exists but is not a regular file, has any
    group/other permission bits, or does not contain exactly one version-1 key.
    """
    path = Path(path)
    try:
        return _read_master_key(path), False
    except FileNotFoundError:
        pass
    if not create:
        raise KeyFileError(
            f"master key file {path} does not exist and creation is disabled; restore it "
            "from backup (without it the stored records cannot be decrypted)"
        )
    if not path.parent.is_dir():
        raise KeyFileError(f"directory for master key file {path} does not exist")
    key = secrets.token_bytes(KEY_SIZE)
    if _create_key_file(path, key):
        return key, True
    # Lost a creation race to another process: use the key it wrote.
    return _read_master_key(path), False


def _read_master_key(path: Path) -> bytes:
    """Read and validate an existing key file; FileNotFoundError if absent."""
    # O_NOFOLLOW is deliberately not used: secret stores (e.g. Kubernetes) mount keys
    # as symlinks.  The permission check runs on the opened file via fstat, so a swap
    # between check and read is impossible.
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise KeyFileError(f"master key file {path} is not a regular file")
        if st.st_mode & 0o077:
            raise KeyFileError(
                f"master key file {path} has mode {stat.S_IMODE(st.st_mode):04o}; it must not "
                f"be accessible to group or others. Check who could have read it, then run "
                f"'chmod 600 {path}'"
            )
        raw = os.read(fd, _KEY_FILE_MAX_READ)
    finally:
        os.close(fd)
    return _parse_key_file(path, raw)


def _parse_key_file(path: Path, raw: bytes) -> bytes:
    """Decode the ``ccmk1:<hex>`` line; never echo the content in error messages."""
    try:
        text = raw.decode("ascii").strip()
    except UnicodeDecodeError:
        text = ""
    if not text.startswith(_KEY_FILE_PREFIX):
        raise KeyFileError(
            f"master key file {path} is not in the expected format "
            f"'{_KEY_FILE_PREFIX}<64 hex digits>' ({len(raw)} bytes read)"
        )
    body = text[len(_KEY_FILE_PREFIX) :]
    try:
        key = bytes.fromhex(body)
    except ValueError:
        raise KeyFileError(f"master key file {path} does not contain valid hex") from None
    if len(key) != KEY_SIZE:
        raise KeyFileError(
            f"master key file {path} holds a {len(key)}-byte key; expected {KEY_SIZE} bytes"
        )
    return key


def _create_key_file(path: Path, key: bytes) -> bool:
    """Write *key* to *path* atomically; False if *path* appeared meanwhile."""
    data = f"{_KEY_FILE_PREFIX}{key.hex()}\n".encode("ascii")
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        try:
            # The umask can only remove bits, but be explicit in case the file system
            # applies default ACLs.
            os.fchmod(fd, 0o600)
            write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            # link() refuses to replace an existing name, unlike rename(): two processes
            # starting at once cannot overwrite each other's freshly generated key.
            os.link(tmp, path)
        except FileExistsError:
            return False
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    fsync_dir(path.parent)
    return True


def master_key_id(master: bytes) -> str:
    """Short public identifier of a master key: hex of the first 4 bytes of its SHA-256.

    It lets key rotation tell which master key wrapped a given data key, and lets logs
    name the key in use without revealing it.
    """
    _check_key(master, "master key")
    return hashlib.sha256(master).digest()[:_KEY_ID_SIZE].hex()


# --------------------------------------------------------------------------- data keys


def new_data_key() -> bytes:
    """Return a fresh random 32-byte AES-256 data key."""
    return secrets.token_bytes(KEY_SIZE)


def wrap_key(master: bytes, data_key: bytes, context: str) -> bytes:
    """Encrypt *data_key* under *master*, bound to *context* (e.g. the case id).

    The result (65 bytes) carries a version byte and the master key id in clear so
    rotation can find keys wrapped by an old master; both are also authenticated.
    """
    _check_key(master, "master key")
    _check_key(data_key, "data key")
    header = bytes([_WRAP_VERSION]) + bytes.fromhex(master_key_id(master))
    nonce = secrets.token_bytes(NONCE_SIZE)
    sealed = AESGCM(master).encrypt(nonce, data_key, _wrap_aad(header, context))
    return header + nonce + sealed


def unwrap_key(master: bytes, wrapped: bytes, context: str) -> bytes:
    """Decrypt a key made by :func:`wrap_key`; raise :class:`KeyUnwrapError` if it fails.

    Fails when the master key, the context or any byte of *wrapped* differs from what
    was used for wrapping.
    """
    _check_key(master, "master key")
    wrapped = bytes(wrapped)
    if len(wrapped) != _WRAPPED_SIZE or wrapped[0] != _WRAP_VERSION:
        raise KeyUnwrapError("wrapped key has an unknown version or a wrong length")
    header = wrapped[:_WRAP_HEADER_SIZE]
    expected_id = master_key_id(master)
    if header[1:].hex() != expected_id:
        raise KeyUnwrapError(
            f"wrapped key was made with master key {header[1:].hex()}, "
            f"but the loaded master key is {expected_id}"
        )
    nonce = wrapped[_WRAP_HEADER_SIZE : _WRAP_HEADER_SIZE + NONCE_SIZE]
    sealed = wrapped[_WRAP_HEADER_SIZE + NONCE_SIZE :]
    try:
        return AESGCM(master).decrypt(nonce, sealed, _wrap_aad(header, context))
    except InvalidTag:
        raise KeyUnwrapError(
            "wrapped key does not authenticate (wrong context or damaged data)"
        ) from None


def wrapped_key_id(wrapped: bytes) -> str:
    """Return the id of the master key that wrapped *wrapped* (not authenticated here)."""
    if len(wrapped) != _WRAPPED_SIZE or wrapped[0] != _WRAP_VERSION:
        raise KeyUnwrapError("wrapped key has an unknown version or a wrong length")
    return bytes(wrapped[1:_WRAP_HEADER_SIZE]).hex()


def _wrap_aad(header: bytes, context: str) -> bytes:
    return _WRAP_AAD_LABEL + header + context.encode("utf-8")


# --------------------------------------------------------------------------- fields


def encrypt_field(key: bytes, plaintext: str, context: str) -> str:
    """Encrypt a database column value; returns ASCII text safe for a TEXT column.

    *context* should name where the value lives, e.g. ``"patient.name:<case id>"``, so
    a token copied into another column or row does not decrypt there.
    """
    _check_key(key, "field key")
    nonce = secrets.token_bytes(NONCE_SIZE)
    sealed = AESGCM(key).encrypt(nonce, plaintext.encode("utf-8"), _field_aad(context))
    return _FIELD_PREFIX + base64.urlsafe_b64encode(nonce + sealed).decode("ascii")


def decrypt_field(key: bytes, token: str, context: str) -> str:
    """Decrypt a token made by :func:`encrypt_field`; :class:`FieldDecryptError` if wrong."""
    _check_key(key, "field key")
    if not isinstance(token, str) or not token.startswith(_FIELD_PREFIX):
        raise FieldDecryptError("encrypted field has an unknown format")
    try:
        blob = base64.b64decode(token[len(_FIELD_PREFIX) :], altchars=b"-_", validate=True)
    except (binascii.Error, ValueError):
        raise FieldDecryptError("encrypted field is not valid base64") from None
    if len(blob) < NONCE_SIZE + TAG_SIZE:
        raise FieldDecryptError("encrypted field is too short")
    try:
        data = AESGCM(key).decrypt(blob[:NONCE_SIZE], blob[NONCE_SIZE:], _field_aad(context))
    except InvalidTag:
        raise FieldDecryptError(
            "encrypted field does not authenticate (wrong key, wrong context or damaged)"
        ) from None
    return data.decode("utf-8")


def _field_aad(context: str) -> bytes:
    return _FIELD_AAD_LABEL + context.encode("utf-8")


def _check_key(key: bytes, what: str) -> None:
    # AESGCM would also accept 16/24-byte keys; insisting on 32 catches a truncated or
    # mixed-up key early instead of silently using AES-128.
    if not isinstance(key, bytes | bytearray) or len(key) != KEY_SIZE:
        raise ValueError(f"{what} must be {KEY_SIZE} bytes")
