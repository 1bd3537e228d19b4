"""Inline records' slots are deferred (kept in memory, durable in the log) and written to
the data files in batches: in-process, on real replica directories."""

from __future__ import annotations

import stat
import threading
from pathlib import Path

import trio

from conftest import VolumeDirs, make_volume
from lnmirrorfs import format, scrub
from lnmirrorfs.cli.common import read_key_file
from lnmirrorfs.namespace import Namespace
from lnmirrorfs.replica import DEFERRED_FLUSH_BYTES, ONLINE
from lnmirrorfs.volume import INLINE_BLOCKS, Options, Volume


def data_file(replica: Path, ino: int, slot: int = 0) -> Path:
    return replica / "data" / format.data_name(ino, slot)


def open_volume(tmp_path: Path, k: int = 1, options: Options | None = None
                ) -> tuple[VolumeDirs, bytes, Volume, Namespace]:
    """A fresh n=2 volume, opened in-process."""
    v = make_volume(tmp_path / "vol", n=2, k=k)
    master = read_key_file(str(v.key))
    volume = Volume.open([str(r) for r in v.replicas], master, options)
    return v, master, volume, Namespace(volume)


async def reopened_read(dirs, master: bytes, ino: int, length: int) -> bytes:
    again = Volume.open([str(r) for r in dirs.replicas], master, writable=False)
    try:
        return await again.read(ino, 0, length)
    finally:
        again.close()


async def test_a_file_freed_before_the_snapshot_never_reaches_the_data_files(tmp_path):
    """SQLite's rollback journal: created, written, synced and deleted within a commit.
    Its slots stay in memory (reads find them there) and are dropped with the file; a
    file that stays is written out and synced by the snapshot."""
    v, master, volume, ns = open_volume(tmp_path, k=1)
    bs = volume.block_size
    journal = await ns.mknod(1, b"db-journal", stat.S_IFREG | 0o644, 0, 0)
    db = await ns.mknod(1, b"db", stat.S_IFREG | 0o644, 0, 0)
    await volume.write(journal.ino, 0, b"j" * 3 * bs)
    await volume.sync(journal.ino)
    await volume.write(db.ino, 0, b"d" * 2 * bs)
    await volume.sync(db.ino)
    assert not any(data_file(r, journal.ino).exists() or data_file(r, db.ino).exists()
                   for r in v.replicas)
    volume.reader.cache.clear()  # the reads go to the replicas, which answer from memory
    assert await volume.read(journal.ino, 0, 3 * bs) == b"j" * 3 * bs
    assert await volume.read(db.ino, 0, 2 * bs) == b"d" * 2 * bs
    await ns.unlink(1, b"db-journal", False)
    async with volume.lock:
        await volume.snapshot()
    volume.close()
    for r in v.replicas:
        assert not data_file(r, journal.ino).exists()
        assert not (r / "data" / (format.data_name(journal.ino, 0) + ".deleted")).exists()
        assert data_file(r, db.ino).stat().st_size > 0
    assert await reopened_read(v, master, db.ino, 2 * bs) == b"d" * 2 * bs


async def test_a_crash_before_the_flush_leaves_the_slots_in_the_log(tmp_path):
    """The volume is dropped without its unmount snapshot (as kill -9 would): the slots
    were never written to the data files, and the next open redoes them from the log."""
    v, master, volume, ns = open_volume(tmp_path, k=1)
    bs = volume.block_size
    node = await ns.mknod(1, b"f", stat.S_IFREG | 0o644, 0, 0)
    await volume.write(node.ino, 0, b"x" * 5 * bs)
    await volume.sync(node.ino)
    volume.close()  # no snapshot
    assert not any(data_file(r, node.ino).exists() for r in v.replicas)
    assert await reopened_read(v, master, node.ino, 5 * bs) == b"x" * 5 * bs
    writable = Volume.open([str(r) for r in v.replicas], master)  # redo, then a fresh log
    writable.close()
    assert all(data_file(r, node.ino).exists() for r in v.replicas)
    assert await reopened_read(v, master, node.ino, 5 * bs) == b"x" * 5 * bs


async def test_deferred_slots_past_a_truncation_are_not_written(tmp_path):
    """Blocks cut off by a truncate are dropped from memory, not written past the end."""
    v, master, volume, ns = open_volume(tmp_path, k=1)
    bs = volume.block_size
    node = await ns.mknod(1, b"f", stat.S_IFREG | 0o644, 0, 0)
    await volume.write(node.ino, 0, b"t" * 8 * bs)
    await volume.sync(node.ino)
    await ns.setattr(node.ino, size=2 * bs)
    async with volume.lock:
        await volume.snapshot()
    volume.close()
    layout = volume.layout
    for r in v.replicas:
        assert data_file(r, node.ino).stat().st_size <= layout.file_length(2)
    assert await reopened_read(v, master, node.ino, 8 * bs) == b"t" * 2 * bs


