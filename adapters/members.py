"""Unpacking an accepted ZIP (a CD copy) into one encrypted blob per usable member.

Runs only after the intake checks accepted the archive, so its inventory is already known
to be safe (entry count, expanded size, ratio, overlapping entries, path escapes). Members
are streamed from the decrypting reader into the encrypting writer in 1 MiB pieces: no
plaintext touches the disk and memory stays bounded whatever the size of the CD.
"""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import PurePosixPath

from adapters.vault import Vault
from core.ports import StoredMember
from intake import limits
from intake.sniff import HEAD_SIZE, sniff_head
from intake.verdict import Kind

PIECE = 1 << 20
# What a hospital can use from a CD: the images, their index, and documents on it.
USABLE = frozenset({Kind.DICOM, Kind.PDF, Kind.IMAGE})


def member_blob_id(zip_blob_id: str, index: int) -> str:
    """Deterministic, so a retried extraction overwrites its own leftovers."""
    return hashlib.sha256(f"{zip_blob_id}\0member\0{index}".encode()).hexdigest()[:40]


def extract_members(vault: Vault, zip_blob_id: str, key: bytes) -> list[StoredMember]:
    """Every usable member of the ZIP blob as its own blob (blocking: run in a thread)."""
    members: list[StoredMember] = []
    budget = limits.MAX_ZIP_TOTAL  # zipfile never inflates a member past its declared size
    with vault.reader(zip_blob_id, key) as reader, zipfile.ZipFile(reader) as archive:
        for index, info in enumerate(archive.infolist()):
            if info.is_dir() or info.file_size == 0 or info.file_size > budget:
                continue
            with archive.open(info) as source:
                head = source.read(HEAD_SIZE)
                kind = sniff_head(head)
                if kind not in USABLE:
                    continue
                blob_id = member_blob_id(zip_blob_id, index)
                if vault.exists(blob_id):
                    vault.delete(blob_id)
                with vault.writer(blob_id, key) as writer:
                    writer.write(head)
                    while piece := source.read(PIECE):
                        writer.write(piece)
                    blob = writer.commit()
            budget -= blob.size
            members.append(
                StoredMember(
                    member_id=blob_id,
                    blob_id=blob_id,
                    name=str(PurePosixPath(info.filename))[-255:],
                    kind=kind.value,
                    size=blob.size,
                    sha256=blob.sha256,
                )
            )
    return members
