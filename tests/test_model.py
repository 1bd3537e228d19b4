"""Model test: the same random operations on the mount and on a plain directory must agree.

A seeded generator drives a few hundred operations per seed against both trees: each
operation either succeeds on both with the same result, or fails on both with the same
errno.  Every CHECK_EVERY operations, and after every seed, the two trees are compared in
full; after every seed the volume is also unmounted cleanly, mounted again, and compared
once more, so everything has to survive a remount.

The mount is made once per test function; every seed works in its own subdirectory
`s<seed>` (the earlier seeds' trees stay and keep being compared).  What is compared:
paths, type, st_mode, owner, size and nlink (not for directories), file contents, symlink
targets, which paths are hard links of each other, and st_mtime_ns of regular files whose
mtime was last set explicitly (utime/futimens); never st_ino, atime, ctime, directory
size or nlink.

Environment:
    LNMIRROR_MODEL_SEEDS=1,2,3   seeds to run instead of a test's default ones (replay)
    LNMIRROR_MODEL_OPS=600       operations per seed
    LNMIRROR_SLOW=1              also run test_model_long

Replay a failure with the command it prints, e.g.
    LNMIRROR_MODEL_SEEDS=<seed> pytest -q tests/test_model.py::test_model
"""

from __future__ import annotations

import errno
import hashlib
import os
import random
import stat
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

NAMES = ["a", "b", "c", "d", "e", "f"]
LONGEST, TOO_LONG = "L" * 255, "T" * 256      # NAME_MAX is 255 on both
DEFAULT_BS = 4096               # the default block size of `lnmirror init`
CHECK_EVERY = 25
# Times set explicitly are drawn from 2001..2008; anything newer was set by the filesystem.
EXPLICIT_LO, EXPLICIT_HI = 1_000_000_000 * 10**9, 1_200_000_000 * 10**9
FILE_MODES = [0o400, 0o600, 0o644, 0o666, 0o755, 0o000, 0o700, 0o4755, 0o2644]
DIR_MODES = [0o755, 0o700, 0o777, 0o1777, 0o500, 0o000]
SEED_TIMEOUT = 180.0            # a hung FUSE request must fail the test, not hang it

def _env_ints(name: str, default: list[int]) -> list[int]:
    raw = os.environ.get(name, "")
    return [int(x) for x in raw.replace(",", " ").split()] or default


class Mismatch(AssertionError):
    pass


@dataclass
class Handle:
    """The same file opened in both trees."""

    mfd: int
    pfd: int
    desc: str


def attempt(fn: Callable[[], object]) -> tuple:
    try:
        return ("ok", fn())
    except OSError as exc:
        return ("err", errno.errorcode.get(exc.errno, exc.errno))


def short(data: bytes) -> str:
    return f"{len(data)}B#{hashlib.blake2b(data, digest_size=4).hexdigest()}"


def stat_view(st: os.stat_result) -> dict:
    """What must agree in a stat: type and mode always; size and nlink but not for dirs."""
    out = {"mode": oct(st.st_mode), "owner": (st.st_uid, st.st_gid)}
    if not stat.S_ISDIR(st.st_mode):
        out["size"] = st.st_size
        out["nlink"] = st.st_nlink
    if stat.S_ISREG(st.st_mode) and st.st_mtime_ns < EXPLICIT_HI:
        out["mtime"] = st.st_mtime_ns
    return out


def tree_state(root: Path) -> dict:
    """Everything about a tree that must be equal: per path type/mode/size/nlink/content/
    target/explicit mtime, plus which paths are hard links of each other."""
    state: dict[str, dict] = {}
    by_ino: dict[int, list[str]] = {}

    def walk(directory: str, rel: str) -> None:
        for name in sorted(os.listdir(directory)):
            path, relpath = os.path.join(directory, name), rel + name
            st = os.lstat(path)
            entry = stat_view(st)
            if stat.S_ISLNK(st.st_mode):
                entry["target"] = os.readlink(path)
            elif stat.S_ISREG(st.st_mode):
                fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
                try:
                    chunks = []
                    while chunk := os.read(fd, 1 << 20):
                        chunks.append(chunk)
                finally:
                    os.close(fd)
                data = b"".join(chunks)
                entry["content"] = short(data)
                if len(data) != st.st_size:
                    entry["read_len"] = len(data)
            if not stat.S_ISDIR(st.st_mode):
                by_ino.setdefault(st.st_ino, []).append(relpath)
            state[relpath] = entry
            if stat.S_ISDIR(st.st_mode):
                walk(path, relpath + "/")

    walk(str(root), "")
    for paths in by_ino.values():
        if len(paths) > 1:
            for p in paths:
                state[p]["links"] = sorted(paths)
    return state


