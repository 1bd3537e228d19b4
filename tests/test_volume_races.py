"""The two races the review suspected in the volume, driven in-process on real replica
directories: each would lose or reuse a record if the code still had it."""

from __future__ import annotations

import errno
import stat
import threading

import trio
import trio.testing

from conftest import make_volume
from lnmirrorfs import format, heal, scrub
from lnmirrorfs.cli.common import read_key_file
from lnmirrorfs.namespace import Namespace
from lnmirrorfs.replica import ONLINE, Replica
from lnmirrorfs.tree import entry_slot
from lnmirrorfs.volume import Options, Volume


def open_volume(tmp_path) -> tuple[Volume, list, bytes]:
    v = make_volume(tmp_path / "vol", n=2, k=1)
    master = read_key_file(str(v.key))
    return Volume.open([str(r) for r in v.replicas], master), v.replicas, master


async def test_partial_write_racing_a_commit_of_the_same_block_loses_nothing(tmp_path):
    """A partial write reads the old block from the replicas (it waits); meanwhile another
    writer (an mmap writeback, a second handle) rewrites that block and commits it.  The
    partial write must apply on top of the committed block, not on the one it read."""
    volume, _, _ = open_volume(tmp_path)
    bs = volume.block_size
    node = await Namespace(volume).mknod(1, b"f", stat.S_IFREG | 0o644, 0, 0)
    await volume.write(node.ino, 0, b"o" * bs)
    await volume.sync(node.ino)
    volume.reader.cache.clear()  # the partial write must go to the replicas for the old block

    async def other_writer() -> None:
        await volume.write(node.ino, 0, b"N" * bs)
        await volume.sync(node.ino)

    hold = threading.Event()  # the replica workers wait here: a slow disk, deterministically
    for r in volume.online:
        r.worker.submit(hold.wait, lambda result, error: None)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(volume.write, node.ino, 10, b"x")  # reads block 0: queued
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(other_writer)  # buffers block 0 whole, its commit queued behind
        await trio.testing.wait_all_tasks_blocked()
        hold.set()
    await volume.sync(node.ino)
    volume.reader.cache.clear()
    got = await volume.read(node.ino, 0, bs)
    assert got == b"N" * 10 + b"x" + b"N" * (bs - 11)
    volume.close()


async def test_read_racing_a_commit_never_caches_the_old_block(tmp_path):
    """A read fetches a block's old version from the replicas while a new one is committed:
    the old one must not land in the cache over the new one (every later read would serve
    the old content)."""
    volume, _, _ = open_volume(tmp_path)
    bs = volume.block_size
    node = await Namespace(volume).mknod(1, b"f", stat.S_IFREG | 0o644, 0, 0)
    await volume.write(node.ino, 0, b"o" * bs)
    await volume.sync(node.ino)
    volume.reader.cache.clear()
    hold = threading.Event()
    for r in volume.online:
        r.worker.submit(hold.wait, lambda result, error: None)
    first: list[bytes] = []

    async def reader() -> None:
        first.append(await volume.read(node.ino, 0, bs))

    async def other_writer() -> None:
        await volume.write(node.ino, 0, b"N" * bs)
        await volume.sync(node.ino)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)  # fetch of the old version: queued
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(other_writer)
        await trio.testing.wait_all_tasks_blocked()
        hold.set()
    assert first[0] in (b"o" * bs, b"N" * bs)
    assert await volume.read(node.ino, 0, bs) == b"N" * bs
    volume.close()


async def test_cancelled_commit_is_applied_and_its_number_never_reused(tmp_path):
    """Shutdown cancels the writeback task while its commit is at the replicas: the record
    is there, so it must be in memory too, and the next record must follow it."""
    volume, replicas, master = open_volume(tmp_path)
    node = await Namespace(volume).mknod(1, b"f", stat.S_IFREG | 0o644, 0, 0)
    await volume.write(node.ino, 0, b"first")
    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(volume.sync, node.ino)
            await trio.sleep(0)  # the commit is handed to the replica workers ...
            scope.cancel()       # ... and its caller cancelled
    seq = volume.tree.seq
    await volume.write(node.ino, 0, b"second")
    await volume.sync(node.ino)
    assert volume.tree.seq == seq + 1
    volume.close()
    keys = volume.keys
    for path in replicas:  # every replica's log replays with no gap and no reused number
        loaded = Replica.open(str(path)).load(keys)
        assert loaded.tree.seq == seq + 1 and not loaded.damage
    again = Volume.open([str(r) for r in replicas], master, writable=False)
    ino = again.tree.child(1, b"f").ino
    assert await again.read(ino, 0, 6) == b"second"
    again.close()


async def test_a_free_never_reaches_a_replica_that_missed_its_record(tmp_path):
    """W=1 of 2: an unlink is acknowledged by one replica while the other's part of it is
    still queued, and fails.  The freed file's removal is queued behind it on that replica
    and must not run there: its own latest state still holds the file, and once it is the
    only replica left, a read-only open serves that state from it."""
    v = make_volume(tmp_path / "vol", n=2, k=1)
    master = read_key_file(str(v.key))
    volume = Volume.open([str(r) for r in v.replicas], master, Options(quorum=1))
    names = Namespace(volume)
    node = await names.mknod(1, b"f", stat.S_IFREG | 0o644, 0, 0)
    await volume.write(node.ino, 0, b"kept" * 100)
    await volume.sync(node.ino)
    async with volume.lock:  # the shares now live in the data file alone, not in the log
        await volume.snapshot()
    late = volume.replicas[1]
    late._append = _crash
    hold = threading.Event()  # its disk is slow: the other replica answers first
    late.worker.submit(hold.wait, lambda result, error: None)
    await names.unlink(1, b"f", want_dir=False)
    hold.set()
    while late.worker.pending:
        await trio.sleep(0.01)
    volume.close()
    v.replicas[0].rename(tmp_path / "away")
    alone = Volume.open([str(r) for r in v.replicas], master, writable=False)
    try:
        assert await alone.read(alone.tree.child(1, b"f").ino, 0, 400) == b"kept" * 100
    finally:
        alone.close()


