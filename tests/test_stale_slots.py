"""Stale slot bodies are punched out after a snapshot, in-process on real replica
directories: the space comes back, and a body rewritten meanwhile is never punched; and
the pages chosen, against a brute force."""

from __future__ import annotations

import os
import random
import stat
import threading
from array import array
from pathlib import Path

import trio

from conftest import make_volume
from lnmirrorfs import codec, format
from lnmirrorfs.cli.common import read_key_file
from lnmirrorfs.namespace import Namespace
from lnmirrorfs.stale import stale_pages
from lnmirrorfs.tree import HOLE, Inode, Tree, block_entry, entry_slot
from lnmirrorfs.volume import INLINE_BLOCKS, Options, Volume

MIB = 1 << 20


def allocated(replica: Path) -> int:
    return sum(os.stat(f).st_blocks * 512 for f in (replica / "data").iterdir())


async def until_snapshots_written(volume: Volume) -> None:
    with trio.fail_after(10):
        while volume.snapshots.writing:
            await trio.sleep(0.01)


async def until_workers_idle(volume: Volume) -> None:
    """Punching runs on the workers a slice at a time, after the snapshot."""
    with trio.fail_after(10):
        while any(r.worker.pending for r in volume.online):
            await trio.sleep(0.01)


async def test_a_file_rewritten_in_place_takes_its_size_once_after_a_snapshot(tmp_path):
    """Every block overwritten: both slot files hold a version until the snapshot, then
    the stale bodies are punched out (on ext4 or tmpfs; FAT keeps them)."""
    v = make_volume(tmp_path / "vol", n=2, k=1)
    master = read_key_file(str(v.key))
    volume = Volume.open([str(r) for r in v.replicas], master)
    node = await Namespace(volume).mknod(1, b"f", stat.S_IFREG | 0o644, 0, 0)
    for fill in (b"a", b"b", b"c"):
        await volume.write(node.ino, 0, fill * (4 * MIB))
        await volume.sync(node.ino)
    before = [allocated(r) for r in v.replicas]
    async with volume.lock:
        await volume.snapshot()
    await until_workers_idle(volume)
    after = [allocated(r) for r in v.replicas]
    volume.close()
    assert all(b > 1.9 * 4 * MIB for b in before), before  # two versions of every block
    assert all(a < 1.1 * 4 * MIB for a in after), after
    again = Volume.open([str(r) for r in v.replicas], master, writable=False)
    try:
        assert await again.read(node.ino, 0, 4 * MIB) == b"c" * (4 * MIB)
    finally:
        again.close()


async def test_a_stale_body_rewritten_while_the_snapshot_is_written_is_kept(tmp_path):
    """The snapshot at record S finds block 0's slot 0 stale; before its pages are
    punched (the snapshot is still being written: a slow disk), the block's next version
    is committed into that very slot.  The punch must see the newer generation and keep it.
    (C is a commit too big for the log, so its slots are written at once, not deferred.)"""
    v = make_volume(tmp_path / "vol", n=2, k=1)
    master = read_key_file(str(v.key))
    volume = Volume.open([str(r) for r in v.replicas], master, Options(snapshot_log_bytes=1))
    bs = volume.block_size
    node = await Namespace(volume).mknod(1, b"f", stat.S_IFREG | 0o644, 0, 0)
    await volume.write(node.ino, 0, b"A" * bs)  # slot 0
    await volume.sync(node.ino)
    await until_snapshots_written(volume)
    hold = threading.Event()  # the snapshot writes wait here
    for r in volume.online:
        r.housekeeper.submit(hold.wait, lambda result, error: None)
    await volume.write(node.ino, 0, b"B" * bs)  # slot 1; its snapshot finds slot 0 stale
    await volume.sync(node.ino)
    assert volume.snapshots.writing
    await volume.write(node.ino, 0, b"C" * bs * (INLINE_BLOCKS + 1))  # slot 0, before the punch
    await volume.sync(node.ino)
    hold.set()
    await until_snapshots_written(volume)
    await until_workers_idle(volume)  # the punch has run: it follows the log cut
    volume.reader.cache.clear()
    assert await volume.read(node.ino, 0, bs) == b"C" * bs
    volume.close()
    layout = volume.layout
    for r in v.replicas:
        raw = (r / "data" / format.data_name(node.ino, 0)).read_bytes()
        body = raw[layout.body_offset(0):layout.body_offset(0) + layout.body_size]
        assert body != bytes(layout.body_size)  # not punched
    again = Volume.open([str(r) for r in v.replicas], master, writable=False)
    try:
        assert await again.read(node.ino, 0, bs) == b"C" * bs
    finally:
        again.close()


def test_stale_pages_free_exactly_the_pages_no_current_body_touches():
    """Random block maps, layouts and rewritten sets, against a brute force over bytes:
    a page is listed if and only if it holds the stale body of a rewritten block and no
    body current in that slot file touches it."""
    rng = random.Random(1303)
    for _ in range(2000):
        block_size, k = rng.choice([512, 1024, 4096, 65536]), rng.randrange(1, 9)
        layout = format.SlotLayout.of(block_size, k, rng.choice([40, 56]))  # the ciphers' overheads
        tree = Tree.new(block_size, 0, 0, 0, 1)
        node = Inode(2, stat.S_IFREG | 0o644, 0, 0)
        node.blocks.extend(rng.choice([HOLE, block_entry(rng.randrange(1, 99), rng.randrange(2))])
                           for _ in range(rng.randrange(1, 3 * layout.group)))
        tree.inodes[2] = node
        rewritten = {(2, rng.randrange(len(node.blocks) + 2)) for _ in range(rng.randrange(1, 40))}
        listed = {(slot, page) for _, slot, offset, length, blocks in
                  stale_pages(tree, rewritten, layout)
                  for page in range(offset, offset + length, format.PAGE)}
        assert listed == brute_force_stale(node, {b for _, b in rewritten}, layout)


def brute_force_stale(node: Inode, rewritten: set[int], layout: format.SlotLayout) -> set:
    def body(b: int) -> range:
        return range(layout.body_offset(b), layout.body_offset(b) + layout.body_size)

    def touches(b: int, page: int) -> bool:
        return max(page, body(b).start) < min(page + format.PAGE, body(b).stop)

    expected = set()
    for b in rewritten:
        if b >= len(node.blocks) or node.blocks[b] == HOLE:
            continue
        slot = 1 - entry_slot(node.blocks[b])
        for page in range(body(b).start // format.PAGE * format.PAGE, body(b).stop, format.PAGE):
            if not any(touches(c, page) for c, e in enumerate(node.blocks)
                       if e != HOLE and entry_slot(e) == slot):
                expected.add((slot, page))
    return expected


def test_shares_too_small_for_a_body_punch_nothing():
    layout = format.SlotLayout.of(512, 12, codec.XCHACHA20.overhead)  # 46-byte shares: all in the heads
    assert layout.body_size == 0
    tree = Tree.new(512, 0, 0, 0, 1)
    tree.inodes[2] = Inode(2, stat.S_IFREG | 0o644, 0, 0, blocks=array("Q", [block_entry(3, 1)]))
    assert stale_pages(tree, {(2, 0)}, layout) == []
