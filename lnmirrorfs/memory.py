"""The mount daemon's heap: glibc malloc tuned for a long-running, threaded process, and
the start-up's objects kept out of the garbage collector's way.

glibc gives each thread that contends for the heap an arena of its own (up to 8 per core)
and keeps freed memory in them. The daemon's replica and encoder threads allocate the
sealed blocks of a commit and the event loop frees them, so a bulk write left some 20 MB of
free but resident memory spread over arenas (measured: peak RSS writing 2 GiB, 126 MB with
the default arenas, 104 MB with two). A commit's sealed blocks are one buffer
(Volume._encode_plan), and buffers from 256 KiB up are mapped apart from the heap and
unmapped when freed: glibc's own threshold grows with the sizes freed, up to 32 MiB, and
then put those buffers on the heap too. Elsewhere (musl, macOS) these calls do nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc

_M_ARENA_MAX = -8  # glibc's mallopt parameter numbers
_M_MMAP_THRESHOLD = -3
ARENAS = 2
MMAP_THRESHOLD = 256 << 10


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "malloc_trim") else None


_LIBC = _libc()


def limit_arenas() -> None:
    """Call before the first thread starts: later arenas are not created past ARENAS."""
    if _LIBC is not None:
        _LIBC.mallopt(_M_ARENA_MAX, ARENAS)
        _LIBC.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)


def trim() -> None:
    """Give free heap pages back to the kernel (after a bulk write left them behind)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def freeze_startup() -> None:
    """Take the objects alive once the mount is up (modules, classes, the tree as opened)
    out of the cyclic garbage collector's scans.  Each full collection walked all ~30,000 of
    them, 12-22 ms with the event loop stopped, about once a second during a bulk write
    (its slot tuples set off collections); frozen, no collection of the same run took over
    2 ms but the one here, once."""
    gc.collect()
    gc.freeze()

