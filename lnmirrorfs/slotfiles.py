"""One replica's data directory: its slot files (`data/<file id>.<slot>`), their open
descriptors, slot writes and reads in runs, the files written without a sync, truncates,
removals and hole punches.

Blocking, like the rest of the replica store; every method but `sync_files` runs on the
replica's worker thread, which owns the descriptor cache.  What the slots mean (which
are current, which are deferred in memory) is the replica's business, not this one's.
"""

from __future__ import annotations

import collections
import errno
import os
from collections.abc import Callable

from . import format
from .fileio import fsync_dir, punch_hole, pwrite_all

_MAX_OPEN_FILES = 256
DELETED_SUFFIX = ".deleted"  # a freed slot file waiting for its unlink (scrub removes leftovers)

SlotKey = tuple[int, int, int]  # (file id, block, slot)
_SHORT_RUN = 4  # blocks: a read of a run this short starts its bodies' read ahead


class SlotFiles:
    def __init__(self, data_path: str, layout: format.SlotLayout) -> None:
        self.path = data_path
        self.layout = layout
        self._fds: collections.OrderedDict[format.DataFile, int] = collections.OrderedDict()
        self.unsynced: set[format.DataFile] = set()  # written without a sync since the last one

    def fd(self, data_file: format.DataFile, create: bool) -> tuple[int | None, bool]:
        """An open fd for a slot file (cached); returns (fd, created).  Good until the next
        call: opening another file may close the least recently used one, so no caller
        keeps a descriptor across calls (its number may be another file's by then)."""
        fd = self._fds.get(data_file)
        if fd is not None:
            self._fds.move_to_end(data_file)
            return fd, False
        path = os.path.join(self.path, format.data_name(*data_file))
        created = False
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            if not create:
                return None, False
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            created = True
        self._fds[data_file] = fd
        if len(self._fds) > _MAX_OPEN_FILES:
            os.close(self._fds.popitem(last=False)[1])
        return fd, created

    def detach(self) -> list[int]:
        """Forget every open descriptor and hand them over (the caller closes them: on a
        hung filesystem, in a thread left behind)."""
        fds = list(self._fds.values())
        self._fds.clear()
        return fds

    def write(self, slots: list[format.SlotWrite], sync: bool, abandoned: Callable[[], bool]) -> None:
        """Write slots (file id, block, slot, buffers) in runs.  With `sync`, make them and
        new names durable; without, the files are remembered for the next sync_unsynced
        (the caller has the same bytes durable elsewhere: the log).  `abandoned` says the
        calling thread hung and was replaced: it stops before its next run."""
        if not os.path.isdir(self.path):
            raise OSError(errno.ENOENT, "replica directory vanished")
        touched: set[format.DataFile] = set()
        created = False
        layout = self.layout
        for file_id, slot, first, run in _write_runs(slots, layout.group):
            if abandoned():  # what it was writing is owned by the new threads now
                raise OSError(errno.EIO, "a call that hung came back after its replica was reopened")
            fd, new = self.fd((file_id, slot), create=True)
            created |= new
            heads: list[memoryview] = []
            bodies: list[memoryview] = []
            for data in run:
                head, body = format.split_slot(data, layout.head_size)
                heads += head
                bodies += body
            pwrite_all(fd, heads, layout.head_offset(first))
            pwrite_all(fd, bodies, layout.body_offset(first))
            touched.add((file_id, slot))
        if not sync:
            self.unsynced.update(touched)
            return
        self._sync(touched, names=created)

    def read(self, wanted: list[SlotKey], in_memory: Callable[[SlotKey], bytes | None]) -> list[bytes]:
        """Raw slots (file id, block, slot); a missing file or slot reads as b''.  A slot
        `in_memory` gives is taken from there.  Slots of consecutive blocks in one group
        are read with one pread for their heads and one for their bodies (a 1 MiB read: 8
        preads, not 512)."""
        out: list[bytes] = []
        pos = 0
        while pos < len(wanted):
            file_id, block, slot = wanted[pos]
            raw = in_memory(wanted[pos])
            if raw is not None:
                out.append(raw)
                pos += 1
                continue
            count = _run_length(wanted, pos, self.layout.group, in_memory)
            fd, _ = self.fd((file_id, slot), create=False)
            if fd is None:
                out.extend([b""] * count)
            else:
                out.extend(_read_run(fd, self.layout, block, count))
            pos += count
        return out

    def sync_unsynced(self) -> None:
        """Make every file written without sync durable (before a snapshot drops the log)."""
        self._sync(self.unsynced, names=bool(self.unsynced))
        self.unsynced.clear()

    def _sync(self, data_files: set[format.DataFile], names: bool) -> None:
        """fdatasync each file (looked up anew: a write of more files than the cache holds
        closed the first ones meanwhile, and a descriptor kept from then could name another
        file now), then the directory if `names` changed."""
        for data_file in sorted(data_files):
            fd, _ = self.fd(data_file, create=False)
            if fd is not None:
                os.fdatasync(fd)
        if names:
            fsync_dir(self.path)

    def sync_files(self, data_files: set[format.DataFile]) -> None:
        """The same for files handed over to another thread (a background snapshot's
        housekeeper): opened by name, not from the worker's cache."""
        for file_id, slot in sorted(data_files):
            try:
                fd = os.open(os.path.join(self.path, format.data_name(file_id, slot)), os.O_RDONLY)
            except FileNotFoundError:
                continue  # freed since: no record the snapshot keeps points into it
            try:
                os.fdatasync(fd)
            finally:
                os.close(fd)
        if data_files:
            fsync_dir(self.path)

    def truncate(self, file_id: int, blocks: int) -> None:
        for slot in range(format.SLOTS):
            fd, _ = self.fd((file_id, slot), create=False)
            if fd is not None:
                os.ftruncate(fd, self.layout.file_length(blocks))

    def rename_deleted(self, file_id: int) -> list[str]:
        """Close a freed file's slot files and rename them to `.deleted` (fast); returns the
        new names, for the caller to unlink off the queue commits wait in (freeing a big
        file's extents can take seconds)."""
        renamed = []
        for slot in range(format.SLOTS):
            fd = self._fds.pop((file_id, slot), None)
            if fd is not None:
                os.close(fd)
            path = os.path.join(self.path, format.data_name(file_id, slot))
            try:
                os.rename(path, path + DELETED_SUFFIX)
            except FileNotFoundError:
                continue
            renamed.append(path + DELETED_SUFFIX)
        return renamed

    def deleted_leftovers(self) -> list[str]:
        """Slot files renamed for deletion whose unlink a crash cut short."""
        return [os.path.join(self.path, name) for name in os.listdir(self.path)
                if name.endswith(DELETED_SUFFIX)]

    def file_ids(self) -> set[int]:
        """The file ids that have a slot file here."""
        return {parsed[0] for parsed in map(format.parse_data_name, os.listdir(self.path))
                if parsed is not None}

    def punch_run(self, seq: int, run: format.StalePages) -> bool:
        """Punch a run of stale pages, but not those a block written after record `seq`
        has a body on (its head's generation is higher).  False if the filesystem cannot."""
        file_id, slot, offset, length, blocks = run
        fd, _ = self.fd((file_id, slot), create=False)
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


