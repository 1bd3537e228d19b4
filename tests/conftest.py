"""Shared fixtures: real replica directories, real `lnmirror init`, real FUSE mounts.

The mount daemon always runs in its own process (`mount_lnmirror -f`), never inside
pytest, and every mount is unmounted in a finalizer.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from lnmirrorfs import format

REPO = Path(__file__).resolve().parent.parent
MOUNT = [sys.executable, str(REPO / "mount_lnmirror")]
LNMIRROR = [sys.executable, "-m", "lnmirrorfs"]


def slow_enabled() -> bool:
    return os.environ.get("LNMIRROR_SLOW") == "1"


def pytest_collection_modifyitems(config, items):
    if slow_enabled():
        return
    skip = pytest.mark.skip(reason="slow: set LNMIRROR_SLOW=1 to run")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _isolated_dirs(tmp_path, monkeypatch):
    """Keys, control sockets and log files of a test stay inside its tmp dir."""
    monkeypatch.setenv("LNMIRROR_KEYDIR", str(tmp_path / "keys"))
    monkeypatch.setenv("LNMIRROR_RUNDIR", str(tmp_path / "run"))
    monkeypatch.setenv("LNMIRROR_LOGDIR", str(tmp_path / "logs"))  # daemonized mounts' logs


def lnmirror(*args: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(LNMIRROR + list(args), capture_output=True, text=True, input=input,
                          cwd=REPO, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"lnmirror {' '.join(args)} failed ({proc.returncode}):\n"
                             f"{proc.stdout}{proc.stderr}")
    return proc


@dataclass
class VolumeDirs:
    """A volume made by `lnmirror init` in a test's tmp dir."""

    root: Path
    replicas: list[Path]
    key: Path
    k: int
    mounts: list[Mount] = field(default_factory=list)

    def replica_args(self, replicas: list[Path] | None = None) -> list[str]:
        out = []
        for r in replicas if replicas is not None else self.replicas:
            out += ["--replica", str(r)]
        return out + ["--key-file", str(self.key)]

    def mount_command(self, name: str = "mnt") -> list[str]:
        """A foreground mount of every replica, for tests that expect it to be refused."""
        (self.root / name).mkdir(exist_ok=True)
        return MOUNT + [str(self.root / name), "-f"] + self.replica_args()

    def mount(self, *extra: str, replicas: list[Path] | None = None, name: str = "mnt") -> Mount:
        m = Mount(self.root / name, self.replica_args(replicas) + list(extra))
        m.start()
        self.mounts.append(m)
        return m

    def restore(self, target: Path, replicas: list[Path] | None = None,
                check: bool = True) -> subprocess.CompletedProcess:
        return lnmirror("restore", *self.replica_args(replicas), str(target), check=check)

    def status(self, *args: str) -> subprocess.CompletedProcess:
        return lnmirror("status", *args, check=False)


def make_volume(root: Path, n: int = 2, k: int = 1, replica_paths: list[Path] | None = None,
                extra: tuple[str, ...] = ()) -> VolumeDirs:
    replicas = replica_paths or [root / f"replica{i}" for i in range(n)]
    for r in replicas:
        r.mkdir(parents=True, exist_ok=True)
    key = root / "key"
    args = ["init", "-k", str(k), "--key-file", str(key)]
    for r in replicas:
        args += ["--replica", str(r)]
    if os.environ.get("LNMIRROR_TEST_CIPHER") and "--cipher" not in extra:
        args += ["--cipher", os.environ["LNMIRROR_TEST_CIPHER"]]  # default: the CPU's (auto)
    lnmirror(*args, *extra)
    return VolumeDirs(root, replicas, key, k)


def replica_layout(replica: Path) -> format.SlotLayout:
    """Where a replica's slots lie, as its header says (block size, k and cipher)."""
    return format.Header.unpack((replica / format.HEADER_NAME).read_bytes()).layout


