"""Scrubber: verify every share on every replica and heal what is stale, missing or corrupt.

It runs inside whoever holds the replica set: the live mount (asked through the control
socket) or `lnmirror scrub` on an unmounted volume (holding every replica's lock).  Either
way it works under the volume's lock, one chunk of blocks at a time, so a commit never
races a heal write (I5) and lightningd waits at most one chunk.

Healing a share: decode the block's sealed bytes from k good shares and FEC-encode them
again.  zfec is deterministic, so this yields exactly the lost share; it is written back
into the same slot with the same generation.  A replica that missed records (STALE) or
was FAULTED gets every share it lacks, then the current snapshot and an empty log, and
rejoins: only then is its blame lifted.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import logging
import time
from collections.abc import AsyncIterator, Iterator
from functools import partial

import trio

from .fileio import unlink_quietly
from .heal import (
    CHUNK_BLOCKS,
    ChunkRead,
    Progress,
    Report,
    blocks_since,
    give_blocks,
    heal_chunk,
    install_snapshot,
    read_chunk,
)
from .replica import ONLINE, STALE, Replica, ReplicaError
from .tree import Tree
from .volume import Volume, VolumeError

log = logging.getLogger("lnmirrorfs.scrub")
READ_AHEAD_CHUNKS = 2  # chunks being read and checked while one is healed


def _scrub_targets(volume: Volume) -> list[Replica]:
    """Every replica with a readable header and a worker: online, stale and faulted ones,
    but not one taken offline or still busy with a job that hung (it would hold up every
    chunk for the deadline)."""
    return [r for r in volume.replicas if r.header and r.worker and not r.offline
            and (r.state == ONLINE or not r.worker.pending)]


async def scrub(volume: Volume, dry_run: bool = False, rate_mb: float | None = None,
                progress: Progress | None = None, chunk: int = CHUNK_BLOCKS) -> Report:
    """`chunk`: blocks checked per hold of the volume lock; a live mount uses fewer, so a
    commit waits for one small chunk at most."""
    report = Report(dry_run=dry_run)
    started = time.monotonic()
    start_seq = volume.tree.seq
    # A faulted replica whose fault just cleared may still be finishing the calls that
    # hung: give it the deadline to do so rather than skip it as hung.
    await volume.replica_set.wait_idle([r for r in volume.replicas if r.state != ONLINE])
    targets = _scrub_targets(volume)
    lagging = [r for r in targets if r.state != ONLINE]
    if lagging and not dry_run:
        await volume.replica_set.run_jobs([(r, r.reopen) for r in lagging], len(lagging))
    total = sum(len(n.blocks) for n in volume.tree.inodes.values() if n.is_reg)
    done = 0
    async with trio.open_nursery() as nursery:
        async for span, read in _read_ahead(volume, targets, chunk, nursery):
            async with volume.lock:
                await heal_chunk(volume, read, targets, report, dry_run)
            done += span
            if progress:
                progress(min(done, total), total)
            await _throttle(report.bytes_read, started, rate_mb)
    async with volume.lock:
        await _heal_lagging_replicas(volume, targets, start_seq, report, dry_run)
        if not dry_run:
            await volume.resume()  # a suspended mount takes writes again once W are back
        if volume.pending is None:  # a pending record sits in some logs: keep them
            await _check_metadata(volume, targets, report, dry_run)
        extra = await _extra_files(volume, targets, report)
        volume.replica_set.report_changes()
        report.seconds = round(time.monotonic() - started, 3)
        recordable = (not dry_run and volume.pending is None
                      and len(volume.online) >= volume.commit_quorum())
        if recordable:
            await volume.commit([{"op": "scrubbed", "report": _summary(report)}])
            # Only now is the served state acknowledged in this term: before, its last
            # record may never have been, and a later open may serve the state before it,
            # whose files these may be (a crash right after an unlink W did not hold).
            await _remove_extra_files(volume, extra)
        elif not dry_run:
            report.unrepairable.append(f"result not recorded: only {len(volume.online)} "
                                       f"replica(s) writable, the write quorum is "
                                       f"{volume.commit_quorum()}")
    if recordable:
        await volume.record_errors()
    return report


async def _read_ahead(volume: Volume, targets: list[Replica], chunk: int,
                      nursery: trio.Nursery) -> AsyncIterator[tuple[int, ChunkRead]]:
    """Every regular file's blocks, `chunk` at a time, read and checked on every target,
    with the number of blocks each covers (holes too).  READ_AHEAD_CHUNKS are being read
    while the caller heals the one before them, so the replicas' threads never wait for
    each other or for the heal, and the volume's lock is not held while they read."""
    reading: collections.deque[_Pending] = collections.deque()
    for ino, first in _chunks(volume, chunk):
        node = volume.tree.inodes.get(ino)
        if node is None:
            continue
        wanted = [(b, node.blocks[b]) for b in range(first, min(first + chunk, len(node.blocks)))]
        reading.append(_Pending(len(wanted)))
        nursery.start_soon(reading[-1].read, volume, ino, wanted, targets)
        if len(reading) > READ_AHEAD_CHUNKS:
            yield await reading.popleft().result()
    while reading:
        yield await reading.popleft().result()


