"""POSIX names on the volume: lookup, create, link, unlink, rename and setattr, each
checked here (ENOENT, EEXIST, ENOTEMPTY...) and made one record by Volume.commit."""

from __future__ import annotations

import errno
import stat
import time

from .tree import Inode
from .tree import name_to_json as _j
from .volume import NAME_MAX, Volume, fail


def _owner_unchanged(node: Inode, changes: dict) -> bool:
    """A chown/chgrp to the owner the inode already has, and nothing else."""
    return (bool(changes) and set(changes) <= {"uid", "gid"}
            and all(getattr(node, key) == value for key, value in changes.items()))


class Namespace:
    def __init__(self, volume: Volume) -> None:
        self.volume = volume

    def lookup(self, parent: int, name: bytes) -> Inode:
        node = self._dir(parent)
        if len(name) > NAME_MAX:
            raise fail(errno.ENAMETOOLONG)
        if name == b".":
            return node
        child = self.volume.tree.child(parent, name)
        if child is None:
            raise fail(errno.ENOENT)
        return child

    def _dir(self, ino: int) -> Inode:
        node = self.volume.tree.inodes.get(ino)
        if node is None:
            raise fail(errno.ENOENT)
        if not node.is_dir:
            raise fail(errno.ENOTDIR)
        return node

    def _new_name(self, parent: int, name: bytes) -> Inode:
        node = self._dir(parent)
        if len(name) > NAME_MAX:
            raise fail(errno.ENAMETOOLONG)
        if name in node.entries:
            raise fail(errno.EEXIST)
        return node

    async def mknod(self, parent: int, name: bytes, mode: int, uid: int, gid: int,
                    rdev: int = 0, target: bytes = b"") -> Inode:
        """Create a file, directory, symlink, socket, FIFO or device node."""
        async with self.volume.lock:
            parent_node = self._new_name(parent, name)
            if parent_node.mode & stat.S_ISGID:  # BSD group semantics of set-group-ID dirs
                gid = parent_node.gid
                if stat.S_ISDIR(mode):
                    mode |= stat.S_ISGID
            ino = self.volume.tree.next_ino
            op = {"op": "mknod", "ino": ino, "parent": parent, "name": _j(name), "mode": mode,
                  "uid": uid, "gid": gid, "rdev": rdev, "time": time.time_ns()}
            if target:
                op["target"] = _j(target)
            await self.volume.commit([op])
            return self.volume.tree.inodes[ino]

    async def link(self, ino: int, parent: int, name: bytes) -> Inode:
        async with self.volume.lock:
            self._new_name(parent, name)
            node = self.volume.tree.inodes[ino]
            if node.is_dir:
                raise fail(errno.EPERM)
            await self.volume.commit([{"op": "link", "ino": ino, "parent": parent, "name": _j(name),
                                "time": time.time_ns()}])
            return node

    async def unlink(self, parent: int, name: bytes, want_dir: bool) -> None:
        async with self.volume.lock:
            node = self.lookup(parent, name)
            if want_dir:
                if not node.is_dir:
                    raise fail(errno.ENOTDIR)
                if node.entries:
                    raise fail(errno.ENOTEMPTY)
            elif node.is_dir:
                raise fail(errno.EISDIR)
            frees = self.volume.free_ops(node, 1)
            await self.volume.commit([{"op": "unlink", "parent": parent, "name": _j(name),
                                "time": time.time_ns()}] + frees)
            if frees:
                self.volume.forget(node)

    async def rename(self, parent: int, name: bytes, new_parent: int, new_name: bytes,
                     noreplace: bool = False) -> None:
        async with self.volume.lock:
            node = self.lookup(parent, name)
            self._dir(new_parent)
            if len(new_name) > NAME_MAX:
                raise fail(errno.ENAMETOOLONG)
            target = self.volume.tree.child(new_parent, new_name)
            if target is not None:
                if noreplace:
                    raise fail(errno.EEXIST)
                if target.ino == node.ino:
                    return
                if node.is_dir and not target.is_dir:
                    raise fail(errno.ENOTDIR)
                if target.is_dir and not node.is_dir:
                    raise fail(errno.EISDIR)
                if target.is_dir and target.entries:
                    raise fail(errno.ENOTEMPTY)
            if node.is_dir and self._is_ancestor(node.ino, new_parent):
                raise fail(errno.EINVAL)
            # The renamed file's buffered data goes in the same record (like ext4's
            # auto_da_alloc), so "write new file, rename over old" never yields a hole.
            frees = self.volume.free_ops(target, 1) if target is not None else []
            await self.volume.commit([{"op": "rename", "parent": parent, "name": _j(name),
                                "new_parent": new_parent, "new_name": _j(new_name),
                                "time": time.time_ns()}] + frees, [node.ino])
            if frees:
                self.volume.forget(target)

    def _is_ancestor(self, ino: int, descendant: int) -> bool:
        """True if `descendant` is `ino` or lies below it."""
        if ino == descendant:
            return True
        stack = [ino]
        while stack:
            for child in self.volume.tree.inodes[stack.pop()].entries.values():
                if child == descendant:
                    return True
                if self.volume.tree.inodes[child].is_dir:
                    stack.append(child)
        return False

    async def setattr(self, ino: int, **changes: int) -> Inode:
        """Change mode, uid, gid, size, atime or mtime (whichever are given)."""
        async with self.volume.lock:
            node = self.volume.tree.inodes[ino]
            changes = {k: v for k, v in changes.items() if v is not None}
            if _owner_unchanged(node, changes):
                # SQLite, run as root, fchowns every journal it creates to the database's
                # owner: nothing changes, so it costs no commit (only ctime stays as it was).
                return node
            op = {"op": "setattr", "ino": ino, "ctime": time.time_ns(), **changes}
            if "size" in op:
                if not node.is_reg:
                    raise fail(errno.EISDIR if node.is_dir else errno.EINVAL)
                await self.volume.truncate_buffers(node, op["size"])
                op.setdefault("mtime", op["ctime"])
            await self.volume.commit([op], [ino])
            if "size" in op:
                self.volume.reclaim_beyond_end(node)
            return node
