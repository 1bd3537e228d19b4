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

import dataclasses
import hashlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import trio

from . import codec, format
from .replica import (
    FAULTED,
    ONLINE,
    STALE,
    Loaded,
    Replica,
    ReplicaError,
    still_current,
    unlink_quietly,
)
from .tree import HOLE, Tree, entry_gen, entry_slot
from .volume import Volume, VolumeError

log = logging.getLogger("lnmirrorfs.scrub")
CHUNK_BLOCKS = 256

Progress = Callable[[int, int], None]


@dataclass
class Report:
    blocks: int = 0
    shares_checked: int = 0
    bad_shares: int = 0
    repaired_shares: int = 0
    unrepairable: list[str] = field(default_factory=list)
    healed_replicas: list[str] = field(default_factory=list)
    metadata_repaired: list[str] = field(default_factory=list)
    extra_files: int = 0
    bytes_read: int = 0
    seconds: float = 0.0
    dry_run: bool = False

    @property
    def result(self) -> str:
        if self.unrepairable:
            return "unrepairable"
        if self.bad_shares or self.healed_replicas or self.metadata_repaired or self.extra_files:
            return "found problems" if self.dry_run else "repaired"
        return "clean"

    @staticmethod
    def exit_code_for(result: str) -> int:
        return {"clean": 0, "repaired": 1, "found problems": 1}.get(result, 2)

    def as_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items()}
        d["result"] = self.result
        return d


def _scrub_targets(volume: Volume) -> list[Replica]:
    """Every replica with a readable header and a worker: online, stale and faulted ones."""
    return [r for r in volume.replicas if r.header and r.worker]


async def scrub(volume: Volume, dry_run: bool = False, rate_mb: float | None = None,
                progress: Progress | None = None) -> Report:
    report = Report(dry_run=dry_run)
    started = time.monotonic()
    start_seq = volume.tree.seq
    targets = _scrub_targets(volume)
    lagging = [r for r in targets if r.state != ONLINE]
    if lagging and not dry_run:
        await volume.run_jobs([(r, r.reopen) for r in lagging], len(lagging))
    total = sum(len(n.blocks) for n in volume.tree.inodes.values() if n.is_reg)
    done = 0
    for ino in sorted(i for i, n in volume.tree.inodes.items() if n.is_reg):
        first = 0
        while True:
            async with volume.lock:
                node = volume.tree.inodes.get(ino)
                if node is None or first >= len(node.blocks):
                    break
                wanted = [(b, node.blocks[b]) for b in range(first, min(first + CHUNK_BLOCKS,
                                                                        len(node.blocks)))]
                await _check_blocks(volume, ino, wanted, targets, report, dry_run)
            first += CHUNK_BLOCKS
            done += len(wanted)
            if progress:
                progress(done, total)
            await _throttle(report.bytes_read, started, rate_mb)
    async with volume.lock:
        await _heal_lagging_replicas(volume, targets, start_seq, report, dry_run)
        await _check_metadata(volume, targets, report, dry_run)
        await _remove_extra_files(volume, targets, report, dry_run)
        volume.report_changes()
        report.seconds = round(time.monotonic() - started, 3)
        recordable = (not dry_run and not volume.suspended
                      and len(volume.online) >= volume.commit_quorum())
        if recordable:
            await volume.commit([{"op": "scrubbed", "report": _summary(report)}])
        elif not dry_run:
            report.unrepairable.append(f"result not recorded: only {len(volume.online)} "
                                       f"replica(s) writable, the write quorum is "
                                       f"{volume.commit_quorum()}")
    if recordable:
        await volume.record_errors()
    return report


async def _throttle(bytes_read: int, started: float, rate_mb: float | None) -> None:
    if rate_mb:
        ahead = bytes_read / (rate_mb * 1e6) - (time.monotonic() - started)
        if ahead > 0:
            await trio.sleep(ahead)


