"""renameat2 flags on a real mount: RENAME_NOREPLACE works, RENAME_EXCHANGE and
RENAME_WHITEOUT (which we cannot honour) fail with EINVAL and change nothing."""

from __future__ import annotations

import ctypes
import errno
import os

import pytest

AT_FDCWD = -100
RENAME_NOREPLACE, RENAME_EXCHANGE, RENAME_WHITEOUT = 1, 2, 4

_libc = ctypes.CDLL(None, use_errno=True)


def renameat2(old: str, new: str, flags: int) -> int:
    """Returns 0 or the errno."""
    if _libc.renameat2(AT_FDCWD, old.encode(), AT_FDCWD, new.encode(), flags) == 0:
        return 0
    return ctypes.get_errno()


@pytest.mark.parametrize("flag", [RENAME_EXCHANGE, RENAME_WHITEOUT,
                                  RENAME_WHITEOUT | RENAME_NOREPLACE])
def test_unsupported_rename_flags_are_einval(mounted, flag):
    a, b = mounted.path / "a", mounted.path / "b"
    a.write_bytes(b"A")
    b.write_bytes(b"B")
    target = mounted.path / "c" if flag & RENAME_NOREPLACE else b
    assert renameat2(str(a), str(target), flag) == errno.EINVAL
    assert sorted(os.listdir(mounted.path)) == ["a", "b"]
    assert a.read_bytes() == b"A" and b.read_bytes() == b"B"
    assert mounted.proc.poll() is None


def test_rename_noreplace(mounted):
    a, b = mounted.path / "a", mounted.path / "b"
    a.write_bytes(b"A")
    b.write_bytes(b"B")
    assert renameat2(str(a), str(b), RENAME_NOREPLACE) == errno.EEXIST
    assert renameat2(str(a), str(mounted.path / "c"), RENAME_NOREPLACE) == 0
    assert sorted(os.listdir(mounted.path)) == ["b", "c"]
    assert (mounted.path / "c").read_bytes() == b"A"
