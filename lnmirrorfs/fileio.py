"""File primitives the replica store and restore build on: whole writes (a filling disk
may take part of one), durable writes, directory syncs, hole punches, quiet cleanup."""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Sequence

Buffers = bytes | bytearray | memoryview | Sequence[bytes]
IOV_MAX = os.sysconf("SC_IOV_MAX")  # buffers one pwritev takes


def pwrite_all(fd: int, data: Buffers, offset: int) -> None:
    """Write every byte of `data` (one buffer or several, with pwritev) at `offset`.  A
    write to a filling disk may return having written part: the rest is retried, and the
    disk then answers ENOSPC.  A short write taken for a whole one would leave a torn slot
    or record behind a commit that reports success."""
    pending = [memoryview(data)] if isinstance(data, (bytes, bytearray, memoryview)) \
        else [memoryview(b) for b in data]
    pending = [b for b in pending if len(b)]
    while pending:
        written = os.pwritev(fd, pending[:IOV_MAX], offset)
        if written == 0:
            raise OSError(errno.ENOSPC, "no space left on device (write took nothing)")
        offset += written
        while pending and written >= len(pending[0]):
            written -= len(pending.pop(0))
        if written:
            pending[0] = pending[0][written:]


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file_durably(path: str, data: bytes, mode: int = 0o600) -> None:
    """Write a whole file via a temporary name, fsync it, rename it, fsync the directory."""
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        pwrite_all(fd, data, 0)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, path)
    fsync_dir(os.path.dirname(path) or ".")


_FALLOC_PUNCH = 0x01 | 0x02  # FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE (linux/falloc.h)
_LIBC = ctypes.CDLL(None, use_errno=True)
_fallocate = getattr(_LIBC, "fallocate64", None)
if _fallocate is not None:
    _fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


def punch_hole(fd: int, offset: int, length: int) -> bool:
    """Free the disk blocks of [offset, offset + length): reads give zeros there, the size
    stays.  False where the filesystem cannot (FAT, exFAT, sshfs): nothing is freed."""
    if _fallocate is None:
        return False
    if _fallocate(fd, _FALLOC_PUNCH, offset, length) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EOPNOTSUPP, errno.ENOSYS):
        return False
    raise OSError(err, f"punching a hole: {os.strerror(err)}")


_SYNC_FILE_RANGE_WRITE = 2  # start writeback of the dirty pages, do not wait (linux/fs.h)
_sync_file_range = getattr(_LIBC, "sync_file_range", None)
if _sync_file_range is not None:
    _sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Have the kernel start writing [offset, offset + length) to disk now, so the
    fsync at the end of a big file waits for its last pages, not all of them.  Only a
    hint: durability still comes from that fsync."""
    if _sync_file_range is not None:
        _sync_file_range(fd, offset, length, _SYNC_FILE_RANGE_WRITE)


def write_zeros(fd: int, start: int, end: int) -> None:
    zeros = bytes(1 << 20)
    for offset in range(start, end, len(zeros)):
        pwrite_all(fd, zeros[:end - offset], offset)


def close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass  # a dead mount's descriptor: gone either way


def close_all_quietly(fds: list[int]) -> None:
    for fd in fds:
        close_quietly(fd)


def unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
