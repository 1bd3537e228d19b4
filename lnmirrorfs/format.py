"""Replica on-disk format: byte layouts of the header, data slots, log records and snapshots.

docs/design.md describes these byte by byte; keep the two in step.  Only framing lives
here: what a record means is the tree module's business, how it reaches a disk the
replica module's.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import math
import struct
from dataclasses import dataclass, field

from . import codec

MAGIC = b"LNMIRROR"
FORMAT_VERSION = 6
HEADER_NAME = "lnmirror.hdr"
LOG_NAME = "log"
SPARE_LOG_NAME = "log.new"
SNAPSHOT_NAME = "snapshot"
META_DIR = "meta"
DATA_DIR = "data"
LOCK_NAME = "lock"

_HEADER = struct.Struct("<8sH16sBBBBI16s")  # ... share index, cipher id, block size ...
# body, then an unkeyed checksum (tells a damaged header from a foreign one without the key),
# then a keyed MAC (a header whose share index or k was edited without the key is refused)
HEADER_SIZE = _HEADER.size + 2 * codec.CHECKSUM_BYTES


class FormatError(Exception):
    """A replica's files are not what this version of lnmirrorfs can read."""


class HeaderDamaged(FormatError):
    """The header is there but does not check out: that replica is FAULTED, not the volume."""


@dataclass(frozen=True)
class Header:
    """The self-description every replica carries (invariant I7)."""

    volume_id: bytes
    k: int
    n: int
    share_index: int
    block_size: int
    key_check: bytes
    cipher: int  # codec.CIPHERS: the AEAD every block and record is sealed with
    version: int = FORMAT_VERSION
    mac: bytes = field(default=b"", compare=False)  # as read; pack() computes it anew

    def _body(self) -> bytes:
        return _HEADER.pack(MAGIC, self.version, self.volume_id, self.k, self.n,
                            self.share_index, self.cipher, self.block_size, self.key_check)

    def pack(self, keys: codec.Keys) -> bytes:
        body = self._body()
        return body + _checksum(body) + codec.header_mac(keys, body)

    def authentic(self, keys: codec.Keys) -> bool:
        """True if the header was written by someone holding the key."""
        return hmac.compare_digest(self.mac, codec.header_mac(keys, self._body()))

    @classmethod
    def unpack(cls, raw: bytes) -> Header:
        """Parse without the key: framing, version and the unkeyed checksum only."""
        if len(raw) < len(MAGIC) or raw[:len(MAGIC)] != MAGIC:
            if len(raw) == HEADER_SIZE:  # a header file of the right size: damaged, not foreign
                raise HeaderDamaged("replica header is corrupt (bad magic)")
            raise FormatError("not an lnmirrorfs replica (no LNMIRROR header)")
        if len(raw) < 10:
            raise HeaderDamaged("replica header is truncated")
        size, check_end = _HEADER.size, _HEADER.size + codec.CHECKSUM_BYTES
        body, check, mac = raw[:size], raw[size:check_end], raw[check_end:]
        whole = len(raw) == HEADER_SIZE and _checksum(body) == check
        if len(raw) == HEADER_SIZE and not whole:  # a flipped version bit is damage, too
            raise HeaderDamaged("replica header is corrupt (checksum mismatch)")
        version = struct.unpack_from("<H", raw, len(MAGIC))[0]
        if version > FORMAT_VERSION:
            raise FormatError(f"replica has format version {version}, this lnmirrorfs reads "
                              f"version {FORMAT_VERSION}: upgrade lnmirrorfs")
        if version < FORMAT_VERSION:
            raise FormatError(f"replica has format version {version}, this lnmirrorfs reads "
                              f"only version {FORMAT_VERSION}: restore it with the lnmirrorfs "
                              "release that wrote it, then init a new volume")
        if not whole:
            raise HeaderDamaged("replica header is truncated or has trailing bytes")
        _, version, volume_id, k, n, index, cipher, block_size, key_check = _HEADER.unpack(body)
        if not 1 <= k <= n or block_size <= 0 or cipher not in codec.CIPHERS:
            raise HeaderDamaged(f"replica header has impossible values k={k} n={n} cipher={cipher}")
        return cls(volume_id, k, n, index, block_size, key_check, cipher, version, mac)

    @property
    def volume_hex(self) -> str:
        return self.volume_id.hex()

    @property
    def aead(self) -> codec.Cipher:
        return codec.CIPHERS[self.cipher]

    @property
    def layout(self) -> SlotLayout:
        return SlotLayout.of(self.block_size, self.k, self.aead.overhead)


def _checksum(body: bytes) -> bytes:
    return hashlib.blake2b(body, digest_size=codec.CHECKSUM_BYTES).digest()


# ---- data slots: every block has two, one in each of its inode's two slot files ----
# A new version of a block goes to the slot the current one does not use, so an interrupted
# overwrite leaves the old one intact; a block written once uses only slot file 0, so data
# written once costs one slot of space, not two.