async def _check_blocks(volume: Volume, ino: int, wanted: list[tuple[int, int]],
                        targets: list[Replica], report: Report, dry_run: bool,
                        only: set[Replica] | None = None) -> set[Replica]:
    """Verify the shares of some blocks of one inode on every target; rewrite the bad ones.
    Returns the replicas that could not be given a share they lack."""
    wanted = [(b, e) for b, e in wanted if e != HOLE]
    if not wanted:
        return set()
    unhealed: set[Replica] = set()
    size = volume.slot_size
    reads = await volume.run_jobs(
        [(r, partial(r.read_slots, [(ino, b, entry_slot(e)) for b, e in wanted], size))
         for r in targets], len(targets))
    writes: dict[Replica, list] = {}
    healed_blocks: dict[Replica, list[int]] = {}
    for position, (block, entry) in enumerate(wanted):
        gen = entry_gen(entry)
        good: dict[int, bytes] = {}
        bad: list[Replica] = []
        for r in targets:
            raw = reads[r][position] if r in reads else b""
            report.shares_checked += 1
            report.bytes_read += len(raw)
            share = volume.share_ok(r, ino, block, gen, raw)
            if share is None:
                bad.append(r)
            else:
                good[r.index] = share
        report.blocks += 1
        bad = [r for r in bad if only is None or r in only]
        if not bad:
            continue
        for r in bad:
            if r.state == ONLINE and only is None:
                report.bad_shares += 1
                r.counters.checksum += 1
        if len(good) < volume.k:
            report.unrepairable.append(f"{volume.path_of(ino)} block {block}: only {len(good)} "
                                       f"good shares of the {volume.k} needed")
            unhealed.update(bad)
            continue
        term = volume.tree.term_of(gen)
        shares = _rebuild_shares(volume, ino, block, gen, term, good)
        offset = format.slot_offset(block, entry_slot(entry), size)
        for r in bad:
            checksum = codec.share_checksum(volume.keys, volume.volume_id, ino, block, gen, term,
                                            r.index, shares[r.index])
            writes.setdefault(r, []).append((ino, offset, format.pack_slot(gen, checksum,
                                                                           shares[r.index])))
            healed_blocks.setdefault(r, []).append(block)
    if writes and not dry_run:
        written = await volume.run_jobs([(r, partial(r.write_slots, slots))
                                     for r, slots in writes.items()], len(writes))
        for r in written:
            report.repaired_shares += len(writes[r])
            volume.bad_shares.difference_update((r.index, ino, b) for b in healed_blocks[r])
        unhealed.update(r for r in writes if r not in written)
    return unhealed


def _rebuild_shares(volume: Volume, ino: int, block: int, gen: int, term: int,
                    good: dict[int, bytes]) -> list[bytes]:
    sealed = codec.fec_decode(good, volume.k, volume.n, volume.block_size + codec.SEALED_OVERHEAD)
    codec.decrypt_block(volume.keys, volume.volume_id, ino, block, gen, term, sealed)  # authenticates
    return codec.fec_encode(sealed, volume.k, volume.n)


async def _heal_lagging_replicas(volume: Volume, targets: list[Replica], start_seq: int,
                                 report: Report, dry_run: bool) -> None:
    """Give stale or faulted replicas the blocks committed during the pass, then the snapshot."""
    lagging = {r for r in targets if r.state != ONLINE}
    if not lagging:
        return
    await _give_blocks(volume, _blocks_since(volume.tree, start_seq, []), targets, report,
                       dry_run, lagging)
    if dry_run:
        report.healed_replicas += [f"{r.path} (would heal: {r.state}, {r.reason})" for r in lagging]
        return
    sealed = volume.seal_snapshot()
    done = await volume.run_jobs([(r, partial(_install_snapshot, volume, r, sealed)) for r in lagging],
                             len(lagging))
    for r in lagging:
        if r in done:
            report.healed_replicas.append(r.path)
            log.info("replica %s healed and back online", r.path)
        else:
            report.unrepairable.append(f"{r.path}: could not be healed ({r.reason})")


Touched = list[tuple[int, list[tuple[int, int]]]]


async def catch_up(volume: Volume, lagging: dict[Replica, tuple[int, Loaded]]) -> None:
    """Bring replicas that only lag to the served state with exactly the blocks they lack,
    then the current snapshot (as ZFS resilvers by birth txg, or DRBD by its bitmap).

    A replica that shares the served log up to record `fork` holds every block born at or
    before it, except those its own later (never acknowledged) records overwrote: it gets
    the blocks born after the fork and those, verified and rebuilt from k good shares.
    First its own log's inline slots that the served state still uses are redone: a power
    cut may have lost them from its data files, and its log is about to be replaced."""
    targets = _scrub_targets(volume)
    report = Report()
    async with volume.lock:
        ready = []
        rewritten: dict[Replica, int] = {}
        for r, (fork, loaded) in lagging.items():
            redo = {key: raw for key, raw in loaded.redo.items()
                    if format.unpack_slot(raw)[0] <= fork and still_current(volume.tree, key, raw)}
            if redo and not await volume.run_jobs([(r, partial(r.apply_redo, redo))], 1):
                r.state, r.reason = FAULTED, "could not be caught up: redo of its log failed"
                continue
            before = report.repaired_shares
            failed = await _give_blocks(volume, _blocks_since(volume.tree, fork, loaded.touched),
                                        targets, report, False, {r})
            rewritten[r] = report.repaired_shares - before
            if failed:
                r.state, r.reason = FAULTED, "could not be caught up: " + "; ".join(
                    report.unrepairable[:1] or ["a write failed"])
            else:
                ready.append(r)
        sealed = volume.seal_snapshot()
        done = await volume.run_jobs([(r, partial(_install_snapshot, volume, r, sealed))
                                      for r in ready], len(ready))
        for r in ready:
            if r in done:
                log.info("replica %s caught up from record %d to %d: %d shares rewritten",
                         r.path, lagging[r][0], volume.tree.seq, rewritten.get(r, 0))
            elif r.state != FAULTED:
                r.state, r.reason = FAULTED, "could not be caught up: its snapshot write failed"
        volume.report_changes()