async def test_deferred_slots_are_written_out_past_the_limit(tmp_path):
    """Memory is bounded: past DEFERRED_FLUSH_BYTES per replica the slots are written
    (unsynced: the log holds them until the next snapshot syncs the files)."""
    v, master, volume, ns = open_volume(tmp_path, k=1)
    bs = volume.block_size
    node = await ns.mknod(1, b"f", stat.S_IFREG | 0o644, 0, 0)
    blocks = 2 * DEFERRED_FLUSH_BYTES // bs
    for index in range(blocks):  # one block per commit: every record is inline
        await volume.write(node.ino, index * bs, index.to_bytes(4, "big") * (bs // 4))
        await volume.sync(node.ino)
        assert all(len(r.deferred) * r.layout.size <= DEFERRED_FLUSH_BYTES + r.layout.size
                   for r in volume.online)
    await volume.replica_set.wait_idle(volume.online)
    assert all(data_file(r, node.ino).stat().st_size > DEFERRED_FLUSH_BYTES for r in v.replicas)
    volume.reader.cache.clear()
    expected = b"".join(i.to_bytes(4, "big") * (bs // 4) for i in range(blocks))
    assert await volume.read(node.ino, 0, blocks * bs) == expected
    volume.close()
    assert await reopened_read(v, master, node.ino, blocks * bs) == expected


async def test_a_flush_that_hung_and_comes_back_late_changes_nothing(tmp_path):
    """A flush hangs (a NAS), the replica is faulted, gets new threads, is caught up and
    takes new commits, and a snapshot cuts its log.  When the hung call returns, on the
    thread left behind, it must not write its old slots over the new ones, which only
    the data files hold now."""
    v, master, volume, ns = open_volume(tmp_path, k=1, options=Options(deadline=0.3))
    bs = volume.block_size
    f = await ns.mknod(1, b"f", stat.S_IFREG | 0o644, 0, 0)
    g = await ns.mknod(1, b"g", stat.S_IFREG | 0o644, 0, 0)
    late = volume.replicas[1]
    old_thread = late.worker._thread
    hold, entered, returned = threading.Event(), threading.Event(), threading.Event()
    write_slot_files = late.files.write

    def hangs_once(slots, sync, abandoned):
        if threading.current_thread() is old_thread and not sync and not entered.is_set():
            entered.set()
            hold.wait()
            try:
                return write_slot_files(slots, sync, abandoned)
            finally:
                returned.set()
        return write_slot_files(slots, sync, abandoned)

    late.files.write = hangs_once
    for chunk in range(5):  # past DEFERRED_FLUSH_BYTES: a flush is queued
        await volume.write(f.ino, chunk * INLINE_BLOCKS * bs, bytes([65 + chunk]) * INLINE_BLOCKS * bs)
        await volume.sync(f.ino)
    with trio.fail_after(5):
        while not entered.is_set():
            await trio.sleep(0.01)
    await volume.write(g.ino, 0, b"G" * bs)
    with trio.fail_after(30):  # the replica faults, gets new threads, is caught up
        await volume.sync(g.ino)
    assert late.state == ONLINE and late.worker._thread is not old_thread
    for text in (b"X", b"Y"):  # block 0 back into its first slot, newer
        await volume.write(f.ino, 0, text * bs)
        await volume.sync(f.ino)
    await volume.write(g.ino, bs, b"H" * bs)
    await volume.sync(g.ino)
    async with volume.lock:
        await volume.snapshot()  # the log goes: the data files hold everything
    hold.set()
    with trio.fail_after(5):
        while not returned.is_set():
            await trio.sleep(0.01)
    assert late.state == ONLINE
    volume.close()
    v.replicas[0].rename(tmp_path / "away")
    alone = Volume.open([str(v.replicas[1])], master, writable=False)
    try:
        assert await alone.read(f.ino, 0, bs) == b"Y" * bs
        assert await alone.read(f.ino, bs, bs) == b"A" * bs
        assert await alone.read(g.ino, 0, 2 * bs) == b"G" * bs + b"H" * bs
    finally:
        alone.close()


async def test_a_live_scrub_of_a_faulted_replica_keeps_its_deferred_shares(tmp_path):
    """k = 2: each replica holds a share no other has.  A replica faults with shares
    deferred; a live scrub reopens and heals it: its deferred shares must reach its data
    files first, or its log goes with the heal's snapshot and the blocks with it."""
    v, master, volume, ns = open_volume(tmp_path, k=2)
    bs = volume.block_size
    f = await ns.mknod(1, b"f", stat.S_IFREG | 0o644, 0, 0)
    await volume.write(f.ino, 0, b"A" * 4 * bs)
    await volume.sync(f.ino)
    volume.replica_set.fault(volume.replicas[1], "no answer within 10s")
    report = await scrub.scrub(volume)
    assert report.unrepairable == [], report.as_dict()
    volume.close()
    assert await reopened_read(v, master, f.ino, 4 * bs) == b"A" * 4 * bs


async def test_a_scrub_with_unrepairable_blocks_keeps_a_lagging_replicas_log(tmp_path):
    """Some block has no good share left anywhere: a faulted replica is not healed with a
    snapshot, which would cut its log, maybe the last place some shares are."""
    v, master, volume, ns = open_volume(tmp_path, k=1)
    bs = volume.block_size
    f = await ns.mknod(1, b"f", stat.S_IFREG | 0o644, 0, 0)
    await volume.write(f.ino, 0, b"F" * bs)
    await volume.sync(f.ino)
    async with volume.lock:
        await volume.snapshot()
    layout = volume.layout
    for r in v.replicas:  # block 0 of f goes bad everywhere
        with open(data_file(r, f.ino), "r+b") as out:
            out.seek(layout.body_offset(0))
            out.write(b"rot")
    g = await ns.mknod(1, b"g", stat.S_IFREG | 0o644, 0, 0)
    await volume.write(g.ino, 0, b"G" * bs)
    await volume.sync(g.ino)
    lagging = volume.replicas[1]
    volume.replica_set.fault(lagging, "no answer within 10s")
    log_size = (v.replicas[1] / "meta" / "log").stat().st_size
    report = await scrub.scrub(volume)
    assert any("its log is kept" in line for line in report.unrepairable), report.unrepairable
    assert lagging.state != ONLINE
    assert (v.replicas[1] / "meta" / "log").stat().st_size == log_size
    volume.close()
