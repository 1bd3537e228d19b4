"""Replica store: one replica directory, its files, and the worker thread that does its I/O.

All methods here are blocking.  The mount calls them through `Replica.worker` so that a
hung NAS stalls only its own queue; offline tools (init, restore, scrub) call them directly.

Layout of a replica directory:
    lnmirror.hdr        header (format.Header)
    lock                flock()ed by whoever writes the replica set
    meta/snapshot       the whole tree at some sequence number, sealed
    meta/log            sealed records after the snapshot, appended (it may still begin
                        with records the snapshot holds: a crash before the log was cut)
    meta/log.new        a zero-filled spare that becomes the log when a snapshot cuts it
    data/<file id>.<s>  slot file s (0, 1): slot s of every block of the inode, one share each
"""

from __future__ import annotations

import collections
import errno
import fcntl
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

from . import codec, format
from .fileio import (
    close_all_quietly,
    close_quietly,
    fsync_dir,
    punch_hole,
    pwrite_all,
    unlink_quietly,
    write_file_durably,
    write_zeros,
)
from .tree import Tree, TreeError, block_entry, decode_ops
from .worker import Once, Worker

log = logging.getLogger("lnmirrorfs.replica")
ONLINE, STALE, FAULTED, MISSING, OFFLINE = "ONLINE", "STALE", "FAULTED", "MISSING", "OFFLINE"
_MAX_OPEN_DATA_FILES = 256
# The log grows by zero-filled chunks: appending inside already-written space changes no
# file size, so the per-commit fdatasync has no metadata to journal.
LOG_CHUNK = 4 << 20
PUNCH_SLICE_SECONDS = 0.002  # the longest a worker frees stale slots before commits go again
DELETED_SUFFIX = ".deleted"  # a freed data file waiting for its unlink (scrub removes leftovers)
# Inline records' slots wait in memory (the log holds them durably) up to this many bytes
# per replica before a queued job writes them to the data files, a slice at a time.
DEFERRED_FLUSH_BYTES = 1 << 20
FLUSH_SLICE_SLOTS = 64  # slots a queued flush writes before the commits queued behind it go


class ReplicaError(Exception):
    """A replica cannot be used; the message says why in one line."""


class ReplicaInUse(ReplicaError):
    """Another process holds the replica's lock."""


@dataclass
class Counters:
    read: int = 0
    write: int = 0
    checksum: int = 0

    def as_dict(self) -> dict:
        return {"read": self.read, "write": self.write, "checksum": self.checksum}


@dataclass
class Loaded:
    """What a replica's metadata says, for the state choice and for opening it.

    `tree` is the state at the end of the valid log; `redo` the slots its log carries that
    the tree still points at.  `commit` is the highest commit point in any authenticated
    record or snapshot of the replica, `max_term` the highest term, both including records
    behind damage; `damage` says why the log is damaged (a bad record with valid ones
    after it), "" if it is whole.  `touched` lists, per record after the snapshot, the
    blocks its writes went to (a replica that diverged needs exactly those rewritten)."""

    tree: Tree
    log_end: int
    log_records: int
    redo: dict[tuple[int, int, int], bytes]
    snapshot_seq: int = 0
    commit: int = 0
    max_term: int = 0
    damage: str = ""
    touched: list[tuple[int, list[tuple[int, int]]]] = field(default_factory=list)


@dataclass
class SnapshotCut:
    """Where a background snapshot cuts a replica's log: right after record `seq`, which
    ended at `log_end` of the log file the replica had in `log_epoch`."""
    seq: int
    log_end: int
    log_epoch: int


