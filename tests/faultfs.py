"""faultfs: a small passthrough FUSE filesystem that puts real faults under a replica.

    python tests/faultfs.py BACKING MOUNTPOINT SPEC_FILE

Everything passes through to BACKING, and faultfs remembers, per file, what each write
overwrote until the file is fsynced.  Send signals to change its behaviour:

    SIGUSR1  reread SPEC_FILE (JSON): {"errno_write": 5, "errno_fsync": 5, "errno_read": 5,
             "stall": true, "ignore_fsync": true, "write_delay": 0.01}; missing keys mean
             "no fault".  Clearing "stall" releases the calls that hang; "write_delay" makes
             each write take that many seconds more (a slow USB stick).
    SIGUSR2  power cut: undo every write that was not fsynced (newest first), keeping a
             random prefix of the last one written to each file (a torn write), as a disk
             cache that lost power would.  Then carry on serving.

Namespace changes (create, rename, unlink, mkdir) are treated as durable at once, like a
journaled filesystem; only file data can be lost.  With "ignore_fsync" fsync succeeds but
forgets nothing: the negative control for a filesystem that lies about fsync.
"""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import stat
import sys

import pyfuse3
import trio


class Undo:
    """What unsynced writes to one file overwrote: (offset, old bytes, old size) newest last."""

    def __init__(self) -> None:
        self.entries: list[tuple[int, bytes, int, int]] = []


