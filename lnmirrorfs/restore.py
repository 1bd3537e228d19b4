"""Restore: write the volume's last acknowledged state out as plain files.

Every block is read through the volume's verified path (per-share checksum, then AEAD),
so a restore that finishes is a restore whose every byte was authenticated.
"""

from __future__ import annotations

import os
import stat
import sys

from .tree import Inode
from .volume import Volume

CHUNK = 1 << 20


class RestoreError(Exception):
    pass


async def restore_tree(volume: Volume, target: str, progress: bool = False) -> dict:
    """Recreate the tree below `target` (an empty or missing directory); returns counts."""
    if os.path.exists(target) and (not os.path.isdir(target) or os.listdir(target)):
        raise RestoreError(f"{target}: target exists and is not an empty directory")
    os.makedirs(target, exist_ok=True)
    tree = volume.tree
    first_path: dict[int, str] = {}
    counts = {"files": 0, "dirs": 0, "links": 0, "bytes": 0, "skipped_sockets": 0}
    dirs: list[tuple[str, Inode]] = [(target, tree.inodes[1])]
    for rel, node in tree.walk():
        path = os.path.join(target, os.fsdecode(rel))
        if node.ino in first_path:
            os.link(first_path[node.ino], path)
            counts["links"] += 1
            continue
        first_path[node.ino] = path
        if node.is_dir:
            os.mkdir(path, 0o700)
            dirs.append((path, node))
            counts["dirs"] += 1
            continue
        if stat.S_ISLNK(node.mode):
            os.symlink(node.target, path)
        elif node.is_reg:
            counts["bytes"] += await _restore_file(volume, node, path)
            counts["files"] += 1
            if progress:
                print(f"\rrestored {counts['files']} files, {counts['bytes'] >> 20} MiB",
                      end="", file=sys.stderr)
        elif stat.S_ISSOCK(node.mode):
            counts["skipped_sockets"] += 1  # a socket is recreated by whoever listens on it
            continue
        else:
            os.mknod(path, node.mode, node.rdev)
        _set_meta(path, node)
    for path, node in reversed(dirs):  # children first, so their creation does not bump mtime
        _set_meta(path, node)
    if progress:
        print(file=sys.stderr)
    return counts


async def _restore_file(volume: Volume, node: Inode, path: str) -> int:
    size = volume.size_of(node)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        offset = 0
        while offset < size:
            data = await volume.read(node.ino, offset, CHUNK)
            os.pwrite(fd, data, offset)
            offset += len(data)
        os.ftruncate(fd, size)
        os.fsync(fd)
    finally:
        os.close(fd)
    return size


def _set_meta(path: str, node: Inode) -> None:
    if not stat.S_ISLNK(node.mode):
        os.chmod(path, stat.S_IMODE(node.mode))
    if os.geteuid() == 0:  # only root may give files away; others keep their own uid
        os.chown(path, node.uid, node.gid, follow_symlinks=False)
    os.utime(path, ns=(node.atime_ns, node.mtime_ns), follow_symlinks=False)
