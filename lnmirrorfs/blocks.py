"""Reading blocks: a block's current content from memory (buffered, in flight, cached,
a hole) or from the replicas, k shares verified and decoded.  Every read of file data
and every share a heal checks goes through here."""

from __future__ import annotations

import errno
import logging
import os
from collections import OrderedDict
from functools import partial

from . import codec, format
from .replica import Replica
from .replicaset import ReplicaSet
from .tree import HOLE, Inode, Tree, entry_gen, entry_slot

log = logging.getLogger("lnmirrorfs.blocks")


class BlockReader:
    def __init__(self, replica_set: ReplicaSet, keys: codec.Keys, volume_id: bytes,
                 tree: Tree, k: int, n: int, block_size: int, cache_bytes: int,
                 dirty: dict[int, dict[int, bytearray]], inflight: dict[int, dict[int, bytes]]) -> None:
        self.replica_set = replica_set
        self.keys, self.volume_id, self.tree = keys, volume_id, tree
        self.k, self.n, self.block_size = k, n, block_size
        self.cache_bytes = cache_bytes
        self.dirty, self.inflight = dirty, inflight   # the volume's write buffers, read here
        self.cache: OrderedDict[tuple[int, int], bytes] = OrderedDict()
        self.bad_shares: set[tuple[int, int, int]] = set()  # (replica index, ino, block)
        self._zero = bytes(block_size)

    def drop_cached(self, ino: int, first: int = 0) -> None:
        """Forget cached blocks of an inode from block `first` on (truncated or freed)."""
        for key in [key for key in self.cache if key[0] == ino and key[1] >= first]:
            del self.cache[key]

    def cache_put(self, ino: int, index: int, data: bytes) -> None:
        self.cache[(ino, index)] = data
        self.cache.move_to_end((ino, index))
        while len(self.cache) * self.block_size > self.cache_bytes:
            self.cache.popitem(last=False)

    def _buffered_block(self, node: Inode, index: int) -> bytes | None:
        """A block's content if it is at hand: buffered, in flight, cached, or a hole."""
        ino = node.ino
        buf = self.dirty.get(ino, {}).get(index)
        if buf is not None:
            return bytes(buf)
        data = self.inflight.get(ino, {}).get(index)
        if data is not None:
            return data
        data = self.cache.get((ino, index))
        if data is not None:
            self.cache.move_to_end((ino, index))
            return data
        if index >= len(node.blocks) or node.blocks[index] == HOLE:
            return self._zero
        return None

    async def read_blocks(self, node: Inode, indexes: list[int]) -> dict[int, bytes]:
        """Current content of some blocks; those not at hand come from the replicas in one
        batch per replica (a 128 KiB read costs one hop, not 32).  A block committed anew
        while its old version was being fetched is taken again from memory: the old one
        must neither be returned nor poison the cache."""
        out: dict[int, bytes] = {}
        missing = list(indexes)
        while missing:
            wanted = []
            for index in missing:
                data = self._buffered_block(node, index)
                if data is None:
                    wanted.append((index, node.blocks[index]))
                else:
                    out[index] = data
            if not wanted:
                break
            fetched = await self._fetch_blocks(node.ino, [
                (index, entry_gen(entry), entry_slot(entry)) for index, entry in wanted])
            missing = []
            for index, entry in wanted:
                if self._current_entry(node, index) == entry and not self._buffered_anew(node, index):
                    self.cache_put(node.ino, index, fetched[index])
                    out[index] = fetched[index]
                else:
                    missing.append(index)
        return out

    def _current_entry(self, node: Inode, index: int) -> int:
        return node.blocks[index] if index < len(node.blocks) else HOLE

    def _buffered_anew(self, node: Inode, index: int) -> bool:
        """Written (buffered or in flight) since: memory holds a newer version."""
        return (self.dirty.get(node.ino, {}).get(index) is not None
                or self.inflight.get(node.ino, {}).get(index) is not None)

    async def read_block(self, node: Inode, index: int) -> bytes:
        return (await self.read_blocks(node, [index]))[index]

    async def _fetch_blocks(self, ino: int, wanted: list[tuple[int, int, int]]) -> dict[int, bytes]:
        """Read shares of (block, generation, slot)s from the least busy online replicas,
        check each, and decode every block from k good shares (asking more replicas for
        blocks that lack them).  With k = 1 a share is the whole sealed block, whose AEAD
        tag already tells a bad one: its checksum is not computed (a third of a cold read's
        CPU); a share that does not decrypt counts as bad and the next replica is asked."""
        candidates = sorted(self.replica_set.online, key=lambda r: r.worker.pending)
        shares: dict[int, dict[int, tuple[Replica, bytes]]] = {index: {} for index, _, _ in wanted}
        out: dict[int, bytes] = {}
        remaining = wanted
        while remaining and candidates:
            ask = self.k - min(len(shares[index]) for index, _, _ in remaining)
            batch, candidates = candidates[:ask], candidates[ask:]
            wanted_slots = [(ino, index, slot) for index, _, slot in remaining]
            results = await self.replica_set.run_jobs(
                [(r, partial(r.read_shares, wanted_slots)) for r in batch],
                len(batch))
            for r, raws in results.items():
                for (index, gen, _), raw in zip(remaining, raws, strict=True):
                    share = self._checked_share(r, ino, index, gen, raw)
                    if share is not None:
                        shares[index][r.index] = (r, share)
            for index, gen, _ in remaining:
                if len(shares[index]) >= self.k:
                    self._decode(ino, index, gen, shares[index], out)
            remaining = [w for w in remaining if w[0] not in out]
        if remaining:
            raise OSError(errno.EIO, f"block {remaining[0][0]} of inode {ino}: fewer than "
                                     f"k={self.k} good shares")
        return out

    def _decode(self, ino: int, index: int, gen: int, shares: dict[int, tuple[Replica, bytes]],
                out: dict[int, bytes]) -> None:
        try:
            out[index] = codec.decode_block(
                self.keys, self.volume_id, self.k, self.n, ino, index, gen, self.tree.term_of(gen),
                {i: share for i, (_, share) in shares.items()}, self.block_size)
        except codec.CodecError as exc:
            if self.k > 1:  # every share's checksum held: not a bad share, a bad block
                log.error("inode %d block %d: shares verified but block does not decrypt: %s",
                          ino, index, exc)
                raise OSError(errno.EIO, os.strerror(errno.EIO)) from None
            (r, _), = shares.values()
            shares.clear()
            self._bad_share(r, ino, index)

    def _checked_share(self, r: Replica, ino: int, index: int, gen: int, raw: bytes) -> bytes | None:
        """share_ok, or with k = 1 only the generation (decryption checks the rest)."""
        if self.k == 1:
            got_gen, _, share = format.unpack_slot(raw)
            share = share if got_gen == gen else None
        else:
            share = self.share_ok(r, ino, index, gen, raw)
        if share is None:
            self._bad_share(r, ino, index)
        return share

    def share_ok(self, r: Replica, ino: int, index: int, gen: int, raw: bytes) -> bytes | None:
        """The share in a raw slot if it is the right generation and its checksum holds."""
        return self._share_ok(r, ino, index, gen, self.tree.term_of(gen), raw)

    def _share_ok(self, r: Replica, ino: int, index: int, gen: int, term: int,
                  raw: bytes) -> bytes | None:
        got_gen, checksum, share = format.unpack_slot(raw)
        if got_gen != gen:
            return None
        expected = codec.share_checksum(self.keys, self.volume_id, ino, index, gen, term,
                                        r.index, share)
        return share if checksum == expected else None

    def read_checked(self, r: Replica, ino: int,
                     wanted: list[tuple[int, int, int, int]]) -> list[tuple[int, bytes | None]]:
        """A job for r's worker thread: read the slots of (block, generation, slot, term)s
        and give, for each, the bytes read and the share if share_ok.  Checking there
        spreads the hashing over the replicas' threads (blake2b releases the GIL) and keeps
        it off the event loop, where a live scrub would hold up the commits."""
        raws = r.read_slots([(ino, block, slot) for block, _, slot, _ in wanted])
        return [(len(raw), self._share_ok(r, ino, block, gen, term, raw))
                for (block, gen, _, term), raw in zip(wanted, raws, strict=True)]

    def _bad_share(self, r: Replica, ino: int, index: int) -> None:
        r.counters.checksum += 1
        self.bad_shares.add((r.index, ino, index))
        log.warning("replica %s: bad share for inode %d block %d (needs scrub)",
                    r.path, ino, index)
