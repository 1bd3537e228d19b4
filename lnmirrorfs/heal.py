"""Healing shares: verify blocks on several replicas and rebuild the bad or missing
shares from k good ones; catch up a replica that only lags with exactly the blocks it
lacks, and bring back, while mounted, a faulted replica that answers again.

The caller holds the volume's lock: a heal write never races a commit (I5)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING

from . import codec, format, statechoice
from .blocks import Checked
from .replay import Loaded, still_current
from .replica import FAULTED, ONLINE, Replica
from .tree import HOLE, Tree, entry_gen, entry_slot

if TYPE_CHECKING:
    from .volume import Volume

log = logging.getLogger("lnmirrorfs.heal")
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


@dataclass
class ChunkRead:
    """Some blocks of one inode as every target holds them, read and checked."""

    ino: int
    wanted: list[tuple[int, int]]  # (block, tree entry when read), holes left out
    reads: dict[Replica, Checked]  # the targets that answered


async def read_chunk(volume: Volume, ino: int, wanted: list[tuple[int, int]],
                     targets: list[Replica]) -> ChunkRead:
    """Read (in the targets' threads) and check the shares of some blocks of one inode on
    every target; needs no lock: heal_chunk finds the blocks committed anew meanwhile."""
    wanted = [(b, e) for b, e in wanted if e != HOLE]
    if not wanted:
        return ChunkRead(ino, [], {})
    # A chunk's blocks were mostly written by a few records: look each term up once.
    terms = {gen: volume.tree.term_of(gen) for gen in {entry_gen(e) for _, e in wanted}}
    slots = [(b, entry_gen(e), entry_slot(e), terms[entry_gen(e)]) for b, e in wanted]
    where = [(ino, b, slot) for b, _, slot, _ in slots]
    raws = await volume.replica_set.run_jobs(
        [(r, partial(r.read_slots, where)) for r in targets], len(targets))
    return ChunkRead(ino, wanted, volume.reader.check_copies(ino, slots, raws))


async def check_blocks(volume: Volume, ino: int, wanted: list[tuple[int, int]],
                        targets: list[Replica], report: Report, dry_run: bool,
                        only: set[Replica] | None = None) -> set[Replica]:
    """read_chunk then heal_chunk, for a caller that holds the volume's lock throughout."""
    read = await read_chunk(volume, ino, wanted, targets)
    return await heal_chunk(volume, read, targets, report, dry_run, only)


async def heal_chunk(volume: Volume, read: ChunkRead, targets: list[Replica], report: Report,
                     dry_run: bool, only: set[Replica] | None = None) -> set[Replica]:
    """Count what read_chunk found and rewrite the bad shares from k good ones; the caller
    holds the volume's lock.  A block committed anew since it was read is left out: that
    commit wrote all its shares, and a replica that missed it lags and is healed with the
    blocks born during the pass.  Returns the replicas that could not be given a share
    they lack."""
    ino, reads = read.ino, read.reads
    node = volume.tree.inodes.get(ino)
    unchanged = {position for position, (block, entry) in enumerate(read.wanted)
                 if node is not None and block < len(node.blocks) and node.blocks[block] == entry}
    report.blocks += len(unchanged)
    report.shares_checked += len(unchanged) * len(targets)
    report.bytes_read += sum(checked.bytes_read for checked in reads.values())
    suspect = unchanged if len(reads) < len(targets) else \
        unchanged.intersection(position for checked in reads.values() for position in checked.bad)
    unhealed: set[Replica] = set()
    writes: dict[Replica, list] = {}
    healed_blocks: dict[Replica, list[int]] = {}
    for position in sorted(suspect):
        block, entry = read.wanted[position]
        gen = entry_gen(entry)
        good: dict[int, bytes] = {}
        bad: list[Replica] = []
        for r in targets:
            share = reads[r].shares[position] if r in reads else None
            if share is None:
                bad.append(r)
            else:
                good[r.index] = share
        bad = [r for r in bad if only is None or r in only]
        if not bad:
            continue
        for r in bad:
            if r.state == ONLINE and only is None:
                report.bad_shares += 1
                r.counters.checksum += 1
        if len(good) < volume.k:
            report.unrepairable.append(f"{volume.tree.path_of(ino)} block {block}: only {len(good)} "
                                       f"good shares of the {volume.k} needed")
            unhealed.update(bad)
            continue
        term = volume.tree.term_of(gen)
        shares = _rebuild_shares(volume, ino, block, gen, term, good)
        for r in bad:
            checksum = codec.slot_checksum(volume.keys, volume.volume_id, volume.k, ino, block,
                                           gen, term, r.index, shares[r.index])
            writes.setdefault(r, []).append((ino, block, entry_slot(entry),
                                             format.pack_slot(gen, checksum, shares[r.index])))
            healed_blocks.setdefault(r, []).append(block)
    if writes and not dry_run:
        written = await volume.replica_set.run_jobs([(r, partial(r.write_slots, slots))
                                     for r, slots in writes.items()], len(writes))
        for r in written:
            report.repaired_shares += len(writes[r])
            volume.reader.bad_shares.difference_update((r.index, ino, b) for b in healed_blocks[r])
        unhealed.update(r for r in writes if r not in written)
    return unhealed


def _rebuild_shares(volume: Volume, ino: int, block: int, gen: int, term: int,
                    good: dict[int, bytes]) -> list[bytes]:
    sealed = codec.fec_decode(good, volume.k, volume.n, volume.block_size + volume.keys.cipher.overhead)
    codec.decrypt_block(volume.keys, volume.volume_id, ino, block, gen, term, sealed)  # authenticates
    return codec.fec_encode(sealed, volume.k, volume.n)


Touched = list[tuple[int, list[tuple[int, int]]]]


async def catch_up(volume: Volume, lagging: dict[Replica, tuple[int, Loaded]]) -> None:
    """Bring replicas that only lag to the served state with exactly the blocks they lack,
    then the current snapshot (as ZFS resilvers by birth txg, or DRBD by its bitmap).

    A replica that shares the served log up to record `fork` holds every block born at or
    before it, except those its own later (never acknowledged) records overwrote: it gets
    the blocks born after the fork and those, verified and rebuilt from k good shares.
    First its own log's inline slots that the served state still uses are redone: a power
    cut may have lost them from its data files, and its log is about to be replaced.
    Good shares come from the online replicas only: a faulted one may hang."""
    targets = volume.online + [r for r in lagging if r not in volume.online]
    report = Report()
    ready = []
    rewritten: dict[Replica, int] = {}
    for r, (fork, loaded) in lagging.items():
        redo = {key: raw for key, raw in loaded.redo.items()
                if format.unpack_slot(raw)[0] <= fork and still_current(volume.tree, key, raw)}
        if redo and not await volume.replica_set.run_jobs([(r, partial(r.apply_redo, redo))], 1):
            _not_caught_up(r, "redo of its log failed")
            continue
        before = report.repaired_shares
        failed = await give_blocks(volume, blocks_since(volume.tree, fork, loaded.touched),
                                   targets, report, False, {r})
        rewritten[r] = report.repaired_shares - before
        if failed:
            _not_caught_up(r, "; ".join(report.unrepairable[:1] or ["a write failed"]))
        else:
            ready.append(r)
    sealed = volume.snapshots.seal(volume.committed)
    done = await volume.replica_set.run_jobs(
        [(r, partial(install_snapshot, volume, r, sealed)) for r in ready], len(ready))
    for r in ready:
        if r in done:
            log.info("replica %s caught up from record %d to %d: %d shares rewritten",
                     r.path, lagging[r][0], volume.tree.seq, rewritten.get(r, 0))
        else:
            _not_caught_up(r, "its snapshot write failed")
    volume.replica_set.report_changes()


def _not_caught_up(r: Replica, why: str) -> None:
    if r.state != FAULTED or not r.reason.startswith("could not be caught up"):
        r.state, r.reason = FAULTED, f"could not be caught up: {why}"


async def rejoin(volume: Volume, back: dict[Replica, Loaded]) -> None:
    """While mounted: faulted replicas that answer again (ReplicaSet.reconnect) are caught
    up with exactly the records they missed and put back ONLINE (the next record lifts
    their blame).  One whose log cannot be matched to the served one stays FAULTED until a
    scrub heals it fully.  The caller holds the volume's lock."""
    lagging = {}
    for r, loaded in back.items():
        if r.state != FAULTED:
            continue  # another caller brought it back meanwhile
        why = _why_not_catchable(volume, loaded)
        if why:
            r.heal_needed = why
            r.reason = f"{why}: heal it with lnmirror scrub"
            log.warning("replica %s answers again but %s", r.path, r.reason)
            continue
        lagging[r] = (statechoice.fork_point(loaded.tree, volume.tree), loaded)
    if lagging:
        await catch_up(volume, lagging)


def _why_not_catchable(volume: Volume, loaded: Loaded) -> str:
    if loaded.damage:
        return f"its log is damaged ({loaded.damage})"
    if statechoice.term_number(loaded.max_term) > statechoice.term_number(volume.term):
        return "it was written by another mount meanwhile"
    fork = statechoice.fork_point(loaded.tree, volume.tree)
    if fork < loaded.snapshot_seq:
        return f"its snapshot (record {loaded.snapshot_seq}) is past the served log's fork"
    return ""


async def give_blocks(volume: Volume, wanted: dict[int, list[int]], targets: list[Replica],
                      report: Report, dry_run: bool, only: set[Replica]) -> bool:
    """Verify these blocks on every target and rewrite, on `only`, the shares they lack,
    CHUNK_BLOCKS at a time; True if some could not be given."""
    failed = False
    for ino, blocks in sorted(wanted.items()):
        entries = volume.tree.inodes[ino].blocks
        for first in range(0, len(blocks), CHUNK_BLOCKS):
            chunk = [(b, entries[b]) for b in blocks[first:first + CHUNK_BLOCKS]]
            failed |= bool(await check_blocks(volume, ino, chunk, targets, report, dry_run, only))
    return failed


def blocks_since(tree: Tree, fork: int, touched: Touched) -> dict[int, list[int]]:
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


def install_snapshot(volume: Volume, r: Replica, sealed: bytes) -> None:
    if r.header_damage:  # its share index was inferred at open: write it down now
        r.write_header(volume.keys)
        r.header_damage = ""
    r.write_snapshot(volume.keys, volume.tree, sealed)
    r.rejoin(volume.tree.seq)
    # A background snapshot it was writing when it faulted is moot now; its threads may
    # have been replaced with it, so it would never say so: the next one may start.
    volume.snapshots.writing.discard(r)
