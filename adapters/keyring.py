"""The master key and the per-case data keys it wraps (envelope encryption)."""

from __future__ import annotations

import hashlib
import hmac

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from adapters import keys


class KeyRing:
    """Unwraps case keys on demand (cached in memory only) and encrypts database fields."""

    def __init__(self, master: bytes) -> None:
        self._master = master
        self._cache: dict[str, bytes] = {}
        # The inbox holds raw updates (names, captions) until handled: encrypt them too,
        # under a key derived from the master key, since no case exists yet for a new chat.
        self._inbox_key = HKDF(
            algorithm=hashes.SHA256(), length=32, salt=None, info=b"care-companion inbox v1"
        ).derive(master)
        self._tombstone_key = HKDF(
            algorithm=hashes.SHA256(), length=32, salt=None, info=b"care-companion tombstone v1"
        ).derive(master)

    def chat_hash(self, chat_id: int) -> str:
        """Keyed hash of a chat id for erasure tombstones (the id itself is personal data)."""
        return hmac.new(self._tombstone_key, str(chat_id).encode(), hashlib.sha256).hexdigest()

    def new_wrapped_key(self, case_id: str) -> bytes:
        data_key = keys.new_data_key()
        self._cache[case_id] = data_key
        return keys.wrap_key(self._master, data_key, case_id)

    def case_key(self, case_id: str, wrapped: bytes) -> bytes:
        key = self._cache.get(case_id)
        if key is None:
            key = keys.unwrap_key(self._master, wrapped, case_id)
            self._cache[case_id] = key
        return key

    def forget(self, case_id: str) -> None:
        self._cache.pop(case_id, None)

    def encrypt_field(self, case_id: str, wrapped: bytes, value: str, field: str) -> str:
        return keys.encrypt_field(self.case_key(case_id, wrapped), value, f"{case_id}/{field}")

    def decrypt_field(self, case_id: str, wrapped: bytes, token: str, field: str) -> str:
        return keys.decrypt_field(self.case_key(case_id, wrapped), token, f"{case_id}/{field}")

    def encrypt_inbox(self, update_id: int, payload: str) -> str:
        return keys.encrypt_field(self._inbox_key, payload, f"inbox/{update_id}")

    def decrypt_inbox(self, update_id: int, token: str) -> str:
        return keys.decrypt_field(self._inbox_key, token, f"inbox/{update_id}")

    def seal_outgoing(self, payload: str) -> str:
        """An outbox message that must not sit in the database in clear (a bundle password)."""
        return keys.encrypt_field(self._inbox_key, payload, "outbox/sealed")

    def unseal_outgoing(self, token: str) -> str:
        return keys.decrypt_field(self._inbox_key, token, "outbox/sealed")
