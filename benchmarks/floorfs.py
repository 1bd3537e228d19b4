"""floorfs: lnmirrorfs' durability barriers and FUSE surface, with no data work: the floor.

    python benchmarks/floorfs.py MOUNTPOINT --data DIR --replica DIR --replica DIR [--quorum W] [--carry-data]

A pyfuse3 + trio filesystem.  The tree (names, modes, owners, times) lives in memory only;
file data is passed to one backing file per inode in --data (pread/pwrite on the event loop,
never synced): no encryption, no FEC, no copies, no block maps.  What it does pay is
lnmirrorfs' barriers: each committing operation appends a 64-byte record to `floor.log` in
every --replica directory and fdatasyncs it, each replica in its own worker thread fed by a
queue (as lnmirrorfs' replica workers are), and replies once W of them (default: all) are
done.  Barriers are serialized by one lock, like lnmirrorfs' volume lock.  A log grows in
zero-filled 4 MiB chunks written without a sync, as lnmirrorfs' replica logs do.  With
--carry-data a record also carries as many bytes as the operation made durable (the inodes'
writes since their last barrier), so each barrier flushes what lnmirrorfs' would (its small
commits carry their blocks in the log record; its big ones write them before it): the floor
of a protocol that keeps the data durable too.

Committing operations, as in lnmirrorfs/fuse_ops.py and volume.py: create, mknod, mkdir,
symlink, link, unlink, rmdir, rename; setattr unless it changes nothing (a chown to the
current owner, a ctime-only update) or only times (buffered like a write), O_TRUNC on
open; fsync, and flush/release of a writable handle whose inode has buffered writes or times;
a write that takes the buffered bytes past 8 MiB; the writeback of buffered writes every
5 s.  Writes otherwise cost no barrier, nor does fsyncdir (namespace changes are durable
when acknowledged, so nothing is pending) or an fsync with nothing buffered.

Same FUSE settings as lnmirrorfs: the writeback cache, no dot lookups, 5 s entry and
attribute timeouts, keep_cache on open, negative lookups cached (inode 0 entries),
pyfuse3's default options plus fsname/subtype.  Nothing survives the unmount: the logs only pay the barriers.
"""

from __future__ import annotations

import argparse
import errno
import functools
import itertools
import os
import queue
import signal
import stat
import struct
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pyfuse3
import trio

CACHE_TIMEOUT = 5.0  # lnmirrorfs/fuse_ops.py
DIRTY_BYTES = 8 << 20  # lnmirrorfs Options.dirty_bytes: buffered writes before a forced commit
WRITEBACK_SECONDS = 5.0  # lnmirrorfs/daemon.py
LOG_CHUNK = 4 << 20  # lnmirrorfs/replica.py
RECORD = struct.Struct("<QQ48s")  # record number, time, what: 64 bytes
H = TypeVar("H", bound=Callable[..., Any])
Attr, Ctx = pyfuse3.EntryAttributes, pyfuse3.RequestContext


def fail(err: int) -> pyfuse3.FUSEError:
    return pyfuse3.FUSEError(err)


def guard(handler: H) -> H:
    """An OSError of the backing files becomes its errno."""
    @functools.wraps(handler)
    async def wrapper(*args: Any) -> Any:
        try:
            return await handler(*args)
        except OSError as exc:
            raise fail(exc.errno or errno.EIO) from None
    return wrapper  # type: ignore[return-value]


