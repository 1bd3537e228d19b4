"""Faults are boring: a replica that vanishes, hangs or stays away makes changes wait, not
fail; past the suspend timeout they fail with EIO, and the mount resumes by itself once the
replica is back.  No path needs a remount.  Real mounts, real replica directories."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import threading
import time

import pytest

import workload
from conftest import FaultFSMount, lnmirror, make_volume

DEADLINE = 3.0


def status(m) -> dict:
    return json.loads(m.status("--json").stdout)


def wait_for(predicate, seconds: float, what: str) -> float:
    """Poll until predicate() holds; returns how long it took."""
    started = time.monotonic()
    while not predicate():
        assert time.monotonic() - started < seconds, f"not within {seconds}s: {what}"
        time.sleep(0.2)
    return time.monotonic() - started


def all_online(m) -> bool:
    s = status(m)
    return s["state"] == "ONLINE" and all(r["state"] == "ONLINE" for r in s["replicas"])


def test_sqlite_rides_through_a_replica_vanishing_five_times(make_vol, tmp_path):
    """n=2, default W=2: B's directory vanishes for 3 s, 5 times; the workload sees slow
    commits, never an error; B is caught up each time and the volume ends ONLINE."""
    v = make_vol(n=2, k=1)
    m = v.mount("--deadline", str(DEADLINE))
    loop = workload.CommitLoop(str(m.path))
    gone = tmp_path / "b-away"
    try:
        for _ in range(5):
            before = loop.acked
            os.rename(v.replicas[1], gone)
            time.sleep(3)
            os.rename(gone, v.replicas[1])
            wait_for(lambda before=before: loop.acked > before + 5 or loop.errors, 30,
                     "commits go on")
            assert not loop.errors, loop.errors
            wait_for(lambda: all_online(m), 15, "B rejoins")
    finally:
        loop.stop()
    assert not loop.errors, loop.errors
    assert loop.acked > 5 * 5
    print(f"{loop.acked} commits, none failed; the slowest took {loop.slowest:.2f}s")
    s = status(m)
    assert s["state"] == "ONLINE" and m.status().returncode == 0
    assert "caught up" in m.output()
    assert workload.check_db(str(m.path)) == loop.acked
    assert m.unmount() == 0
    for replica in v.replicas:  # each replica alone holds every acknowledged commit
        out = tmp_path / f"restore-{replica.name}"
        v.restore(out, replicas=[replica])
        assert workload.check_db(str(out)) == loop.acked


def test_past_the_suspend_timeout_eio_then_the_mount_resumes_by_itself(make_vol, tmp_path):
    v = make_vol(n=2, k=1)
    m = v.mount("--deadline", str(DEADLINE), "--suspend-timeout", "4")
    (m.path / "kept").write_text("acknowledged")
    gone = tmp_path / "b-away"
    os.rename(v.replicas[1], gone)
    started = time.monotonic()
    with pytest.raises(OSError) as exc:
        with open(m.path / "late", "w") as f:
            f.write("x")
            f.flush()
            os.fsync(f.fileno())
    waited = time.monotonic() - started
    assert exc.value.errno == errno.EIO
    assert 4 <= waited < 4 + 2 * DEADLINE, waited
    s = status(m)
    assert s["state"] == "SUSPENDED" and "resumes by itself" in s["reason"]
    assert m.status().returncode == 1
    started = time.monotonic()  # while suspended, changes fail at once
    with pytest.raises(OSError):
        (m.path / "other").write_text("y")
    assert time.monotonic() - started < 1
    assert (m.path / "kept").read_text() == "acknowledged"  # reads go on
    os.rename(gone, v.replicas[1])
    resumed = wait_for(lambda: all_online(m), 20, "the mount resumes")
    (m.path / "after").write_text("written after the resume")
    assert (m.path / "after").read_text() == "written after the resume"
    assert "resumed" in m.output()
    print(f"EIO after {waited:.2f}s (timeout 4 s); resumed {resumed:.1f}s after B came back")
    assert m.unmount() == 0
    v.restore(tmp_path / "out", replicas=[v.replicas[1]])
    assert (tmp_path / "out" / "kept").read_text() == "acknowledged"
    assert (tmp_path / "out" / "after").read_text() == "written after the resume"


def test_a_close_or_a_fork_does_not_wait_for_a_riding_through_quorum(make_vol, tmp_path):
    """While an fsync waits for B, a close of another file with buffered data returns at
    once (its data stays buffered), and so does a subprocess started by a process holding
    a descriptor on the mount: its child closes that descriptor at exec, and the parent of
    a vfork waits for the child (this hung the network test for the whole suspend timeout)."""
    v = make_vol(n=2, k=1)
    m = v.mount("--deadline", str(DEADLINE), "--suspend-timeout", "120")
    held = open(m.path / "held", "w")  # a descriptor the subprocesses inherit a copy of
    fd = os.open(m.path / "waits", os.O_WRONLY | os.O_CREAT, 0o644)
    (m.path / "closed").touch()  # creates are changes: they would wait too
    gone = tmp_path / "b-away"
    os.rename(v.replicas[1], gone)
    try:
        os.write(fd, b"acknowledged once B is back")
        waiting = threading.Thread(target=os.fsync, args=(fd,))
        waiting.start()
        wait_for(lambda: status(m)["state"] != "ONLINE", 2 * DEADLINE + 5, "the fsync waits")
        held.write("buffered, not yet durable")
        held.flush()
        started = time.monotonic()
        subprocess.run(["true"], check=True)
        closed = os.open(m.path / "closed", os.O_WRONLY)
        os.write(closed, b"closed while B is away")
        os.close(closed)
        took = time.monotonic() - started
        assert took < 2, f"a fork and a close waited {took:.1f}s for the quorum"
        assert waiting.is_alive()  # the fsync still waits: nothing failed meanwhile
        os.rename(gone, v.replicas[1])
        waiting.join(60)
        assert not waiting.is_alive()
        os.close(fd)
        held.close()
        os.sync()
        wait_for(lambda: all_online(m), 20, "B rejoins")
    finally:
        if gone.exists():
            os.rename(gone, v.replicas[1])
    assert m.unmount() == 0
    out = tmp_path / "out"
    v.restore(out, replicas=[v.replicas[1]])
    assert (out / "waits").read_bytes() == b"acknowledged once B is back"
    assert (out / "held").read_text() == "buffered, not yet durable"
    assert (out / "closed").read_text() == "closed while B is away"


def unmount_while_stopped(m, fs) -> None:
    """The unmount finishes its work (snapshot on A and B, "unmounted cleanly") within the
    deadline; the process itself may linger until C answers (its descriptors' flushes
    wait in the kernel), so it is let go on with SIGCONT before it is waited for."""
    before = m.output().count(" cleanly at record ")
    started = time.monotonic()
    subprocess.run(["fusermount3", "-u", str(m.path)], check=True, capture_output=True)
    wait_for(lambda: m.output().count(" cleanly at record ") > before, 3 * DEADLINE,
             "the unmount finishes")
    print(f"unmounted with C stopped in {time.monotonic() - started:.1f}s")
    os.kill(fs.proc.pid, signal.SIGCONT)
    assert m.proc.wait(30) == 0
    m.proc = None


def test_stalled_replica_under_mount_status_df_writes_and_unmount(tmp_path):
    """C sits on a FUSE layer that is SIGSTOPped (a NAS that stopped answering): mount,
    status, df, writes and unmount each return within the deadline, C is FAULTED; after
    SIGCONT it is caught up and rejoins by itself."""
    fsroot = tmp_path / "fs"
    fsroot.mkdir()
    fs = FaultFSMount(fsroot, seed=0)
    v = make_volume(tmp_path / "vol", n=3, k=1,
                    replica_paths=[tmp_path / "a", tmp_path / "b", fs.path / "c"])
    try:
        m = v.mount("--deadline", str(DEADLINE))
        workload.run(str(m.path), 5)
        os.kill(fs.proc.pid, signal.SIGSTOP)
        for command in (["df", str(m.path)], ["stat", "-f", str(m.path)]):
            started = time.monotonic()
            subprocess.run(command, check=True, capture_output=True, timeout=30)
            assert time.monotonic() - started < DEADLINE + 2, command
        started = time.monotonic()
        workload.run(str(m.path), 5)
        assert time.monotonic() - started < 3 * DEADLINE
        started = time.monotonic()
        s = status(m)
        assert time.monotonic() - started < DEADLINE + 2
        assert [r["state"] for r in s["replicas"]] == ["ONLINE", "ONLINE", "FAULTED"]
        os.kill(fs.proc.pid, signal.SIGCONT)
        rejoined = wait_for(lambda: all_online(m), 30, "C rejoins after SIGCONT")
        workload.run(str(m.path), 5)
        print(f"C rejoined {rejoined:.1f}s after SIGCONT")
        os.kill(fs.proc.pid, signal.SIGSTOP)  # and an unmount and a mount with C stopped
        unmount_while_stopped(m, fs)
        os.kill(fs.proc.pid, signal.SIGSTOP)
        started = time.monotonic()
        m = v.mount("--deadline", str(DEADLINE))
        assert time.monotonic() - started < 3 * DEADLINE
        assert [r["state"] for r in status(m)["replicas"]][:2] == ["ONLINE", "ONLINE"]
        assert workload.check_db(str(m.path)) == 15
        workload.run(str(m.path), 5)
        unmount_while_stopped(m, fs)
    finally:
        os.kill(fs.proc.pid, signal.SIGCONT)
        for mount in v.mounts:
            if mount.proc is not None:
                mount.kill()
        fs.stop()


def test_offline_a_replica_gone_for_good_then_replace_it(make_vol, tmp_path):
    """n=2, W=2, B's disk dies while lightningd commits: the commit waits; `lnmirror offline`
    lets it complete on A alone (W=1, logged), status says DEGRADED and the risk, a remount
    without B works, and `lnmirror replace` brings the set back to W=2."""
    v = make_vol(n=2, k=1)
    m = v.mount("--deadline", str(DEADLINE))
    workload.run(str(m.path), 5)
    os.rename(v.replicas[1], tmp_path / "b-dead")
    loop = workload.CommitLoop(str(m.path))
    try:
        wait_for(lambda: status(m)["state"] == "WAITING", 10, "a commit waits for B")
        acked = loop.acked
        proc = lnmirror("offline", "--mountpoint", str(m.path), str(v.replicas[1]), check=False)
        assert proc.returncode == 0, proc.stderr
        assert "can lose 0 more" in proc.stdout
        wait_for(lambda: loop.acked > acked + 5 or loop.errors, 10, "commits go on with A alone")
        assert not loop.errors, loop.errors
    finally:
        loop.stop()
    assert not loop.errors, loop.errors
    s = status(m)
    assert s["state"] == "DEGRADED" and "offline" in s["reason"], s
    assert s["replicas"][1]["state"] == "OFFLINE"
    assert m.status().returncode == 1
    assert m.unmount() == 0
    total = loop.acked + 5
    m = v.mount("--deadline", str(DEADLINE), replicas=[v.replicas[0]])  # B is gone: W=1 logged
    assert workload.check_db(str(m.path)) == total
    new = tmp_path / "b-new"
    new.mkdir()
    proc = lnmirror("replace", "--mountpoint", str(m.path), str(v.replicas[1]), str(new),
                    check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    workload.run(str(m.path), 3)
    s = status(m)
    assert s["state"] == "ONLINE" and s["quorum"] == 2, s
    assert m.unmount() == 0
    v.restore(tmp_path / "out", replicas=[new])
    assert workload.check_db(str(tmp_path / "out")) == total + 3


def test_a_replica_away_at_mount_joins_once_it_is_back(make_vol, tmp_path):
    """n=3, W=2: C's NAS is down when the node starts.  The mount serves from A and B;
    once C's directory is back, the daemon finds it, catches it up and puts it ONLINE:
    no remount, no scrub, and C alone then restores every acknowledged change."""
    v = make_vol(n=3, k=1)
    gone = tmp_path / "c-away"
    os.rename(v.replicas[2], gone)
    m = v.mount("--deadline", str(DEADLINE))
    (m.path / "before").write_bytes(os.urandom(100_000))
    s = status(m)
    assert s["state"] == "DEGRADED" and s["replicas"][2]["state"] == "MISSING", s
    os.rename(gone, v.replicas[2])
    wait_for(lambda: all_online(m), 30, "C joins")
    assert "is back" in m.output() and "caught up" in m.output()
    loop = workload.CommitLoop(str(m.path))
    try:
        wait_for(lambda: loop.acked > 20 or loop.errors, 30, "commits go on")
    finally:
        loop.stop()
    assert not loop.errors, loop.errors
    before = (m.path / "before").read_bytes()
    assert m.unmount() == 0
    out = tmp_path / "restore-c"  # alone C cannot prove it is the latest (W=2): it is
    lnmirror("restore", "--unproven", *v.replica_args([v.replicas[2]]), str(out))
    assert (out / "before").read_bytes() == before
    assert workload.check_db(str(out)) == loop.acked