class Mount:
    def __init__(self, path: Path, args: list[str]) -> None:
        self.path = path
        self.args = args
        self.proc: subprocess.Popen | None = None
        self.log = path.parent / f"{path.name}.log"

    def start(self, timeout: float = 20.0) -> None:
        self.path.mkdir(exist_ok=True)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(MOUNT + [str(self.path), "-f"] + self.args,
                                         stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        deadline = time.monotonic() + timeout
        while not is_mounted(self.path):
            if self.proc.poll() is not None:
                raise AssertionError(f"mount daemon exited {self.proc.returncode}:\n{self.output()}")
            if time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"mount did not come up:\n{self.output()}")
            time.sleep(0.05)

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def status(self, *args: str) -> subprocess.CompletedProcess:
        return lnmirror("status", str(self.path), *args, check=False)

    def unmount(self, timeout: float = 60.0) -> int:
        """fusermount3 -u, then wait for the daemon to flush and exit; returns its exit code."""
        if self.proc is None:
            return 0
        if is_mounted(self.path):
            subprocess.run(["fusermount3", "-u", str(self.path)], check=False,
                           capture_output=True)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"daemon did not exit after unmount:\n{self.output()}") from None
        self.proc = None
        return code

    def kill(self) -> None:
        """kill -9 the daemon (a crash), then clear the dead mount."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None
        force_unmount(self.path)


class FaultFSMount:
    """tests/faultfs.py serving BACKING at PATH in its own process, driven by signals."""

    def __init__(self, root, seed: int) -> None:
        self.backing = root / "backing"
        self.path = root / "faulty"
        self.spec = root / "faultfs.json"
        self.backing.mkdir()
        self.path.mkdir()
        self.spec.write_text("{}")
        env = dict(os.environ, FAULTFS_SEED=str(seed))
        self.proc = subprocess.Popen([sys.executable, str(REPO / "tests" / "faultfs.py"),
                                      str(self.backing), str(self.path), str(self.spec)], env=env)
        deadline = time.monotonic() + 20
        while not is_mounted(self.path):
            assert self.proc.poll() is None and time.monotonic() < deadline, "faultfs did not mount"
            time.sleep(0.05)

    def set(self, **spec) -> None:
        self.spec.write_text(json.dumps(spec))
        self.proc.send_signal(signal.SIGUSR1)
        time.sleep(0.2)

    def power_cut(self) -> None:
        self.proc.send_signal(signal.SIGUSR2)
        time.sleep(0.5)

    def stop(self) -> None:
        force_unmount(self.path)
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


def is_mounted(path: Path) -> bool:
    """From /proc/mounts: `mountpoint` cannot stat a mount whose daemon died."""
    target = os.path.realpath(path)
    with open("/proc/mounts") as f:  # which writes a space as \040
        return any(line.split()[1].replace("\\040", " ") == target for line in f)


def force_unmount(path: Path) -> None:
    for args in (["fusermount3", "-u"], ["fusermount3", "-uz"]):
        if not is_mounted(path):
            return
        subprocess.run(args + [str(path)], check=False, capture_output=True)


@pytest.fixture
def volume(tmp_path) -> VolumeDirs:
    """A fresh 2-replica k=1 volume; any mount it makes is unmounted afterwards."""
    v = make_volume(tmp_path)
    yield v
    cleanup_mounts(v)


def cleanup_mounts(v: VolumeDirs) -> None:
    for m in v.mounts:
        if m.proc is not None:
            try:
                m.unmount(timeout=20)
            except AssertionError:
                m.kill()
        force_unmount(m.path)


@pytest.fixture
def make_vol(tmp_path):
    """Factory for volumes with other shapes: make_vol(n=3, k=2)."""
    made: list[VolumeDirs] = []

    def make(n: int = 2, k: int = 1, name: str = "vol", **kw) -> VolumeDirs:
        v = make_volume(tmp_path / name, n=n, k=k, **kw)
        made.append(v)
        return v
    yield make
    for v in made:
        cleanup_mounts(v)


@pytest.fixture
def mounted(volume) -> Mount:
    return volume.mount()
