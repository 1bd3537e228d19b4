"""End-to-end benchmark: lnmirrorfs against a plain directory (and gocryptfs), measured here.

One command runs every measurement on every target and prints one table:

Targets, all under one scratch directory on one disk (a mkdtemp under /var/tmp, or under
--dir), removed at the end:

* ``plain``      -- a directory on the scratch filesystem: the physical limit;
* ``lnmirror-2`` -- an lnmirrorfs volume, 2 replicas, k=1 (``lnmirror init`` + ``mount_lnmirror -f``);
* ``lnmirror-3`` -- an lnmirrorfs volume, 3 replicas, k=2;
* ``gocryptfs``  -- gocryptfs over one directory, if the ``gocryptfs`` binary is installed
  (skipped with a note otherwise; this script installs nothing).

Measurements, each repeated --reps times; the table shows the median of the reps and the
ratio to the plain directory's median of the same run:

* ``commit_delete`` / ``commit_wal`` -- the lightningd-style SQLite loop of tests/workload.py
  (synchronous=FULL) in rollback-journal and WAL mode, on a fresh database per rep:
  ``workload.run()`` itself with each ``workload.commit_once`` timed, so the workload's side
  effects (gossip_store append, lightning-rpc ping, the files it replaces or rewrites every
  few commits) run as in the tests.  commits/s = commits / wall time from the first commit
  to the end of the loop (side effects included); p50/p99 = latency of commit_once alone.
* ``iops_4k_fdatasync`` -- 4 KiB pwrite + fdatasync at random 4 KiB-aligned offsets of a
  preallocated (fully written and fsynced) --iops-file-mib file.
* ``seq_write`` -- --seq-mib MiB in 1 MiB write()s, then fsync; time until fsync returns.
* ``seq_read`` -- the same file read in 1 MiB read()s from a cold start: caches dropped
  (sync; echo 3 > /proc/sys/vm/drop_caches) and, for FUSE targets, unmounted and mounted
  again first so the daemon's cache is cold too.
* ``rand_read_4k`` -- 4 KiB preads at random aligned offsets of that file after another cold
  start; POSIX_FADV_RANDOM is set first (as fio does) so kernel readahead stays out.  IOPS =
  reads / summed pread time: the check of each read's bytes between preads is not timed.
* ``scrub`` -- lnmirrorfs: wall time of ``lnmirror scrub`` on the unmounted volume, caches
  dropped; MB/s = logical bytes in the volume / time.  The volume then holds what the steps
  above left: the SQLite directories, the last rep's 4K-write file and its --seq-mib file.
  Also reported: bytes allocated on disk below the target (all replicas, logs included)
  divided by those logical bytes.  The same bytes are read cold from
  the plain directory (reading everything is what verifying it costs there) and checked by
  ``gocryptfs -fsck`` for gocryptfs.
* ``restore`` -- lnmirrorfs: wall time of ``lnmirror restore`` into a fresh directory (every
  file fsynced), caches dropped first; the plain and gocryptfs analogue is a cold copy of
  the tree with an fsync per file.  The restored big file's BLAKE2b is checked.
* ``daemon_rss`` -- FUSE targets: peak RSS (VmHWM of /proc/PID/status, reset through
  clear_refs and on a fresh mount) of the mount daemon while a --rss-mib file is written
  and fsynced; the file is deleted afterwards.  A plain directory has no daemon.

Data read back is checked (chunk stamps on sequential reads, every random 4 KiB read
against the expected bytes, SQLite integrity and commit count, restored file digests);
a mismatch, a failed step, a non-zero daemon exit or a warning in a daemon's log is
listed under "anomalies" and makes the exit code 1.

As root, the script re-executes itself under ``unshare --mount --propagation private``: its
mounts stay invisible to other processes, so a mount namespace that some other program
creates meanwhile (``ip netns exec`` copies every mount) cannot keep a FUSE session alive
after ``fusermount3 -u`` (--shared-mounts turns this off).  A daemon that still does not
exit is ended by pid and the step is reported as failed.

MiB = 2**20 bytes (seq, RSS); MB = 10**6 bytes (scrub, restore).  Run as root (dropping
caches needs it; without it the numbers are marked warm) from the repository root:

    python benchmarks/run.py                 # defaults, several minutes
    python benchmarks/run.py --smoke         # tiny sizes, 1 rep, well under a minute

It prints the machine, the command line and the table, and writes everything (every rep)
to benchmarks/results/run.json (or --output).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import random
import re
import shlex
import shutil
import signal
import stat
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
import workload  # noqa: E402  (tests/workload.py: the lightningd-style SQLite commit loop)

DEFAULT_OUTPUT = REPO / "benchmarks" / "results" / "run.json"
MOUNT = [sys.executable, str(REPO / "mount_lnmirror")]
LNMIRROR = [sys.executable, "-m", "lnmirrorfs"]
MIB = 1 << 20
PAGE = 4096
PASSWORD = "benchmark-password"
NS_MARK = "LNMIRROR_BENCH_PRIVATE_NS"
UNMOUNT_TIMEOUT = 300.0  # a daemon flushes and snapshots on unmount: allow for a slow disk

FULL = {"commits": 500, "iops_ops": 1000, "iops_file_mib": 16, "seq_mib": 512, "randread_ops": 2000,
        "rss_mib": 2048, "reps": 3}
SMOKE = {"commits": 20, "iops_ops": 50, "iops_file_mib": 16, "seq_mib": 8, "randread_ops": 50,
         "rss_mib": 16, "reps": 1}
MEASUREMENTS = ("commit_delete", "commit_wal", "iops_4k_fdatasync", "seq_write", "seq_read",
                "rand_read_4k", "scrub", "restore", "daemon_rss")
# (measurement, metric, unit, label, higher is better) -- the rows of the printed table
ROWS = (
    ("commit_delete", "commits_per_s", "commits/s", "SQLite commit, rollback journal", True),
    ("commit_delete", "p50_ms", "ms", "  commit latency p50", False),
    ("commit_delete", "p99_ms", "ms", "  commit latency p99", False),
    ("commit_wal", "commits_per_s", "commits/s", "SQLite commit, WAL", True),
    ("commit_wal", "p50_ms", "ms", "  commit latency p50", False),
    ("commit_wal", "p99_ms", "ms", "  commit latency p99", False),
    ("iops_4k_fdatasync", "iops", "IOPS", "4K pwrite+fdatasync", True),
    ("iops_4k_fdatasync", "p50_ms", "ms", "  latency p50", False),
    ("iops_4k_fdatasync", "p99_ms", "ms", "  latency p99", False),
    ("seq_write", "mib_per_s", "MiB/s", "seq write + fsync", True),
    ("seq_read", "mib_per_s", "MiB/s", "seq read, cold", True),
    ("rand_read_4k", "iops", "IOPS", "4K random read, cold", True),
    ("rand_read_4k", "p50_ms", "ms", "  latency p50", False),
    ("scrub", "mb_per_s", "MB/s", "scrub (plain: cold read)", True),
    ("scrub", "space_amplification", "x", "  disk bytes / logical bytes", False),
    ("restore", "mb_per_s", "MB/s", "restore (plain: copy+fsync)", True),
    ("daemon_rss", "peak_rss_mib", "MiB", "daemon peak RSS (VmHWM)", False),
)

ANOMALIES: list[str] = []


def anomaly(target: str, message: str) -> None:
    line = f"{target}: {message}"
    ANOMALIES.append(line)
    print(f"  ! {line}", flush=True)


# ---------------------------------------------------------------- helpers

def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    s = sorted(values)
    if not s:
        return float("nan")
    pos = (len(s) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def latency_stats(latencies: list[float]) -> dict:
    return {"p50_ms": percentile(latencies, 50) * 1e3, "p99_ms": percentile(latencies, 99) * 1e3,
            "max_ms": max(latencies) * 1e3, "mean_ms": statistics.fmean(latencies) * 1e3}


def is_mounted(path: Path) -> bool:
    target = os.path.realpath(path)
    with open("/proc/mounts") as f:
        return any(line.split()[1] == target for line in f)


def mounts_below(root: Path) -> list[str]:
    prefix = os.path.realpath(root) + "/"
    with open("/proc/mounts") as f:
        return [line.split()[1] for line in f if line.split()[1].startswith(prefix)]


def mount_holders(path: Path) -> list[str]:
    """Processes in other mount namespaces that still have `path` mounted (one per namespace)."""
    target = os.path.realpath(path)
    own = os.readlink("/proc/self/ns/mnt")
    found: dict[str, str] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            ns = os.readlink(f"/proc/{entry}/ns/mnt")
            if ns == own or ns in found:
                continue
            with open(f"/proc/{entry}/mountinfo") as f:
                if any(line.split()[4] == target for line in f):
                    with open(f"/proc/{entry}/cmdline", "rb") as c:
                        cmd = c.read().replace(b"\0", b" ").decode(errors="replace").strip()
                    found[ns] = f"pid {entry} ({cmd[:80]}) in {ns}"
        except OSError:
            continue
    return list(found.values())


CACHE_NOTE: list[str] = []


def drop_caches() -> bool:
    """sync, then drop the page cache, dentries and inodes; False if not allowed."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError as exc:
        if not CACHE_NOTE:
            CACHE_NOTE.append(f"cannot drop caches ({exc.strerror}): cold numbers are warm")
            print(f"  ! {CACHE_NOTE[0]}", flush=True)
        return False


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM ... of a process in KiB."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("Vm"):
                name, value = line.split(":", 1)
                out[name] = int(value.split()[0])
    return out


