"""Replica on-disk format: byte layouts of the header, data slots, log records and snapshots.

docs/design.md describes these byte by byte; keep the two in step.  Only framing lives
here: what a record means is the tree module's business, how it reaches a disk the
replica module's.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

from . import codec

MAGIC = b"LNMIRROR"
FORMAT_VERSION = 1
HEADER_NAME = "lnmirror.hdr"
LOG_NAME = "log"
SNAPSHOT_NAME = "snapshot"
META_DIR = "meta"
DATA_DIR = "data"
LOCK_NAME = "lock"

_HEADER = struct.Struct("<8sH16sBBBxI16s")
HEADER_SIZE = _HEADER.size + codec.CHECKSUM_BYTES


class FormatError(Exception):
    """A replica's files are not what this version of lnmirrorfs can read."""


@dataclass(frozen=True)
class Header:
    """The self-description every replica carries (invariant I7)."""

    volume_id: bytes
    k: int
    n: int
    share_index: int
    block_size: int
    key_check: bytes
    version: int = FORMAT_VERSION

    def pack(self) -> bytes:
        body = _HEADER.pack(MAGIC, self.version, self.volume_id, self.k, self.n,
                            self.share_index, self.block_size, self.key_check)
        return body + hashlib.blake2b(body, digest_size=codec.CHECKSUM_BYTES).digest()

    @classmethod
    def unpack(cls, raw: bytes) -> Header:
        if len(raw) < len(MAGIC) or raw[:len(MAGIC)] != MAGIC:
            raise FormatError("not an lnmirrorfs replica (no LNMIRROR header)")
        if len(raw) < 10:
            raise FormatError("replica header is truncated")
        version = struct.unpack_from("<H", raw, len(MAGIC))[0]
        if version > FORMAT_VERSION:
            raise FormatError(f"replica has format version {version}, this lnmirrorfs reads "
                              f"up to {FORMAT_VERSION}: upgrade lnmirrorfs")
        if len(raw) != HEADER_SIZE:
            raise FormatError("replica header is truncated or has trailing bytes")
        body, check = raw[:_HEADER.size], raw[_HEADER.size:]
        if hashlib.blake2b(body, digest_size=codec.CHECKSUM_BYTES).digest() != check:
            raise FormatError("replica header is corrupt (checksum mismatch)")
        _, version, volume_id, k, n, index, block_size, key_check = _HEADER.unpack(body)
        if not 1 <= k <= n or index >= n or block_size <= 0:
            raise FormatError(f"replica header has impossible values k={k} n={n} index={index}")
        return cls(volume_id, k, n, index, block_size, key_check, version)

    @property
    def volume_hex(self) -> str:
        return self.volume_id.hex()


# ---- data slots: every block has two, so an interrupted overwrite leaves the old one intact ----

_SLOT_HEAD = struct.Struct("<Q16s")
SLOT_HEAD_SIZE = _SLOT_HEAD.size


def share_size(block_size: int, k: int) -> int:
    return codec.share_length(block_size + codec.SEALED_OVERHEAD, k)


def slot_size(block_size: int, k: int) -> int:
    return SLOT_HEAD_SIZE + share_size(block_size, k)


def slot_offset(block: int, slot: int, size: int) -> int:
    return (2 * block + slot) * size


def pack_slot(gen: int, checksum: bytes, share: bytes) -> bytes:
    return _SLOT_HEAD.pack(gen, checksum) + share


def unpack_slot(raw: bytes) -> tuple[int, bytes, bytes]:
    """Returns (generation, checksum, share); a short read yields generation 0."""
    if len(raw) < SLOT_HEAD_SIZE:
        return 0, b"", b""
    gen, checksum = _SLOT_HEAD.unpack_from(raw)
    return gen, checksum, raw[SLOT_HEAD_SIZE:]


def data_name(file_id: int) -> str:
    return f"{file_id:016x}"


# ---- log records: length, sequence number, sealed ops, then this replica's inline slots ----

_RECORD_HEAD = struct.Struct("<IQI")
LOG_KIND = b"log"
SNAPSHOT_KIND = b"snapshot"


def pack_record(seq: int, sealed: bytes, inline_slots: bytes = b"") -> bytes:
    """A log frame.  `inline_slots` are the slots of the record's written blocks, in the
    order its write ops list them: the log then holds the data too (redo on replay)."""
    return _RECORD_HEAD.pack(4 + len(sealed) + len(inline_slots), seq, len(sealed)) + sealed + inline_slots


def iter_records(raw: bytes):
    """Yield (seq, sealed ops, inline slots, end offset) per complete frame.

    Stops at a short frame or at zeros: the log is preallocated with zeros, so a zero
    length is where the written part ends."""
    pos = 0
    head = _RECORD_HEAD.size
    while pos + head <= len(raw):
        length, seq, sealed_length = _RECORD_HEAD.unpack_from(raw, pos)
        end = pos + head - 4 + length
        if length < 4 or sealed_length > length - 4 or end > len(raw):
            return
        start = pos + head
        yield seq, raw[start:start + sealed_length], raw[start + sealed_length:end], end
        pos = end


# ---- snapshot: the whole tree at one sequence number ----

SNAPSHOT_MAGIC = b"LNMSNAP1"
_SNAPSHOT_HEAD = struct.Struct("<8sQ")


def pack_snapshot(seq: int, sealed: bytes) -> bytes:
    return _SNAPSHOT_HEAD.pack(SNAPSHOT_MAGIC, seq) + sealed


def unpack_snapshot(raw: bytes) -> tuple[int, bytes]:
    if len(raw) < _SNAPSHOT_HEAD.size:
        raise FormatError("snapshot is truncated")
    magic, seq = _SNAPSHOT_HEAD.unpack_from(raw)
    if magic != SNAPSHOT_MAGIC:
        raise FormatError("snapshot has a bad magic number")
    return seq, raw[_SNAPSHOT_HEAD.size:]
