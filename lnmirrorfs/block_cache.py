"""The decoded-block cache: least recently used blocks go first, and an inode's blocks can
be dropped without a scan of the whole cache (every commit frees a journal inode)."""

from __future__ import annotations

from collections import OrderedDict


class BlockCache:
    def __init__(self, capacity_bytes: int, block_size: int) -> None:
        self.capacity = max(1, capacity_bytes // block_size)  # blocks
        self._blocks: OrderedDict[tuple[int, int], bytes] = OrderedDict()
        self._of_inode: dict[int, set[int]] = {}  # ino: the indexes cached

    def __len__(self) -> int:
        return len(self._blocks)

    def get(self, ino: int, index: int) -> bytes | None:
        data = self._blocks.get((ino, index))
        if data is not None:
            self._blocks.move_to_end((ino, index))
        return data

    def put(self, ino: int, index: int, data: bytes) -> None:
        self._blocks[(ino, index)] = data
        self._blocks.move_to_end((ino, index))
        self._of_inode.setdefault(ino, set()).add(index)
        while len(self._blocks) > self.capacity:
            (old_ino, old_index), _ = self._blocks.popitem(last=False)
            self._forget_index(old_ino, old_index)

    def discard(self, ino: int, index: int) -> None:
        if self._blocks.pop((ino, index), None) is not None:
            self._forget_index(ino, index)

    def drop(self, ino: int, first: int = 0) -> None:
        """Forget an inode's blocks from block `first` on (truncated or freed)."""
        indexes = self._of_inode.get(ino)
        if not indexes:
            return
        for index in [i for i in indexes if i >= first]:
            del self._blocks[(ino, index)]
            self._forget_index(ino, index)

    def clear(self) -> None:
        self._blocks.clear()
        self._of_inode.clear()

    def _forget_index(self, ino: int, index: int) -> None:
        indexes = self._of_inode[ino]
        indexes.discard(index)
        if not indexes:
            del self._of_inode[ino]
