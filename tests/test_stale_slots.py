"""Stale slot bodies are punched out after a snapshot, in-process on real replica
directories: the space comes back, and a body rewritten meanwhile is never punched."""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

import trio

from conftest import make_volume
from lnmirrorfs import format
from lnmirrorfs.cli.common import read_key_file
from lnmirrorfs.namespace import Namespace
from lnmirrorfs.volume import Options, Volume

MIB = 1 << 20


def allocated(replica: Path) -> int:
    return sum(os.stat(f).st_blocks * 512 for f in (replica / "data").iterdir())


async def until_snapshots_written(volume: Volume) -> None:
    with trio.fail_after(10):
        while volume.snapshotting:
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
    is committed into that very slot.  The punch must see the newer generation and keep it."""
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
    assert volume.snapshotting
    await volume.write(node.ino, 0, b"C" * bs)  # back into slot 0, before the punch
    await volume.sync(node.ino)
    hold.set()
    await until_snapshots_written(volume)
    await until_workers_idle(volume)  # the punch has run: it follows the log cut
    volume.reader.cache.clear()
    assert await volume.read(node.ino, 0, bs) == b"C" * bs
    volume.close()
    layout = format.SlotLayout.of(bs, 1)
    for r in v.replicas:
        raw = (r / "data" / format.data_name(node.ino, 0)).read_bytes()
        body = raw[layout.body_offset(0):layout.body_offset(0) + layout.body_size]
        assert body != bytes(layout.body_size)  # not punched
    again = Volume.open([str(r) for r in v.replicas], master, writable=False)
    try:
        assert await again.read(node.ino, 0, bs) == b"C" * bs
    finally:
        again.close()