class Replica:
    """One replica directory's log and the worker thread that appends to it."""

    def __init__(self, path: str) -> None:
        self.fd = os.open(os.path.join(path, "floor.log"), os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        self.end = self.allocated = 0
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._loop, name=f"replica {path}", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while (job := self.jobs.get()) is not None:
            record, done = job
            try:
                self._append(record)
                done(None)
            except OSError as exc:
                done(exc)

    def _append(self, record: bytes) -> None:
        end = self.end + len(record)
        if end > self.allocated:
            os.pwrite(self.fd, bytes(end + LOG_CHUNK - self.allocated), self.allocated)
            self.allocated = end + LOG_CHUNK
        os.pwrite(self.fd, record, self.end)
        os.fdatasync(self.fd)
        self.end = end

    def close(self) -> None:
        self.jobs.put(None)
        self.thread.join(30)
        os.close(self.fd)


@dataclass
class Node:
    ino: int
    mode: int
    uid: int
    gid: int
    rdev: int = 0
    nlink: int = 1
    size: int = 0
    time_ns: tuple[int, int, int] = (0, 0, 0)  # atime, mtime, ctime
    entries: dict[bytes, int] = field(default_factory=dict)  # directories
    target: bytes = b""  # symlinks
    fd: int = -1  # regular files: the backing file
    opens: int = 0


class FloorFS(pyfuse3.Operations):
    supports_dot_lookup = False
    enable_writeback_cache = True

    def __init__(self, data: str, replicas: list[str], quorum: int, carry_data: bool = False) -> None:
        super().__init__()
        self.data, self.quorum, self.carry_data = data, quorum, carry_data
        self.replicas = [Replica(path) for path in replicas]
        now = time.time_ns()
        root = Node(pyfuse3.ROOT_INODE, stat.S_IFDIR | 0o755, 0, 0, nlink=2, time_ns=(now, now, now))
        self.inodes: dict[int, Node] = {root.ino: root}
        self.next_ino = itertools.count(root.ino + 1)
        self.handles: dict[int, tuple[int, bool]] = {}  # fh: (ino, writable)
        self.dir_handles: dict[int, list[tuple[bytes, int]]] = {}
        self.next_fh = itertools.count(1)
        self.dirty: dict[int, int] = {}  # ino: bytes written since its last commit
        self.lock = trio.Lock()
        self.seq = 0

    # ---- the barrier ----

    async def commit(self, what: str, inos: tuple[int, ...] = ()) -> None:
        """A record on W replicas, durable; the buffered writes of `inos` go with it (their
        bytes in the record, with --carry-data)."""
        carried = sum(self.dirty.pop(ino, 0) for ino in inos)
        async with self.lock:
            self.seq += 1
            record = RECORD.pack(self.seq, time.time_ns(), what.encode())
            if self.carry_data:
                record += b"\xa5" * carried
            token, decided, answers = trio.lowlevel.current_trio_token(), trio.Event(), []

            def on_done(error: OSError | None) -> None:  # in a worker thread
                answers.append(error)
                if answers.count(None) >= self.quorum or len(answers) == len(self.replicas):
                    try:
                        token.run_sync_soon(decided.set)
                    except trio.RunFinishedError:
                        pass

            for r in self.replicas:
                r.jobs.put((record, on_done))
            await decided.wait()
            if answers.count(None) < self.quorum:
                raise fail(errno.EIO)

    async def writeback(self) -> None:
        while True:
            await trio.sleep(WRITEBACK_SECONDS)
            if self.dirty:
                await self.commit("writeback", tuple(self.dirty))

    # ---- the tree ----

    def node(self, ino: int) -> Node:
        if ino not in self.inodes:
            raise fail(errno.ENOENT)
        return self.inodes[ino]

    def child(self, parent: int, name: bytes) -> Node:
        directory = self.node(parent)
        if not stat.S_ISDIR(directory.mode):
            raise fail(errno.ENOTDIR)
        if name not in directory.entries:
            raise fail(errno.ENOENT)
        return self.inodes[directory.entries[name]]

    def attr(self, n: Node) -> Attr:
        a = pyfuse3.EntryAttributes()
        a.st_ino, a.generation, a.st_mode, a.st_nlink = n.ino, 0, n.mode, n.nlink
        a.entry_timeout = a.attr_timeout = CACHE_TIMEOUT
        a.st_uid, a.st_gid, a.st_rdev = n.uid, n.gid, n.rdev
        a.st_size = len(n.target) if stat.S_ISLNK(n.mode) else n.size
        a.st_blksize, a.st_blocks = 4096, -(-a.st_size // 512)
        a.st_atime_ns, a.st_mtime_ns, a.st_ctime_ns = n.time_ns
        return a

    async def make(self, parent: int, name: bytes, mode: int, ctx: Ctx,
                   rdev: int = 0, target: bytes = b"") -> Node:
        directory = self.node(parent)
        if name in directory.entries:
            raise fail(errno.EEXIST)
        now = time.time_ns()
        n = Node(next(self.next_ino), mode, ctx.uid, ctx.gid, rdev=rdev, target=target,
                 nlink=2 if stat.S_ISDIR(mode) else 1, time_ns=(now, now, now))
        if stat.S_ISREG(mode):
            n.fd = os.open(os.path.join(self.data, str(n.ino)), os.O_RDWR | os.O_CREAT | os.O_TRUNC,
                           0o600)
        self.inodes[n.ino] = n
        directory.entries[name] = n.ino
        await self.commit("mknod")
        return n

    def drop_name(self, n: Node) -> None:
        """One name fewer; an inode with none that nothing has open is gone."""
        n.nlink = 0 if stat.S_ISDIR(n.mode) else n.nlink - 1
        self.forget_if_unused(n)

    def forget_if_unused(self, n: Node) -> None:
        if n.nlink == 0 and n.opens == 0:
            self.discard(n)

    def discard(self, n: Node) -> None:
        del self.inodes[n.ino]
        self.dirty.pop(n.ino, None)
        if n.fd >= 0:
            os.close(n.fd)
            os.unlink(os.path.join(self.data, str(n.ino)))

    @guard
    async def lookup(self, parent_inode: int, name: bytes, ctx: Ctx) -> Attr:
        if name != b"." and name not in self.node(parent_inode).entries:
            negative = pyfuse3.EntryAttributes()  # inode 0: a negative entry the kernel caches
            negative.st_ino, negative.entry_timeout = 0, CACHE_TIMEOUT
            return negative
        return self.attr(self.node(parent_inode) if name == b"." else self.child(parent_inode, name))

    @guard
    async def getattr(self, inode: int, ctx: Ctx) -> Attr:
        return self.attr(self.node(inode))

    @guard
    async def setattr(self, inode: int, attr: Attr, fields: pyfuse3.SetattrFields, fh: int | None,
                      ctx: Ctx) -> Attr:
        n = self.node(inode)
        given = {key: value for key, value, update in (
            ("mode", stat.S_IFMT(n.mode) | stat.S_IMODE(attr.st_mode), fields.update_mode),
            ("uid", attr.st_uid, fields.update_uid), ("gid", attr.st_gid, fields.update_gid),
            ("size", attr.st_size, fields.update_size), ("atime", attr.st_atime_ns, fields.update_atime),
            ("mtime", attr.st_mtime_ns, fields.update_mtime)) if update}
        if not given or (set(given) <= {"uid", "gid"} and all(getattr(n, k) == v for k, v in given.items())):
            return self.attr(n)  # nothing changes (a ctime update, SQLite's fchown): no commit
        if set(given) <= {"atime", "mtime"}:  # times alone: buffered, the next commit carries them
            n.time_ns = (given.get("atime", n.time_ns[0]), given.get("mtime", n.time_ns[1]), n.time_ns[2])
            self.dirty.setdefault(inode, 0)
            return self.attr(n)
        if "size" in given:
            if not stat.S_ISREG(n.mode):
                raise fail(errno.EISDIR if stat.S_ISDIR(n.mode) else errno.EINVAL)
            os.ftruncate(n.fd, given["size"])
            n.size = given["size"]
        now = time.time_ns()
        n.mode, n.uid, n.gid = given.get("mode", n.mode), given.get("uid", n.uid), given.get("gid", n.gid)
        n.time_ns = (given.get("atime", n.time_ns[0]),
                     given.get("mtime", now if "size" in given else n.time_ns[1]), now)
        await self.commit("setattr", (inode,))
        return self.attr(n)

    @guard
    async def readlink(self, inode: int, ctx: Ctx) -> bytes:
        n = self.node(inode)
        if not stat.S_ISLNK(n.mode):
            raise fail(errno.EINVAL)
        return n.target

    @guard
    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: Ctx) -> Attr:
        return self.attr(await self.make(parent_inode, name, mode, ctx, rdev=rdev))

    @guard
    async def mkdir(self, parent_inode: int, name: bytes, mode: int, ctx: Ctx) -> Attr:
        return self.attr(await self.make(parent_inode, name, stat.S_IFDIR | stat.S_IMODE(mode), ctx))

    @guard
    async def symlink(self, parent_inode: int, name: bytes, target: bytes, ctx: Ctx) -> Attr:
        return self.attr(await self.make(parent_inode, name, stat.S_IFLNK | 0o777, ctx, target=target))

    @guard
    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: Ctx) -> tuple[pyfuse3.FileInfo, Attr]:
        n = await self.make(parent_inode, name, stat.S_IFREG | stat.S_IMODE(mode), ctx)
        return self.open_handle(n, flags), self.attr(n)

    @guard
    async def link(self, inode: int, new_parent_inode: int, new_name: bytes, ctx: Ctx) -> Attr:
        n, directory = self.node(inode), self.node(new_parent_inode)
        if stat.S_ISDIR(n.mode):
            raise fail(errno.EPERM)
        if new_name in directory.entries:
            raise fail(errno.EEXIST)
        directory.entries[new_name] = n.ino
        n.nlink += 1
        await self.commit("link")
        return self.attr(n)

    async def remove(self, parent: int, name: bytes, want_dir: bool) -> None:
        n = self.child(parent, name)
        if want_dir and not stat.S_ISDIR(n.mode):
            raise fail(errno.ENOTDIR)
        if want_dir and n.entries:
            raise fail(errno.ENOTEMPTY)
        if not want_dir and stat.S_ISDIR(n.mode):
            raise fail(errno.EISDIR)
        del self.inodes[parent].entries[name]
        self.drop_name(n)
        await self.commit("unlink")

    @guard
    async def unlink(self, parent_inode: int, name: bytes, ctx: Ctx) -> None:
        await self.remove(parent_inode, name, want_dir=False)

    @guard
    async def rmdir(self, parent_inode: int, name: bytes, ctx: Ctx) -> None:
        await self.remove(parent_inode, name, want_dir=True)

    @guard
    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int, name_new: bytes,
                     flags: int, ctx: Ctx) -> None:
        if flags & ~pyfuse3.RENAME_NOREPLACE:
            raise fail(errno.EINVAL)
        n, new_dir = self.child(parent_inode_old, name_old), self.node(parent_inode_new)
        old = self.inodes.get(new_dir.entries.get(name_new, 0))
        if old is not None:
            if flags & pyfuse3.RENAME_NOREPLACE:
                raise fail(errno.EEXIST)
            if old.ino == n.ino:
                return
            if stat.S_ISDIR(old.mode) and (old.entries or not stat.S_ISDIR(n.mode)):
                raise fail(errno.ENOTEMPTY if old.entries else errno.EISDIR)
            if stat.S_ISDIR(n.mode) and not stat.S_ISDIR(old.mode):
                raise fail(errno.ENOTDIR)
            self.drop_name(old)
        del self.inodes[parent_inode_old].entries[name_old]
        new_dir.entries[name_new] = n.ino
        await self.commit("rename", (n.ino,))  # the renamed file's buffered data goes along

    # ---- file data ----

    def open_handle(self, n: Node, flags: int) -> pyfuse3.FileInfo:
        fh = next(self.next_fh)
        self.handles[fh] = (n.ino, flags & os.O_ACCMODE != os.O_RDONLY)
        n.opens += 1
        return pyfuse3.FileInfo(fh=fh, keep_cache=True)

    @guard
    async def open(self, inode: int, flags: int, ctx: Ctx) -> pyfuse3.FileInfo:
        n = self.node(inode)
        if stat.S_ISDIR(n.mode):
            raise fail(errno.EISDIR)
        if flags & os.O_TRUNC and stat.S_ISREG(n.mode):  # atomic O_TRUNC: no setattr comes
            os.ftruncate(n.fd, 0)
            n.size = 0
            await self.commit("truncate", (inode,))
        return self.open_handle(n, flags)

    @guard
    async def read(self, fh: int, off: int, size: int) -> bytes:
        return os.pread(self.inodes[self.handles[fh][0]].fd, size, off)

    @guard
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        ino = self.handles[fh][0]
        n = self.inodes[ino]
        written = os.pwrite(n.fd, buf, off)
        n.size = max(n.size, off + written)
        n.time_ns = (n.time_ns[0], time.time_ns(), n.time_ns[2])
        self.dirty[ino] = self.dirty.get(ino, 0) + written
        if sum(self.dirty.values()) > DIRTY_BYTES:
            await self.commit("write", (ino,))
        return written

    @guard
    async def flush(self, fh: int) -> None:
        ino, writable = self.handles[fh]
        if writable and ino in self.dirty:  # keyed by inode: pages go through any writable handle
            await self.commit("flush", (ino,))

    @guard
    async def fsync(self, fh: int, datasync: bool) -> None:
        ino = self.handles[fh][0]
        if ino in self.dirty:
            await self.commit("fsync", (ino,))

    @guard
    async def release(self, fh: int) -> None:
        ino, writable = self.handles.pop(fh)
        n = self.inodes[ino]
        n.opens -= 1
        if writable and n.nlink > 0 and n.ino in self.dirty:
            await self.commit("release", (n.ino,))
        self.forget_if_unused(n)

    # ---- directories and the volume ----

    @guard
    async def opendir(self, inode: int, ctx: Ctx) -> int:
        n = self.node(inode)
        if not stat.S_ISDIR(n.mode):
            raise fail(errno.ENOTDIR)
        fh = next(self.next_fh)
        self.dir_handles[fh] = sorted(n.entries.items())
        return fh

    @guard
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        entries = self.dir_handles[fh]
        for position in range(start_id, len(entries)):
            name, ino = entries[position]
            if ino in self.inodes and not pyfuse3.readdir_reply(token, name, self.attr(self.inodes[ino]),
                                                                position + 1):
                break

    @guard
    async def releasedir(self, fh: int) -> None:
        self.dir_handles.pop(fh, None)

    @guard
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        pass  # namespace changes were durable when acknowledged: nothing is pending

    @guard
    async def statfs(self, ctx: Ctx) -> pyfuse3.StatvfsData:
        v = os.statvfs(self.data)
        s = pyfuse3.StatvfsData()
        s.f_bsize, s.f_frsize, s.f_blocks = v.f_bsize, v.f_frsize, v.f_blocks
        s.f_bfree, s.f_bavail, s.f_namemax = v.f_bfree, v.f_bavail, 255
        s.f_files, s.f_ffree = len(self.inodes) + 1_000_000, 1_000_000
        s.f_favail = s.f_ffree
        return s


