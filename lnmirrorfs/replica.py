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

import errno
import fcntl
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

from . import codec, format, replay
from .fileio import (
    close_all_quietly,
    close_quietly,
    fsync_dir,
    pwrite_all,
    unlink_quietly,
    write_file_durably,
    write_zeros,
)
from .replay import Loaded
from .slotfiles import SlotFiles, SlotKey
from .tree import Tree
from .worker import Once, Worker

log = logging.getLogger("lnmirrorfs.replica")
ONLINE, STALE, FAULTED, MISSING, OFFLINE = "ONLINE", "STALE", "FAULTED", "MISSING", "OFFLINE"
# The log grows by zero-filled chunks: appending inside already-written space changes no
# file size, so the per-commit fdatasync has no metadata to journal.
LOG_CHUNK = 4 << 20
PUNCH_SLICE_SECONDS = 0.002  # the longest a worker frees stale slots before commits go again
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
    _files: SlotFiles | None = None  # see `files`
    # A read-only open: the slots that only its log holds.
    overlay: dict[SlotKey, bytes] = field(default_factory=dict)
    deferred: dict[SlotKey, bytes] = field(default_factory=dict)  # see _defer
    _flush_queued: bool = False  # a _flush_slice job is in the worker's queue
    _replaced_threads: set[threading.Thread] = field(default_factory=set)  # see _left_behind
    _log_fd: int | None = None
    _log_end: int = 0
    _log_allocated: int = 0
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
        fds = self.files.detach() + [self._log_fd, self._lock_fd]
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
        fds = [fd for fd in [*(self._files.detach() if self._files else []), self._log_fd,
                             self._lock_fd] if fd is not None]
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
        """Rebuild this replica's tree from its snapshot and log (replay.load)."""
        try:
            loaded = replay.load(self.meta_path, self.header, keys, upto)
        except replay.ReplayError as exc:
            raise ReplicaError(f"{self.path}: metadata unreadable: {exc}") from None
        self.snapshot_seq = loaded.snapshot_seq
        return loaded

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
            self.files.unsynced |= self._cut_files
            self._cut_files = set()
            self.files.sync_unsynced()
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
            self._cut_files |= self.files.unsynced
            self.files.unsynced = set()
            return SnapshotCut(seq, self._log_end, self._log_epoch)

    def _write_cut_snapshot(self, cut: SnapshotCut, term: int, sealed: Once[bytes]) -> bool:
        """Housekeeper: sync the data up to the cut, write the snapshot, make the spare log."""
        with self._snapshot_lock:
            if self.snapshot_seq >= cut.seq or self.state != ONLINE:
                return False  # a newer snapshot was written meanwhile, or it faulted
            self.files.sync_files(self._cut_files)
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
                if not self.files.punch_run(seq, runs[at]):
                    self.can_punch = False  # FAT, exFAT, sshfs: the space stays in use
                    return
            except OSError as exc:  # a full copy-on-write filesystem: the space stays, for now
                log.warning("replica %s: stale slots not freed: %s", self.path, exc)
                return

    @property
    def _spare_log_path(self) -> str:
        return os.path.join(self.meta_path, format.SPARE_LOG_NAME)

    # ---- data ----

    @property
    def layout(self) -> format.SlotLayout:
        return self.header.layout

    @property
    def files(self) -> SlotFiles:
        """Its slot files (made once the header, hence the layout, is known)."""
        if self._files is None:
            self._files = SlotFiles(self.data_path, self.layout)
        return self._files

    def write_slots(self, slots: list[format.SlotWrite]) -> None:
        """Write slots (file id, block, slot, buffers) and make them and new names durable
        (a heal, a redo, a commit too big for the log): newer than what is deferred."""
        for file_id, block, slot, _ in slots:
            self.deferred.pop((file_id, block, slot), None)
        self.files.write(slots, sync=True, abandoned=self._left_behind)

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
            self.files.write([(file_id, block, slot, (raw,))
                              for (file_id, block, slot), raw in written], sync=False,
                             abandoned=self._left_behind)
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

    def read_slots(self, wanted: list[SlotKey]) -> list[bytes]:
        """Raw slots (file id, block, slot), from memory where they are not in the data
        files yet (deferred) or, on a read-only open, only in the log (overlay)."""
        return self.files.read(wanted, lambda key: self.deferred.get(key) or self.overlay.get(key))

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
        self.files.truncate(file_id, blocks)

    def remove_data(self, file_id: int) -> None:
        """Delete a freed inode's slot files: this job only closes and renames them; the
        unlinks run on the replica's housekeeping thread, off the queue that commits wait
        in (freeing a big file's extents can take longer than the deadline)."""
        self._drop_deferred(lambda key: key[0] == file_id)
        for path in self.files.rename_deleted(file_id):
            self.housekeeper.submit(partial(unlink_quietly, path), lambda result, error: None)

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
                "queue": self.worker.pending if self.worker else 0,
                "queue_bytes": self.worker.queued_bytes if self.worker else 0}


def seal_snapshot(keys: codec.Keys, volume_id: bytes, tree: Tree) -> bytes:
    return codec.seal_record(keys, volume_id, format.SNAPSHOT_KIND,
                             format.snapshot_context(tree.seq, tree.term), tree.dump())

