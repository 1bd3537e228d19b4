"""Replica faults on a live mount: a full disk, a read-only or vanished replica, lost quorum.

The workload keeps going while W replicas answer, fails with EIO when they do not, the
mount never dies, and status names the faulted replica."""

from __future__ import annotations

import errno
import json
import os
import re
import subprocess

import pytest

import workload
from conftest import lnmirror
from lnmirrorfs.fileio import pwrite_all


def run(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True)


@pytest.fixture
def mounts_to_undo():
    """System mounts (tmpfs, read-only binds) a test makes, undone in reverse order."""
    made: list[str] = []
    yield made
    for path in reversed(made):
        subprocess.run(["umount", "-l", path], capture_output=True)


def replica_states(m) -> dict[str, str]:
    return {r["path"]: r["state"] for r in json.loads(m.status("--json").stdout)["replicas"]}


def test_full_replica_faults_and_workload_continues(make_vol, tmp_path, mounts_to_undo):
    small = tmp_path / "small"
    small.mkdir()
    run("mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", str(small))
    mounts_to_undo.append(str(small))
    (small / "r").mkdir()
    v = make_vol(n=3, k=1, replica_paths=[tmp_path / "a", tmp_path / "b", small / "r"])
    m = v.mount()
    workload.run(str(m.path), 150)  # ~250 KiB of database pages per replica: fills 600k
    big = m.path / "blob"
    big.write_bytes(os.urandom(1 << 20))
    os.sync()
    states = replica_states(m)
    assert states[str(small / "r")] == "FAULTED"
    assert states[str(tmp_path / "a")] == states[str(tmp_path / "b")] == "ONLINE"
    assert m.status().returncode != 0
    assert "FAULTED" in m.status().stdout
    assert workload.check_db(str(m.path)) == 150
    assert m.unmount() == 0
    v.restore(tmp_path / "out", replicas=v.replicas[:2])
    assert workload.check_db(str(tmp_path / "out")) == 150


def test_a_write_that_only_partly_fits_is_an_error_not_a_success(tmp_path, mounts_to_undo):
    """A filling disk takes part of a write and returns its length: taken for the whole,
    a torn slot or record would sit behind a commit that succeeded."""
    small = tmp_path / "small"
    small.mkdir()
    run("mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(small))
    mounts_to_undo.append(str(small))
    fd = os.open(small / "f", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        assert 0 < os.pwritev(fd, [bytes(200 << 10), bytes(200 << 10)], 0) < 400 << 10  # the fault
        with pytest.raises(OSError) as raised:
            pwrite_all(fd, [b"h" * 40, bytes(400 << 10)], 0)
        assert raised.value.errno == errno.ENOSPC
        pwrite_all(fd, [b"h" * 40, b"s" * 4096], 8192)  # what fits is written whole
        assert os.pread(fd, 4136, 8192) == b"h" * 40 + b"s" * 4096
    finally:
        os.close(fd)


def test_read_only_replica_mounts_degraded(make_vol, tmp_path, mounts_to_undo):
    v = make_vol(n=3, k=1)
    ro = str(v.replicas[2])
    run("mount", "--bind", ro, ro)
    mounts_to_undo.append(ro)
    run("mount", "-o", "remount,bind,ro", ro)
    m = v.mount()
    assert "degraded" in m.output()
    workload.run(str(m.path), 20)
    assert replica_states(m)[ro] == "FAULTED"
    assert m.unmount() == 0


def test_vanished_replica_faults_then_is_caught_up_at_the_next_mount(make_vol, tmp_path):
    v = make_vol(n=3, k=1)
    m = v.mount()
    workload.run(str(m.path), 10)
    gone = v.replicas[2].with_name("gone")
    os.rename(v.replicas[2], gone)
    workload.run(str(m.path), 10)
    assert replica_states(m)[str(v.replicas[2])] == "FAULTED"
    assert m.unmount() == 0
    os.rename(gone, v.replicas[2])
    # Back in place it holds an older state: STALE, named as behind, never served.
    offline = v.status("--json", *v.replica_args())
    assert offline.returncode != 0
    c = json.loads(offline.stdout)["replicas"][2]
    assert c["state"] == "STALE" and re.match(r"behind: at record \d+, record \d+ was "
                                              r"acknowledged", c["reason"]), c
    # Alone, or with too few others, it cannot prove it is current: refused.
    refused = v.restore(v.root / "out", replicas=[v.replicas[2]], check=False)
    assert refused.returncode != 0 and "need 2" in refused.stderr, refused.stderr
    # With one other it vouches: the blame says where the writer stopped sending to it, and
    # its log ends exactly there (an old copy from earlier would not).
    v.restore(v.root / "out2", replicas=[v.replicas[0], v.replicas[2]])
    assert workload.check_db(str(v.root / "out2")) == 20
    # A mount catches it up with the records it missed and serves everything.
    m = v.mount()
    assert replica_states(m)[str(v.replicas[2])] == "ONLINE"
    assert workload.check_db(str(m.path)) == 20
    assert m.unmount() == 0
    v.restore(v.root / "out3", replicas=[v.replicas[1], v.replicas[2]])
    assert workload.check_db(str(v.root / "out3")) == 20


def test_lost_quorum_gives_eio_and_mount_survives(make_vol, tmp_path, mounts_to_undo):
    v = make_vol(n=2, k=1)  # W = 2: both replicas must answer
    m = v.mount("--suspend-timeout", "1")
    (m.path / "kept").write_text("acknowledged")
    os.rename(v.replicas[1], v.replicas[1].with_name("away"))
    with pytest.raises(OSError) as exc:
        with open(m.path / "kept", "a") as f:
            f.write("more")
            f.flush()
            os.fsync(f.fileno())
    assert exc.value.errno == errno.EIO
    # Later changes fail fast with EIO; reads and stat keep working; the mount is alive.
    with pytest.raises(OSError) as exc:
        os.mkdir(m.path / "dir")
    assert exc.value.errno == errno.EIO
    assert (m.path / "kept").read_text().startswith("acknowledged")
    status = json.loads(m.status("--json").stdout)
    assert status["state"] == "SUSPENDED"
    assert m.proc.poll() is None
    m.kill()


def test_mount_refused_below_write_quorum_but_scrub_still_runs(make_vol, mounts_to_undo):
    v = make_vol(n=2, k=1)  # W = 2
    ro = str(v.replicas[1])
    run("mount", "--bind", ro, ro)
    mounts_to_undo.append(ro)
    run("mount", "-o", "remount,bind,ro", ro)
    with pytest.raises(AssertionError) as exc:
        v.mount()
    assert "write quorum is 2" in str(exc.value)
    proc = lnmirror("scrub", *v.replica_args(), check=False)  # the healer may still open it
    assert proc.returncode == 2 and "could not be healed" in proc.stdout