async def _give_blocks(volume: Volume, wanted: dict[int, list[int]], targets: list[Replica],
                      report: Report, dry_run: bool, only: set[Replica]) -> bool:
    """Verify these blocks on every target and rewrite, on `only`, the shares they lack,
    CHUNK_BLOCKS at a time; True if some could not be given."""
    failed = False
    for ino, blocks in sorted(wanted.items()):
        entries = volume.tree.inodes[ino].blocks
        for first in range(0, len(blocks), CHUNK_BLOCKS):
            chunk = [(b, entries[b]) for b in blocks[first:first + CHUNK_BLOCKS]]
            failed |= bool(await _check_blocks(volume, ino, chunk, targets, report, dry_run, only))
    return failed


def _blocks_since(tree: Tree, fork: int, touched: Touched) -> dict[int, list[int]]:
    """Per inode, the blocks whose current version is newer than `fork`, plus those the
    replica's own records after `fork` wrote (their slots may hold other content now)."""
    out: dict[int, set[int]] = {}
    for ino, node in tree.inodes.items():
        if node.is_reg:
            newer = {b for b, e in enumerate(node.blocks) if entry_gen(e) > fork}
            if newer:
                out[ino] = newer
    for seq, blocks in touched:
        if seq <= fork:
            continue
        for ino, index in blocks:
            node = tree.inodes.get(ino)
            if node is not None and node.is_reg and index < len(node.blocks):
                out.setdefault(ino, set()).add(index)
    return {ino: sorted(blocks) for ino, blocks in out.items()}


def _install_snapshot(volume: Volume, r: Replica, sealed: bytes) -> None:
    if r.header_damage:  # its share index was inferred at open: write it down now
        r.write_header(volume.keys)
        r.header_damage = ""
    r.write_snapshot(volume.keys, volume.tree, sealed)
    r.rejoin(volume.tree.seq)


def tree_digest(tree: Tree) -> bytes:
    return hashlib.blake2b(tree.dump(with_commit=False), digest_size=16).digest()


async def _check_metadata(volume: Volume, targets: list[Replica], report: Report,
                          dry_run: bool) -> None:
    """Reload each online replica's snapshot and log; rewrite any that do not give our tree."""
    online = [r for r in targets if r.state == ONLINE]
    loaded = await volume.run_jobs([(r, partial(r.load, volume.keys)) for r in online], len(online))
    want = tree_digest(volume.tree)
    sealed = None
    for r in online:
        result = loaded.get(r)
        if result is not None and tree_digest(result.tree) == want:
            continue
        report.metadata_repaired.append(r.path)
        if not dry_run:
            sealed = sealed or volume.seal_snapshot()
            await volume.run_jobs([(r, partial(r.write_snapshot, volume.keys, volume.tree, sealed))], 1)


async def _remove_extra_files(volume: Volume, targets: list[Replica], report: Report,
                              dry_run: bool) -> None:
    """Data files of inodes that no longer exist (a crash between free and delete)."""
    live = {ino for ino, n in volume.tree.inodes.items() if n.is_reg}
    listed = await volume.run_jobs([(r, partial(_extra_files, r, live)) for r in targets],
                                   len(targets))
    for r, (extra, leftovers) in listed.items():
        report.extra_files += len(extra) + len(leftovers)
        if (extra or leftovers) and not dry_run:
            await volume.run_jobs([(r, partial(_remove_all, r, extra, leftovers))], 1)


def _extra_files(r: Replica, live: set[int]) -> tuple[list[int], list[str]]:
    return [f for f in r.data_files() if f not in live], r.deleted_leftovers()


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

def replacement_index(volume: Volume, old_path: str) -> int:
    """The share the dead replica held: from its header if readable, else the one unaccounted for."""
    old = os.path.realpath(old_path)
    for r in volume.replicas:
        if os.path.realpath(r.path) == old and r.header:
            return r.index
    held = {r.index for r in volume.replicas if r.header and os.path.realpath(r.path) != old}
    missing = sorted(set(range(volume.n)) - held)
    if len(missing) != 1:
        raise VolumeError(f"cannot tell which share {old_path} held (shares not present: "
                          f"{missing}); give every other replica with --replica")
    return missing[0]


def attach_replacement(volume: Volume, old_path: str, new_path: str) -> Replica:
    """Lay out NEW as share `index` of the volume and put it in OLD's place, STALE until healed."""
    index = replacement_index(volume, old_path)
    header = dataclasses.replace(next(r.header for r in volume.replicas if r.header),
                                 share_index=index)
    empty = Tree.new(volume.block_size, 0, 0, 0, volume.quorum)
    try:
        new = Replica.create(new_path, header, volume.keys, empty)
        new.lock()
    except ReplicaError as exc:
        raise VolumeError(str(exc)) from None
    new.start_worker()
    new.mark(STALE, "replacement, not yet resilvered")
    old = os.path.realpath(old_path)
    for position, r in enumerate(volume.replicas):
        if os.path.realpath(r.path) == old or (r.header and r.index == index):
            r.close(timeout=0)  # a dead replica may hang: do not wait for it
            volume.replicas[position] = new
            break
    else:
        volume.replicas.append(new)
    return new