async def serve(fs: FloorFS) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(fs.writeback)

        async def on_signals() -> None:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for _ in signals:
                    pyfuse3.terminate()
                    return

        nursery.start_soon(on_signals)
        await pyfuse3.main()
        nursery.cancel_scope.cancel()
    if fs.dirty:
        await fs.commit("unmount", tuple(fs.dirty))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("mountpoint")
    p.add_argument("--data", required=True, help="directory for the backing files of file data")
    p.add_argument("--replica", action="append", required=True, help="a replica directory (repeat)")
    p.add_argument("--quorum", type=int, help="replicas a barrier waits for (default: all)")
    p.add_argument("--carry-data", action="store_true",
                   help="each record also carries the bytes its operation made durable")
    args = p.parse_args(argv)
    quorum = args.quorum or len(args.replica)
    if not 1 <= quorum <= len(args.replica):
        p.error(f"--quorum must be between 1 and {len(args.replica)}")
    fs = FloorFS(args.data, args.replica, quorum, args.carry_data)
    options = set(pyfuse3.default_options) | {"fsname=floorfs", "subtype=floor"}
    pyfuse3.init(fs, args.mountpoint, options)
    try:
        trio.run(serve, fs)
    finally:
        pyfuse3.close(unmount=True)
        for r in fs.replicas:
            r.close()
        for n in list(fs.inodes.values()):
            fs.discard(n)  # nothing survives the unmount
    print(f"floorfs: unmounted after {fs.seq} barriers", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