def _chunks(volume: Volume, chunk: int) -> Iterator[tuple[int, int]]:
    """(inode, first block) of each chunk; a file that grows during the pass is followed
    to its end as it is then."""
    for ino in sorted(i for i, n in volume.tree.inodes.items() if n.is_reg):
        first = 0
        while (node := volume.tree.inodes.get(ino)) is not None and first < len(node.blocks):
            yield ino, first
            first += chunk


class _Pending:
    """One chunk being read: its ChunkRead once read."""

    def __init__(self, span: int) -> None:
        self.span = span
        self.done = trio.Event()
        self.value: ChunkRead | None = None

    async def read(self, volume: Volume, ino: int, wanted: list[tuple[int, int]],
                   targets: list[Replica]) -> None:
        self.value = await read_chunk(volume, ino, wanted, targets)
        self.done.set()

    async def result(self) -> tuple[int, ChunkRead]:
        await self.done.wait()
        assert self.value is not None
        return self.span, self.value


async def _throttle(bytes_read: int, started: float, rate_mb: float | None) -> None:
    if rate_mb:
        ahead = bytes_read / (rate_mb * 1e6) - (time.monotonic() - started)
        if ahead > 0:
            await trio.sleep(ahead)


async def _heal_lagging_replicas(volume: Volume, targets: list[Replica], start_seq: int,
                                 report: Report, dry_run: bool) -> None:
    """Give stale or faulted replicas the blocks committed during the pass, then the snapshot."""
    lagging = {r for r in targets if r.state != ONLINE}
    if not lagging:
        return
    await give_blocks(volume, blocks_since(volume.tree, start_seq, []), targets, report,
                       dry_run, lagging)
    if dry_run:
        report.healed_replicas += [f"{r.path} (would heal: {r.state}, {r.reason})" for r in lagging]
        return
    if report.unrepairable:
        # A snapshot would cut their logs, which may hold the only shares of those blocks
        # left (inline slots lost from the data files by a power cut): keep them as they are.
        report.unrepairable += [f"{r.path}: not healed, its log is kept: some blocks could not "
                                f"be rebuilt" for r in lagging]
        return
    sealed = volume.snapshots.seal(volume.committed)
    done = await volume.replica_set.run_jobs(
        [(r, partial(install_snapshot, volume, r, sealed)) for r in lagging], len(lagging))
    for r in lagging:
        if r in done:
            report.healed_replicas.append(r.path)
            log.info("replica %s healed and back online", r.path)
        else:
            report.unrepairable.append(f"{r.path}: could not be healed ({r.reason})")


def tree_digest(tree: Tree) -> bytes:
    return hashlib.blake2b(tree.dump(with_commit=False), digest_size=16).digest()