_SLOT_HEAD = struct.Struct("<Q16s")
SLOT_HEAD_SIZE = _SLOT_HEAD.size
SLOTS = 2
PAGE = 4096  # the filesystem block a hole punch frees whole
BODY_ALIGN = 64  # a slot's body is the share's last multiple of this many bytes


def share_size(block_size: int, k: int, overhead: int) -> int:
    """The share of a block sealed with `overhead` bytes (nonce and tag) more."""
    return codec.share_length(block_size + overhead, k)


@dataclass(frozen=True)
class SlotLayout:
    """Where a block's slot lies in a slot file.

    A slot is its head (generation, checksum, and the first `share % 64` bytes of the share:
    for k = 1 the AEAD's nonce and tag, 40 or 56 bytes) and its body (the rest: for k = 1 exactly one block of
    ciphertext).  Slots are stored in groups: the heads of `group` blocks packed in whole
    pages, then their bodies, so bodies are page-aligned where their size allows and a
    stale one can be punched out whole, freeing its disk blocks (`body_pages`)."""

    head_size: int
    body_size: int
    group: int  # blocks per group
    heads_bytes: int  # the group's head area, whole pages

    @staticmethod
    @functools.cache
    def of(block_size: int, k: int, overhead: int) -> SlotLayout:
        share = share_size(block_size, k, overhead)
        body = share // BODY_ALIGN * BODY_ALIGN
        head = SLOT_HEAD_SIZE + share - body
        step = PAGE // math.gcd(body, PAGE)  # groups of bodies that fill whole pages
        group = max(step, PAGE // head // step * step)
        return SlotLayout(head, body, group, -(-group * head // PAGE) * PAGE)

    @property
    def size(self) -> int:
        return self.head_size + self.body_size

    def _group_start(self, block: int) -> int:
        return block // self.group * (self.heads_bytes + self.group * self.body_size)

    def head_offset(self, block: int) -> int:
        return self._group_start(block) + block % self.group * self.head_size

    def body_offset(self, block: int) -> int:
        return self._group_start(block) + self.heads_bytes + block % self.group * self.body_size

    def file_length(self, blocks: int) -> int:
        """The length of a slot file that holds blocks [0, blocks) and nothing after."""
        return 0 if blocks == 0 else self.body_offset(blocks - 1) + self.body_size

    def blocks_in(self, length: int) -> int:
        """How many blocks' slots start within a slot file of `length` bytes."""
        blocks = 0
        while self.head_offset(blocks) < length:
            blocks += 1
        return blocks

    def body_pages(self, block: int) -> tuple[int, int]:
        """(offset, length) of the whole pages that block's body touches."""
        start = self.body_offset(block) // PAGE * PAGE
        end = -(-(self.body_offset(block) + self.body_size) // PAGE) * PAGE
        return start, end - start

    def bodies_on(self, offset: int, length: int) -> range:
        """The blocks whose bodies share a byte with [offset, offset + length)."""
        group_bytes = self.heads_bytes + self.group * self.body_size
        group, within = divmod(offset, group_bytes)
        first = (within - self.heads_bytes) // self.body_size  # pages never reach the heads
        last = (within + length - 1 - self.heads_bytes) // self.body_size
        return range(group * self.group + first, group * self.group + last + 1)


DataFile = tuple[int, int]  # (file id, slot): one slot file
SlotWrite = tuple[int, int, int, tuple[bytes, ...]]  # (file id, block, slot, the slot's buffers)
# (file id, slot, offset, length, the blocks whose bodies lie there): pages to free
StalePages = tuple[int, int, int, int, tuple[int, ...]]


def pack_slot(gen: int, checksum: bytes, share: bytes) -> tuple[bytes, bytes]:
    """A slot as its two buffers (written with pwritev): with k = 1 every replica's slot
    holds the same share object, so n slots cost one copy of the block, not n."""
    return _SLOT_HEAD.pack(gen, checksum), share


def split_slot(buffers: tuple[bytes, ...], head_size: int) -> tuple[list[memoryview], list[memoryview]]:
    """A slot's buffers cut into what goes to its head and what to its body (no copy)."""
    head: list[memoryview] = []
    body: list[memoryview] = []
    room = head_size
    for buffer in map(memoryview, buffers):
        if room:
            head.append(buffer[:room])
            buffer = buffer[room:]
            room -= len(head[-1])
        if len(buffer):
            body.append(buffer)
    return head, body


def slot_generation(raw: bytes) -> int:
    """unpack_slot's generation alone (no copy of the share)."""
    return _SLOT_HEAD.unpack_from(raw)[0] if len(raw) >= SLOT_HEAD_SIZE else 0


def unpack_slot(raw: bytes) -> tuple[int, bytes, bytes]:
    """Returns (generation, checksum, share); a short read yields generation 0."""
    if len(raw) < SLOT_HEAD_SIZE:
        return 0, b"", b""
    gen, checksum = _SLOT_HEAD.unpack_from(raw)
    return gen, checksum, raw[SLOT_HEAD_SIZE:]


def data_name(file_id: int, slot: int) -> str:
    return f"{file_id:016x}.{slot}"


def parse_data_name(name: str) -> DataFile | None:
    """(file id, slot) of a slot file's name; None for any other name."""
    stem, dot, slot = name.partition(".")
    if (len(stem) != 16 or dot != "." or slot not in ("0", "1")
            or any(c not in "0123456789abcdef" for c in stem)):
        return None
    return int(stem, 16), int(slot)


# ---- log records: magic, length, head, sealed ops, then this replica's inline slots ----

FRAME_MAGIC = b"LNMR"
_FRAME_PREFIX = struct.Struct("<4sI")      # magic, length of everything after the prefix
_RECORD_HEAD = struct.Struct("<QQQQB3xI")  # seq, term, commit, time_ms, quorum, sealed length
FRAME_OVERHEAD = _FRAME_PREFIX.size + _RECORD_HEAD.size
LOG_KIND = b"log"
SNAPSHOT_KIND = b"snapshot"


@dataclass(frozen=True)
class RecordHead:
    """What identifies a record and what it knew when it was written (all authenticated).

    `term` is the writable open that wrote it (never reused, see statechoice); `commit`
    is the highest record known acknowledged at the time; `quorum` the W it needs."""

    seq: int
    term: int
    commit: int
    time_ms: int
    quorum: int

    def context(self) -> bytes:
        """Bound into the record's AEAD: a flipped bit in the head fails authentication."""
        return struct.pack("<QQQQB", self.seq, self.term, self.commit, self.time_ms, self.quorum)


@dataclass(frozen=True)
class Frame:
    head: RecordHead
    sealed: bytes
    inline: bytes
    start: int
    end: int


def pack_record(head: RecordHead, sealed: bytes, inline_slots: bytes = b"") -> bytes:
    """A log frame.  `inline_slots` are the slots of the record's written blocks, in the
    order its write ops list them: the log then holds the data too (redo on replay)."""
    body = _RECORD_HEAD.pack(head.seq, head.term, head.commit, head.time_ms, head.quorum,
                             len(sealed)) + sealed + inline_slots
    return _FRAME_PREFIX.pack(FRAME_MAGIC, len(body)) + body


def frame_at(raw: bytes, pos: int) -> Frame | None:
    """The frame starting at `pos` if its framing is whole (not yet authenticated)."""
    if pos + FRAME_OVERHEAD > len(raw):
        return None
    magic, length = _FRAME_PREFIX.unpack_from(raw, pos)
    end = pos + _FRAME_PREFIX.size + length
    if magic != FRAME_MAGIC or length < _RECORD_HEAD.size or end > len(raw):
        return None
    seq, term, commit, time_ms, quorum, sealed_length = _RECORD_HEAD.unpack_from(
        raw, pos + _FRAME_PREFIX.size)
    start = pos + FRAME_OVERHEAD
    if sealed_length > end - start:
        return None
    return Frame(RecordHead(seq, term, commit, time_ms, quorum), raw[start:start + sealed_length],
                 raw[start + sealed_length:end], pos, end)


def frames_after(raw: bytes, pos: int):
    """Every offset after `pos` where a frame's magic appears: where to look for valid
    records behind a damaged one (a torn tail has none; damage in the middle does)."""
    pos = raw.find(FRAME_MAGIC, pos + 1)
    while pos >= 0:
        frame = frame_at(raw, pos)
        if frame is not None:
            yield frame
        pos = raw.find(FRAME_MAGIC, pos + 1)


# ---- snapshot: the whole tree at one record ----

SNAPSHOT_MAGIC = b"LNMSNAP2"
_SNAPSHOT_HEAD = struct.Struct("<8sQQ")  # magic, seq, term of that record


def snapshot_context(seq: int, term: int) -> bytes:
    return struct.pack("<QQ", seq, term)


def pack_snapshot(seq: int, term: int, sealed: bytes) -> bytes:
    return _SNAPSHOT_HEAD.pack(SNAPSHOT_MAGIC, seq, term) + sealed


def unpack_snapshot(raw: bytes) -> tuple[int, int, bytes]:
    if len(raw) < _SNAPSHOT_HEAD.size:
        raise FormatError("snapshot is truncated")
    magic, seq, term = _SNAPSHOT_HEAD.unpack_from(raw)
    if magic != SNAPSHOT_MAGIC:
        raise FormatError("snapshot has a bad magic number")
    return seq, term, raw[_SNAPSHOT_HEAD.size:]
