"""Stale slot bodies: the pages a snapshot leaves no block's version in, which a replica
may punch out to give their disk blocks back.

A block overwritten once keeps its old version in the other slot until the next snapshot
makes the log that could still need it (a replay from the older snapshot) go away; after
it, that slot is garbage until the block's next version is written there.
"""

from __future__ import annotations

from collections.abc import Iterable

from .format import PAGE, SlotLayout, StalePages
from .tree import HOLE, Inode, Tree, entry_slot


def stale_pages(tree: Tree, rewritten: Iterable[tuple[int, int]],
                layout: SlotLayout) -> list[StalePages]:
    """The body pages that the blocks (inode, block) rewritten since the last snapshot
    left behind, where no block of `tree` (the new snapshot's state) has its version, in
    runs of adjacent pages."""
    if layout.body_size == 0:
        return []  # shares of under 64 bytes live in the heads: nothing to punch
    found: dict[tuple[int, int, int], StalePages] = {}
    for ino, block in rewritten:
        node = tree.inodes.get(ino)
        if node is None or block >= len(node.blocks) or node.blocks[block] == HOLE:
            continue  # freed or cut off since: its slot files went or were truncated
        slot = 1 - entry_slot(node.blocks[block])
        offset, length = layout.body_pages(block)
        for page in range(offset, offset + length, PAGE):
            sharing = layout.bodies_on(page, PAGE)
            if (ino, slot, page) not in found and not any(_uses(node, b, slot) for b in sharing):
                found[ino, slot, page] = (ino, slot, page, PAGE, tuple(sharing))
    return _merged(sorted(found.values()))


def _merged(pages: list[StalePages]) -> list[StalePages]:
    """Adjacent pages of one slot file as one run: one punch frees them all.  (Runs never
    cross a group: its head pages lie between.)"""
    runs: list[StalePages] = []
    for page in pages:
        ino, slot, offset, length, blocks = page
        if runs and runs[-1][:2] == (ino, slot) and runs[-1][2] + runs[-1][3] == offset:
            last = runs[-1]
            runs[-1] = (ino, slot, last[2], last[3] + length,
                        last[4] + tuple(b for b in blocks if b > last[4][-1]))  # sorted
        else:
            runs.append(page)
    return runs


def _uses(node: Inode, block: int, slot: int) -> bool:
    """Does the block's version live in this slot?"""
    return (block < len(node.blocks) and node.blocks[block] != HOLE
            and entry_slot(node.blocks[block]) == slot)