async def _check_metadata(volume: Volume, targets: list[Replica], report: Report,
                          dry_run: bool) -> None:
    """Reload each online replica's snapshot and log; rewrite any that do not give our tree."""
    online = [r for r in targets if r.state == ONLINE]
    loaded = await volume.replica_set.run_jobs([(r, partial(r.load, volume.keys)) for r in online],
                                               len(online))
    want = tree_digest(volume.tree)
    sealed = None
    for r in online:
        result = loaded.get(r)
        if result is not None and tree_digest(result.tree) == want:
            continue
        report.metadata_repaired.append(r.path)
        if not dry_run:
            sealed = sealed or volume.snapshots.seal(volume.committed)
            await volume.replica_set.run_jobs(
                [(r, partial(r.write_snapshot, volume.keys, volume.tree, sealed))], 1)


ExtraFiles = dict[Replica, tuple[list[int], list[str]]]


async def _extra_files(volume: Volume, targets: list[Replica], report: Report) -> ExtraFiles:
    """Per replica, data files of inodes that no longer exist (a crash between free and
    delete) and `.deleted` leftovers; counted in the report."""
    live = {ino for ino, n in volume.tree.inodes.items() if n.is_reg}
    listed = await volume.replica_set.run_jobs(
        [(r, partial(_extra_files_of, r, live)) for r in targets], len(targets))
    for extra, leftovers in listed.values():
        report.extra_files += len(extra) + len(leftovers)
    return listed


async def _remove_extra_files(volume: Volume, listed: ExtraFiles) -> None:
    for r, (extra, leftovers) in listed.items():
        if extra or leftovers:
            await volume.replica_set.run_jobs([(r, partial(_remove_all, r, extra, leftovers))], 1)


def _extra_files_of(r: Replica, live: set[int]) -> tuple[list[int], list[str]]:
    return sorted(r.files.file_ids() - live), r.files.deleted_leftovers()


def _remove_all(r: Replica, file_ids: list[int], leftovers: list[str]) -> None:
    for file_id in file_ids:
        r.remove_data(file_id)
    for path in leftovers:
        unlink_quietly(path)  # the housekeeping thread may be deleting it right now


def _summary(report: Report) -> dict:
    return {"time": int(time.time()), "result": report.result, "blocks": report.blocks,
            "bad_shares": report.bad_shares, "repaired_shares": report.repaired_shares,
            "unrepairable": len(report.unrepairable), "healed": report.healed_replicas}


# ---------------------------------------------------------------- replace

def prepare_replacement(volume: Volume, old_path: str, new_path: str) -> tuple[Replica, list[Replica]]:
    """Lay out NEW as the share OLD held; return it and the replicas it takes the place of.
    It touches both directories (and OLD may be a hung NAS): on a live mount, a thread's job."""
    index, named = volume.members.locate(old_path)
    header = dataclasses.replace(next(r.header for r in volume.replicas if r.header),
                                 share_index=index)
    empty = Tree.new(volume.block_size, 0, 0, 0, volume.members.quorum)
    try:
        new = Replica.create(new_path, header, volume.keys, empty)
        new.lock()
    except ReplicaError as exc:
        raise VolumeError(str(exc)) from None
    return new, named + [r for r in volume.replicas if r.header and r.index == index]


def attach_replacement(volume: Volume, new: Replica, old: list[Replica]) -> None:
    """Put NEW in the first of OLD's places (or add it), STALE until healed."""
    new.start_worker()
    new.mark(STALE, "replacement, not yet resilvered")
    for position, r in enumerate(volume.replicas):
        if r in old:
            r.close(timeout=0)  # a dead replica may hang: do not wait for it
            volume.replicas[position] = new
            return
    volume.replicas.append(new)


def replace(volume: Volume, old_path: str, new_path: str) -> None:
    """prepare_replacement and attach_replacement, for an unmounted volume."""
    attach_replacement(volume, *prepare_replacement(volume, old_path, new_path))
