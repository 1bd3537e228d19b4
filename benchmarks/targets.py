"""The targets of the end-to-end benchmark (run.py): where it writes, and how each one is
set up, mounted, unmounted, made cold, scrubbed and restored.

* ``plain``      -- a directory on the scratch filesystem: the physical limit;
* ``floor``      -- benchmarks/floorfs.py: lnmirrorfs' FUSE settings and durability barriers
  (a pwrite + fdatasync of a small record on each of 2 replica logs, W=2, per committing
  operation) but no data work: the floor of lnmirrorfs' protocol on this disk;
* ``floor-data`` -- the same with every record carrying the bytes its operation made durable
  (floorfs --carry-data): the floor of a protocol that keeps the data durable as well;
* ``lnmirror-2`` -- an lnmirrorfs volume, 2 replicas, k=1 (``lnmirror init`` + ``mount_lnmirror -f``);
* ``lnmirror-3`` -- an lnmirrorfs volume, 3 replicas, k=2;
* ``gocryptfs``  -- gocryptfs over one directory (run.py skips it when it is not installed).
"""

from __future__ import annotations

import json
import os
import re
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

from common import MIB, REPO, anomaly, drop_caches, run_cmd

NAMES = ("plain", "floor", "floor-data", "lnmirror-2", "lnmirror-3", "gocryptfs")
MOUNT = [sys.executable, str(REPO / "mount_lnmirror")]
LNMIRROR = [sys.executable, "-m", "lnmirrorfs"]
FLOORFS = [sys.executable, str(REPO / "benchmarks" / "floorfs.py")]
PASSWORD = "benchmark-password"
UNMOUNT_TIMEOUT = 300.0  # a daemon flushes and snapshots on unmount: allow for a slow disk

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


class Target:
    """Where the benchmarks write: `workdir`; FUSE targets also mount and unmount."""

    name = ""
    fuse = False
    offline = True  # has an offline scrub and restore (or their plain analogue)
    live_scrub = False  # can be scrubbed while mounted

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
    live_scrub = True

    def __init__(self, root: Path, env: dict, n: int, k: int) -> None:
        super().__init__(root, env)
        self.n, self.k = n, k
        self.name = f"lnmirror-{n}"
        self.replicas = [root / f"replica{i}" for i in range(n)]
        self.key = root / "key"

    def describe(self) -> str:
        return f"lnmirrorfs n={self.n} k={self.k}"

    def replica_args(self) -> list[str]:
        return replica_flags(self.replicas) + ["--key-file", str(self.key)]

    def setup(self) -> None:
        self.init()
        self.mount()

    def init(self) -> None:
        for r in self.replicas:
            r.mkdir(parents=True)
        done = run_cmd(LNMIRROR + ["init", "-k", str(self.k)] + self.replica_args(), self.env, 120)
        if done.returncode != 0:
            raise RuntimeError(f"lnmirror init failed: {done.stdout}{done.stderr}")

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


class Floor(Target):
    """benchmarks/floorfs.py: its tree lives in the daemon's memory, so a remount starts empty."""

    fuse = True
    offline = False

    def __init__(self, root: Path, env: dict, carry_data: bool) -> None:
        super().__init__(root, env)
        self.carry_data = carry_data
        self.name = "floor-data" if carry_data else "floor"
        self.data = root / "data"
        self.replicas = [root / f"replica{i}" for i in range(2)]

    def describe(self) -> str:
        if self.carry_data:
            return ("floorfs --carry-data: as floor, each record also carrying the bytes its "
                    "operation made durable (what lnmirrorfs' barriers flush)")
        return ("floorfs: lnmirrorfs' barriers (pwrite + fdatasync on 2 replica logs, W=2) and FUSE "
                "settings, no data work (data in one backing dir, unsynced); cold = caches dropped")

    def setup(self) -> None:
        for d in [self.data, *self.replicas]:
            d.mkdir(parents=True)
        self.mount()

    def mount_command(self) -> list[str]:
        return (FLOORFS + [str(self.mountpoint), "--data", str(self.data)] + replica_flags(self.replicas)
                + (["--carry-data"] if self.carry_data else []))

    def cold(self) -> bool:
        """The daemon caches nothing (its data is in the backing files): dropping caches makes
        the kernel's pages of both cold; a remount would lose the tree."""
        return drop_caches()


def replica_flags(dirs: list[Path]) -> list[str]:
    return [arg for d in dirs for arg in ("--replica", str(d))]


def make_target(name: str, scratch: Path, env: dict) -> Target:
    root = scratch / name
    if name == "plain":
        return Plain(root, env)
    if name in ("floor", "floor-data"):
        return Floor(root, env, carry_data=name == "floor-data")
    if name == "lnmirror-2":
        return Lnmirror(root, env, 2, 1)
    if name == "lnmirror-3":
        return Lnmirror(root, env, 3, 2)
    return Gocryptfs(root, env)


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