def _run_length(wanted: list[SlotKey], pos: int, group: int,
                in_memory: Callable[[SlotKey], bytes | None]) -> int:
    """How many of wanted[pos:] are consecutive blocks of one slot file and group, none of
    them in memory."""
    file_id, first, slot = wanted[pos]
    count = 1
    while (pos + count < len(wanted) and wanted[pos + count] == (file_id, first + count, slot)
           and (first + count) // group == first // group
           and in_memory(wanted[pos + count]) is None):
        count += 1
    return count


def _read_run(fd: int, layout: format.SlotLayout, first: int, count: int) -> list[bytes]:
    """The raw slots of blocks first .. first + count - 1, all in one group: a slot whose
    head is cut short by the end of the file is returned as far as it goes.  Heads and
    bodies lie apart: for a short run (a random read) the bodies' read is started ahead
    (WILLNEED), so that on a cold disk the two reads overlap instead of one waiting for the
    other (4K random reads 11 % faster); for a long one (sequential reads, scrub, restore)
    the bodies' read is the work, and the run as long after it is started ahead instead,
    to be on its way while this one is checked (a cold offline scrub 7 % faster)."""
    bodies_at, bodies_length = layout.body_offset(first), count * layout.body_size
    if bodies_length and count <= _SHORT_RUN:
        os.posix_fadvise(fd, bodies_at, bodies_length, os.POSIX_FADV_WILLNEED)
    elif bodies_length:
        after = layout.head_offset(first + count)
        os.posix_fadvise(fd, after, layout.file_length(first + 2 * count) - after,
                         os.POSIX_FADV_WILLNEED)
    heads = os.pread(fd, count * layout.head_size, layout.head_offset(first))
    bodies = os.pread(fd, bodies_length, bodies_at) if len(heads) else b""
    out = []
    for i in range(count):
        head = heads[i * layout.head_size:(i + 1) * layout.head_size]
        if len(head) == layout.head_size:
            head += bodies[i * layout.body_size:(i + 1) * layout.body_size]
        out.append(head)
    return out
