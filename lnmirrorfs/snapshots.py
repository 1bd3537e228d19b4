"""Snapshots: when the whole tree is written to the replicas so that their logs can be cut,
and how: in the replicas' threads after a record, without holding up the commits that
follow, or waited for (unmount, import).  Each snapshot also frees the stale slot bodies
of the blocks rewritten since the last one."""

from __future__ import annotations

import logging
from functools import partial

from . import codec, format
from .replica import FAULTED, ONLINE, Replica, seal_snapshot
from .replicaset import ReplicaSet
from .stale import stale_pages
from .tree import Tree
from .worker import Once

log = logging.getLogger("lnmirrorfs.snapshots")
# Blocks overwritten since the last snapshot that trigger the next one (a big file rewritten
# grows the log little): bounds the set (~160 B a block) and the stale slot bodies kept.
REWRITTEN_BLOCKS = 32768


class Snapshots:
    def __init__(self, replica_set: ReplicaSet, keys: codec.Keys, volume_id: bytes, tree: Tree,
                 layout: format.SlotLayout, log_limit: int) -> None:
        self.replica_set = replica_set
        self.keys, self.volume_id, self.tree, self.layout = keys, volume_id, tree, layout
        self.log_limit = log_limit  # log bytes since the last snapshot that trigger the next
        self.log_bytes = 0
        self.writing: set[Replica] = set()  # replicas writing a background snapshot
        self.rewritten: set[tuple[int, int]] = set()  # (ino, block) overwritten since the last one

    def seal(self, committed: int) -> bytes:
        """The current tree, sealed, with the highest record known acknowledged: a snapshot
        may hold records not yet acknowledged (a catch-up at open), so its own record
        number proves nothing."""
        self.tree.commit = max(self.tree.commit, committed)
        return seal_snapshot(self.keys, self.volume_id, self.tree)

    def recorded(self, record_bytes: int, committed: int) -> None:
        """A record of that size was applied: snapshot in the background once the log or
        the set of rewritten blocks has grown past its limit."""
        self.log_bytes += record_bytes
        if self.log_bytes > self.log_limit or len(self.rewritten) > REWRITTEN_BLOCKS:
            self._in_background(committed)

    def _in_background(self, committed: int) -> None:
        """Snapshot the current record: only the tree's copy is made here; the dump, the
        seal and the writes run in the replicas' threads (Replica.snapshot_in_background),
        and the log keeps growing meanwhile."""
        online = self.replica_set.online
        if self.writing & set(online):
            return  # the last one is still being written: try again after the next record
        self.log_bytes = 0
        self.tree.commit = max(self.tree.commit, committed)
        frozen = self.tree.copy()
        sealed = Once(partial(seal_snapshot, self.keys, self.volume_id, frozen))
        stale = self._take_stale(frozen)
        for r in online:
            self.writing.add(r)
            r.snapshot_in_background(frozen.seq, frozen.term, sealed, partial(self._written, r),
                                     stale)

    def _take_stale(self, tree: Tree) -> Once[list[format.StalePages]]:
        """The pages the snapshot of `tree` lets each replica free, found by the first
        replica thread that asks (`tree` does not change until all have: a frozen copy, or
        the volume's own under the volume lock).  A replica that misses this snapshot
        keeps them (until the blocks' next versions reuse them)."""
        stale = Once(partial(stale_pages, tree, self.rewritten, self.layout))
        self.rewritten = set()
        return stale

    def _written(self, r: Replica, error: BaseException | None) -> None:
        """In the replica's thread: its part is done.  A failure faults it (the next
        run_jobs reports it; bring_back catches it up from what its disk holds)."""
        self.writing.discard(r)
        if error is not None and r.state == ONLINE:
            log.warning("replica %s faulted: snapshot failed: %s", r.path, error)
            r.mark(FAULTED, f"snapshot failed: {error}")

    async def write(self, committed: int) -> None:
        """Write the whole tree to every online replica and empty their logs, waiting for
        them; the caller holds the volume lock."""
        sealed = self.seal(committed)
        targets = self.replica_set.online
        stale = self._take_stale(self.tree)
        await self.replica_set.run_jobs([(r, partial(r.write_snapshot, self.keys, self.tree, sealed,
                                                     stale)) for r in targets], len(targets))
        self.log_bytes = 0