@dataclass(eq=False)  # identity semantics: replicas are dict keys
class Replica:
    path: str
    header: format.Header | None = None
    state: str = ONLINE
    reason: str = ""
    counters: Counters = field(default_factory=Counters)
    worker: Worker | None = None
    housekeeper: Worker | None = None
    _data_fds: collections.OrderedDict = field(default_factory=collections.OrderedDict)
    # A read-only open: the slots that only its log holds.
    overlay: dict[tuple[int, int, int], bytes] = field(default_factory=dict)
    deferred: dict[tuple[int, int, int], bytes] = field(default_factory=dict)  # see _defer
    _flush_queued: bool = False  # a _flush_slice job is in the worker's queue
    _replaced_threads: set[threading.Thread] = field(default_factory=set)  # see _left_behind
    _log_fd: int | None = None
    _log_end: int = 0
    _log_allocated: int = 0
    _unsynced_files: set[format.DataFile] = field(default_factory=set)
    _cut_files: set[format.DataFile] = field(default_factory=set)  # unsynced, for a background snapshot
    _log_epoch: int = 0       # bumped whenever the log file is reset or replaced
    _snapshot_lock: threading.Lock = field(default_factory=threading.Lock)
    snapshot_seq: int = 0     # the record of the snapshot on disk, once loaded or written
    can_punch: bool = True    # its filesystem frees a punched hole's blocks
    _lock_fd: int | None = None
    header_damage: str = ""   # why the header was refused: scrub rewrites it
    last_seq: int | None = None  # the last record durably on this replica, when known
    heal_needed: str = ""     # why a returning replica cannot be caught up: scrub heals it
    offline: bool = False     # taken offline by the operator: never written, never probed

    # ---- creation and opening ----

    @classmethod
    def create(cls, path: str, header: format.Header, keys: codec.Keys, tree: Tree) -> Replica:
        """Lay out a new replica in an existing empty directory."""
        if not os.path.isdir(path):
            raise ReplicaError(f"{path}: replica directory does not exist")
        if os.listdir(path):
            raise ReplicaError(f"{path}: directory is not empty")
        replica = cls(path, header)
        os.mkdir(replica.meta_path, 0o700)
        os.mkdir(replica.data_path, 0o700)
        replica.write_snapshot(keys, tree)
        os.close(os.open(os.path.join(path, format.LOCK_NAME), os.O_WRONLY | os.O_CREAT, 0o600))
        replica.write_header(keys)
        return replica

    def write_header(self, keys: codec.Keys) -> None:
        write_file_durably(os.path.join(self.path, format.HEADER_NAME), self.header.pack(keys), 0o400)

    @classmethod
    def open(cls, path: str) -> Replica:
        """Read and check the header; raises ReplicaError with a one-line reason.  A
        damaged header gives a FAULTED replica without header (the others may serve)."""
        header_path = os.path.join(path, format.HEADER_NAME)
        if not os.path.isdir(path):
            raise ReplicaError(f"{path}: replica directory does not exist")
        try:
            with open(header_path, "rb") as f:
                raw = f.read(format.HEADER_SIZE + 1)
        except FileNotFoundError:
            raise ReplicaError(f"{path}: not an lnmirrorfs replica (no {format.HEADER_NAME})") from None
        except OSError as exc:  # an I/O error is a fault of this replica, not of the volume
            why = f"cannot read header: {exc.strerror}"
            return cls(path, None, state=FAULTED, reason=why, header_damage=why)
        try:
            return cls(path, format.Header.unpack(raw))
        except format.HeaderDamaged as exc:
            return cls(path, None, state=FAULTED, reason=str(exc), header_damage=str(exc))
        except format.FormatError as exc:
            raise ReplicaError(f"{path}: {exc}") from None

    @property
    def meta_path(self) -> str:
        return os.path.join(self.path, format.META_DIR)

    @property
    def data_path(self) -> str:
        return os.path.join(self.path, format.DATA_DIR)

    @property
    def log_path(self) -> str:
        return os.path.join(self.meta_path, format.LOG_NAME)

    @property
    def index(self) -> int:
        return self.header.share_index

    @property
    def usable(self) -> bool:
        return self.state == ONLINE

    def lock(self) -> None:
        """Take the replica's exclusive lock: one writer (mount or offline tool) at a time.

        The lock file is opened read-only so a read-only replica can still be locked."""
        path = os.path.join(self.path, format.LOCK_NAME)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o600)
        except OSError as exc:
            raise ReplicaError(f"{self.path}: cannot open lock file: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ReplicaInUse(f"{self.path}: replica is in use by a mount or another lnmirror "
                               "command") from None
        self._lock_fd = fd

    def reopen(self) -> None:
        """Drop every open file and take the lock again, then check it is still the same
        replica: after a fault its files may belong to a mount that went away (a NAS or
        sshfs mounted anew), and a heal must write to what is there now."""
        fds = list(self._data_fds.values()) + [self._log_fd, self._lock_fd]
        self._data_fds.clear()
        self._log_fd = self._lock_fd = None
        self._log_epoch += 1
        # The old descriptors may belong to a mount that hangs (an sshfs whose connection
        # is half dead, lazily unmounted): a close there blocks in its flush, and this job
        # with it, so the replica would never rejoin.  Close them in a thread left behind.
        threading.Thread(target=close_all_quietly, args=([fd for fd in fds if fd is not None],),
                         daemon=True).start()
        self.lock()
        if Replica.open(self.path).header != self.header:
            raise ReplicaError(f"{self.path}: now holds a different replica than before")
        # Slots still deferred go to the files that are there now, before a catch-up or
        # a scrub reads them: as they would be had they been written with their records.
        self.flush_deferred()

    def start_worker(self) -> None:
        if self.worker is not None:  # its thread hung in a call: it is left behind
            self._replaced_threads.add(self.worker.thread)
        self.worker = Worker(f"replica-{self.index}")
        self.housekeeper = Worker(f"replica-{self.index}-housekeeping")
        self._flush_queued = False  # a flush queued on the replaced threads never runs

    def _left_behind(self) -> bool:
        """Is this call on a worker thread that hung and was replaced, come back late?
        It must change nothing that the new threads own: the log's end, the deferred
        slots, the replica's state."""
        return threading.current_thread() in self._replaced_threads

    def close(self, timeout: float = 30.0) -> None:
        hung = False
        if self.worker:
            if self.state == FAULTED and self.worker.pending:
                timeout = 0  # its job hung long ago: do not wait for it again
            hung = not (self.worker.stop(timeout) & self.housekeeper.stop(timeout))
            self.worker = self.housekeeper = None
        fds = [fd for fd in [*self._data_fds.values(), self._log_fd, self._lock_fd]
               if fd is not None]
        self._data_fds.clear()
        self._log_fd = self._lock_fd = None
        if not hung:
            for fd in fds:
                os.close(fd)
            return
        # A close on a hung filesystem (a FUSE or NFS mount that stopped answering) blocks
        # in its flush.  Each descriptor is closed in a thread of its own, left behind:
        # the unmount finishes its work for the other replicas; the process itself ends
        # once that filesystem answers (or its connection is aborted).
        for fd in fds:
            threading.Thread(target=close_quietly, args=(fd,), daemon=True).start()

    def mark(self, state: str, reason: str) -> None:
        if self.state == ONLINE or state == MISSING:
            self.state, self.reason = state, reason

    # ---- metadata ----

    def load(self, keys: codec.Keys, upto: int | None = None) -> Loaded:
        """Rebuild this replica's tree from its snapshot and log (up to record `upto`).  The
        log ends at the first record that is torn, forged or impossible; valid records after
        it mean damage."""
        vol = self.header.volume_id
        try:
            with open(os.path.join(self.meta_path, format.SNAPSHOT_NAME), "rb") as f:
                snap_seq, snap_term, sealed = format.unpack_snapshot(f.read())
            tree = Tree.load(codec.open_record(keys, vol, format.SNAPSHOT_KIND,
                                               format.snapshot_context(snap_seq, snap_term), sealed))
            if (tree.seq, tree.term) != (snap_seq, snap_term):
                raise TreeError("snapshot head does not match its contents")
            with open(self.log_path, "rb") as f:
                raw = f.read()
        except (OSError, format.FormatError, codec.CodecError, TreeError) as exc:
            raise ReplicaError(f"{self.path}: metadata unreadable: {exc}") from None
        self.snapshot_seq = tree.seq
        loaded = Loaded(tree, 0, 0, {}, snapshot_seq=tree.seq, commit=tree.commit,
                        max_term=tree.term)
        pos = 0
        while (frame := format.frame_at(raw, pos)) is not None:
            head = frame.head
            if upto is not None and head.seq > upto:
                break
            if head.seq <= tree.seq and self._authentic(keys, frame):
                pos = loaded.log_end = frame.end  # already in the snapshot (crash before log reset)
                continue
            try:
                ops = decode_ops(codec.open_record(keys, vol, format.LOG_KIND, head.context(),
                                                   frame.sealed))
                slots = self._inline_slots(keys, head, ops, frame.inline)
                tree.apply(head.seq, head.term, head.time_ms, ops, head.commit)
            except (codec.CodecError, TreeError, ValueError, KeyError, TypeError):
                break
            loaded.redo.update(slots)
            loaded.touched.append((head.seq, [(op["ino"], packed >> 1) for op in ops
                                              if op["op"] == "write" for packed in op["blocks"]]))
            self._note(loaded, head)
            pos = loaded.log_end = frame.end
            loaded.log_records += 1
        if upto is None:
            self._look_behind(keys, raw, pos, loaded)
        loaded.redo = {key: raw for key, raw in loaded.redo.items() if still_current(tree, key, raw)}
        return loaded

    def _authentic(self, keys: codec.Keys, frame: format.Frame) -> bool:
        try:
            codec.open_record(keys, self.header.volume_id, format.LOG_KIND, frame.head.context(),
                              frame.sealed)
            return True
        except codec.CodecError:
            return False

    @staticmethod
    def _note(loaded: Loaded, head: format.RecordHead) -> None:
        loaded.commit = max(loaded.commit, head.commit)
        loaded.max_term = max(loaded.max_term, head.term)

    def _look_behind(self, keys: codec.Keys, raw: bytes, pos: int, loaded: Loaded) -> None:
        """Where the valid log ends, a torn tail leaves nothing but zeros after it; records
        that authenticate further on mean the log was damaged in the middle."""
        if raw.count(b"\0", pos) == len(raw) - pos:
            return
        end_seq = loaded.tree.seq
        last = format.frame_at(raw, pos)
        if last is not None and raw[last.end - 1] != 0:
            # A torn append leaves the end of the frame unwritten (the log is zero-filled
            # ahead); a frame written to its last byte that does not check out was damaged
            # later.  (A whole record whose last byte is zero, 1 in 256, still looks torn.)
            loaded.damage = f"log damaged after record {end_seq} (the next record is whole but corrupt)"
        for frame in format.frames_after(raw, pos):
            if frame.head.seq <= end_seq:
                continue
            if self._authentic(keys, frame):
                self._note(loaded, frame.head)
                if not loaded.damage:
                    loaded.damage = (f"log damaged after record {end_seq} (record "
                                     f"{frame.head.seq} further on is intact)")

    def _inline_slots(self, keys: codec.Keys, head: format.RecordHead, ops: list[dict],
                      inline: bytes) -> dict[tuple[int, int, int], bytes]:
        """The slots a record carries, each checked: a torn record fails here as a whole."""
        if not inline:
            return {}
        h = self.header
        size = self.layout.size
        out, pos = {}, 0
        for op in ops:
            if op["op"] != "write":
                continue
            for packed in op["blocks"]:
                raw = inline[pos:pos + size]
                pos += size
                gen, checksum, share = format.unpack_slot(raw)
                if gen != head.seq or not codec.share_ok(
                        keys, h.volume_id, h.k, op["ino"], packed >> 1, head.seq, head.term,
                        h.share_index, checksum, share):
                    raise codec.CodecError(f"record {head.seq}: torn or damaged inline slot")
                out[(op["ino"], packed >> 1, packed & 1)] = raw
        if pos != len(inline):
            raise codec.CodecError(f"record {head.seq}: inline slots do not match its ops")
        return out

    def apply_redo(self, redo: dict[tuple[int, int, int], bytes]) -> None:
        """Copy slots that only the log holds durably into the data files, and sync them."""
        self.write_slots([(ino, block, slot, (raw,)) for (ino, block, slot), raw in redo.items()])

    def open_log(self, valid_end: int) -> None:
        """Open the log for appending, cutting off any torn tail (and stale zeros) first."""
        fd = os.open(self.log_path, os.O_RDWR)
        if os.fstat(fd).st_size != valid_end:
            os.ftruncate(fd, valid_end)
            os.fsync(fd)
        self._log_fd = fd
        self._log_end = self._log_allocated = valid_end
        self._log_epoch += 1

    def _append(self, record: bytes) -> None:
        fd, start = self._log_fd, self._log_end
        end = start + len(record)
        if end > self._log_allocated:
            write_zeros(fd, self._log_allocated, end + LOG_CHUNK)
            self._log_allocated = end + LOG_CHUNK
        pwrite_all(fd, record, start)
        os.fdatasync(fd)
        if self._left_behind():  # the log it appended to may be another one by now
            raise OSError(errno.EIO, "a call that hung came back after its replica was reopened")
        self._log_end = end

    def write_snapshot(self, keys: codec.Keys, tree: Tree, sealed: bytes | None = None,
                       stale: Once[list[format.StalePages]] | None = None) -> None:
        """Replace snapshot and empty the log; a crash in between leaves records the load skips.

        Slots written without fdatasync (their data was in the log) are synced first: once
        the log is gone, the data files must hold everything on their own.  Then the
        `stale` bodies are freed (free_stale)."""
        if sealed is None:
            sealed = seal_snapshot(keys, self.header.volume_id, tree)
        self.flush_deferred()
        with self._snapshot_lock:  # after a background snapshot's part, never between
            self._unsynced_files |= self._cut_files
            self._cut_files = set()
            self._sync_data_files()
            write_file_durably(os.path.join(self.meta_path, format.SNAPSHOT_NAME),
                               format.pack_snapshot(tree.seq, tree.term, sealed))
            self.snapshot_seq = tree.seq
            self._log_epoch += 1
            if self._log_fd is not None:
                os.ftruncate(self._log_fd, 0)
                os.fsync(self._log_fd)
                self._log_end = self._log_allocated = 0
            else:
                fd = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                os.fsync(fd)
                os.close(fd)
                fsync_dir(self.meta_path)
        if stale is not None:
            self.free_stale(tree.seq, stale)

    def _sync_data_files(self) -> None:
        for data_file in sorted(self._unsynced_files):
            fd, _ = self._data_fd(data_file, create=False)
            if fd is not None:
                os.fdatasync(fd)
        if self._unsynced_files:
            fsync_dir(self.data_path)
        self._unsynced_files.clear()

    # ---- snapshots in the background ----

    def snapshot_in_background(self, seq: int, term: int, sealed: Once[bytes],
                               done: Callable[[BaseException | None], None],
                               stale: Once[list[format.StalePages]]) -> None:
        """Snapshot at record `seq` without holding up the records after it.

        The worker marks where the log is cut (in order with the records: right after
        `seq`); the housekeeping thread syncs the data files written up to there and
        writes the snapshot; then the worker replaces the log by the records after the cut
        (read back from it) in the zero-filled spare, renamed over it.  A crash at any
        point leaves a snapshot and a log that hold every record: the load skips those
        the snapshot already has.  Last, the worker frees the `stale` bodies (free_stale).
        `done` gets the first error, or None, in a thread."""
        def marked(cut: SnapshotCut | None, error: BaseException | None) -> None:
            if error is not None or cut is None:
                return done(error)
            self.housekeeper.submit(partial(self._write_cut_snapshot, cut, term, sealed),
                                    partial(written, cut))

        def written(cut: SnapshotCut, wrote: bool, error: BaseException | None) -> None:
            if error is not None or not wrote:
                return done(error)
            self.worker.submit(partial(self._cut_log, cut, stale), lambda result, error: done(error))

        self.worker.submit(partial(self._mark_cut, seq), marked)

    def _mark_cut(self, seq: int) -> SnapshotCut | None:
        """Worker: the data files written so far go to the snapshot's sync; later writes
        are tracked afresh (their records stay in the log)."""
        if self.state != ONLINE or self.last_seq != seq or self._log_fd is None:
            return None  # it missed the record or faulted: a catch-up snapshots it instead
        self.flush_deferred()
        with self._snapshot_lock:
            self._cut_files |= self._unsynced_files
            self._unsynced_files = set()
            return SnapshotCut(seq, self._log_end, self._log_epoch)

    def _write_cut_snapshot(self, cut: SnapshotCut, term: int, sealed: Once[bytes]) -> bool:
        """Housekeeper: sync the data up to the cut, write the snapshot, make the spare log."""
        with self._snapshot_lock:
            if self.snapshot_seq >= cut.seq or self.state != ONLINE:
                return False  # a newer snapshot was written meanwhile, or it faulted
            for file_id, slot in sorted(self._cut_files):
                try:
                    fd = os.open(os.path.join(self.data_path, format.data_name(file_id, slot)),
                                 os.O_RDONLY)
                except FileNotFoundError:
                    continue  # freed since: no record the snapshot keeps points into it
                try:
                    os.fdatasync(fd)
                finally:
                    os.close(fd)
            if self._cut_files:
                fsync_dir(self.data_path)
            self._cut_files = set()
            write_file_durably(os.path.join(self.meta_path, format.SNAPSHOT_NAME),
                               format.pack_snapshot(cut.seq, term, sealed()))
            self.snapshot_seq = cut.seq
        fd = os.open(self._spare_log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            write_zeros(fd, 0, LOG_CHUNK)
            os.fdatasync(fd)
        finally:
            os.close(fd)
        return True

    def _cut_log(self, cut: SnapshotCut, stale: Once[list[format.StalePages]]) -> None:
        """Worker: the records after the cut become the whole log; then the stale bodies go."""
        if cut.log_epoch != self._log_epoch or self.snapshot_seq != cut.seq:
            return  # the log was reset or replaced meanwhile: nothing to cut
        tail = os.pread(self._log_fd, self._log_end - cut.log_end, cut.log_end)
        fd = os.open(self._spare_log_path, os.O_RDWR)
        try:
            allocated = os.fstat(fd).st_size
            if len(tail) >= allocated:
                allocated = len(tail) + LOG_CHUNK
                write_zeros(fd, len(tail), allocated)
            pwrite_all(fd, tail, 0)
            os.fdatasync(fd)
            os.rename(self._spare_log_path, self.log_path)
            fsync_dir(self.meta_path)  # before any later record is appended to it
        except BaseException:
            os.close(fd)
            raise
        old, self._log_fd = self._log_fd, fd
        os.close(old)
        self._log_end, self._log_allocated = len(tail), allocated
        self._log_epoch += 1
        self.free_stale(cut.seq, stale)

    def free_stale(self, seq: int, stale: Once[list[format.StalePages]], start: int = 0) -> None:
        """Punch out slot bodies that the snapshot at record `seq`, now on disk here, no
        longer needs (the volume found them in its tree at `seq`: no block has its version
        there).  A body some record after `seq` wrote since has a higher generation in its
        head: its pages are kept.  Runs on the worker, in order with the slot writes, a
        slice at a time: the rest goes back in the queue, behind the commits that came
        (punching out a 256 KiB run takes ~0.4 ms on ext4 here).  A stopping worker does
        it all: the unmount's snapshot frees everything.  A snapshot written since changes
        nothing: what no block used at `seq` and nothing wrote after it is unused still."""
        if (self.snapshot_seq < seq or self.state != ONLINE or not self.can_punch
                or (self.worker is not None and not self.worker.runs_here())):
            return  # not its state, faulted, or an abandoned worker's thread come back
        started, runs = time.monotonic(), stale()
        for at in range(start, len(runs)):
            if (self.worker is not None and not self.worker.stopping
                    and time.monotonic() - started > PUNCH_SLICE_SECONDS):
                self.worker.submit(partial(self.free_stale, seq, stale, at),
                                   lambda result, error: None)
                return
            try:
                if not self._punch_run(seq, runs[at]):
                    self.can_punch = False  # FAT, exFAT, sshfs: the space stays in use
                    return
            except OSError as exc:  # a full copy-on-write filesystem: the space stays, for now
                log.warning("replica %s: stale slots not freed: %s", self.path, exc)
                return

    def _punch_run(self, seq: int, run: format.StalePages) -> bool:
        """Punch a run of pages, but not those a block written after `seq` has a body on."""
        file_id, slot, offset, length, blocks = run
        fd, _ = self._data_fd((file_id, slot), create=False)
        if fd is None:
            return True  # freed since
        layout = self.layout
        first = layout.head_offset(blocks[0])  # a run lies in one group: its heads are in a row
        heads = os.pread(fd, layout.head_offset(blocks[-1]) + format.SLOT_HEAD_SIZE - first, first)
        live = {b for b in blocks
                if format.unpack_slot(heads[layout.head_offset(b) - first:])[0] > seq}
        keep = [page for page in range(offset, offset + length, format.PAGE)
                if live.intersection(layout.bodies_on(page, format.PAGE))]
        for start, end in zip([offset] + [p + format.PAGE for p in keep],
                              keep + [offset + length], strict=True):
            if start < end and not punch_hole(fd, start, end - start):
                return False
        return True

    @property
    def _spare_log_path(self) -> str:
        return os.path.join(self.meta_path, format.SPARE_LOG_NAME)

    # ---- data ----

    @property
    def layout(self) -> format.SlotLayout:
        return self.header.layout

    def _data_fd(self, data_file: format.DataFile, create: bool) -> tuple[int | None, bool]:
        """An open fd for a slot file (cached); returns (fd, created)."""
        fd = self._data_fds.get(data_file)
        if fd is not None:
            self._data_fds.move_to_end(data_file)
            return fd, False
        path = os.path.join(self.data_path, format.data_name(*data_file))
        created = False
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            if not create:
                return None, False
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            created = True
        self._data_fds[data_file] = fd
        if len(self._data_fds) > _MAX_OPEN_DATA_FILES:
            os.close(self._data_fds.popitem(last=False)[1])
        return fd, created

    def write_slots(self, slots: list[format.SlotWrite]) -> None:
        """Write slots (file id, block, slot, buffers) and make them and new names durable
        (a heal, a redo, a commit too big for the log): newer than what is deferred."""
        for file_id, block, slot, _ in slots:
            self.deferred.pop((file_id, block, slot), None)
        self._write_slot_files(slots, sync=True)

    def _write_slot_files(self, slots: list[format.SlotWrite], sync: bool) -> None:
        """Without sync the caller has the same bytes durable in the log, and the next
        snapshot syncs these files before it drops that log."""
        if not os.path.isdir(self.data_path):
            raise OSError(errno.ENOENT, "replica directory vanished")
        touched: dict[format.DataFile, int] = {}
        created = False
        layout = self.layout
        for file_id, slot, first, run in _write_runs(slots, layout.group):
            if self._left_behind():  # what it was writing is owned by the new threads now
                raise OSError(errno.EIO, "a call that hung came back after its replica was reopened")
            fd, new = self._data_fd((file_id, slot), create=True)
            created |= new
            heads: list[memoryview] = []
            bodies: list[memoryview] = []
            for data in run:
                head, body = format.split_slot(data, layout.head_size)
                heads += head
                bodies += body
            pwrite_all(fd, heads, layout.head_offset(first))
            pwrite_all(fd, bodies, layout.body_offset(first))
            touched[file_id, slot] = fd
        if not sync:
            self._unsynced_files.update(touched)
            return
        for fd in touched.values():
            os.fdatasync(fd)
        if created:
            fsync_dir(self.data_path)

    def commit(self, slots: list[format.SlotWrite], record: bytes, inline: bool,
               seq: int) -> None:
        """Append the record and sync the log: the commit point.

        An inline record carries the slots' bytes itself, so one fdatasync (of the log)
        makes the whole commit durable and the slots are deferred (_defer); otherwise
        they are written and synced before the record is appended.  A crash leaves
        either the old state or the new one on this replica.
        """
        if self.last_seq is not None and self.last_seq >= seq:
            return  # a retry after a cancelled wait: it holds the record already
        try:
            self._check_online()
            if not inline:
                self.write_slots(slots)
            self._append(record)
        except OSError as exc:
            if not self._left_behind():
                self._write_failed(exc)
            raise
        self.last_seq = seq
        if inline:
            self._defer(slots)

    def _write_failed(self, exc: OSError) -> None:
        self.counters.write += 1
        self.mark(FAULTED, f"write failed: {exc.strerror or exc}")

    def _defer(self, slots: list[format.SlotWrite]) -> None:
        """Keep an inline record's slots in memory (reads find them here) and write them
        to the data files later, in batches: a slot rewritten meanwhile is written once,
        and those of a file freed meanwhile (SQLite's rollback journal, every commit) are
        never written.  Its log holds them durably until a snapshot, and every snapshot
        writes and syncs them first; a crash before that redoes them from the log."""
        for file_id, block, slot, data in slots:
            self.deferred[(file_id, block, slot)] = b"".join(data)
        if (len(self.deferred) * self.layout.size >= DEFERRED_FLUSH_BYTES
                and not self._flush_queued):
            if self.worker is None:  # an offline tool
                self.flush_deferred()
            else:
                self._flush_queued = True  # after this commit is answered
                self.worker.submit(self._flush_slice, self._flushed)

    def _flush_slice(self) -> None:
        """The queued flush, a slice at a time: the rest goes back in the queue, behind the
        commits that came meanwhile (a whole megabyte at once held one up by milliseconds),
        until half the limit is left."""
        if self._left_behind():
            return
        self._flush_queued = False
        self.flush_deferred(None if self.worker.stopping else FLUSH_SLICE_SLOTS)
        if len(self.deferred) * self.layout.size > DEFERRED_FLUSH_BYTES // 2:
            self._flush_queued = True
            self.worker.submit(self._flush_slice, self._flushed)

    def flush_deferred(self, most: int | None = None) -> None:
        """Write the deferred slots (the `most` first of them, by file and block) to the
        data files, unsynced (see _defer).  A failure faults the replica, as a failed
        commit would."""
        if self._left_behind():
            return
        written = sorted(self.deferred.items())[:most]
        try:
            self._write_slot_files([(file_id, block, slot, (raw,))
                                    for (file_id, block, slot), raw in written], sync=False)
        except OSError as exc:
            if not self._left_behind():
                self._write_failed(exc)
            raise
        for key, raw in written:
            if self.deferred.get(key) is raw:
                del self.deferred[key]

    def _flushed(self, result: object, error: BaseException | None) -> None:
        """A queued flush_deferred ended (in the worker): nobody waits for it, so a failure
        is told here, and faults the replica whatever its kind."""
        if error is None or self._left_behind():
            return
        log.warning("replica %s: writing its deferred slots failed: %s", self.path, error)
        if self.state == ONLINE:
            self.mark(FAULTED, f"write failed: {error}")

    def _drop_deferred(self, dropped: Callable[[tuple[int, int, int]], bool]) -> None:
        """Forget deferred slots of a file truncated or freed (at most a megabyte's worth
        to look through)."""
        for key in [key for key in self.deferred if dropped(key)]:
            del self.deferred[key]

    def read_shares(self, wanted: list[tuple[int, int, int]]) -> list[bytes]:
        """read_slots for serving reads: only from an online replica, errors counted."""
        try:
            self._check_online()
            return self.read_slots(wanted)
        except OSError:
            self.counters.read += 1
            raise

    def read_slots(self, wanted: list[tuple[int, int, int]]) -> list[bytes]:
        """Raw slots (file id, block, slot); a missing file or slot reads as b''.  Slots of
        consecutive blocks in one group are read with one pread for their heads and one for
        their bodies (a 1 MiB read: 8 preads, not 512)."""
        out: list[bytes] = []
        layout = self.layout
        pos = 0
        while pos < len(wanted):
            file_id, block, slot = wanted[pos]
            raw = self.deferred.get(wanted[pos]) or self.overlay.get(wanted[pos])
            if raw is not None:  # not in the data files yet, or (read-only) only in the log
                out.append(raw)
                pos += 1
                continue
            count = self._run_length(wanted, pos, layout.group)
            fd, _ = self._data_fd((file_id, slot), create=False)
            if fd is None:
                out.extend([b""] * count)
            else:
                out.extend(_read_run(fd, layout, block, count))
            pos += count
        return out

    def _run_length(self, wanted: list[tuple[int, int, int]], pos: int, group: int) -> int:
        """How many of wanted[pos:] are consecutive blocks of one slot file and group,
        none of them in memory (deferred or overlay)."""
        file_id, first, slot = wanted[pos]
        count = 1
        while (pos + count < len(wanted) and wanted[pos + count] == (file_id, first + count, slot)
               and (first + count) // group == first // group
               and wanted[pos + count] not in self.deferred
               and wanted[pos + count] not in self.overlay):
            count += 1
        return count

    def rejoin(self, seq: int) -> None:
        """Back in service after a heal gave it the current snapshot and an empty log."""
        self.last_seq = seq
        if self._log_fd is None:
            self.open_log(0)
        self.state, self.reason, self.heal_needed = ONLINE, "", ""

    def if_holds(self, seq: int, job: Callable[[], None]) -> None:
        """Run `job` only if this replica is online and wrote record `seq`."""
        if self.state == ONLINE and self.last_seq is not None and self.last_seq >= seq:
            job()

    def truncate_data(self, file_id: int, blocks: int) -> None:
        self._drop_deferred(lambda key: key[0] == file_id and key[1] >= blocks)
        for slot in range(format.SLOTS):
            fd, _ = self._data_fd((file_id, slot), create=False)
            if fd is not None:
                os.ftruncate(fd, self.layout.file_length(blocks))

    def remove_data(self, file_id: int) -> None:
        """Delete a freed inode's slot files.  Freeing the extents of a big file can take
        seconds (longer than the deadline on a slow disk), so this job only closes and
        renames them; the unlinks run on the replica's housekeeping thread, off the queue
        that commits wait in."""
        self._drop_deferred(lambda key: key[0] == file_id)
        for slot in range(format.SLOTS):
            fd = self._data_fds.pop((file_id, slot), None)
            if fd is not None:
                os.close(fd)
            path = os.path.join(self.data_path, format.data_name(file_id, slot))
            try:
                os.rename(path, path + DELETED_SUFFIX)
            except FileNotFoundError:
                continue
            self.housekeeper.submit(partial(unlink_quietly, path + DELETED_SUFFIX),
                                    lambda result, error: None)

    def deleted_leftovers(self) -> list[str]:
        """Data files renamed for deletion whose unlink a crash cut short."""
        return [os.path.join(self.data_path, name) for name in os.listdir(self.data_path)
                if name.endswith(DELETED_SUFFIX)]

    def data_files(self) -> set[int]:
        """The file ids that have a slot file here."""
        return {parsed[0] for parsed in map(format.parse_data_name, os.listdir(self.data_path))
                if parsed is not None}

    def probe(self) -> tuple[int, int]:
        """(total, free) bytes of the replica's filesystem, if its directory is there."""
        self._check_online()
        st = os.statvfs(self.path)
        return st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize

    def _check_online(self) -> None:
        if self.state == FAULTED:
            raise OSError(errno.EIO, f"replica faulted earlier: {self.reason}")
        if not os.path.isdir(self.data_path):
            raise OSError(errno.ENOENT, "replica directory vanished")

    def status(self, free: int | None) -> dict:
        """What `lnmirror status` shows of it; `free` comes from a probe (None: no answer)."""
        return {"path": self.path, "index": self.index if self.header else None,
                "state": self.state, "reason": self.reason, "free_bytes": free,
                "header_damage": self.header_damage,
                "errors": self.counters.as_dict(),
                "queue": self.worker.pending if self.worker else 0}


def _write_runs(slots: list[format.SlotWrite], group: int
                ) -> list[tuple[int, int, int, list[tuple[bytes, ...]]]]:
    """Slots as (file id, slot, first block, buffers of each block) runs of consecutive
    blocks of one slot file and group: their heads lie in a row, and so do their bodies,
    so each run is two pwritevs (a 1 MiB write: 8 per replica, not 512).  A slot given
    twice is written in the order given (the later one lands last)."""
    runs: list[tuple[int, int, int, list[tuple[bytes, ...]]]] = []
    last: tuple[int, int, int] | None = None
    for file_id, block, slot, data in sorted(slots, key=lambda s: (s[0], s[2], s[1])):
        if last == (file_id, slot, block - 1) and block % group:
            runs[-1][3].append(data)
        else:
            runs.append((file_id, slot, block, [data]))
        last = (file_id, slot, block)
    return runs


def _read_run(fd: int, layout: format.SlotLayout, first: int, count: int) -> list[bytes]:
    """The raw slots of blocks first .. first + count - 1, all in one group: a slot whose
    head is cut short by the end of the file is returned as far as it goes."""
    heads = os.pread(fd, count * layout.head_size, layout.head_offset(first))
    bodies = os.pread(fd, count * layout.body_size, layout.body_offset(first)) if len(heads) else b""
    out = []
    for i in range(count):
        head = heads[i * layout.head_size:(i + 1) * layout.head_size]
        if len(head) == layout.head_size:
            head += bodies[i * layout.body_size:(i + 1) * layout.body_size]
        out.append(head)
    return out


def still_current(tree: Tree, key: tuple[int, int, int], raw: bytes) -> bool:
    """Does the tree still point at this slot with this generation?"""
    ino, block, slot = key
    node = tree.inodes.get(ino)
    gen = format.unpack_slot(raw)[0]
    return (node is not None and block < len(node.blocks)
            and node.blocks[block] == block_entry(gen, slot))


def seal_snapshot(keys: codec.Keys, volume_id: bytes, tree: Tree) -> bytes:
    return codec.seal_record(keys, volume_id, format.SNAPSHOT_KIND,
                             format.snapshot_context(tree.seq, tree.term), tree.dump())