class FaultFS(pyfuse3.Operations):
    enable_writeback_cache = False

    def __init__(self, backing: str, spec_path: str) -> None:
        super().__init__()
        self.backing = backing
        self.spec_path = spec_path
        self.spec: dict = {}
        self.unstall = trio.Event()
        self.unstall.set()
        self.paths: dict[int, str] = {pyfuse3.ROOT_INODE: backing}
        self.fds: dict[int, tuple[int, str]] = {}
        self.undo: dict[str, Undo] = {}
        self.rng = random.Random(os.environ.get("FAULTFS_SEED", "0"))

    # ---- faults ----

    def reload(self) -> None:
        try:
            with open(self.spec_path) as f:
                self.spec = json.load(f)
        except (OSError, ValueError):
            self.spec = {}
        if self.spec.get("stall"):
            self.unstall = trio.Event()
        else:
            self.unstall.set()

    async def _gate(self, kind: str) -> None:
        if self.spec.get("stall"):
            await self.unstall.wait()
        err = self.spec.get(f"errno_{kind}")
        if err:
            raise pyfuse3.FUSEError(err)

    def power_cut(self) -> None:
        for path, undo in self.undo.items():
            entries = undo.entries
            if not entries:
                continue
            try:
                fd = os.open(path, os.O_RDWR)
            except OSError:
                continue  # unlinked since
            try:
                last_offset, _, _, last_len = entries[-1]
                newest = os.pread(fd, last_len, last_offset)
                for offset, old, old_size, _ in reversed(entries):
                    os.pwrite(fd, old, offset)
                    os.ftruncate(fd, old_size)
                # Torn write: a prefix of the newest unsynced write reached the disk anyway.
                keep = self.rng.randrange(0, len(newest) + 1)
                if keep:
                    os.pwrite(fd, newest[:keep], last_offset)
                os.fsync(fd)
            finally:
                os.close(fd)
        self.undo.clear()

    def _remember(self, path: str, fd: int, offset: int, length: int) -> None:
        size = os.fstat(fd).st_size
        old = os.pread(fd, length, offset)
        self.undo.setdefault(path, Undo()).entries.append((offset, old, size, length))

    # ---- inodes ----

    def _path(self, ino: int) -> str:
        try:
            return self.paths[ino]
        except KeyError:
            raise pyfuse3.FUSEError(errno.ENOENT) from None

    def _attr(self, path: str) -> pyfuse3.EntryAttributes:
        try:
            st = os.lstat(path)
        except OSError as exc:
            raise pyfuse3.FUSEError(exc.errno) from None
        self.paths[st.st_ino] = path
        a = pyfuse3.EntryAttributes()
        for name in ("st_ino", "st_mode", "st_nlink", "st_uid", "st_gid", "st_rdev", "st_size",
                     "st_atime_ns", "st_mtime_ns", "st_ctime_ns"):
            setattr(a, name, getattr(st, name))
        a.st_blksize, a.st_blocks = st.st_blksize, st.st_blocks
        a.generation, a.entry_timeout, a.attr_timeout = 0, 0, 0
        return a

    def _child(self, parent: int, name: bytes) -> str:
        return os.path.join(self._path(parent), os.fsdecode(name))

    async def lookup(self, parent_inode, name, ctx):
        await self._gate("meta")  # a hung NAS hangs stat() too
        return self._attr(self._child(parent_inode, name))

    async def getattr(self, inode, ctx):
        await self._gate("meta")
        return self._attr(self._path(inode))

    async def setattr(self, inode, attr, fields, fh, ctx):
        path = self._path(inode)
        await self._gate("write")
        try:
            if fields.update_size:
                fd = os.open(path, os.O_RDWR)
                try:
                    size = os.fstat(fd).st_size
                    if attr.st_size < size:
                        self._remember(path, fd, attr.st_size, size - attr.st_size)
                    os.ftruncate(fd, attr.st_size)
                finally:
                    os.close(fd)
            if fields.update_mode:
                os.chmod(path, stat.S_IMODE(attr.st_mode))
        except OSError as exc:
            raise pyfuse3.FUSEError(exc.errno) from None
        return self._attr(path)

    # ---- namespace ----

    async def _namespace(self, fn, *args):
        await self._gate("write")
        try:
            return fn(*args)
        except OSError as exc:
            raise pyfuse3.FUSEError(exc.errno) from None

    async def mkdir(self, parent_inode, name, mode, ctx):
        path = self._child(parent_inode, name)
        await self._namespace(os.mkdir, path, mode)
        return self._attr(path)

    async def unlink(self, parent_inode, name, ctx):
        path = self._child(parent_inode, name)
        await self._namespace(os.unlink, path)
        self.undo.pop(path, None)

    async def rmdir(self, parent_inode, name, ctx):
        await self._namespace(os.rmdir, self._child(parent_inode, name))

    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        old, new = self._child(parent_inode_old, name_old), self._child(parent_inode_new, name_new)
        await self._namespace(os.rename, old, new)
        if old in self.undo:
            self.undo[new] = self.undo.pop(old)
        for ino, path in list(self.paths.items()):
            if path == old:
                self.paths[ino] = new

    async def create(self, parent_inode, name, mode, flags, ctx):
        path = self._child(parent_inode, name)
        fd = await self._namespace(os.open, path, _rdwr(flags) | os.O_CREAT, mode)
        attr = self._attr(path)
        self.fds[fd] = (fd, path)
        return pyfuse3.FileInfo(fh=fd), attr

    async def opendir(self, inode, ctx):
        return inode

    async def readdir(self, fh, start_id, token):
        path = self._path(fh)
        names = sorted(os.listdir(path))
        for i, name in enumerate(names[start_id:], start_id):
            attr = self._attr(os.path.join(path, name))
            if not pyfuse3.readdir_reply(token, os.fsencode(name), attr, i + 1):
                break

    async def fsyncdir(self, fh, datasync):
        await self._gate("fsync")

    async def statfs(self, ctx):
        await self._gate("meta")
        st = os.statvfs(self.backing)
        s = pyfuse3.StatvfsData()
        for name in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files",
                     "f_ffree", "f_favail", "f_namemax"):
            setattr(s, name, getattr(st, name))
        return s

    # ---- data ----

    async def open(self, inode, flags, ctx):
        path = self._path(inode)
        try:
            fd = os.open(path, _rdwr(flags) & ~os.O_CREAT)
        except OSError as exc:
            raise pyfuse3.FUSEError(exc.errno) from None
        self.fds[fd] = (fd, path)
        return pyfuse3.FileInfo(fh=fd)

    async def read(self, fh, off, size):
        await self._gate("read")
        return os.pread(fh, size, off)

    async def write(self, fh, off, buf):
        await self._gate("write")
        await trio.sleep(self.spec.get("write_delay", 0))
        _, path = self.fds[fh]
        self._remember(path, fh, off, len(buf))
        return os.pwrite(fh, buf, off)

    async def fsync(self, fh, datasync):
        await self._gate("fsync")
        if self.spec.get("ignore_fsync"):
            return
        _, path = self.fds[fh]
        os.fsync(fh)
        self.undo.pop(path, None)

    async def flush(self, fh):
        pass

    async def release(self, fh):
        self.fds.pop(fh, None)
        os.close(fh)


def _rdwr(flags: int) -> int:
    """Backing files are always opened read-write: undo needs to read what a write replaces."""
    return flags & ~(os.O_ACCMODE | os.O_APPEND) | os.O_RDWR


async def _signals(fs: FaultFS) -> None:
    with trio.open_signal_receiver(signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM) as signals:
        async for signum in signals:
            if signum == signal.SIGUSR1:
                fs.reload()
            elif signum == signal.SIGUSR2:
                fs.power_cut()
            else:
                pyfuse3.terminate()
                return


async def _main(fs: FaultFS) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_signals, fs)
        await pyfuse3.main()
        nursery.cancel_scope.cancel()


def main() -> int:
    backing, mountpoint, spec = sys.argv[1:4]
    fs = FaultFS(os.path.realpath(backing), spec)
    fs.reload()
    pyfuse3.init(fs, mountpoint, {"fsname=faultfs", "default_permissions"})
    try:
        trio.run(_main, fs)
    finally:
        pyfuse3.close(unmount=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
