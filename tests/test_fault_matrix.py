"""Replica fault matrix on faultfs: EIO on write, on fsync, on read, and a replica that stops
answering.  For each: the mount stays up, calls return within the deadline, the errno is
right, nothing acknowledged is lost, status names the replica, scrub heals it afterwards."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import threading
import time

import pytest

import workload
from conftest import FaultFSMount, lnmirror, make_volume

DEADLINE = 2.0


@pytest.fixture
def faulty_volume(tmp_path):
    """n=3, k=1 (W=2); replica 2 lives on faultfs."""
    (tmp_path / "fs").mkdir()
    fs = FaultFSMount(tmp_path / "fs", seed=0)
    v = make_volume(tmp_path / "vol", n=3, k=1,
                    replica_paths=[tmp_path / "a", tmp_path / "b", fs.path / "c"])
    yield v, fs
    fs.set()  # release anything stalled before tearing down
    for m in v.mounts:
        m.kill()
    fs.stop()


def states(m) -> list[str]:
    return [r["state"] for r in json.loads(m.status("--json").stdout)["replicas"]]


@pytest.mark.parametrize("fault", ["errno_write", "errno_fsync", "stall"])
def test_write_side_faults_degrade_and_heal(faulty_volume, fault):
    v, fs = faulty_volume
    m = v.mount("--deadline", str(DEADLINE))
    workload.run(str(m.path), 10)
    fs.set(**{fault: True if fault == "stall" else errno.EIO})
    started = time.monotonic()
    workload.run(str(m.path), 10)  # goes on with the two healthy replicas
    assert time.monotonic() - started < 10 * DEADLINE
    time.sleep(DEADLINE + 0.5)  # a stalled replica is declared FAULTED once past the deadline
    assert states(m) == ["ONLINE", "ONLINE", "FAULTED"]
    assert m.status().returncode == 1
    fs.set()  # the fault clears
    proc = lnmirror("scrub", str(m.path), "--json", check=False)
    # the scrub heals C (1), or finds the daemon already caught it up on its own (0)
    assert proc.returncode in (0, 1), proc.stdout + proc.stderr
    assert json.loads(proc.stdout)["healed_replicas"] in ([], [str(v.replicas[2])])
    assert states(m) == ["ONLINE"] * 3
    workload.run(str(m.path), 5)
    assert m.unmount() == 0
    out = v.root / "out"
    v.restore(out, replicas=[v.replicas[2], v.replicas[0]])
    assert workload.check_db(str(out)) == 25


def test_a_slow_replica_slows_a_bulk_write_instead_of_queuing_it(faulty_volume):
    """W=2 of 3: records are acknowledged without the slow replica, which is left to write
    them in the background, each holding its shares until written.  Past dirty_bytes of
    them queued the writer waits for it, so the daemon's memory stays bounded however slow
    a replica is (without that wait this write queued some 60 MB for it)."""
    v, fs = faulty_volume
    m = v.mount("--deadline", "60")  # slow is not hung: it must stay ONLINE throughout
    fs.set(write_delay=0.01)  # each write of at most 128 KiB: under 13 MB/s
    writer = threading.Thread(target=lambda: (m.path / "bulk").write_bytes(os.urandom(96 << 20)))
    writer.start()
    queued = []
    while writer.is_alive():
        queued.append(json.loads(m.status("--json").stdout)["replicas"][2]["queue_bytes"])
        time.sleep(0.1)
    writer.join()
    fs.set()
    assert max(queued) > 0, "the replica never lagged: this run shows nothing"
    assert max(queued) <= 2 * (8 << 20), max(queued)  # dirty_bytes, plus the commit in hand
    assert states(m) == ["ONLINE"] * 3
    assert m.unmount() == 0


def test_read_errors_are_served_elsewhere(faulty_volume):
    v, fs = faulty_volume
    m = v.mount("--deadline", str(DEADLINE))
    data = os.urandom(300_000)
    (m.path / "blob").write_bytes(data)
    assert m.unmount() == 0
    m = v.mount("--deadline", str(DEADLINE))  # cold cache: reads go to the replicas
    fs.set(errno_read=errno.EIO)
    for _ in range(3):
        assert (m.path / "blob").read_bytes() == data
    fs.set()
    assert m.unmount() == 0


def test_stalled_replica_below_quorum_gives_eio_after_the_suspend_timeout(tmp_path):
    fsroot = tmp_path / "fs"
    fsroot.mkdir()
    fs = FaultFSMount(fsroot, seed=0)
    v = make_volume(tmp_path / "vol", n=2, k=1, replica_paths=[tmp_path / "a", fs.path / "b"])
    try:
        m = v.mount("--deadline", str(DEADLINE), "--suspend-timeout", "2")
        (m.path / "kept").write_text("acknowledged")
        fs.set(stall=True)
        started = time.monotonic()
        with pytest.raises(OSError) as exc:
            with open(m.path / "new", "w") as f:
                f.write("x")
        assert exc.value.errno == errno.EIO
        assert time.monotonic() - started < 2 + 3 * DEADLINE
        assert (m.path / "kept").read_text() == "acknowledged"  # the mount is alive
        assert json.loads(m.status("--json").stdout)["state"] == "SUSPENDED"
        fs.set()  # B answers again: caught up, and the mount takes writes again
        deadline = time.monotonic() + 30
        while json.loads(m.status("--json").stdout)["state"] != "ONLINE":
            assert time.monotonic() < deadline, m.output()
            time.sleep(0.3)
        (m.path / "later").write_text("x")
        assert m.unmount() == 0
    finally:
        fs.set()
        for mount in v.mounts:
            mount.kill()
        fs.stop()


def test_hung_replica_never_holds_up_df_status_or_writes(faulty_volume):
    """Replica C hangs in every call, statvfs and stat included (a NAS that stopped
    answering): df, status and writes on the mount still return within the deadline."""
    v, fs = faulty_volume
    m = v.mount("--deadline", str(DEADLINE))
    workload.run(str(m.path), 5)
    fs.set(stall=True)
    for command in (["df", str(m.path)], ["stat", "-f", str(m.path)]):
        started = time.monotonic()
        subprocess.run(command, check=True, capture_output=True, timeout=30)
        assert time.monotonic() - started < DEADLINE + 2, command
    started = time.monotonic()
    status = json.loads(m.status("--json").stdout)
    assert time.monotonic() - started < DEADLINE + 3
    assert [r["state"] for r in status["replicas"]] == ["ONLINE", "ONLINE", "FAULTED"]
    started = time.monotonic()
    workload.run(str(m.path), 5)
    assert time.monotonic() - started < 10 * DEADLINE
    fs.set()
    proc = lnmirror("scrub", str(m.path), "--json", check=False)
    assert proc.returncode in (0, 1), proc.stdout  # healed by it, or by the daemon before
    assert states(m) == ["ONLINE"] * 3
    assert m.unmount() == 0


def test_idle_probe_sees_a_vanished_replica(make_vol, tmp_path):
    v = make_vol(n=3, k=1)
    m = v.mount()
    (m.path / "f").write_text("x")
    os.rename(v.replicas[2], tmp_path / "gone")
    deadline = time.monotonic() + 15  # the probe runs every 5 s, with no write to notice it
    while "faulted" not in m.output():  # nothing asks the mount anything meanwhile
        assert time.monotonic() < deadline, "an idle mount did not notice a vanished replica"
        time.sleep(0.5)
    assert json.loads(m.status("--json").stdout)["replicas"][2]["state"] == "FAULTED"
    assert m.status().returncode == 1
    os.rename(tmp_path / "gone", v.replicas[2])
    assert m.unmount() == 0