def tree_bytes(root: Path) -> tuple[int, int]:
    """(logical bytes of regular files, counting each inode once; number of files)."""
    seen = set()
    total = files = 0
    for dirpath, _, names in os.walk(root):
        for name in names:
            st = os.lstat(os.path.join(dirpath, name))
            if stat.S_ISREG(st.st_mode) and (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_size
                files += 1
    return total, files


def disk_bytes(root: Path) -> int:
    """Allocated bytes (st_blocks) below root, like du."""
    total = 0
    for dirpath, _, names in os.walk(root):
        for name in names:
            total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
    return total


def file_digest(path: Path) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while chunk := f.read(MIB):
            h.update(chunk)
    return h.hexdigest()


class Pattern:
    """The content of every big file: a random MiB, its first 8 bytes the chunk number."""

    def __init__(self) -> None:
        self.base = bytearray(os.urandom(MIB))
        self.buf = bytearray(self.base)

    def chunk(self, index: int) -> bytearray:
        self.buf[:8] = index.to_bytes(8, "little")
        return self.buf

    def expected(self, offset: int, length: int) -> bytes:
        out = bytearray()
        while length:
            index, within = divmod(offset, MIB)
            take = min(length, MIB - within)
            out += bytes(self.chunk(index)[within:within + take])
            offset += take
            length -= take
        return bytes(out)

    def digest(self, mib: int) -> str:
        h = hashlib.blake2b(digest_size=16)
        for i in range(mib):
            h.update(self.chunk(i))
        return h.hexdigest()


def run_cmd(args: list[str], env: dict, timeout: float = 3600) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, env=env, cwd=REPO, timeout=timeout)


