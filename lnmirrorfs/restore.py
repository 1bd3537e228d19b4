"""Restore and import: between the volume and a plain directory tree, both ways.

Restore writes the volume's last acknowledged state out as plain files.

Every block is read through the volume's verified path (per-share checksum, then AEAD),
so a restore that finishes is a restore whose every byte was authenticated.
"""

from __future__ import annotations

import collections
import fcntl
import os
import socket
import stat
from collections.abc import Callable

import trio

from .fileio import pwrite_all, start_writeback
from .namespace import Namespace
from .tree import Inode
from .volume import Volume

CHUNK = 1 << 20
READ_AHEAD_CHUNKS = 4  # chunks being read while one is written


class RestoreError(Exception):
    pass


Progress = Callable[[int, int], None]  # (bytes done, bytes in all)


async def restore_tree(volume: Volume, target: str, progress: Progress | None = None) -> dict:
    """Recreate the tree below `target` (an empty or missing directory); returns counts.
    `progress` is told the bytes written so far, inside big files too."""
    if os.path.exists(target) and (not os.path.isdir(target) or os.listdir(target)):
        raise RestoreError(f"{target}: target exists and is not an empty directory")
    os.makedirs(target, exist_ok=True)
    tree = volume.tree
    first_path: dict[int, str] = {}
    counts = {"files": 0, "dirs": 0, "links": 0, "bytes": 0, "skipped_sockets": 0}
    dirs: list[tuple[str, Inode]] = [(target, tree.inodes[1])]
    sizes = {node.ino: volume.buffer.size_of(node) for _, node in tree.walk() if node.is_reg}
    meter = _Meter(progress, sum(sizes.values()))
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
            counts["bytes"] += await _restore_file(volume, node, path, meter)
            counts["files"] += 1
        elif stat.S_ISSOCK(node.mode):
            counts["skipped_sockets"] += 1  # a socket is recreated by whoever listens on it
            continue
        else:
            os.mknod(path, node.mode, node.rdev)
        _set_meta(path, node)
    for path, node in reversed(dirs):  # children first, so their creation does not bump mtime
        _set_meta(path, node)
    return counts


class _Meter:
    """Counts bytes for a progress callback."""

    def __init__(self, progress: Progress | None, total: int) -> None:
        self.progress, self.total, self.done = progress, total, 0

    def add(self, count: int) -> None:
        self.done += count
        if self.progress:
            self.progress(self.done, self.total)


async def _restore_file(volume: Volume, node: Inode, path: str, meter: _Meter) -> int:
    """Copy one file out.  READ_AHEAD_CHUNKS chunks are being read (in the replicas'
    threads) while one is written (in a thread of its own) and its writeback starts at
    once: a restore waits for the slowest of the three, not for their sum."""
    size = volume.buffer.size_of(node)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        async with trio.open_nursery() as nursery:
            chunks: collections.deque[_Chunk] = collections.deque()
            for offset in range(0, size, CHUNK):
                chunks.append(_Chunk(offset))
                nursery.start_soon(chunks[-1].read, volume, node.ino)
                if len(chunks) > READ_AHEAD_CHUNKS:
                    await _write_chunk(fd, chunks.popleft(), meter)
            while chunks:
                await _write_chunk(fd, chunks.popleft(), meter)
        os.ftruncate(fd, size)
        os.fsync(fd)
    finally:
        os.close(fd)
    return size


class _Chunk:
    """One chunk of a file being read: its bytes or the error, once read."""

    def __init__(self, offset: int) -> None:
        self.offset = offset
        self.done = trio.Event()
        self.data = b""
        self.error: OSError | None = None

    async def read(self, volume: Volume, ino: int) -> None:
        try:
            self.data = await volume.read(ino, self.offset, CHUNK)
        except OSError as exc:  # raised where the chunk is written, in order
            self.error = exc
        self.done.set()


async def _write_chunk(fd: int, chunk: _Chunk, meter: _Meter) -> None:
    await chunk.done.wait()
    if chunk.error is not None:
        raise chunk.error
    await trio.to_thread.run_sync(_write_and_start_writeback, fd, chunk.data, chunk.offset)
    meter.add(len(chunk.data))


def _write_and_start_writeback(fd: int, data: bytes, offset: int) -> None:
    pwrite_all(fd, data, offset)
    start_writeback(fd, offset, len(data))