async def test_a_scrub_heals_a_replica_whose_hung_call_is_just_returning(tmp_path):
    """A replica was FAULTED because a call hung; the fault clears and the call returns
    while the operator's scrub starts.  The scrub must wait for it (up to the deadline)
    and heal it, not skip it as still hung (CI caught that race through a mount)."""
    volume, _, _ = open_volume(tmp_path)
    names = Namespace(volume)
    node = await names.mknod(1, b"f", stat.S_IFREG | 0o644, 0, 0)
    await volume.write(node.ino, 0, b"d" * 9000)
    await volume.sync(node.ino)
    slow = volume.replicas[1]
    hold = threading.Event()
    slow.worker.submit(hold.wait, lambda result, error: None)
    volume.replica_set.fault(slow, "no answer within 10s")

    async def fault_clears() -> None:
        await trio.sleep(0.3)
        hold.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(fault_clears)
        report = await scrub.scrub(volume)
    assert report.healed_replicas == [slow.path]
    assert slow.state == ONLINE
    volume.close()


def _crash(*args, **kwargs) -> None:
    raise OSError(errno.EIO, "crash injected")


async def test_a_chunk_read_before_two_commits_is_never_healed_over_them(tmp_path):
    """A scrub reads a chunk outside the volume's lock and heals it under the lock.  Two
    commits in between put a block back into the slot it had, newer: healing the bad
    share it read would write the old version over the new one on that replica."""
    volume, replicas, _ = open_volume(tmp_path)
    bs = volume.block_size
    node = await Namespace(volume).mknod(1, b"f", stat.S_IFREG | 0o644, 0, 0)
    await volume.write(node.ino, 0, b"1" * bs)
    await volume.sync(node.ino)
    async with volume.lock:  # the deferred slots go to the data files
        await volume.snapshot()
    layout = volume.layout
    data_file = replicas[0] / "data" / format.data_name(node.ino, entry_slot(node.blocks[0]))
    with open(data_file, "r+b") as f:  # replica 0's share of block 0 goes bad
        f.seek(layout.body_offset(0))
        f.write(b"rot")
    targets = volume.online
    read = await heal.read_chunk(volume, node.ino, [(0, node.blocks[0])], targets)
    assert read.reads[targets[0]].bad == [0]
    for version in (b"2", b"3"):  # slot 1, then the first slot again
        await volume.write(node.ino, 0, version * bs)
        await volume.sync(node.ino)
    report = heal.Report()
    async with volume.lock:
        await heal.heal_chunk(volume, read, targets, report, dry_run=False)
    assert report.repaired_shares == 0
    after = await scrub.scrub(volume)
    assert after.bad_shares == 0 and after.result == "clean", after
    volume.close()


async def test_a_bulk_write_goes_on_while_its_commit_is_in_flight(tmp_path):
    """Half of dirty_bytes buffered for one file starts its commit in the background; the
    writes after it are buffered meanwhile (they do not wait for that commit), up to the
    bound; past the bound a write waits.  Everything reads back once durable."""
    volume, replicas, master = open_volume(tmp_path)
    bound = volume.options.dirty_bytes
    node = await Namespace(volume).mknod(1, b"f", stat.S_IFREG | 0o644, 0, 0)
    chunk = 128 * 1024  # what the kernel sends in one WRITE
    data = bytes(range(256)) * (2 * bound // 256)
    hold = threading.Event()  # the replicas' disks stall: the background commit cannot end
    for r in volume.online:
        r.worker.submit(hold.wait, lambda result, error: None)
    async with trio.open_nursery() as nursery:
        volume.background = nursery
        offset = 0
        with trio.fail_after(5):  # the first half, then as much again while it is in flight
            while offset < bound - chunk:
                await volume.write(node.ino, offset, data[offset:offset + chunk])
                await trio.sleep(0)  # each WRITE is a request task of its own
                offset += chunk
        assert volume.buffer.inflight.get(node.ino), "no commit was started in the background"
        assert volume.tree.seq == volume.committed and not hold.is_set()
        blocked = trio.Event()

        async def past_the_bound() -> None:
            for at in range(offset, len(data), chunk):
                await volume.write(node.ino, at, data[at:at + chunk])
            blocked.set()
        nursery.start_soon(past_the_bound)
        await trio.testing.wait_all_tasks_blocked()
        assert not blocked.is_set(), "a write past dirty_bytes did not wait for the commit"
        hold.set()
        with trio.fail_after(30):
            await blocked.wait()
        volume.background = None
    await volume.sync(node.ino)
    volume.close()
    again = Volume.open([str(r) for r in replicas], master, writable=False)
    try:
        assert await again.read(node.ino, 0, len(data)) == data
    finally:
        again.close()