def diff_states(m: dict, p: dict) -> list[str]:
    out = []
    for path in sorted(set(m) | set(p)):
        if m.get(path) != p.get(path):
            out.append(f"  {path}:\n    mount: {m.get(path)}\n    plain: {p.get(path)}")
    return out


class Runner:
    """Runs one seed's operations on both trees and compares every outcome."""

    def __init__(self, seed: int, mroot: Path, proot: Path, test: str,
                 block_size: int = DEFAULT_BS) -> None:
        self.seed, self.test, self.bs = seed, test, block_size
        self.rng = random.Random(seed)
        self.mroot, self.proot = mroot, proot
        self.run = f"s{seed}"
        self.handles: list[Handle] = []
        self.log: list[str] = []
        self.step = 0

    # ---- plumbing ----

    def fail(self, message: str) -> None:
        message = message.replace(TOO_LONG, "T*256").replace(LONGEST, "L*255")
        tail = "\n".join(self.log[-int(os.environ.get("LNMIRROR_MODEL_TAIL", "60")):])
        raise Mismatch(f"seed {self.seed}, step {self.step}: {message}\n"
                       f"replay: LNMIRROR_MODEL_SEEDS={self.seed} pytest -q tests/test_model.py"
                       f"::{self.test}\nlast operations:\n{tail}")

    def note(self, desc: str) -> None:
        desc = desc.replace(TOO_LONG, "T*256").replace(LONGEST, "L*255")
        self.log.append(f"{self.step:4d} {desc}")

    def both(self, desc: str, fn: Callable[[Path], object]) -> tuple:
        """fn(root) on the mount, then on the plain tree; the outcomes must be equal."""
        self.note(desc)
        got_m = attempt(lambda: fn(self.mroot))
        got_p = attempt(lambda: fn(self.proot))
        if got_m != got_p:
            self.fail(f"{desc}\n  mount: {got_m}\n  plain: {got_p}")
        self.log[-1] += f"  -> {self._brief(got_m)}"
        return got_m

    def both_fd(self, desc: str, h: Handle, fn: Callable[[int], object]) -> tuple:
        self.note(f"{desc} [{h.desc}]")
        got_m = attempt(lambda: fn(h.mfd))
        got_p = attempt(lambda: fn(h.pfd))
        if got_m != got_p:
            self.fail(f"{desc} on [{h.desc}]\n  mount: {got_m}\n  plain: {got_p}")
        self.log[-1] += f"  -> {self._brief(got_m)}"
        return got_m

    @staticmethod
    def _brief(outcome: tuple) -> str:
        kind, value = outcome
        if kind == "ok" and isinstance(value, bytes):
            return f"ok {short(value)}"
        return f"{kind} {value}" if value is not None else kind

    def compare_trees(self, when: str) -> None:
        self.note(f"compare trees ({when})")
        m, p = tree_state(self.mroot), tree_state(self.proot)
        problems = diff_states(m, p)
        for h in self.handles:
            got_m, got_p = (attempt(lambda fd=fd: stat_view(os.fstat(fd))) for fd in (h.mfd, h.pfd))
            if got_m != got_p:
                problems.append(f"  open fd [{h.desc}]:\n    mount: {got_m}\n    plain: {got_p}")
        if problems:
            self.fail(f"trees differ ({when}):\n" + "\n".join(problems))

    def close_all(self) -> None:
        while self.handles:
            self.close_handle(self.handles[-1])

    def close_handle(self, h: Handle) -> None:
        self.handles.remove(h)
        self.note(f"close [{h.desc}]")
        got_m, got_p = attempt(lambda: os.close(h.mfd)), attempt(lambda: os.close(h.pfd))
        if got_m != got_p:
            self.fail(f"close [{h.desc}]\n  mount: {got_m}\n  plain: {got_p}")

    # ---- random choices ----

    def name(self) -> str:
        r = self.rng.random()
        if r < 0.02:
            return LONGEST
        if r < 0.04:
            return TOO_LONG
        return self.rng.choice(NAMES)

    def path(self, kind: str = "", p: float = 0.75) -> str:
        """A random path from the name pool; with probability p instead an existing entry of
        the kind asked for (looked up in the plain tree, which so far agrees with the mount)."""
        existing = self.rng.random() < p and self.existing(kind) if kind else []
        if existing:
            return self.rng.choice(existing)
        if self.rng.random() < 0.5:
            return f"{self.run}/{self.name()}"
        return f"{self.run}/{self.name()}/{self.name()}"

    def existing(self, kind: str) -> list[str]:
        found = []
        for rel in sorted(self._entries(self.run)):
            mode = os.lstat(self.proot / rel).st_mode
            if (kind == "any" or (kind == "file" and stat.S_ISREG(mode))
                    or (kind == "dir" and stat.S_ISDIR(mode))
                    or (kind == "link" and stat.S_ISLNK(mode))
                    or (kind == "nondir" and not stat.S_ISDIR(mode))):
                found.append(rel)
        return found

    def _entries(self, rel: str, depth: int = 2):
        for name in os.listdir(self.proot / rel):
            yield f"{rel}/{name}"
            if depth > 1 and stat.S_ISDIR(os.lstat(self.proot / rel / name).st_mode):
                yield from self._entries(f"{rel}/{name}", depth - 1)

    def size(self) -> int:
        r = self.rng.random()
        if r < 0.1:
            return 0
        if r < 0.4:
            return self.rng.randint(1, 100)
        if r < 0.7:
            return self.rng.randint(100, 5000)
        return self.rng.randint(5000, 20000)

    def offset(self) -> int:
        r = self.rng.random()
        if r < 0.2:
            return 0
        if r < 0.4:
            return max(0, self.rng.randint(0, 3) * self.bs + self.rng.randint(-2, 2))
        if r < 0.7:
            return self.rng.randint(0, 2 * self.bs)
        return self.rng.randint(0, 40000)

    def data(self) -> bytes:
        n = self.size()
        if self.rng.random() < 0.1:
            return bytes(n)
        return self.rng.randbytes(n)

    def explicit_ns(self) -> int:
        return self.rng.randrange(EXPLICIT_LO, EXPLICIT_HI)

    def open_flags(self) -> tuple[int, str]:
        acc, accname = self.rng.choice([(os.O_RDONLY, "RDONLY"), (os.O_WRONLY, "WRONLY"),
                                        (os.O_RDWR, "RDWR")])
        flags, names = acc | os.O_NONBLOCK, [accname]   # NONBLOCK: a FIFO must never block us
        for flag, fname, p in [(os.O_CREAT, "CREAT", 0.5), (os.O_EXCL, "EXCL", 0.15),
                               (os.O_TRUNC, "TRUNC", 0.15), (os.O_APPEND, "APPEND", 0.2),
                               (os.O_DIRECTORY, "DIRECTORY", 0.05)]:
            if self.rng.random() < p:
                flags |= flag
                names.append(fname)
        return flags, "|".join(names)

    def handle(self) -> Handle | None:
        return self.rng.choice(self.handles) if self.handles else None

    # ---- operations on paths ----

    def op_create(self) -> None:
        path, mode = self.path("file", 0.4), self.rng.choice(FILE_MODES)
        excl = self.rng.random() < 0.5
        data = self.data() if self.rng.random() < 0.7 else b""
        flags = os.O_CREAT | os.O_WRONLY | os.O_NONBLOCK | (os.O_EXCL if excl else 0)

        def fn(root: Path) -> int:
            fd = os.open(root / path, flags, mode)
            try:
                return os.write(fd, data)
            finally:
                os.close(fd)
        self.both(f"create {path} mode={mode:o} excl={excl} write {short(data)}", fn)

    def op_rewrite(self) -> None:
        """The everyday way to replace a file's content: open(O_CREAT|O_TRUNC), write, close."""
        path, data = self.path("file", 0.8), self.data()
        mode = self.rng.choice(FILE_MODES)

        def fn(root: Path) -> int:
            fd = os.open(root / path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NONBLOCK, mode)
            try:
                return os.write(fd, data)
            finally:
                os.close(fd)
        self.both(f"rewrite (O_TRUNC) {path} mode={mode:o} {short(data)}", fn)

    def op_write(self) -> None:
        path, off, data = self.path("file", 0.8), self.offset(), self.data()

        def fn(root: Path) -> int:
            fd = os.open(root / path, os.O_WRONLY | os.O_NONBLOCK)
            try:
                return os.pwrite(fd, data, off)
            finally:
                os.close(fd)
        self.both(f"pwrite {path} off={off} {short(data)}", fn)

    def op_append(self) -> None:
        path, data = self.path("file", 0.8), self.data()

        def fn(root: Path) -> tuple:
            fd = os.open(root / path, os.O_WRONLY | os.O_APPEND | os.O_NONBLOCK)
            try:
                n = os.write(fd, data)
                return n, os.lseek(fd, 0, os.SEEK_CUR)
            finally:
                os.close(fd)
        self.both(f"append {path} {short(data)}", fn)

    def op_read(self) -> None:
        path, off = self.path("file", 0.8), self.offset()
        n = self.rng.choice([1, 100, self.bs, 3 * self.bs, 50000])

        def fn(root: Path) -> bytes:
            fd = os.open(root / path, os.O_RDONLY | os.O_NONBLOCK)
            try:
                return os.pread(fd, n, off)
            finally:
                os.close(fd)
        self.both(f"pread {path} off={off} n={n}", fn)

    def op_truncate(self) -> None:
        path = self.path("file", 0.8)
        size = self.rng.choice([0, self.rng.randint(0, 2 * self.bs), self.rng.randint(0, 40000),
                                self.rng.randint(1, 8) * self.bs])
        try:
            unchanged = os.stat(self.proot / path).st_size == size
        except OSError:
            unchanged = False
        self.both(f"truncate {path} {size}", lambda root: os.truncate(root / path, size))
        if unchanged:  # POSIX leaves mtime alone when the size stays; ext4 sets it, the
            # writeback cache does not: set it to now on both, so they agree
            self.both(f"touch {path}", lambda root: os.utime(root / path))

    def op_open_keep(self) -> None:
        if len(self.handles) >= 6:
            self.close_handle(self.rng.choice(self.handles))
        path, (flags, fname) = self.path("file", 0.6), self.open_flags()
        mode = self.rng.choice(FILE_MODES)
        desc = f"open {path} {fname} mode={mode:o}"
        self.note(desc)
        got_m = attempt(lambda: os.open(self.mroot / path, flags, mode))
        got_p = attempt(lambda: os.open(self.proot / path, flags, mode))
        if got_m[0] == got_p[0] == "ok":
            h = Handle(got_m[1], got_p[1], f"{path} {fname} @{self.step}")
            self.handles.append(h)
            self.log[-1] += "  -> ok"
            return
        for kind, fd in (got_m, got_p):
            if kind == "ok":
                os.close(fd)
        if got_m != got_p:
            self.fail(f"{desc}\n  mount: {got_m}\n  plain: {got_p}")
        self.log[-1] += f"  -> {got_m[0]} {got_m[1]}"

    def op_mkdir(self) -> None:
        path, mode = self.path(), self.rng.choice(DIR_MODES)
        self.both(f"mkdir {path} {mode:o}", lambda root: os.mkdir(root / path, mode))

    def op_rmdir(self) -> None:
        path = self.path("dir", 0.7)
        self.both(f"rmdir {path}", lambda root: os.rmdir(root / path))

    def op_unlink(self) -> None:
        path = self.path("nondir", 0.7)
        self.both(f"unlink {path}", lambda root: os.unlink(root / path))

    def op_rename(self) -> None:
        src, dst = self.path("any", 0.8), self.path("any", 0.4)
        self.both(f"rename {src} -> {dst}", lambda root: os.rename(root / src, root / dst))

    def op_rename_into_self(self) -> None:
        src = f"{self.run}/{self.name()}"
        dst = f"{src}/{self.name()}"
        if self.rng.random() < 0.5:
            src, dst = dst, src          # a directory onto its own parent: ENOTEMPTY/EISDIR/...
        self.both(f"rename {src} -> {dst}", lambda root: os.rename(root / src, root / dst))

    def op_link(self) -> None:
        src, dst = self.path("file", 0.8), self.path()
        follow = self.rng.random() < 0.7
        self.both(f"link {src} -> {dst} follow={follow}",
                  lambda root: os.link(root / src, root / dst, follow_symlinks=follow))

    def op_symlink(self) -> None:
        path = self.path()
        target = self.rng.choice([self.name(), self.name(), f"{self.name()}/{self.name()}", ".",
                                  f"../{self.name()}", "missing", "a" * 200])
        self.both(f"symlink {path} -> {target}", lambda root: os.symlink(target, root / path))

    def op_readlink(self) -> None:
        path = self.path("link", 0.8)
        self.both(f"readlink {path}", lambda root: os.readlink(root / path))

    def op_chmod(self) -> None:
        modes = FILE_MODES + DIR_MODES
        path, mode = self.path("any", 0.7), self.rng.choice(modes)
        self.both(f"chmod {path} {mode:o}", lambda root: os.chmod(root / path, mode))

    def op_chown(self) -> None:
        path, uid, gid = self.path("any", 0.7), self.rng.choice([0, 1000]), self.rng.choice([0, 1000])
        follow = self.rng.random() < 0.7
        self.both(f"chown {path} {uid}:{gid} follow={follow}",
                  lambda root: os.chown(root / path, uid, gid, follow_symlinks=follow))

    def op_utime(self) -> None:
        path, times = self.path("file", 0.8), (self.explicit_ns(), self.explicit_ns())
        self.both(f"utime {path} ns={times}", lambda root: os.utime(root / path, ns=times))

    def op_mkfifo(self) -> None:
        path, mode = self.path(), self.rng.choice([0o600, 0o644, 0o666])
        self.both(f"mkfifo {path} {mode:o}", lambda root: os.mkfifo(root / path, mode))

    def op_stat(self) -> None:
        path = self.path("any", 0.5)
        if self.rng.random() < 0.5:
            self.both(f"lstat {path}", lambda root: stat_view(os.lstat(root / path)))
        else:
            self.both(f"stat {path}", lambda root: stat_view(os.stat(root / path)))

    def op_listdir(self) -> None:
        path = self.rng.choice([self.run, self.path("dir", 0.7)])
        self.both(f"listdir {path}", lambda root: sorted(os.listdir(root / path)))

    def op_unlink_open(self) -> None:
        """Open a file, remove its name, then keep using it through the descriptor."""
        path = self.path("file", 0.8)
        create = self.rng.random() < 0.5
        flags = os.O_RDWR | os.O_NONBLOCK | (os.O_CREAT if create else 0)
        desc = f"open {path} RDWR{'|CREAT' if create else ''}"
        self.note(desc)
        got_m = attempt(lambda: os.open(self.mroot / path, flags, 0o600))
        got_p = attempt(lambda: os.open(self.proot / path, flags, 0o600))
        if got_m[0] != "ok" or got_p[0] != "ok":
            for kind, fd in (got_m, got_p):
                if kind == "ok":
                    os.close(fd)
            if got_m != got_p:
                self.fail(f"{desc}\n  mount: {got_m}\n  plain: {got_p}")
            return
        h = Handle(got_m[1], got_p[1], f"{path} RDWR unlinked @{self.step}")
        self.handles.append(h)
        self.both(f"unlink {path} (open)", lambda root: os.unlink(root / path))
        for _ in range(self.rng.randint(1, 4)):
            if h in self.handles:
                self.fd_op(h)
        if h in self.handles:
            self.both_fd("fstat", h, lambda fd: stat_view(os.fstat(fd)))
            if self.rng.random() < 0.5:
                self.close_handle(h)

    # ---- operations on open descriptors ----

    def op_fd(self) -> None:
        h = self.handle()
        if h is None:
            self.op_open_keep()
        else:
            self.fd_op(h)

    def fd_op(self, h: Handle) -> None:
        r = self.rng.random()
        if r < 0.25:
            off, data = self.offset(), self.data()
            self.both_fd(f"pwrite off={off} {short(data)}", h, lambda fd: os.pwrite(fd, data, off))
        elif r < 0.35:
            data = self.data()
            self.both_fd(f"write {short(data)}", h,
                         lambda fd: (os.write(fd, data), os.lseek(fd, 0, os.SEEK_CUR)))
        elif r < 0.5:
            off, n = self.offset(), self.rng.choice([1, 100, self.bs, 50000])
            self.both_fd(f"pread off={off} n={n}", h, lambda fd: os.pread(fd, n, off))
        elif r < 0.55:
            n = self.rng.choice([10, self.bs, 50000])
            self.both_fd(f"read n={n}", h, lambda fd: os.read(fd, n))
        elif r < 0.6:
            off, whence = self.offset(), self.rng.choice([os.SEEK_SET, os.SEEK_CUR, os.SEEK_END])
            self.both_fd(f"lseek {off} whence={whence}", h, lambda fd: os.lseek(fd, off, whence))
        elif r < 0.72:
            size = self.rng.choice([0, self.rng.randint(0, 2 * self.bs), self.rng.randint(0, 40000)])
            self.both_fd(f"ftruncate {size}", h, lambda fd: os.ftruncate(fd, size))
        elif r < 0.8:
            self.both_fd("fsync", h, os.fsync)
        elif r < 0.83:
            self.both_fd("fdatasync", h, os.fdatasync)
        elif r < 0.9:
            self.both_fd("fstat", h, lambda fd: stat_view(os.fstat(fd)))
        elif r < 0.94:
            times = (self.explicit_ns(), self.explicit_ns())
            self.both_fd(f"futimens ns={times}", h, lambda fd: os.utime(fd, ns=times))
        elif r < 0.97:
            mode = self.rng.choice(FILE_MODES)
            self.both_fd(f"fchmod {mode:o}", h, lambda fd: os.chmod(fd, mode))
        else:
            self.close_handle(h)

    # ---- driver ----

    OPS = [
        ("op_create", 6), ("op_rewrite", 3), ("op_write", 8), ("op_append", 4), ("op_read", 4),
        ("op_truncate", 4), ("op_chown", 1),
        ("op_open_keep", 4), ("op_fd", 14), ("op_mkdir", 4), ("op_rmdir", 3), ("op_unlink", 4),
        ("op_rename", 7), ("op_rename_into_self", 1), ("op_link", 3), ("op_symlink", 3),
        ("op_readlink", 1), ("op_chmod", 3), ("op_utime", 3), ("op_mkfifo", 1), ("op_stat", 3),
        ("op_listdir", 2), ("op_unlink_open", 2),
    ]

    def go(self, n_ops: int) -> None:
        names, weights = zip(*self.OPS, strict=True)
        self.both(f"mkdir {self.run}", lambda root: os.mkdir(root / self.run))
        for self.step in range(1, n_ops + 1):
            getattr(self, self.rng.choices(names, weights)[0])()
            if self.step % CHECK_EVERY == 0:
                self.compare_trees(f"after step {self.step}")
        self.compare_trees("end of seed, fds still open")
        self.close_all()
        self.compare_trees("end of seed, all closed")


