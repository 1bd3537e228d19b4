"""Volume layer: the replicated tree.  Knows nothing of FUSE.

Opening: every replica's tree is rebuilt from its snapshot and log and the state choice
(statechoice) picks the one to serve; a writable open catches up the replicas that only
lag and writes its records in a new term.

Changing: every change is one sealed log record with the next sequence number and this
open's term, carrying namespace ops and the new generations of written blocks (gen = that
sequence number).  A record is acknowledged once W replicas wrote its block shares, synced
them, appended the record and synced the log.  Writes between syncs stay in memory.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial

import trio

from . import codec, format, heal, statechoice
from .blocks import BlockReader
from .membership import OFFLINE_REASON, Membership
from .opening import (
    VolumeError,
    load_views,
    open_replicas,
    rewrite_damaged_headers,
    roll_back,
)
from .replica import (
    FAULTED,
    OFFLINE,
    ONLINE,
    STALE,
    Counters,
    Replica,
)
from .replicaset import ReplicaSet
from .snapshots import Snapshots
from .tree import Inode, Tree, encode_ops
from .writebuffer import Plan, WriteBuffer

log = logging.getLogger("lnmirrorfs.volume")
NAME_MAX = 255
INLINE_BLOCKS = 64  # commits of up to this many blocks write their data into the log too
RETRY_SECONDS = 1.0  # how often a change that waits for W replicas looks for returning ones



def fail(err: int, what: str = "") -> OSError:
    return OSError(err, what or os.strerror(err))


@dataclass
class Options:
    quorum: int | None = None          # W; default majority of n, never below k
    deadline: float = 10.0             # seconds a replica has to answer one request
    cache_bytes: int = 8 << 20         # decoded-block cache
    # Buffered writes, with those of the commit in flight, before a write waits for a
    # commit: bounds the daemon's memory (a commit holds its blocks twice over, in flight
    # and sealed; with k = 1 every replica's slot shares the sealed block) while keeping
    # commits large.
    dirty_bytes: int = 8 << 20
    snapshot_log_bytes: int = 16 << 20  # log size that triggers a snapshot
    inline_blocks: int = INLINE_BLOCKS  # (the random histories lower it to reach bulk commits)
    # How long a change waits for W replicas before it fails with EIO.  Five minutes
    # covers a NAS or router reboot; lightningd just sees a slow fsync meanwhile (its
    # peers may disconnect and reconnect; HTLC deadlines are hours of blocks away).
    suspend_timeout: float = 300.0


@dataclass
class PendingRecord:
    """A sealed record handed to the replicas and not yet held by W of them."""
    head: format.RecordHead
    ops: list[dict]
    slots: list[list[format.SlotWrite]]
    inline: bool
    inos: list[int]
    freed: list[Inode]
    records: list[bytes]   # per share index



# ---------------------------------------------------------------- opening

class Volume:
    def __init__(self, replicas: list[Replica], keys: codec.Keys, tree: Tree,
                 options: Options) -> None:
        header = next(r.header for r in replicas if r.header)
        self.replica_set = ReplicaSet(replicas, options.deadline)
        self.keys = keys
        self.tree = tree
        self.options = options
        self.volume_id = header.volume_id
        self.k, self.n, self.block_size = header.k, header.n, header.block_size
        self.layout = header.layout
        self.members = Membership(self.replica_set, tree, self.k, self.n)
        self.suspended = ""                      # why changes fail with EIO (quorum lost too long)
        self.waiting = ""                        # why a change is waiting for replicas
        self.pending: PendingRecord | None = None  # the record that waits for W replicas
        self.writable = True
        self.choice: statechoice.Choice | None = None
        self.term = 0                            # this open's term; its first record starts it
        self.term_started = False
        self.committed = tree.seq                # highest record known acknowledged
        self.heal_progress: dict | None = None   # a live scrub's {"done", "total"} bytes
        self.lock = trio.Lock()                  # serializes check + commit + apply
        # Where a bulk write's commits run while its writes go on (the daemon's nursery;
        # None offline: a write past the bound commits itself, as it does past dirty_bytes).
        self.background: trio.Nursery | None = None
        self._flushing = False                   # a background commit is started or waiting
        self.buffer = WriteBuffer()
        self.refs: dict[int, int] = {}           # kernel lookup counts (FUSE forget protocol)
        self.unused: set[int] = set()            # orphans the kernel forgot: free next record
        self.snapshots = Snapshots(self.replica_set, keys, self.volume_id, tree, self.layout,
                                   options.snapshot_log_bytes)
        # fsync/fsyncdir count only calls that returned success, i.e. waited for W replicas
        self.stats = {"commits": 0, "fsync": 0, "fsyncdir": 0}
        self.reader = BlockReader(self.replica_set, keys, self.volume_id, tree, self.k, self.n,
                                  self.block_size, options.cache_bytes, self.buffer.dirty,
                                  self.buffer.inflight)

    @classmethod
    def open(cls, paths: list[str], master: bytes, options: Options | None = None,
             writable: bool = True, serving: bool = False) -> Volume:
        """Open the replica set and choose the state to serve (statechoice).  Read-only
        opens change no byte on any replica; writable ones catch up the replicas that lag
        (exactly the blocks they lack) and start a new term.  `serving` (a mount) refuses,
        before changing anything, when fewer than W replicas could be writable."""
        options = options or Options()
        replicas, keys = open_replicas(paths, master, options.deadline)
        try:
            return cls._open(replicas, keys, options, writable, serving)
        except BaseException:
            for r in replicas:  # a refused open leaves no lock and no thread behind
                r.close(options.deadline)
            raise

    @classmethod
    def _open(cls, replicas: list[Replica], keys: codec.Keys, options: Options,
              writable: bool, serving: bool) -> Volume:
        header = next(r.header for r in replicas if r.header)
        views = load_views(replicas, keys, options.deadline)
        try:
            choice = statechoice.decide(views, header.n, header.k)
        except statechoice.ChoiceError as exc:
            raise VolumeError(str(exc)) from None
        if writable and choice.doubt:
            raise VolumeError(f"cannot prove the latest state: {choice.doubt}")
        views = [roll_back(r, view, choice, keys) for r, view in zip(replicas, views, strict=True)]
        for r, view in zip(replicas, views, strict=True):
            verdict = choice.verdicts[view.name]
            if r.header is not None:
                r.state, r.reason = verdict.state, verdict.reason
                if r.index in choice.tree.offline:
                    r.state, r.reason, r.offline = OFFLINE, OFFLINE_REASON, True
        volume = cls(replicas, keys, choice.tree, options)
        volume.choice, volume.writable = choice, writable
        volume.members.want(options.quorum)
        lagging = volume._lagging(views) if writable else {}
        if serving:
            volume.members.check(can_join=len(lagging))
        if writable:
            rewrite_damaged_headers(replicas, views, keys)
        volume.committed = choice.commit
        volume._start(views)
        if writable:
            volume.term = choice.new_term()
            if lagging:
                trio.run(heal.catch_up, volume, lagging)
        return volume

    def _start(self, views: list[statechoice.View]) -> None:
        """Give every replica with a header a worker (scrub reads and heals the lagging
        ones), and make the current ones ready to serve."""
        for r, view in zip(self.replicas, views, strict=True):
            if r.header is None:
                continue
            r.start_worker()
            r.counters = Counters(**self.tree.error_counts.get(r.index, {}))
            if view.loaded is not None:
                r.last_seq = min(view.loaded.tree.seq, self.tree.seq)
                if not self.writable:  # a STALE one too: reads may fall back to it
                    r.overlay = view.loaded.redo
            if r.state != ONLINE:
                continue
            self.snapshots.log_bytes = max(self.snapshots.log_bytes, view.loaded.log_end)
            if not self.writable:
                continue
            try:
                r.apply_redo(view.loaded.redo)
                r.open_log(view.loaded.log_end)
            except OSError as exc:
                r.mark(FAULTED, f"cannot recover or open the log for writing: {exc.strerror}")

    def _lagging(self, views: list[statechoice.View]) -> dict:
        """Replicas that are only behind (or hold never-acknowledged records of an old
        mount) and whose own records since the fork are all in their log: catchable."""
        lagging = {}
        for r, view in zip(self.replicas, views, strict=True):
            verdict = self.choice.verdicts[view.name]
            if r.state == STALE and view.loaded and verdict.fork >= view.loaded.snapshot_seq:
                lagging[r] = (verdict.fork, view.loaded)
        return lagging

    def commit_quorum(self) -> int:
        return self.members.commit_quorum()

    async def offline(self, path: str) -> dict:
        """Take a replica offline (Membership.take_offline), then log it: a change waiting
        for that replica completes with the lower W within a second, then a record of its
        own logs the offline op."""
        located = None
        try:
            with trio.move_on_after(self.options.deadline):
                located = await trio.to_thread.run_sync(self.members.locate, path,
                                                        abandon_on_cancel=True)
            if located is None:
                return {"error": f"{path}: no answer within {self.options.deadline:g}s"}
            risk = self.members.take_offline(path, *located)
        except VolumeError as exc:
            return {"error": str(exc)}
        async with self.lock:
            await self.resume()
            try:
                await self.commit([])
            except OSError as exc:
                return {"risk": risk, "recorded": False,
                        "error": f"taken offline, but not logged yet: {exc.strerror or exc}"}
        return {"risk": risk, "recorded": True, "record": self.tree.seq}

    def close(self) -> None:
        self.replica_set.close()

    @property
    def replicas(self) -> list[Replica]:
        return self.replica_set.replicas

    @property
    def online(self) -> list[Replica]:
        return self.replica_set.online

    # ---- commit: the only way anything reaches the replicas ----

    async def commit(self, ops: list[dict], inos: Iterable[int] = ()) -> None:
        """Make ops and the dirty blocks of `inos` durable on W replicas.  Caller holds self.lock."""
        inos = list(inos)
        self._check_writable()
        if not (ops or any(self.buffer.dirty.get(i) or self.buffer.retimed(i) for i in inos)
                or self.unused or self.members.pending()):
            return
        await self.start_term()
        seq = self.tree.seq + 1
        freed = self._take_unused()
        for node in freed:  # what was buffered for them goes with them
            self.buffer.forget(node.ino)
        retimed = [i for i in inos if self.buffer.retimed(i)]
        plan: Plan = []
        write_ops = [self.buffer.retime_op(ino) for ino in retimed]
        write_ops += [self.buffer.take(self.tree.inodes[ino], plan,
                                       self.snapshots.rewritten)
                      for ino in inos if self.buffer.dirty.get(ino)]
        slots = await self._encode(seq, plan)
        ops = (self.members.ops(self.choice.serve if self.choice else None)
               + [{"op": "free", "ino": n.ino} for n in freed] + write_ops + ops)
        await self._write_record(seq, ops, slots, inos, freed)

    async def start_term(self) -> None:
        """The first record of a writable open holds nothing but its term, and must reach W
        replicas before anything else is written: then no later open can pick the same term
        number without seeing it, and an open whose start failed left nothing but that."""
        self._check_writable()
        if not self.term_started:
            await self._write_record(self.tree.seq + 1, [{"op": "term", "term": self.term}],
                                     [[] for _ in range(self.n)], [])

    def _check_writable(self) -> None:
        if self.suspended:
            raise fail(errno.EIO, self.suspended)
        if not self.writable:
            raise fail(errno.EROFS, "volume opened read-only")

    async def _write_record(self, seq: int, ops: list[dict], slots: list[list],
                            inos: list[int], freed: list[Inode] = ()) -> None:
        """Seal one record, hand it to every online replica, wait for W (riding through a
        lost quorum up to the suspend timeout), apply it."""
        need = self.commit_quorum()
        head = format.RecordHead(seq, self.term, self.committed, time.time_ns() // 1_000_000, need)
        sealed = codec.seal_record(self.keys, self.volume_id, format.LOG_KIND, head.context(),
                                   encode_ops(ops))
        # Small commits carry their shares in the log record: one fdatasync per replica.
        inline = len(slots[0]) <= self.options.inline_blocks
        record = PendingRecord(head, ops, slots, inline, inos, list(freed), [
            format.pack_record(head, sealed, b"".join(part for s in mine for part in s[3]) if inline else b"")
            for mine in slots])
        # Once the record is handed to the replicas it exists there: a cancelled caller
        # (shutdown, a killed scrub) must not leave it unapplied here, or the next record
        # would reuse its number.  run_jobs is bounded by the deadline.
        with trio.CancelScope(shield=True):
            await self._send(record, need)
            self.stats["commits"] += 1
        if len(self._holders(record)) < need:
            await self._ride_through(record)
        self._apply(record)

    def _holders(self, record: PendingRecord) -> list[Replica]:
        """Online replicas that wrote this record (one healed meanwhile got a snapshot of
        the state before it, which set its last_seq back)."""
        return [r for r in self.online if (r.last_seq or 0) >= record.head.seq]

    async def _send(self, record: PendingRecord, need: int) -> None:
        """Hand the record to the online replicas that lack it.  With `need` below their
        number the slowest ones finish in the background (they hold it all the same)."""
        holders = self._holders(record)
        targets = [r for r in self.online if r not in holders]
        seq = record.head.seq
        sizes = {r: len(record.records[r.index]) + (0 if record.inline else sum(
            len(part) for slot in record.slots[r.index] for part in slot[3])) for r in targets}
        await self.replica_set.wait_backlog(targets, self.options.dirty_bytes)
        await self.replica_set.run_jobs(
            [(r, partial(r.commit, record.slots[r.index], record.records[r.index], record.inline,
                         seq)) for r in targets], min(need, len(targets)), sizes)

    async def _ride_through(self, record: PendingRecord) -> None:
        """Fewer than W replicas hold the record: wait for faulted ones to come back, catch
        them up and give them the record, up to the suspend timeout; past it (or if the
        wait is cancelled) the volume is SUSPENDED with the record pending, and EIO."""
        self.pending = record
        timeout = self.options.suspend_timeout
        self.waiting = (f"write quorum lost at record {record.head.seq}: "
                        f"{len(self._holders(record))} of the needed {self.commit_quorum()} "
                        f"replicas hold it; waiting up to {timeout:g}s for the others")
        log.warning("%s", self.waiting)
        self.replica_set.on_event("quorum-lost", "", self.waiting)
        try:
            with trio.move_on_after(timeout):
                while not await self._try_pending():
                    await trio.sleep(RETRY_SECONDS)
        finally:
            self.waiting = ""
            if self.pending is not None:
                self.suspended = (f"write quorum lost at record {record.head.seq} for more "
                                  f"than the suspend timeout ({timeout:g}s): "
                                  f"{len(self._holders(record))} of {self.commit_quorum()} "
                                  "replicas hold it; changes fail with EIO until enough "
                                  "replicas are back (the mount resumes by itself)")
                log.error("%s", self.suspended)
                self.replica_set.on_event("suspended", "", self.suspended)
                self.buffer.requeue(record.inos)
        if self.pending is not None:
            raise fail(errno.EIO, self.suspended)

    async def _try_pending(self) -> bool:
        """Bring back the replicas that answer again and give them the pending record;
        True once W replicas hold it."""
        record = self.pending
        if len(self._holders(record)) < self.commit_quorum():
            await heal.rejoin(self, await self.replica_set.reconnect(self.keys))
            await self._send(record, len(self.online))
        if len(self._holders(record)) < self.commit_quorum():
            return False
        self.pending = None
        return True

    async def bring_back(self) -> None:
        """The daemon's way back from faults: faulted replicas that answer again are
        reconnected (without the lock: a replica may hang right then), then caught up,
        and a record left pending past the suspend timeout is completed."""
        back = await self.replica_set.reconnect(self.keys)
        if back or self.pending:
            async with self.lock:
                await heal.rejoin(self, back)
                await self.resume()

    async def resume(self) -> None:
        """Complete a record left pending past the suspend timeout, if W replicas can hold
        it now, and lift the suspension.  Caller holds self.lock."""
        record = self.pending
        if record is None or not await self._try_pending():
            return
        self._apply(record)
        log.warning("resumed: record %d reached the write quorum; writes accepted again",
                    record.head.seq)
        self.replica_set.on_event("resumed", "", self.suspended)
        self.suspended = ""

    def _apply(self, record: PendingRecord) -> None:
        head = record.head
        self.tree.apply(head.seq, head.term, head.time_ms, record.ops, head.commit)
        self._acknowledged(head.seq)
        self._settle_inflight(record.inos, cache_all=record.inline)
        for node in record.freed:
            self.forget(node)
        self.snapshots.recorded(len(record.records[0]), self.committed)

    def _acknowledged(self, seq: int) -> None:
        self.committed = seq
        self.term_started = True
        self.members.acknowledged()

    async def _encode(self, seq: int, plan: Plan) -> list[list]:
        """Seal and FEC-encode the planned blocks for generation `seq` into per-replica
        slots.  A big commit is encoded in a thread (libsodium, zfec and BLAKE2b release
        the GIL), so the event loop goes on buffering the writes that follow; it is
        shielded, being short and bounded, so a cancellation never strands blocks in flight."""
        if len(plan) <= self.options.inline_blocks:
            return self._encode_plan(seq, plan)
        with trio.CancelScope(shield=True):
            return await trio.to_thread.run_sync(self._encode_plan, seq, plan)

    def _encode_plan(self, seq: int, plan: Plan) -> list[list]:
        """The blocks are sealed into one buffer for the whole commit (with k = 1 it is what
        the replicas write): one allocation, given back whole once the commit is done,
        where a block each left a bulk write's heap fragmented (see memory.py)."""
        slots: list[list[format.SlotWrite]] = [[] for _ in range(self.n)]
        sealed_size = self.block_size + self.keys.cipher.overhead
        sealed = memoryview(bytearray(len(plan) * sealed_size))
        for position, (ino, index, slot, data) in enumerate(plan):
            into = sealed[position * sealed_size:(position + 1) * sealed_size]
            for i, (checksum, share) in enumerate(codec.encode_block(
                    self.keys, self.volume_id, self.k, self.n, ino, index, seq, self.term, data,
                    into)):
                slots[i].append((ino, index, slot, format.pack_slot(seq, checksum, share)))
        return slots

    def _settle_inflight(self, inos: Iterable[int], cache_all: bool = True) -> None:
        """After a commit of these inodes: their blocks are durable (WriteBuffer.settle).
        They go to the cache; after a big commit (a bulk write) only each inode's last
        one, which an append's next partial write reads: the rest would only push out what
        a database rereads, and the kernel's page cache holds them anyway."""
        for ino in inos:
            blocks = self.buffer.settle(ino)
            last = max(blocks, default=None)
            for index, data in blocks.items():
                if cache_all or index == last:
                    self.reader.cache.put(ino, index, data)
                else:  # the version cached before this commit must not be served again
                    self.reader.cache.discard(ino, index)

    async def snapshot(self) -> None:
        """Write the whole tree to every online replica and empty their logs (unmount,
        import): the caller holds the volume lock and waits for it."""
        await self.snapshots.write(self.committed)

    # ---- file data ----

    async def read(self, ino: int, offset: int, length: int) -> bytes:
        node = self.tree.inodes[ino]
        end = min(offset + length, self.buffer.size_of(node))
        if offset >= end:
            return b""
        bs = self.block_size
        indexes = list(range(offset // bs, (end - 1) // bs + 1))
        blocks = await self.reader.read_blocks(node, indexes)
        parts = []
        for index in indexes:
            lo = max(offset - index * bs, 0)
            hi = min(end - index * bs, bs)
            parts.append(blocks[index][lo:hi])
        return b"".join(parts)

    async def _dirty_block(self, node: Inode, index: int) -> bytearray:
        """The buffer a partial write of a block goes into, filled with its current content.

        Reading that content may wait for the replicas; meanwhile another write of the same
        block may be buffered or committed (an mmap writeback, a second handle): read_block
        returns what is current when it returns, and a buffer made meanwhile wins."""
        dirty = self.buffer.dirty
        buf = dirty.get(node.ino, {}).get(index)
        if buf is None:
            old = await self.reader.read_block(node, index)
            buf = dirty.setdefault(node.ino, {}).setdefault(index, bytearray(old))
        if isinstance(buf, bytes):  # a whole block written before: copied only now
            buf = dirty[node.ino][index] = bytearray(buf)
        return buf

    async def write(self, ino: int, offset: int, data: bytes) -> int:
        if self.suspended:  # nothing buffered now could be committed: memory stays bounded
            raise fail(errno.EIO, self.suspended)
        await self._make_room(ino, len(data))
        node = self.tree.inodes[ino]
        bs = self.block_size
        pos = 0
        while pos < len(data):
            index, lo = divmod(offset + pos, bs)
            take = min(bs - lo, len(data) - pos)
            if take == bs:
                self.buffer.dirty.setdefault(ino, {})[index] = bytes(data[pos:pos + bs])  # one copy
            else:
                buf = await self._dirty_block(node, index)
                buf[lo:lo + take] = data[pos:pos + take]
            pos += take
        self.buffer.wrote(node, offset + len(data))
        if self.buffer.dirty_blocks(ino) * bs >= self.options.dirty_bytes // 2:
            self._flush_in_background(ino)
        return len(data)

    async def _make_room(self, ino: int, length: int) -> None:
        """Wait, committing, until `length` more bytes fit under dirty_bytes with what is
        buffered and in flight.  Checked before buffering: the kernel has several WRITEs
        of up to 1 MiB out at once, and when each was buffered first and checked after,
        all of them were in memory by the time the first had waited (commits of 16 MB
        under an 8 MiB bound)."""
        bs = self.block_size
        while (held := self.buffer.held_blocks()) and held * bs + length > self.options.dirty_bytes:
            await self.sync(ino if self.buffer.dirty_blocks(ino) else None)
            if self.buffer.held_blocks() >= held:
                return  # nothing that a commit could take: buffer it, as a bound must not hang

    def _flush_in_background(self, ino: int) -> None:
        """Half the bound is buffered for one inode: commit it in a task of its own, so the
        writes that follow are buffered while its blocks are encoded, written and synced,
        and the next commit starts right after (a bulk write was serial: the writes waited
        for every commit).  The bound itself is unchanged: past dirty_bytes, buffered and
        in flight together, a write still waits for a commit.  A failure is logged; the
        data stays buffered, or its record pending, for the next fsync to report."""
        if self.background is None or self._flushing:
            return
        self._flushing = True

        async def flush() -> None:
            try:
                await self.sync(ino)
            except OSError as exc:
                log.warning("background commit of a bulk write failed: %s", exc)
            except Exception:  # a bug here must not take the mount down (cancellation passes)
                log.exception("background commit of a bulk write failed")
            finally:
                self._flushing = False
        self.background.start_soon(flush)

    async def sync(self, ino: int | None = None) -> None:
        """Commit buffered writes of one inode (fsync) or of all (periodic flush, unmount)."""
        async with self.lock:
            await self._sync_locked(ino)

    async def _sync_locked(self, ino: int | None) -> None:
        if self.suspended:
            raise fail(errno.EIO, self.suspended)
        inos = [ino] if ino is not None else sorted(self.buffer.buffered())
        await self.commit([], [i for i in inos if i in self.tree.inodes])

    async def sync_on_close(self, ino: int) -> None:
        """close() of a writable handle: commit the inode's buffered data, unless a change
        is waiting for the write quorum (a ride-through) or the lock does not come within
        the deadline.  The data then stays buffered for the next fsync or writeback: close
        promises no durability, and it must not hang for minutes.  Every close of every
        copy of a descriptor sends one (a forked child closing what it inherited before
        exec), and the parent of a vfork (Python's subprocess) waits for that child."""
        if self.waiting:
            return
        with trio.move_on_after(self.options.deadline) as waited:  # for the lock, not the commit
            await self.lock.acquire()
        if waited.cancelled_caught:
            return
        try:
            await self._sync_locked(ino)
        finally:
            self.lock.release()

    async def truncate_buffers(self, node: Inode, size: int) -> None:
        """Drop buffered and cached blocks past the new end; zero the tail of the last one."""
        bs = self.block_size
        keep = -(-size // bs)
        self.buffer.cut(node.ino, keep)
        self.reader.cache.drop(node.ino, keep)
        if size % bs and size < self.buffer.size_of(node):
            buf = await self._dirty_block(node, size // bs)
            buf[size % bs:] = bytes(bs - size % bs)
            self.reader.cache.discard(node.ino, size // bs)
        self.buffer.resize(node.ino, size)

    def reclaim_beyond_end(self, node: Inode) -> None:
        blocks = len(node.blocks)
        self._reclaim(lambda r: r.truncate_data(node.ino, blocks))

    def _reclaim(self, job: Callable[[Replica], None]) -> None:
        """Queue a job that frees space on each online replica, to run only where the
        record just applied (which freed it) was written.  A replica whose part of that
        record failed, still queued when W others answered, must keep the space: its own
        latest state still points into it, and a later open may have only it to serve."""
        seq = self.tree.seq
        for r in self.online:
            r.worker.submit(partial(r.if_holds, seq, partial(job, r)), lambda result, error: None)

    # ---- kernel references and freeing ----

    def referenced(self, ino: int, count: int = 1) -> None:
        """The kernel learned of the inode (lookup, create, a readdirplus entry...)."""
        self.refs[ino] = self.refs.get(ino, 0) + count

    def forgotten(self, ino: int, count: int) -> None:
        """The kernel dropped references (FUSE forget).  An inode with no name that the
        kernel no longer knows (so nothing has it open) is freed in the next record."""
        left = self.refs.get(ino, 0) - count
        if left > 0:
            self.refs[ino] = left
            return
        self.refs.pop(ino, None)
        node = self.tree.inodes.get(ino)
        if node is not None and node.nlink == 0:
            self.unused.add(ino)

    async def released(self, ino: int) -> None:
        """A file handle closed: whatever was written through it (or an mmap) is committed."""
        node = self.tree.inodes.get(ino)
        if node is not None and node.nlink > 0 and self.buffer.is_buffered(ino):
            await self.sync(ino)

    def free_ops(self, node: Inode, names_lost: int) -> list[dict]:
        """A `free` op for the same record if the change leaves the inode with no name and
        the kernel holds no reference to it (offline use; through FUSE it comes on forget)."""
        remaining = 0 if node.is_dir else node.nlink - names_lost
        if remaining > 0 or self.refs.get(node.ino):
            return []
        return [{"op": "free", "ino": node.ino}]

    def _take_unused(self) -> list[Inode]:
        """Orphans to free in the record being built (they ride along: no commit of their own)."""
        nodes = [self.tree.inodes[i] for i in sorted(self.unused) if i in self.tree.inodes
                 and self.tree.inodes[i].nlink == 0 and not self.refs.get(i)]
        self.unused.clear()
        return nodes

    def forget(self, node: Inode) -> None:
        """Drop what memory and the replicas still hold of an inode whose free committed."""
        self.buffer.forget(node.ino)
        self.reader.cache.drop(node.ino)
        if node.is_reg:
            self._reclaim(lambda r: r.remove_data(node.ino))

    async def free_orphans(self) -> None:
        """After a crash nothing is open: forget inodes whose last name was removed."""
        self.unused.update(self.tree.orphans())
        await self.sync()

    # ---- volume-wide ----

    async def record_errors(self) -> None:
        """Persist error counters that changed, so status shows them across mounts."""
        zero = Counters().as_dict()
        ops = [{"op": "errors", "replica": r.index, "counts": r.counters.as_dict()}
               for r in self.replicas
               if r.header and r.counters.as_dict() != self.tree.error_counts.get(r.index, zero)]
        if ops:
            async with self.lock:
                await self.commit(ops)

    async def statfs(self) -> tuple[int, int]:
        """(total, free) logical bytes: limited by the fullest replica; shares are 1/k of a block."""
        sizes = [(total * self.k, free * self.k)
                 for total, free in (await self.replica_set.probe()).values()]
        return min(sizes, default=(0, 0), key=lambda s: s[1])

    async def status(self) -> dict:
        free = {r: space[1] for r, space in (await self.replica_set.probe()).items()}
        healthy = all(r.state == ONLINE for r in self.replicas) and not self.members.offlined
        state = ("SUSPENDED" if self.suspended else "WAITING" if self.waiting
                 else "ONLINE" if healthy else "DEGRADED")
        return {"volume": self.volume_id.hex(), "state": state,
                "reason": self.suspended or self.waiting or self.members.risk(),
                "k": self.k, "n": self.n, "quorum": self.members.quorum, "cipher": self.keys.cipher.name,
                "record": self.tree.seq,
                "written_ms": self.tree.time_ms, "committed": self.committed,
                "term": statechoice.term_number(self.term or self.tree.term),
                "doubt": self.choice.doubt if self.choice else "",
                "heal_progress": self.heal_progress,
                "blamed": {str(i): why for i, why in self.tree.blame.items()},
                "bad_shares": len(self.reader.bad_shares), "stats": dict(self.stats),
                "last_scrub": self.tree.last_scrub,
                "replicas": [r.status(free.get(r)) for r in self.replicas]}

