"""Reading blocks: a block's current content from memory (buffered, in flight, cached,
a hole) or from the replicas, k shares verified and decoded.  Every read of file data
and every share a heal checks goes through here."""

from __future__ import annotations

import errno
import logging
import os
from dataclasses import dataclass
from functools import partial

from . import codec, format
from .block_cache import BlockCache
from .replica import Replica
from .replicaset import ReplicaSet
from .tree import HOLE, Inode, Tree, entry_gen, entry_slot

log = logging.getLogger("lnmirrorfs.blocks")

SPREAD_BLOCKS = 16  # a read of this many blocks or more is spread over the replicas
_NONE: dict = {}  # an inode without write buffers (never written to)


@dataclass
class Checked:
    """What check_slots found on one replica for a list of blocks."""

    bytes_read: int
    shares: list[bytes | None]  # per block: the share if good
    bad: list[int]  # the positions of the blocks whose share is missing or bad


class BlockReader:
    def __init__(self, replica_set: ReplicaSet, keys: codec.Keys, volume_id: bytes,
                 tree: Tree, k: int, n: int, block_size: int, cache_bytes: int,
                 dirty: dict[int, dict[int, bytearray]], inflight: dict[int, dict[int, bytes]]) -> None:
        self.replica_set = replica_set
        self.keys, self.volume_id, self.tree = keys, volume_id, tree
        self.k, self.n, self.block_size = k, n, block_size
        self.dirty, self.inflight = dirty, inflight   # the volume's write buffers, read here
        self.cache = BlockCache(cache_bytes, block_size)
        self.bad_shares: set[tuple[int, int, int]] = set()  # (replica index, ino, block)
        self._zero = bytes(block_size)

    def _buffered_block(self, node: Inode, index: int, dirty: dict[int, bytearray],
                        inflight: dict[int, bytes]) -> bytes | None:
        """A block's content if it is at hand: buffered (`dirty`, `inflight`: the inode's
        write buffers), cached, or a hole."""
        buf = dirty.get(index)
        if buf is not None:
            return bytes(buf)
        data = inflight.get(index)
        if data is not None:
            return data
        data = self.cache.get(node.ino, index)
        if data is not None:
            return data
        if index >= len(node.blocks) or node.blocks[index] == HOLE:
            return self._zero
        return None

    async def read_blocks(self, node: Inode, indexes: list[int]) -> dict[int, bytes]:
        """Current content of some blocks; those not at hand come from the replicas in one
        batch per replica (a 128 KiB read costs one hop, not 32).  A block committed anew
        while its old version was being fetched is taken again from memory: the old one
        must neither be returned nor poison the cache.  Blocks of a long read are not
        cached: it streams past (the kernel's page cache keeps it), and caching it would
        push out the blocks that partial writes and SQLite's page reads come back to (and
        cost a sixth of a restore's time)."""
        ino = node.ino
        cache = len(indexes) < SPREAD_BLOCKS
        out: dict[int, bytes] = {}
        missing = list(indexes)
        while missing:
            dirty, inflight = self.dirty.get(ino, _NONE), self.inflight.get(ino, _NONE)
            wanted = []
            for index in missing:
                data = self._buffered_block(node, index, dirty, inflight)
                if data is None:
                    wanted.append((index, node.blocks[index]))
                else:
                    out[index] = data
            if not wanted:
                break
            fetched = await self._fetch_blocks(ino, [
                (index, entry_gen(entry), entry_slot(entry)) for index, entry in wanted])
            dirty, inflight = self.dirty.get(ino, _NONE), self.inflight.get(ino, _NONE)
            blocks = node.blocks
            missing = []
            for index, entry in wanted:
                current = index < len(blocks) and blocks[index] == entry
                if current and index not in dirty and index not in inflight:
                    if cache:
                        self.cache.put(ino, index, fetched[index])
                    out[index] = fetched[index]
                else:  # committed, written or truncated meanwhile: memory has the news
                    missing.append(index)
        return out

    async def read_block(self, node: Inode, index: int) -> bytes:
        return (await self.read_blocks(node, [index]))[index]

    async def _fetch_blocks(self, ino: int, wanted: list[tuple[int, int, int]]) -> dict[int, bytes]:
        """Read shares of (block, generation, slot)s from the online replicas, check each,
        and decode every block from k good shares, asking further replicas for blocks that
        lack them.  A big read is cut into as many runs as there are replicas, each run
        starting at another one, so its reads go to all of them at once."""
        shares: dict[int, dict[int, bytes]] = {index: {} for index, _, _ in wanted}
        tried: dict[int, set[Replica]] = {index: set() for index, _, _ in wanted}
        out: dict[int, bytes] = {}
        terms = {gen: self.tree.term_of(gen) for gen in {gen for _, gen, _ in wanted}}
        remaining = [(index, gen, slot, terms[gen]) for index, gen, slot in wanted]
        while remaining:
            asks = self._plan_asks(remaining, shares, tried)
            if not asks:
                break
            results = await self.replica_set.run_jobs(
                [(r, partial(r.read_shares, [(ino, block, slot) for block, _, slot, _ in items]))
                 for r, items in asks.items()], len(asks))
            for r, raws in results.items():
                for item, got in zip(asks[r], self._check(r, ino, asks[r], raws), strict=True):
                    index = item[0]
                    if got is None:
                        if r.usable:  # a STALE one may just lack that version
                            self._bad_share(r, ino, index)
                    elif self.k == 1:
                        out[index] = got
                    else:
                        shares[index][r.index] = got
            for index, gen, _, term in remaining:
                if index not in out and len(shares[index]) >= self.k:
                    out[index] = self._decode(ino, index, gen, term, shares[index])
            remaining = [w for w in remaining if w[0] not in out]
        if remaining:
            raise OSError(errno.EIO, f"block {remaining[0][0]} of inode {ino}: fewer than "
                                     f"k={self.k} good shares")
        return out

    def _plan_asks(self, remaining: list[tuple[int, int, int, int]],
                   shares: dict[int, dict[int, bytes]],
                   tried: dict[int, set[Replica]]) -> dict[Replica, list[tuple[int, int, int, int]]]:
        """Which replica to ask for which blocks this round: each block the shares it lacks
        from replicas not asked for it yet, least busy first, the i-th of `spread` runs of
        blocks starting at the i-th replica (blocks stay in order: a run is one pread).

        Past the online replicas, the STALE ones: one that missed later records still holds
        the versions of the blocks those did not touch (a crash cut the last record short
        on two replicas of three, and the third's copy of an older block rotted).  What it
        gives is checked like any share: the generation, and the checksum or AEAD that bind
        the generation and term, so an older version never passes."""
        online = sorted(self.replica_set.online, key=lambda r: r.worker.pending)
        standby = self.replica_set.standby
        spread = max(len(online), 1) if len(remaining) >= SPREAD_BLOCKS else 1
        orders = [online[turn:] + online[:turn] + standby for turn in range(spread)]
        asks: dict[Replica, list[tuple[int, int, int, int]]] = {}
        for position, item in enumerate(remaining):
            index = item[0]
            asked = tried[index]
            lacking = self.k - len(shares[index])
            for r in orders[position * spread // len(remaining)]:
                if lacking == 0:
                    break
                if r not in asked:
                    asks.setdefault(r, []).append(item)
                    asked.add(r)
                    lacking -= 1
        return asks

    def _check(self, r: Replica, ino: int, items: list[tuple[int, int, int, int]],
               raws: list[bytes]) -> list[bytes | None]:
        """The shares in the raw slots r gave for (block, generation, slot, term)s, None
        for each bad one.  With k = 1 a share is the whole sealed block, whose AEAD tag
        already tells a bad one: its checksum is not computed (a third of a cold read's
        CPU), the block is decrypted instead, and its plaintext is what is given.  Done on
        the event loop (see check_slots)."""
        if self.k == 1:
            return self._open_slots(ino, items, raws)
        return [self._share_ok(r, ino, index, gen, term, raw)
                for (index, gen, _, term), raw in zip(items, raws, strict=True)]

    def _open_slots(self, ino: int, items: list[tuple[int, int, int, int]],
                    raws: list[bytes]) -> list[bytes | None]:
        """The plaintexts of k = 1 raw slots, None for each of another generation or
        forged; decrypted in one batch (codec.decrypt_blocks)."""
        head = format.SLOT_HEAD_SIZE
        sealed = [(index, gen, term, memoryview(raw)[head:])
                  for (index, gen, _, term), raw in zip(items, raws, strict=True)]
        opened = codec.decrypt_blocks(self.keys, self.volume_id, ino, sealed)
        return [plaintext if format.slot_generation(raw) == item[1] else None
                for item, raw, plaintext in zip(items, raws, opened, strict=True)]

    def _decode(self, ino: int, index: int, gen: int, term: int, shares: dict[int, bytes]) -> bytes:
        """A block from k shares whose checksums held (k > 1): if it does not decrypt, no
        share is to blame and the block is lost."""
        try:
            return codec.decode_block(self.keys, self.volume_id, self.k, self.n, ino, index,
                                      gen, term, shares, self.block_size)
        except codec.CodecError as exc:
            log.error("inode %d block %d: shares verified but block does not decrypt: %s",
                      ino, index, exc)
            raise OSError(errno.EIO, os.strerror(errno.EIO)) from None

    def _share_ok(self, r: Replica, ino: int, index: int, gen: int, term: int,
                  raw: bytes) -> bytes | None:
        """The share in a raw slot if it is the right generation and checks out (share_ok)."""
        got_gen, checksum, share = format.unpack_slot(raw)
        if got_gen != gen or not codec.share_ok(self.keys, self.volume_id, self.k, ino, index, gen,
                                                term, r.index, checksum, share):
            return None
        return share

    def check_slots(self, r: Replica, ino: int, wanted: list[tuple[int, int, int, int]],
                    raws: list[bytes], good: list[bytes | None] | None = None) -> Checked:
        """Check the raw slots r gave for (block, generation, slot, term)s (_share_ok).
        With k = 1 every replica's slot of a block holds the same bytes (the sealed block,
        no checksum), so a raw slot equal to one already found good on another replica
        (`good`, per position) is good without decrypting it again: a scrub of n replicas
        decrypts each block once, not n times.  Done on the event loop, not in the
        replicas' threads: libsodium and blake2b release the GIL for each 4 KiB share, and
        handing it to and fro between two threads made a scrub 15% and a cold read 15%
        slower than checking everything here (0.45 ms per live-scrub chunk, 0.13 ms per
        128 KiB read)."""
        if self.k == 1:
            shares = self._sealed_if_good(ino, wanted, raws, good or [None] * len(raws))
        else:
            shares = [self._share_ok(r, ino, block, gen, term, raw)
                      for (block, gen, _, term), raw in zip(wanted, raws, strict=True)]
        return Checked(sum(map(len, raws)), shares,
                       [position for position, share in enumerate(shares) if share is None])

    def _sealed_if_good(self, ino: int, wanted: list[tuple[int, int, int, int]],
                        raws: list[bytes], good: list[bytes | None]) -> list[bytes | None]:
        """k = 1: the share (sealed block) in each raw slot that is `good` or opens."""
        unknown = [position for position, (raw, known) in enumerate(zip(raws, good, strict=True))
                   if raw != known]
        opened = self._open_slots(ino, [wanted[p] for p in unknown], [raws[p] for p in unknown])
        shares: list[bytes | None] = [raw[format.SLOT_HEAD_SIZE:] for raw in raws]
        for position, plaintext in zip(unknown, opened, strict=True):
            if plaintext is None:
                shares[position] = None
        return shares

    def check_copies(self, ino: int, wanted: list[tuple[int, int, int, int]],
                     raws: dict[Replica, list[bytes]]) -> dict[Replica, Checked]:
        """check_slots on every replica's raw slots of the same blocks."""
        good: list[bytes | None] = [None] * len(wanted)
        out = {}
        for r, raw in raws.items():
            out[r] = checked = self.check_slots(r, ino, wanted, raw, good)
            good = [known if known is not None or share is None else slot
                    for known, share, slot in zip(good, checked.shares, raw, strict=True)]
        return out

    def _bad_share(self, r: Replica, ino: int, index: int) -> None:
        r.counters.checksum += 1
        self.bad_shares.add((r.index, ino, index))
        log.warning("replica %s: bad share for inode %d block %d (needs scrub)",
                    r.path, ino, index)