def run_model(volume, plain: Path, seeds: list[int], n_ops: int, test: str,
              block_size: int = DEFAULT_BS) -> None:
    """Run every seed on one mount of `volume`; after each seed unmount cleanly, mount
    again and compare once more."""
    plain.mkdir()
    mount = volume.mount()
    for seed in seeds:
        runner = Runner(seed, mount.path, plain, test, block_size)
        timed_out = threading.Event()

        def watchdog(m=mount, flag=timed_out) -> None:
            flag.set()
            m.kill()           # aborts the hung request instead of hanging pytest

        timer = threading.Timer(SEED_TIMEOUT, watchdog)
        timer.start()
        try:
            runner.go(n_ops)
        except BaseException as exc:
            for h in list(runner.handles):
                for fd in (h.mfd, h.pfd):
                    try:
                        os.close(fd)
                    except OSError:
                        pass
            runner.handles.clear()
            if timed_out.is_set():
                raise AssertionError(f"seed {seed}: no progress within {SEED_TIMEOUT}s; "
                                     f"daemon log:\n{mount.output()[-3000:]}") from exc
            if isinstance(exc, Mismatch):
                exc.args = (exc.args[0] + f"\ndaemon log tail:\n{mount.output()[-2000:]}",)
            raise
        finally:
            timer.cancel()

        code = mount.unmount()
        assert code == 0, f"seed {seed}: daemon exited {code}:\n{mount.output()[-3000:]}"
        mount = volume.mount()
        runner.compare_trees("after remount")


def seeds(default: list[int]) -> list[int]:
    return _env_ints("LNMIRROR_MODEL_SEEDS", default)


N_OPS = _env_ints("LNMIRROR_MODEL_OPS", [600])[0]


def test_model(volume, tmp_path):
    """2 replicas, k=1, 4 KiB blocks."""
    run_model(volume, tmp_path / "plain", seeds(list(range(1, 9))), N_OPS, "test_model")


def test_model_k2_of_3(make_vol, tmp_path):
    """3 replicas, k=2 (every block really FEC-decoded), 1 KiB blocks (more block edges)."""
    volume = make_vol(n=3, k=2, extra=("--block-size", "1024"))
    run_model(volume, tmp_path / "plain", seeds([1001, 1002, 1003, 1004]), N_OPS, "test_model_k2_of_3",
              block_size=1024)


@pytest.mark.slow
def test_model_long(volume, tmp_path):
    run_model(volume, tmp_path / "plain", seeds(list(range(100, 130))), 1500, "test_model_long")
