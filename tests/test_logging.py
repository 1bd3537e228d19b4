"""A daemonized mount logs where an operator can read it: syslog when its socket answers,
else a log file (default under LNMIRROR_LOGDIR, or --log-file / -o log_file=), and
`lnmirror status` says where.  Mount, clean unmount, replica fault, heal and quorum loss
each leave a line."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from conftest import MOUNT, REPO, force_unmount, is_mounted, lnmirror
from lnmirrorfs import logsetup


def wait_for(predicate, timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


class Daemonized:
    """mount_lnmirror without -f; the daemon's pid comes from its own 'mounted' log line."""

    def __init__(self, volume, path: Path) -> None:
        self.volume, self.path, self.pid = volume, path, None
        path.mkdir(exist_ok=True)

    def mount(self, *extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(MOUNT + [str(self.path)] + self.volume.replica_args() + list(extra),
                              capture_output=True, text=True, cwd=REPO, timeout=60)

    def unmount(self) -> None:
        subprocess.run(["fusermount3", "-u", str(self.path)], check=True, capture_output=True)
        if self.pid:
            wait_for(lambda: not os.path.exists(f"/proc/{self.pid}"), what="daemon exit")

    def cleanup(self) -> None:
        force_unmount(self.path)
        if self.pid and os.path.exists(f"/proc/{self.pid}"):
            os.kill(self.pid, signal.SIGKILL)


@pytest.fixture
def daemonized(volume, request):
    made: list[Daemonized] = []

    def make(volume=volume, name: str = "dmnt") -> Daemonized:
        d = Daemonized(volume, volume.root / name)
        made.append(d)
        return d
    yield make
    for d in made:
        d.cleanup()


def daemon_pid(log_text: str, mountpoint: Path) -> int:
    match = re.search(rf"\[(\d+)\]: mounted {re.escape(str(mountpoint))}:", log_text)
    assert match, log_text
    return int(match.group(1))


def in_proc_mounts(path: Path) -> bool:
    """Without touching the path: a stat of a mount not yet serving blocks until it serves."""
    with open("/proc/mounts") as f:
        return any(line.split()[1] == str(path) for line in f)


def write_sync(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        os.fsync(f.fileno())


def test_without_syslog_logs_to_default_file(make_vol, daemonized, monkeypatch, tmp_path):
    monkeypatch.setenv("LNMIRROR_SYSLOG_SOCKET", str(tmp_path / "no-syslog-here"))
    v = make_vol(n=3, k=1)
    d = daemonized(v)
    proc = d.mount()
    assert proc.returncode == 0, proc.stderr
    log_file = Path(logsetup.default_log_file(str(d.path)))
    assert log_file.parent == tmp_path / "logs"
    d.pid = daemon_pid(log_file.read_text(), d.path)
    status = json.loads(lnmirror("status", str(d.path), "--json").stdout)
    assert status["log_file"] == str(log_file)
    assert f"log: {log_file}" in lnmirror("status", str(d.path)).stdout

    # A replica vanishes: it faults; back in place, scrub heals it.
    write_sync(d.path / "a", b"1")
    gone = v.replicas[2].with_name("gone")
    os.rename(v.replicas[2], gone)
    write_sync(d.path / "b", b"2")
    lnmirror("status", str(d.path), check=False)  # reports the change (also every 5 s)
    wait_for(lambda: "FAULTED" in log_file.read_text(), what="fault line")
    os.rename(gone, v.replicas[2])
    # 1 if the scrub healed it, 0 if the daemon had caught it up on its own already
    assert lnmirror("scrub", str(d.path), check=False).returncode in (0, 1)
    wait_for(lambda: "healed" in log_file.read_text(), what="heal line")
    d.unmount()
    text = log_file.read_text()
    lines = text.splitlines()
    assert sum(f"mounted {d.path}:" in line for line in lines) == 1, text
    assert sum(f"replica {v.replicas[2]} FAULTED" in line for line in lines) == 1, text
    assert sum(f"replica {v.replicas[2]} healed: back ONLINE" in line for line in lines) == 1, text
    assert sum(f"unmounted {d.path} cleanly" in line for line in lines) == 1, text

    # Quorum loss (W=2 of 3, two replicas gone) is logged too.
    assert d.mount("-o", "suspend_timeout=1").returncode == 0
    d.pid = daemon_pid(log_file.read_text().split(f"unmounted {d.path} cleanly")[-1], d.path)
    for r in v.replicas[1:]:
        os.rename(r, r.with_name(r.name + ".away"))
    with pytest.raises(OSError):
        write_sync(d.path / "c", b"3")
    wait_for(lambda: "quorum-lost" in log_file.read_text(), what="quorum line")
    d.unmount()
    for r in v.replicas[1:]:
        os.rename(r.with_name(r.name + ".away"), r)
    assert "with the write quorum lost" in log_file.read_text()


def test_log_file_option_and_syslog(volume, daemonized, monkeypatch, tmp_path):
    # -o log_file= wins over syslog.
    syslog_path = tmp_path / "devlog"
    syslog = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    syslog.bind(str(syslog_path))
    syslog.settimeout(10)
    monkeypatch.setenv("LNMIRROR_SYSLOG_SOCKET", str(syslog_path))
    d = daemonized()
    chosen = tmp_path / "chosen" / "ln.log"
    proc = d.mount("-o", f"log_file={chosen}")
    assert proc.returncode == 0, proc.stderr
    d.pid = daemon_pid(chosen.read_text(), d.path)
    assert json.loads(lnmirror("status", str(d.path), "--json").stdout)["log_file"] == str(chosen)
    d.unmount()
    assert f"unmounted {d.path} cleanly" in chosen.read_text()

    # Without it: syslog, and status says so.
    assert d.mount().returncode == 0
    message = syslog.recv(65536).decode()
    assert f"mounted {d.path}:" in message and "lnmirrorfs[" in message
    d.pid = int(re.search(r"lnmirrorfs\[(\d+)\]", message).group(1))
    status = json.loads(lnmirror("status", str(d.path), "--json").stdout)
    assert status["log_file"] is None and status["log"] == f"syslog ({syslog_path})"
    d.unmount()
    assert f"unmounted {d.path} cleanly" in syslog.recv(65536).decode()
    syslog.close()
    assert not os.path.exists(logsetup.default_log_file(str(d.path)))


def test_unwritable_log_file_is_one_line_error(volume, daemonized, tmp_path):
    (tmp_path / "plainfile").write_text("")
    d = daemonized()
    proc = d.mount("--log-file", str(tmp_path / "plainfile" / "x.log"))
    assert proc.returncode == 1
    assert proc.stderr.startswith("mount_lnmirror: cannot open log file ")
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not is_mounted(d.path)


def test_parent_killed_before_ready_leaves_no_mount(volume, monkeypatch, tmp_path):
    """mount(8) or a shell killed while the daemon starts: the daemon must not leave a dead
    mount behind (nor a live one that nobody was told about)."""
    monkeypatch.setenv("LNMIRROR_SYSLOG_SOCKET", str(tmp_path / "no-syslog-here"))
    monkeypatch.setenv("LNMIRROR_TEST_READY_DELAY", "2")
    mnt = Path(os.path.realpath(volume.root)) / "early"
    mnt.mkdir()
    log_file = Path(logsetup.default_log_file(str(mnt)))
    parent = subprocess.Popen(MOUNT + [str(mnt)] + volume.replica_args(), cwd=REPO,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pid = None
    try:
        wait_for(lambda: in_proc_mounts(mnt) and log_file.exists() and "mounted" in
                 log_file.read_text(), what="the daemon's mount")
        pid = daemon_pid(log_file.read_text(), mnt)
        # Someone looks at the mount meanwhile: blocked until it serves, it must be freed.
        looker = threading.Thread(target=lambda: os.path.exists(mnt / "x"), daemon=True)
        looker.start()
        assert parent.poll() is None, "the parent returned before the daemon was ready"
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
        wait_for(lambda: not os.path.exists(f"/proc/{pid}"), what="daemon exit")
        looker.join(10)
        assert not looker.is_alive(), "a process is still stuck in the undone mount"
        assert not in_proc_mounts(mnt), "a mount was left behind"
        assert "unmounting" in log_file.read_text()
        assert os.listdir(mnt) == []
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        force_unmount(mnt)
        if pid and os.path.exists(f"/proc/{pid}"):
            os.kill(pid, signal.SIGKILL)
    # The volume is intact: it mounts again and works.
    m = volume.mount()
    write_sync(m.path / "x", b"ok")
    assert m.unmount() == 0
