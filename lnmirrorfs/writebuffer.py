"""The write buffer: what the mount holds of its files in memory only, until their next
record.  Written blocks (whole ones as written, bytes; partly written ones as bytearray),
the blocks of the commit in flight, and sizes and times changed since.  Reads see all of
it at once (BlockReader); a commit takes it (take) and settles it once durable (settle).
Knows nothing of replicas or commits."""

from __future__ import annotations

import time
from collections.abc import Iterable

from .tree import HOLE, Inode, entry_slot

Plan = list[tuple[int, int, int, bytes]]  # (inode, block, slot, data): what a commit encodes


class WriteBuffer:
    def __init__(self) -> None:
        self.dirty: dict[int, dict[int, bytes | bytearray]] = {}
        self.inflight: dict[int, dict[int, bytes]] = {}
        self._size: dict[int, int] = {}
        self._mtime: dict[int, int] = {}
        self._atime: dict[int, int] = {}

    def size_of(self, node: Inode) -> int:
        return self._size.get(node.ino, node.size)

    def atime_of(self, node: Inode) -> int:
        return self._atime.get(node.ino, node.atime_ns)

    def mtime_of(self, node: Inode) -> int:
        """Written but not yet committed data has already changed the file's mtime."""
        return self._mtime.get(node.ino, node.mtime_ns)

    def held_blocks(self) -> int:
        """Blocks held, buffered and in flight (what bounds the daemon's memory)."""
        return sum(map(len, self.dirty.values())) + sum(map(len, self.inflight.values()))

    def dirty_blocks(self, ino: int) -> int:
        return len(self.dirty.get(ino, ()))

    def wrote(self, node: Inode, end: int) -> None:
        """A write up to byte `end` was buffered: the size and mtime it gives the file."""
        self._size[node.ino] = max(self.size_of(node), end)
        self._mtime[node.ino] = time.time_ns()

    def resize(self, ino: int, size: int) -> None:
        self._size[ino] = size

    def retime(self, ino: int, atime: int | None = None, mtime: int | None = None) -> None:
        """A change of times alone (touch, or the kernel's own mtime before an fsync with
        the writeback cache): buffered like a write and made durable with the inode's
        next record (its fsync, close, or the periodic writeback), so it costs no barrier."""
        if atime is not None:
            self._atime[ino] = atime
        if mtime is not None:
            self._mtime[ino] = mtime

    def buffered(self) -> set[int]:
        """Inodes with changes in memory only: data written, or times (retime)."""
        return set(self.dirty) | set(self._mtime) | set(self._atime)

    def is_buffered(self, ino: int) -> bool:
        """ino in buffered(), without building the set (asked on every close)."""
        return ino in self.dirty or ino in self._mtime or ino in self._atime

    def retimed(self, ino: int) -> bool:
        """Times changed and buffered that no write op will carry."""
        return ino in self._atime or (ino in self._mtime and not self.dirty.get(ino))

    def retime_op(self, ino: int) -> dict:
        op = {"op": "setattr", "ino": ino, "ctime": time.time_ns()}
        if ino in self._atime:
            op["atime"] = self._atime[ino]
        if ino in self._mtime and not self.dirty.get(ino):
            op["mtime"] = self._mtime[ino]
        return op

    def take(self, node: Inode, plan: Plan, rewritten: set[tuple[int, int]]) -> dict:
        """Move an inode's dirty blocks in flight and give each the slot it does not use
        now; `plan` gets (ino, block, slot, data), `rewritten` the blocks overwritten.
        Returns the write op."""
        ino = node.ino
        blocks = self.dirty.pop(ino)
        inflight = self.inflight.setdefault(ino, {})
        packed = []
        for index in sorted(blocks):
            data = bytes(blocks[index])
            inflight[index] = data
            old = node.blocks[index] if index < len(node.blocks) else HOLE
            slot = 1 - entry_slot(old) if old != HOLE else 0
            if old != HOLE:
                rewritten.add((ino, index))
            plan.append((ino, index, slot, data))
            packed.append(index << 1 | slot)
        return {"op": "write", "ino": ino, "blocks": packed, "size": self._size.get(ino, node.size),
                "mtime": self._mtime.get(ino, time.time_ns())}

    def settle(self, ino: int) -> dict[int, bytes]:
        """A commit of the inode is durable: its size and times are in the tree (a
        truncate may have left an empty dirty table: dropped too).  Returns the blocks it
        had in flight."""
        blocks = self.inflight.pop(ino, {})
        if not self.dirty.get(ino):
            self.dirty.pop(ino, None)
            self._size.pop(ino, None)
            self._mtime.pop(ino, None)
            self._atime.pop(ino, None)
        return blocks

    def requeue(self, inos: Iterable[int]) -> None:
        """A commit failed: what it had in flight is buffered again (unless rewritten since)."""
        for ino in inos:
            dirty = self.dirty.setdefault(ino, {})
            for index, data in self.inflight.pop(ino, {}).items():
                dirty.setdefault(index, data)

    def cut(self, ino: int, blocks: int) -> None:
        """A truncate to `blocks` blocks: the ones past it are gone."""
        for table in (self.dirty.get(ino, {}), self.inflight.get(ino, {})):
            for index in [i for i in table if i >= blocks]:
                del table[index]

    def forget(self, ino: int) -> None:
        """The inode is freed: nothing of it is kept."""
        for table in (self.dirty, self.inflight, self._size, self._mtime, self._atime):
            table.pop(ino, None)