# ---------------------------------------------------------------- targets

class Target:
    """Where the benchmarks write: `workdir`; FUSE targets also mount and unmount."""

    name = ""
    fuse = False

    def __init__(self, root: Path, env: dict) -> None:
        self.root = root
        self.env = env
        self.proc: subprocess.Popen | None = None
        self.mountpoint = root / "mnt"
        self.mounts = 0
        self.log_path = root / "daemon.log"
        self.log_offset = 0

    @property
    def workdir(self) -> Path:
        return self.mountpoint

    def describe(self) -> str:
        return self.name

    def setup(self) -> None:
        raise NotImplementedError

    def mount_command(self) -> list[str]:
        raise NotImplementedError

    def daemon_pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.proc.poll() is None else None

    def mount(self, timeout: float = 60.0) -> None:
        self.mountpoint.mkdir(exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.mount_command(), stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, cwd=REPO, env=self.env)
        self.mounts += 1
        deadline = time.monotonic() + timeout
        while not is_mounted(self.mountpoint):
            if self.proc.poll() is not None:
                code, self.proc = self.proc.returncode, None
                raise RuntimeError(f"mount daemon exited {code}: {self.log_tail()}")
            if time.monotonic() > deadline:
                self.end_daemon()
                raise RuntimeError(f"mount did not come up in {timeout:g}s: {self.log_tail()}")
            time.sleep(0.02)

    def unmount(self, timeout: float = UNMOUNT_TIMEOUT) -> None:
        """fusermount3 -u, then wait for the daemon to flush and exit.

        A daemon that does not exit is ended by pid (so the next step can mount again) and
        the step fails; if the mount was copied into another mount namespace (a process
        that unshared one while we were mounted) the kernel never ends the FUSE session,
        and the error names that process."""
        if self.proc is None:
            return
        for _ in range(50):
            if not is_mounted(self.mountpoint):
                break
            done = subprocess.run(["fusermount3", "-u", str(self.mountpoint)], capture_output=True,
                                  text=True)
            if done.returncode == 0:
                break
            time.sleep(0.1)  # EBUSY right after a close: try again
        else:
            raise RuntimeError(f"fusermount3 -u {self.mountpoint} keeps failing: {done.stderr.strip()}")
        deadline = time.monotonic() + timeout
        holders: list[str] = []
        try:
            while self.proc.poll() is None:
                waited = timeout - (deadline - time.monotonic())
                if waited > 10 and not holders:
                    holders = mount_holders(self.mountpoint)
                if time.monotonic() > deadline or (holders and waited > 20):
                    pid = self.proc.pid
                    self.end_daemon()
                    why = (f"the mount lives on in other mount namespaces: {'; '.join(holders)}"
                           if holders else "")
                    raise RuntimeError(f"daemon {pid} did not exit {waited:.0f}s after unmount "
                                       f"(ended by pid) {why}".strip())
                time.sleep(0.05)
        finally:
            self.check_log()
        code = self.proc.returncode
        self.proc = None
        if code != 0:
            anomaly(self.name, f"mount daemon exited {code} after unmount: {self.log_tail()}")

    def end_daemon(self) -> None:
        """SIGTERM (the daemons unmount and exit on it), then SIGKILL; clear a dead mount."""
        if self.proc is not None and self.proc.poll() is None:
            for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
                try:
                    os.kill(self.proc.pid, sig)
                    self.proc.wait(wait)
                    break
                except (subprocess.TimeoutExpired, ProcessLookupError):
                    continue
        self.proc = None
        self.force_unmount()

    def cold(self) -> bool:
        """Nothing of the data in any cache: unmount, drop caches, mount again."""
        self.unmount()
        dropped = drop_caches()
        self.mount()
        return dropped

    def ensure_mounted(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            anomaly(self.name, f"mount daemon died (exit {self.proc.returncode}): {self.log_tail()}")
            self.proc = None
            self.force_unmount()
        elif self.proc is not None and not is_mounted(self.mountpoint):
            anomaly(self.name, f"daemon {self.proc.pid} is alive but {self.mountpoint} is not mounted")
            self.end_daemon()
        if self.proc is None:
            self.mount()

    def force_unmount(self) -> None:
        for args in (["fusermount3", "-u"], ["fusermount3", "-uz"]):
            if is_mounted(self.mountpoint):
                subprocess.run(args + [str(self.mountpoint)], capture_output=True)

    def close(self) -> None:
        """For finally: unmount, end our daemon by pid if it is still alive, clear the mount."""
        if self.proc is not None:
            try:
                self.unmount(timeout=60)
            except Exception as exc:  # noqa: BLE001 - cleanup goes on whatever happened
                print(f"  ! {self.name}: unmount failed during cleanup: {exc}", file=sys.stderr)
        self.end_daemon()

    def log_tail(self, lines: int = 5) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return " | ".join(text.strip().splitlines()[-lines:])

    def check_log(self) -> None:
        """Report what the daemon logged at warning level or worse since the last look."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self.log_offset)
                text = f.read().decode(errors="replace")
                self.log_offset = f.tell()
        except OSError:
            return
        for line in text.splitlines():
            if re.search(r"\b(WARNING|ERROR|CRITICAL)\b|Traceback|panic", line):
                anomaly(self.name, f"daemon log: {line.strip()}")

    # offline work on the unmounted target (scrub, restore); see the measurements
    def scrub(self) -> dict:
        raise NotImplementedError

    def restore(self, dest: Path) -> dict:
        raise NotImplementedError


class Plain(Target):
    name = "plain"

    @property
    def workdir(self) -> Path:
        return self.root / "data"

    def describe(self) -> str:
        return "plain directory (physical limit)"

    def setup(self) -> None:
        self.workdir.mkdir(parents=True)

    def mount(self, timeout: float = 60.0) -> None:
        pass

    def unmount(self, timeout: float = UNMOUNT_TIMEOUT) -> None:
        pass

    def cold(self) -> bool:
        return drop_caches()

    def ensure_mounted(self) -> None:
        pass

    def close(self) -> None:
        pass

    def scrub(self) -> dict:
        """Reading every byte cold is the least that verifying the data can cost."""
        count = 0
        for dirpath, _, names in os.walk(self.workdir):
            for name in names:
                path = os.path.join(dirpath, name)
                if stat.S_ISREG(os.lstat(path).st_mode):
                    with open(path, "rb", buffering=0) as f:
                        while chunk := f.read(MIB):
                            count += len(chunk)
        return {"method": "cold read of every file", "bytes_read": count}

    def restore(self, dest: Path) -> dict:
        return copy_tree_fsync(self.workdir, dest)


class Lnmirror(Target):
    fuse = True

    def __init__(self, root: Path, env: dict, n: int, k: int) -> None:
        super().__init__(root, env)
        self.n, self.k = n, k
        self.name = f"lnmirror-{n}"
        self.replicas = [root / f"replica{i}" for i in range(n)]
        self.key = root / "key"

    def describe(self) -> str:
        return f"lnmirrorfs n={self.n} k={self.k}"

    def replica_args(self) -> list[str]:
        args = []
        for r in self.replicas:
            args += ["--replica", str(r)]
        return args + ["--key-file", str(self.key)]

    def setup(self) -> None:
        for r in self.replicas:
            r.mkdir(parents=True)
        done = run_cmd(LNMIRROR + ["init", "-k", str(self.k)] + self.replica_args(), self.env, 120)
        if done.returncode != 0:
            raise RuntimeError(f"lnmirror init failed: {done.stdout}{done.stderr}")
        self.mount()

    def mount_command(self) -> list[str]:
        return MOUNT + [str(self.mountpoint), "-f"] + self.replica_args()

    def scrub(self) -> dict:
        done = run_cmd(LNMIRROR + ["scrub", "--json"] + self.replica_args(), self.env)
        try:
            report = json.loads(done.stdout)
        except ValueError:
            raise RuntimeError(f"lnmirror scrub exit {done.returncode}: {done.stdout}{done.stderr}") \
                from None
        if done.returncode != 0 or report.get("result") != "clean":
            anomaly(self.name, f"lnmirror scrub exit {done.returncode}, result {report.get('result')}: "
                               f"{json.dumps(report)[:400]}")
        return {"method": "lnmirror scrub (offline)", "exit": done.returncode,
                "result": report.get("result"), "blocks": report.get("blocks"),
                "shares_checked": report.get("shares_checked"), "bytes_read": report.get("bytes_read"),
                "scrub_reported_seconds": report.get("seconds")}

    def restore(self, dest: Path) -> dict:
        done = run_cmd(LNMIRROR + ["restore"] + self.replica_args() + [str(dest)], self.env)
        if done.returncode != 0:
            raise RuntimeError(f"lnmirror restore exit {done.returncode}: {done.stdout}{done.stderr}")
        m = re.search(r"(\d+) bytes", done.stdout)
        return {"method": "lnmirror restore", "reported_bytes": int(m[1]) if m else None,
                "output": done.stdout.strip()}


class Gocryptfs(Target):
    name = "gocryptfs"
    fuse = True

    def __init__(self, root: Path, env: dict) -> None:
        super().__init__(root, env)
        self.cipher = root / "cipher"

    def describe(self) -> str:
        return "gocryptfs (1 dir)"

    def extpass(self) -> list[str]:
        return ["-extpass", f"echo {PASSWORD}"]

    def setup(self) -> None:
        self.cipher.mkdir(parents=True)
        done = run_cmd(["gocryptfs", "-init", "-q"] + self.extpass() + [str(self.cipher)], self.env, 120)
        if done.returncode != 0:
            raise RuntimeError(f"gocryptfs -init failed: {done.stdout}{done.stderr}")
        self.mount()

    def mount_command(self) -> list[str]:
        return ["gocryptfs", "-f", "-q"] + self.extpass() + [str(self.cipher), str(self.mountpoint)]

    def check_log(self) -> None:
        pass  # gocryptfs logs to syslog; its exit code is checked

    def scrub(self) -> dict:
        done = run_cmd(["gocryptfs", "-fsck", "-q"] + self.extpass() + [str(self.cipher)], self.env)
        if done.returncode != 0:
            anomaly(self.name, f"gocryptfs -fsck exit {done.returncode}: {done.stdout}{done.stderr}")
        return {"method": "gocryptfs -fsck (offline)", "exit": done.returncode}

    def restore(self, dest: Path) -> dict:
        self.mount()
        try:
            return copy_tree_fsync(self.mountpoint, dest)
        finally:
            self.unmount()


def copy_tree_fsync(src: Path, dest: Path) -> dict:
    """What restore does, as a plain copy: files, directories, symlinks; fsync every file."""
    files = total = 0
    for dirpath, _, names in os.walk(src):
        rel = os.path.relpath(dirpath, src)
        out = dest / rel if rel != "." else dest
        out.mkdir(parents=True, exist_ok=True)
        for name in names:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                os.symlink(os.readlink(path), out / name)
            elif stat.S_ISREG(st.st_mode):
                with open(path, "rb", buffering=0) as fin:
                    fd = os.open(out / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                    try:
                        while chunk := fin.read(MIB):
                            os.write(fd, chunk)
                            total += len(chunk)
                        os.fsync(fd)
                    finally:
                        os.close(fd)
                files += 1
    return {"method": "copy with fsync per file", "files": files, "bytes_copied": total}


# ---------------------------------------------------------------- measurements

def measure_commits(target: Target, rep: int, params: dict, journal_mode: str) -> dict:
    """workload.run() itself, with its commit_once timed call by call: the loop, its side
    effects and their order stay exactly the workload's."""
    directory = target.workdir / f"commit-{journal_mode}-{rep}"
    directory.mkdir()
    commits = params["commits"]
    latencies: list[float] = []
    first: list[float] = []
    commit_once = workload.commit_once

    def timed_commit(db, number: int) -> None:
        t0 = time.perf_counter()
        if not first:
            first.append(t0)  # open_db's table setup is not part of the loop
        commit_once(db, number)
        latencies.append(time.perf_counter() - t0)

    workload.commit_once = timed_commit
    try:
        last = workload.run(str(directory), commits, journal_mode)
        elapsed = time.perf_counter() - first[0]
    finally:
        workload.commit_once = commit_once
    found = workload.check_db(str(directory))
    if found != commits or last != commits or len(latencies) != commits:
        anomaly(target.name, f"{journal_mode}: {len(latencies)} commits timed, run() returned {last}, "
                             f"the database holds {found}; expected {commits}")
    return {"commits": commits, "seconds": elapsed, "commits_per_s": commits / elapsed,
            **latency_stats(latencies)}


def measure_iops(target: Target, rep: int, params: dict, pattern: Pattern) -> dict:
    path = target.workdir / f"iops-{rep}"
    blocks = params["iops_file_mib"] * MIB // PAGE
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for i in range(params["iops_file_mib"]):
            os.write(fd, pattern.chunk(i))
        os.fsync(fd)
        rng = random.Random(rep)
        ops = params["iops_ops"]
        offsets = [rng.randrange(blocks) * PAGE for _ in range(ops)]
        payloads = [rng.randbytes(PAGE) for _ in range(min(ops, 64))]
        latencies = []
        started = time.perf_counter()
        for i, offset in enumerate(offsets):
            t0 = time.perf_counter()
            os.pwrite(fd, payloads[i % len(payloads)], offset)
            os.fdatasync(fd)
            latencies.append(time.perf_counter() - t0)
        elapsed = time.perf_counter() - started
        last = {offset: payloads[i % len(payloads)] for i, offset in enumerate(offsets)}
        bad = sum(1 for offset, data in last.items() if os.pread(fd, PAGE, offset) != data)
        if bad:
            anomaly(target.name, f"iops: {bad} of {len(last)} written 4K blocks read back wrong")
    finally:
        os.close(fd)
    if rep < params["reps"] - 1:
        path.unlink()
    return {"ops": ops, "seconds": elapsed, "iops": ops / elapsed, **latency_stats(latencies)}


def measure_seq(target: Target, rep: int, params: dict, pattern: Pattern) -> tuple[dict, dict, dict]:
    """Sequential write, cold sequential read, cold random 4K reads of one file."""
    mib = params["seq_mib"]
    path = target.workdir / f"seq-{rep}"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        started = time.perf_counter()
        for i in range(mib):
            os.write(fd, pattern.chunk(i))
        os.fsync(fd)
        elapsed = time.perf_counter() - started
    finally:
        os.close(fd)
    write = {"mib": mib, "seconds": elapsed, "mib_per_s": mib / elapsed}

    cold = target.cold()
    fd = os.open(target.workdir / path.name, os.O_RDONLY)
    try:
        got = index = bad = 0
        started = time.perf_counter()
        while chunk := os.read(fd, MIB):
            if len(chunk) == MIB and int.from_bytes(chunk[:8], "little") != index:
                bad += 1
            got += len(chunk)
            index += 1
        elapsed = time.perf_counter() - started
    finally:
        os.close(fd)
    if got != mib * MIB or bad:
        anomaly(target.name, f"seq read: {got} bytes (expected {mib * MIB}), {bad} chunks misplaced")
    read = {"mib": got / MIB, "seconds": elapsed, "mib_per_s": got / MIB / elapsed, "cold": cold}

    cold = target.cold()
    rng = random.Random(1000 + rep)
    ops = params["randread_ops"]
    offsets = [rng.randrange(mib * MIB // PAGE) * PAGE for _ in range(ops)]
    fd = os.open(target.workdir / path.name, os.O_RDONLY)
    latencies = []
    bad = 0
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        started = time.perf_counter()
        for offset in offsets:
            t0 = time.perf_counter()
            data = os.pread(fd, PAGE, offset)
            latencies.append(time.perf_counter() - t0)
            if data != pattern.expected(offset, PAGE):  # checked outside the timed call
                bad += 1
        elapsed = time.perf_counter() - started
    finally:
        os.close(fd)
    if bad:
        anomaly(target.name, f"random read: {bad} of {ops} 4K reads returned wrong data")
    busy = sum(latencies)
    rand = {"ops": ops, "seconds": busy, "loop_seconds": elapsed, "iops": ops / busy, "cold": cold,
            **latency_stats(latencies)}
    if rep < params["reps"] - 1:
        (target.workdir / path.name).unlink()
    return write, read, rand


def measure_rss(target: Target, rep: int, params: dict, pattern: Pattern) -> dict:
    target.unmount()
    target.mount()  # a fresh daemon: its high-water mark covers this write only
    pid = target.daemon_pid()
    baseline = proc_status(pid)
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5\n")  # resets VmHWM to the current RSS
    except OSError:
        pass
    samples: list[int] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            try:
                samples.append(proc_status(pid)["VmRSS"])
            except (OSError, KeyError):
                return
            stop.wait(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    path = target.workdir / f"rss-{rep}"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        started = time.perf_counter()
        for i in range(params["rss_mib"]):
            os.write(fd, pattern.chunk(i))
        os.fsync(fd)
        elapsed = time.perf_counter() - started
    finally:
        os.close(fd)
        stop.set()
        sampler.join()
    after = proc_status(pid)
    path.unlink()
    time.sleep(0.2)
    after_unlink = proc_status(pid)["VmRSS"]
    return {"mib_written": params["rss_mib"], "seconds": elapsed,
            "write_mib_per_s": params["rss_mib"] / elapsed,
            "peak_rss_mib": after["VmHWM"] / 1024, "baseline_rss_mib": baseline["VmRSS"] / 1024,
            "sampled_peak_rss_mib": max(samples, default=0) / 1024,
            "rss_after_fsync_mib": after["VmRSS"] / 1024, "rss_after_unlink_mib": after_unlink / 1024}


def measure_offline(target: Target, reps: int, seq_digest: tuple[str, str] | None) -> tuple[list, list]:
    """Scrub and restore the unmounted target, `reps` times each, from cold caches."""
    if target.fuse and not is_mounted(target.mountpoint):
        raise RuntimeError(f"{target.mountpoint} is not mounted: cannot count the volume's bytes")
    logical, files = tree_bytes(target.workdir)
    target.unmount()
    on_disk = disk_bytes(target.root if target.fuse else target.workdir)
    scrubs, restores = [], []
    for _ in range(reps):
        cold = drop_caches()
        started = time.perf_counter()
        info = target.scrub()
        elapsed = time.perf_counter() - started
        scrubs.append({"logical_bytes": logical, "files": files, "disk_bytes": on_disk,
                       "space_amplification": on_disk / logical if logical else None,
                       "seconds": elapsed, "mb_per_s": logical / elapsed / 1e6, "cold": cold, **info})
    for rep in range(reps):
        dest = target.root / f"restored-{rep}"
        cold = drop_caches()
        started = time.perf_counter()
        info = target.restore(dest)
        elapsed = time.perf_counter() - started
        restored, _ = tree_bytes(dest)
        if restored != logical:
            anomaly(target.name, f"restore wrote {restored} bytes of {logical}")
        if seq_digest is not None:
            name, digest = seq_digest
            if file_digest(dest / name) != digest:
                anomaly(target.name, f"restored {name} differs from what was written")
        restores.append({"logical_bytes": logical, "restored_bytes": restored, "seconds": elapsed,
                         "mb_per_s": logical / elapsed / 1e6, "cold": cold, **info})
        shutil.rmtree(dest)
    return scrubs, restores


def run_target(target: Target, params: dict, pattern: Pattern) -> dict:
    """Every measurement on one target: {measurement: {"reps": [...]}} or {"error": ...}."""
    reps = params["reps"]
    results: dict[str, dict] = {m: {"reps": []} for m in MEASUREMENTS}

    def attempt(names: tuple[str, ...], fn) -> None:
        try:
            target.ensure_mounted()
            out = fn()
            for name, value in zip(names, out if isinstance(out, tuple) else (out,), strict=True):
                # a dict is one rep; a list holds every rep (scrub and restore run theirs together)
                results[name]["reps"].extend(value if isinstance(value, list) else [value])
        except Exception as exc:  # noqa: BLE001 - one failed step must not end the run
            message = f"{type(exc).__name__}: {exc}"
            anomaly(target.name, f"{'/'.join(names)} failed: {message}")
            for name in names:
                results[name].setdefault("errors", []).append(message)

    for mode in ("delete", "wal"):
        step(target, f"SQLite commit loop, journal_mode={mode}")
        for rep in range(reps):
            attempt((f"commit_{mode}",),
                    lambda rep=rep, mode=mode: measure_commits(target, rep, params, mode))
    step(target, "4K pwrite+fdatasync")
    for rep in range(reps):
        attempt(("iops_4k_fdatasync",), lambda rep=rep: measure_iops(target, rep, params, pattern))
    step(target, "sequential write, cold sequential read, cold random 4K read")
    for rep in range(reps):
        attempt(("seq_write", "seq_read", "rand_read_4k"),
                lambda rep=rep: measure_seq(target, rep, params, pattern))
    if target.fuse:
        step(target, f"daemon RSS while writing {params['rss_mib']} MiB")
        for rep in range(reps):
            attempt(("daemon_rss",), lambda rep=rep: measure_rss(target, rep, params, pattern))
    else:
        results["daemon_rss"] = {"not_applicable": "no daemon: the kernel serves a plain directory"}
    step(target, "scrub and restore")
    seq_name = f"seq-{reps - 1}"
    seq_digest = (seq_name, pattern.digest(params["seq_mib"])) \
        if (target.workdir / seq_name).exists() else None
    attempt(("scrub", "restore"), lambda: measure_offline(target, reps, seq_digest))
    for body in results.values():
        if body.get("reps"):
            body["median"] = medians(body["reps"])
    return results


def step(target: Target, what: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {target.name}: {what}", flush=True)


def medians(reps: list[dict]) -> dict:
    keys = [k for k, v in reps[0].items() if isinstance(v, int | float) and not isinstance(v, bool)]
    return {k: statistics.median(r[k] for r in reps if isinstance(r.get(k), int | float)) for k in keys
            if all(isinstance(r.get(k), int | float) for r in reps)}


# ---------------------------------------------------------------- report

def machine_info(scratch: Path) -> dict:
    mem_kib = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    df = subprocess.run(["df", "-T", str(scratch)], capture_output=True, text=True).stdout.strip()
    fields = df.splitlines()[-1].split() if df else []
    git = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty"],
                         capture_output=True, text=True).stdout.strip()
    gocryptfs = shutil.which("gocryptfs")
    return {
        "nproc": os.cpu_count(), "cpu": cpu, "mem_total_gib": round(mem_kib / 2**20, 1),
        "kernel": platform.release(), "python": sys.version.split()[0],
        "scratch": str(scratch), "scratch_device": fields[0] if fields else None,
        "scratch_fstype": fields[1] if len(fields) > 1 else None, "df_T": df,
        "git": git or None, "lnmirrorfs_source_digest": source_digest(), "loadavg_at_start": loadavg(),
        "gocryptfs": subprocess.run([gocryptfs, "-version"], capture_output=True, text=True)
        .stdout.strip() if gocryptfs else None,
    }


def source_digest() -> str:
    """Of lnmirrorfs/*.py: every mount starts a new daemon, so edits during a run would mix versions."""
    h = hashlib.blake2b(digest_size=8)
    for path in sorted((REPO / "lnmirrorfs").glob("*.py")):
        h.update(path.name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def format_value(value: float) -> str:
    """Three significant digits, never exponent notation."""
    for limit, digits in ((100, 0), (10, 1), (1, 2)):
        if abs(value) >= limit:
            return f"{value:.{digits}f}"
    return f"{value:.3f}"


def format_table(report: dict) -> str:
    targets = report["targets"]
    names = list(targets)
    plain = targets.get("plain", {}).get("measurements", {})
    width = 22
    head = f"{'measurement':<34}{'unit':<10}" + "".join(f"{n:>{width}}" for n in names)
    lines = [head, "-" * len(head)]
    for measurement, metric, unit, label, _ in ROWS:
        cells = []
        for name in names:
            t = targets[name]
            body = t.get("measurements", {}).get(measurement, {})
            if t.get("skipped"):
                cells.append("skipped")
            elif "median" in body and metric in body["median"]:
                value = body["median"][metric]
                text = format_value(value)
                base = plain.get(measurement, {}).get("median", {}).get(metric)
                if name != "plain" and base:
                    text += f" ({value / base:.2f}x)"
                cells.append(text)
            elif "errors" in body:
                cells.append("FAILED")
            else:
                cells.append("-")
        lines.append(f"{label:<34}{unit:<10}" + "".join(f"{c:>{width}}" for c in cells))
    lines.append("-" * len(head))
    lines.append(f"median of {report['params']['reps']} rep(s); (Nx) = ratio to the plain directory's "
                 "median; for ms and RSS lower is better")
    for name in names:
        t = targets[name]
        if t.get("skipped"):
            lines.append(f"{name}: skipped: {t['skipped']}")
        else:
            lines.append(f"{name}: {t['description']}")
    return "\n".join(lines)


def add_ratios(report: dict) -> None:
    plain = report["targets"].get("plain", {}).get("measurements", {})
    for name, t in report["targets"].items():
        if name == "plain":
            continue
        for measurement, body in t.get("measurements", {}).items():
            base = plain.get(measurement, {}).get("median", {})
            if "median" in body and base:
                body["ratio_vs_plain"] = {k: v / base[k] for k, v in body["median"].items()
                                          if base.get(k)}


# ---------------------------------------------------------------- main

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true",
                   help="tiny sizes and 1 rep: " + ", ".join(f"{k}={v}" for k, v in SMOKE.items()))
    p.add_argument("--reps", type=int, help=f"repetitions per measurement (default {FULL['reps']})")
    p.add_argument("--commits", type=int, help=f"commits per SQLite loop (default {FULL['commits']})")
    p.add_argument("--iops-ops", type=int, help=f"4K pwrite+fdatasync ops (default {FULL['iops_ops']})")
    p.add_argument("--iops-file-mib", type=int,
                   help=f"size of the preallocated 4K-write file (default {FULL['iops_file_mib']})")
    p.add_argument("--seq-mib", type=int, help=f"sequential file size (default {FULL['seq_mib']})")
    p.add_argument("--randread-ops", type=int,
                   help=f"cold 4K random reads (default {FULL['randread_ops']})")
    p.add_argument("--rss-mib", type=int,
                   help=f"file written while watching daemon RSS (default {FULL['rss_mib']})")
    p.add_argument("--targets", default="plain,lnmirror-2,lnmirror-3,gocryptfs",
                   help="comma-separated subset of plain,lnmirror-2,lnmirror-3,gocryptfs")
    p.add_argument("--dir", type=Path, default=Path("/var/tmp"),
                   help="the scratch directory is made (and removed) inside this one (default /var/tmp)")
    p.add_argument("--keep", action="store_true", help="keep the scratch directory (debugging)")
    p.add_argument("--shared-mounts", action="store_true",
                   help="mount in the host's mount namespace (default: a private one when root)")
    p.add_argument("--output", type=Path, default=DEFAULT_OUTPUT,
                   help=f"JSON results file (default {DEFAULT_OUTPUT})")
    args = p.parse_args(argv)
    profile = SMOKE if args.smoke else FULL
    args.params = {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in profile.items()}
    for k, v in args.params.items():
        if v < 1:
            p.error(f"--{k.replace('_', '-')} must be at least 1")
    args.target_names = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = set(args.target_names) - {"plain", "lnmirror-2", "lnmirror-3", "gocryptfs"}
    if unknown:
        p.error(f"unknown targets: {', '.join(sorted(unknown))}")
    return args


def make_target(name: str, scratch: Path, env: dict) -> Target:
    root = scratch / name
    if name == "plain":
        return Plain(root, env)
    if name == "lnmirror-2":
        return Lnmirror(root, env, 2, 1)
    if name == "lnmirror-3":
        return Lnmirror(root, env, 3, 2)
    return Gocryptfs(root, env)


def private_mount_namespace(args: argparse.Namespace, argv: list[str] | None) -> str:
    """Run in a mount namespace of our own (re-executing under unshare(1)), so no other process
    gets copies of our mounts: a namespace some other program creates while we are mounted
    would otherwise keep the FUSE session alive after fusermount3 -u, and the daemon with it."""
    if os.environ.get(NS_MARK) == str(os.getpid()):
        return "private (unshare --mount --propagation private)"
    if args.shared_mounts:
        return "the host's (--shared-mounts)"
    if argv is not None or os.geteuid() != 0 or not shutil.which("unshare"):
        return "the host's (a private one needs root, unshare(1) and running as a script)"
    probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "true"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        return f"the host's (unshare failed: {probe.stderr.strip()})"
    sys.stdout.flush()
    os.environ[NS_MARK] = str(os.getpid())  # unshare(1) execs in place: the pid stays ours
    os.execvp("unshare", ["unshare", "--mount", "--propagation", "private", sys.executable] + sys.argv)
    raise AssertionError("not reached")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    namespace = private_mount_namespace(args, argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the finally blocks run
    args.dir.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="lnmirror-bench-", dir=args.dir)).resolve()
    env = dict(os.environ, LNMIRROR_KEYDIR=str(scratch / "keys"), LNMIRROR_RUNDIR=str(scratch / "run"),
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    command = shlex.join([sys.executable] + (sys.argv if argv is None else [sys.argv[0]] + argv))
    started_wall, started = time.time(), time.perf_counter()
    machine = machine_info(scratch)
    machine["mount_namespace"] = namespace
    print(f"command: {command}")
    print(f"machine: nproc={machine['nproc']} ({machine['cpu']}), memory={machine['mem_total_gib']} GiB, "
          f"kernel={machine['kernel']}, python={machine['python']}, repo={machine['git']} "
          f"(lnmirrorfs source {machine['lnmirrorfs_source_digest']})")
    print(f"scratch: {scratch}, filesystem {machine['scratch_fstype']} on {machine['scratch_device']} "
          "(df -T):")
    print("  " + machine["df_T"].replace("\n", "\n  "))
    print(f"mount namespace: {namespace}")
    print(f"load average at start: {machine['loadavg_at_start']} (other work on this machine skews numbers)")
    print("params: " + ", ".join(f"{k}={v}" for k, v in args.params.items()), flush=True)

    pattern = Pattern()
    report: dict = {"benchmark": "run", "command": command, "started_unix": started_wall,
                    "machine": machine, "params": args.params, "targets": {}}
    targets: list[Target] = []
    try:
        for name in args.target_names:
            if name == "gocryptfs" and not shutil.which("gocryptfs"):
                note = "gocryptfs is not installed (Debian: apt-get install gocryptfs)"
                print(f"{name}: skipped: {note}", flush=True)
                report["targets"][name] = {"skipped": note}
                continue
            target = make_target(name, scratch, env)
            targets.append(target)
            entry = {"description": target.describe()}
            report["targets"][name] = entry
            try:
                step(target, "setup")
                target.setup()
                entry["measurements"] = run_target(target, args.params, pattern)
                entry["mounts"] = target.mounts
            except Exception as exc:  # noqa: BLE001 - report, go on with the next target
                anomaly(name, f"setup failed: {type(exc).__name__}: {exc}")
                entry["error"] = f"{type(exc).__name__}: {exc}"
            finally:
                target.close()
                target.check_log()
                if not args.keep:
                    shutil.rmtree(target.root, ignore_errors=True)  # free the disk for the next
    finally:
        for target in targets:
            target.close()
        left = mounts_below(scratch)
        if left:
            print(f"! mounts still present, not removing {scratch}: {left}", file=sys.stderr)
        elif not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)

    add_ratios(report)
    report["duration_s"] = time.perf_counter() - started
    report["loadavg_at_end"] = loadavg()
    report["lnmirrorfs_source_changed_during_run"] = source_digest() != machine["lnmirrorfs_source_digest"]
    report["cold_cache_note"] = CACHE_NOTE[0] if CACHE_NOTE else "caches dropped before every cold step"
    report["anomalies"] = ANOMALIES
    print()
    print(format_table(report))
    if ANOMALIES:
        print(f"\nanomalies ({len(ANOMALIES)}):")
        for line in ANOMALIES:
            print(f"  {line}")
    if CACHE_NOTE:
        print(f"note: {CACHE_NOTE[0]}")
    if report["lnmirrorfs_source_changed_during_run"]:
        print("note: lnmirrorfs/*.py changed during the run: later mounts ran other code than earlier ones")
    print(f"\ntotal time {report['duration_s']:.1f}s; load average at end {report['loadavg_at_end']}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.output}")
    return 1 if ANOMALIES else 0


if __name__ == "__main__":
    sys.exit(main())