def _set_meta(path: str, node: Inode) -> None:
    if not stat.S_ISLNK(node.mode):
        os.chmod(path, stat.S_IMODE(node.mode))
    if os.geteuid() == 0:  # only root may give files away; others keep their own uid
        os.chown(path, node.uid, node.gid, follow_symlinks=False)
    os.utime(path, ns=(node.atime_ns, node.mtime_ns), follow_symlinks=False)


# ---------------------------------------------------------------- import (the other way)

def check_node_stopped(source: str) -> None:
    """Refuse a directory a running lightningd uses: it holds a lock on its pid file and
    listens on lightning-rpc, in the top directory or a network one (bitcoin/, testnet/)."""
    places = [source] + [e.path for e in os.scandir(source) if e.is_dir(follow_symlinks=False)]
    for directory in places:
        _check_place(directory)


def _check_place(source: str) -> None:
    for name in os.listdir(source):
        path = os.path.join(source, name)
        if name.endswith(".pid") and os.path.isfile(path):
            fd = os.open(path, os.O_RDWR)
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                fcntl.lockf(fd, fcntl.LOCK_UN)
            except OSError:
                raise RestoreError(f"{source}: lightningd is running ({name} is locked): "
                                   "stop it first") from None
            finally:
                os.close(fd)
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(path)
                raise RestoreError(f"{source}: something is listening on {name}: "
                                   "stop lightningd first")
            except OSError:
                pass
            finally:
                probe.close()


async def import_tree(volume: Volume, source: str, progress: Progress | None = None) -> dict:
    """Copy a plain directory tree into an empty volume (modes, owners, times, symlinks,
    hard links, FIFOs), then read every file back through the volume and compare."""
    counts = {"files": 0, "dirs": 0, "links": 0, "bytes": 0, "skipped_sockets": 0}
    names = Namespace(volume)
    meter = _Meter(progress, sum(os.lstat(os.path.join(d, f)).st_size for d, _, files in
                                 os.walk(source) for f in files
                                 if stat.S_ISREG(os.lstat(os.path.join(d, f)).st_mode)))
    seen: dict[tuple[int, int], int] = {}
    dirs: list[tuple[int, os.stat_result]] = [(1, os.lstat(source))]
    copied: list[tuple[str, int]] = []
    stack = [(source, 1)]
    while stack:
        directory, parent = stack.pop()
        for entry in sorted(os.scandir(directory), key=lambda e: e.name):
            st = entry.stat(follow_symlinks=False)
            name = os.fsencode(entry.name)
            if (st.st_dev, st.st_ino) in seen:
                await names.link(seen[(st.st_dev, st.st_ino)], parent, name)
                counts["links"] += 1
                continue
            if stat.S_ISSOCK(st.st_mode):
                counts["skipped_sockets"] += 1
                continue
            target = os.fsencode(os.readlink(entry.path)) if entry.is_symlink() else b""
            node = await names.mknod(parent, name, st.st_mode, st.st_uid, st.st_gid,
                                      rdev=st.st_rdev, target=target)
            seen[(st.st_dev, st.st_ino)] = node.ino
            if stat.S_ISDIR(st.st_mode):
                stack.append((entry.path, node.ino))
                dirs.append((node.ino, st))
                counts["dirs"] += 1
                continue
            if stat.S_ISREG(st.st_mode):
                counts["bytes"] += await _import_file(volume, node.ino, entry.path, meter)
                copied.append((entry.path, node.ino))
                counts["files"] += 1
            await names.setattr(node.ino, atime=st.st_atime_ns, mtime=st.st_mtime_ns)
    root = dirs[0][1]
    await names.setattr(1, mode=root.st_mode, uid=root.st_uid, gid=root.st_gid)
    for ino, st in reversed(dirs):  # children first, so adding them does not bump mtime
        await names.setattr(ino, atime=st.st_atime_ns, mtime=st.st_mtime_ns)
    for path, ino in copied:
        await _verify_file(volume, ino, path)
    return counts


async def _import_file(volume: Volume, ino: int, path: str, meter: _Meter) -> int:
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            await volume.write(ino, size, chunk)
            size += len(chunk)
            meter.add(len(chunk))
    await volume.sync(ino)
    return size


async def _verify_file(volume: Volume, ino: int, path: str) -> None:
    offset = 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            if await volume.read(ino, offset, len(chunk)) != chunk:
                raise RestoreError(f"{path}: read back from the volume differs from the source")
            offset += len(chunk)
    if volume.buffer.size_of(volume.tree.inodes[ino]) != offset:
        raise RestoreError(f"{path}: size in the volume differs from the source")
