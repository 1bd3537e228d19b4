"""FUSE adapter: pyfuse3 Operations that translate kernel requests into volume calls.

Every handler goes through `_guard`: an OSError becomes its errno, anything else a logged
EIO.  One bad request must never end the mount.
"""

from __future__ import annotations

import errno
import functools
import itertools
import logging
import os
import stat
from dataclasses import dataclass

import pyfuse3

from .namespace import Namespace
from .tree import Inode
from .volume import NAME_MAX, Volume, fail

log = logging.getLogger("lnmirrorfs.fuse")
# We are the only writer, so the kernel may cache names and attributes for a while.
CACHE_TIMEOUT = 5.0


def _guard(handler):
    @functools.wraps(handler)
    async def wrapper(self, *args):
        try:
            return await handler(self, *args)
        except pyfuse3.FUSEError:
            raise
        except OSError as exc:
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None
        except Exception:
            log.exception("%s%r failed", handler.__name__, args[:2])
            raise pyfuse3.FUSEError(errno.EIO) from None
    return wrapper


@dataclass
class FileHandle:
    ino: int
    writable: bool


class Operations(pyfuse3.Operations):
    supports_dot_lookup = False
    # The kernel caches written pages and sends them in large WRITEs at fsync and close
    # (an SQLite commit: ~3 WRITEs instead of ~22); it then owns size and mtime.
    enable_writeback_cache = True

    def __init__(self, volume: Volume) -> None:
        super().__init__()
        self.volume = volume
        self.names = Namespace(volume)
        self._dir_handles: dict[int, list[tuple[bytes, int]]] = {}
        self._file_handles: dict[int, FileHandle] = {}
        self._next_handle = itertools.count(1)

    def _node(self, ino: int) -> Inode:
        node = self.volume.tree.inodes.get(ino)
        if node is None:
            raise fail(errno.ENOENT)
        return node

    def _attr(self, node: Inode) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = node.ino
        a.generation = 0
        a.entry_timeout = a.attr_timeout = CACHE_TIMEOUT
        a.st_mode = node.mode
        a.st_nlink = node.nlink
        a.st_uid, a.st_gid, a.st_rdev = node.uid, node.gid, node.rdev
        if node.is_reg:
            a.st_size = self.volume.buffer.size_of(node)
        elif stat.S_ISLNK(node.mode):
            a.st_size = len(node.target)
        else:
            a.st_size = 0
        a.st_blksize = self.volume.block_size
        a.st_blocks = -(-a.st_size // 512)
        mtime = self.volume.buffer.mtime_of(node)
        a.st_atime_ns, a.st_mtime_ns = self.volume.buffer.atime_of(node), mtime
        a.st_ctime_ns = max(node.ctime_ns, mtime)
        return a

    def _entry(self, node: Inode) -> pyfuse3.EntryAttributes:
        """Attributes for a reply that gives the kernel a reference (it will forget it later)."""
        self.volume.referenced(node.ino)
        return self._attr(node)

    # ---- names and attributes ----

    @_guard
    async def lookup(self, parent_inode, name, ctx):
        try:
            return self._entry(self.names.lookup(parent_inode, name))
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                raise
        # A name that is not there: an entry with inode 0 is a negative entry the kernel
        # caches (an ENOENT is not), so SQLite's check for a hot journal before every
        # transaction costs no request.  All changes come through this mount, and the
        # kernel drops the negative entry itself when a create or rename makes the name.
        negative = pyfuse3.EntryAttributes()
        negative.st_ino = 0
        negative.entry_timeout = CACHE_TIMEOUT
        return negative

    async def forget(self, inode_list):
        for inode, count in inode_list:
            self.volume.forgotten(inode, count)

    @_guard
    async def getattr(self, inode, ctx):
        return self._attr(self._node(inode))

    @_guard
    async def setattr(self, inode, attr, fields, fh, ctx):
        node = self._node(inode)
        changes = {}
        if fields.update_mode:
            changes["mode"] = stat.S_IFMT(node.mode) | stat.S_IMODE(attr.st_mode)
        if fields.update_uid:
            changes["uid"] = attr.st_uid
        if fields.update_gid:
            changes["gid"] = attr.st_gid
        if fields.update_size:
            changes["size"] = attr.st_size
        if fields.update_atime:
            changes["atime"] = attr.st_atime_ns
        if fields.update_mtime:
            changes["mtime"] = attr.st_mtime_ns
        if changes and set(changes) <= {"atime", "mtime"}:
            # Times alone: the kernel sends its mtime before every fsync with the writeback
            # cache; buffered, they are made durable with the inode's next record.
            self.volume.buffer.retime(inode, **changes)
        elif changes:
            node = await self.names.setattr(inode, **changes)
        return self._attr(node)

    @_guard
    async def readlink(self, inode, ctx):
        node = self._node(inode)
        if not stat.S_ISLNK(node.mode):
            raise fail(errno.EINVAL)
        return node.target

    # ---- creating and removing names ----

    @_guard
    async def mknod(self, parent_inode, name, mode, rdev, ctx):
        node = await self.names.mknod(parent_inode, name, mode, ctx.uid, ctx.gid, rdev=rdev)
        return self._entry(node)

    @_guard
    async def mkdir(self, parent_inode, name, mode, ctx):
        mode = stat.S_IFDIR | stat.S_IMODE(mode)
        return self._entry(await self.names.mknod(parent_inode, name, mode, ctx.uid, ctx.gid))

    @_guard
    async def symlink(self, parent_inode, name, target, ctx):
        node = await self.names.mknod(parent_inode, name, stat.S_IFLNK | 0o777, ctx.uid, ctx.gid,
                                       target=target)
        return self._entry(node)

    @_guard
    async def create(self, parent_inode, name, mode, flags, ctx):
        mode = stat.S_IFREG | stat.S_IMODE(mode)
        node = await self.names.mknod(parent_inode, name, mode, ctx.uid, ctx.gid)
        return self._open_handle(node.ino, flags), self._entry(node)

    @_guard
    async def link(self, inode, new_parent_inode, new_name, ctx):
        return self._entry(await self.names.link(inode, new_parent_inode, new_name))

    @_guard
    async def unlink(self, parent_inode, name, ctx):
        await self.names.unlink(parent_inode, name, want_dir=False)

    @_guard
    async def rmdir(self, parent_inode, name, ctx):
        await self.names.unlink(parent_inode, name, want_dir=True)

    @_guard
    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        if flags & pyfuse3.RENAME_EXCHANGE:
            raise fail(errno.EINVAL, "RENAME_EXCHANGE is not supported")
        if flags & ~pyfuse3.RENAME_NOREPLACE:  # RENAME_WHITEOUT (overlayfs), or anything newer
            raise fail(errno.EINVAL, f"rename flags {flags:#x} are not supported")
        await self.names.rename(parent_inode_old, name_old, parent_inode_new, name_new,
                                 noreplace=bool(flags & pyfuse3.RENAME_NOREPLACE))

    # ---- file data ----

    @_guard
    async def open(self, inode, flags, ctx):
        node = self._node(inode)
        if node.is_dir:
            raise fail(errno.EISDIR)
        if flags & os.O_TRUNC and node.is_reg:
            # libfuse enables atomic O_TRUNC: the kernel sends no setattr, we truncate here.
            await self.names.setattr(inode, size=0)
        return self._open_handle(inode, flags)

    def _open_handle(self, ino: int, flags: int) -> pyfuse3.FileInfo:
        handle = next(self._next_handle)
        self._file_handles[handle] = FileHandle(ino, flags & os.O_ACCMODE != os.O_RDONLY)
        # keep_cache: we are the only writer, so the kernel's page cache stays valid.
        return pyfuse3.FileInfo(fh=handle, keep_cache=True)

    @_guard
    async def read(self, fh, off, size):
        return await self.volume.read(self._file_handles[fh].ino, off, size)

    @_guard
    async def write(self, fh, off, buf):
        return await self.volume.write(self._file_handles[fh].ino, off, buf)

    @_guard
    async def flush(self, fh):
        # close() of a writable handle makes the inode's data durable (a crash after it
        # loses nothing) unless the volume waits for its quorum (sync_on_close).  Keyed by
        # inode: with the writeback cache the kernel writes an inode's cached pages through
        # any writable handle, just before this FLUSH.  A read-only close promises nothing
        # and must not fail for another handle's writes.
        handle = self._file_handles[fh]
        if handle.writable and self.volume.buffer.is_buffered(handle.ino):
            await self.volume.sync_on_close(handle.ino)

    @_guard
    async def fsync(self, fh, datasync):
        await self.volume.sync(self._file_handles[fh].ino)
        self.volume.stats["fsync"] += 1

    @_guard
    async def release(self, fh):
        handle = self._file_handles.pop(fh)
        if handle.writable:
            await self.volume.released(handle.ino)

    # ---- directories ----

    @_guard
    async def opendir(self, inode, ctx):
        node = self._node(inode)
        if not node.is_dir:
            raise fail(errno.ENOTDIR)
        handle = next(self._next_handle)
        self._dir_handles[handle] = sorted(node.entries.items())
        return handle

    @_guard
    async def readdir(self, fh, start_id, token):
        entries = self._dir_handles[fh]
        for position in range(start_id, len(entries)):
            name, ino = entries[position]
            node = self.volume.tree.inodes.get(ino)
            if node is None:
                continue  # removed since opendir
            if not pyfuse3.readdir_reply(token, name, self._attr(node), position + 1):
                break
            self.volume.referenced(ino)  # each entry given is a lookup the kernel will forget

    @_guard
    async def releasedir(self, fh):
        self._dir_handles.pop(fh, None)

    @_guard
    async def fsyncdir(self, fh, datasync):
        # Namespace changes are acknowledged only once durable on W replicas, so nothing
        # is pending here; the volume still refuses if it lost quorum since.
        if self.volume.suspended:
            raise fail(errno.EIO, self.volume.suspended)
        self.volume.stats["fsyncdir"] += 1

    # ---- volume ----

    @_guard
    async def statfs(self, ctx):
        total, free = await self.volume.statfs()
        bs = self.volume.block_size
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = bs
        s.f_blocks = total // bs
        s.f_bfree = s.f_bavail = free // bs
        s.f_files = len(self.volume.tree.inodes) + 1_000_000
        s.f_ffree = s.f_favail = 1_000_000
        s.f_namemax = NAME_MAX
        return s


def mount_options(extra: list[str]) -> set[str]:
    """pyfuse3 defaults plus ours; the kernel enforces modes so hsm_secret stays 0400."""
    options = set(pyfuse3.default_options) | {"fsname=lnmirrorfs", "subtype=lnmirror"}
    options.update(extra)
    return options
