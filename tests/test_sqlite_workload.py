"""The lightningd-style SQLite workload on a real mount, restored from each replica alone."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

import workload
from conftest import REPO


def daemon_stats(m) -> dict:
    proc = m.status("--json")
    return json.loads(proc.stdout)["stats"]


@pytest.mark.parametrize("journal_mode", ["delete", "wal"])
def test_workload_then_restore_from_each_single_replica(volume, tmp_path, journal_mode):
    m = volume.mount()
    last = workload.run(str(m.path), 40, journal_mode)
    last = workload.run(str(m.path), 20, journal_mode)  # reopen, as a restarted node does
    assert last == 60
    assert workload.check_db(str(m.path)) == 60
    assert m.unmount() == 0, m.output()
    for i, replica in enumerate(volume.replicas):
        target = tmp_path / f"restored{i}"
        volume.restore(target, replicas=[replica])
        assert workload.check_db(str(target)) == 60
        gossip = (target / workload.GOSSIP_NAME).read_text()
        assert gossip.count("\n") == 60 * 8


def test_every_sync_reaches_the_daemon_and_waits_for_quorum(volume, tmp_path):
    """strace counts the fsync/fdatasync calls the workload makes on the mount; the daemon's
    counters (incremented only after W replicas acknowledged) must match exactly."""
    m = volume.mount()
    before = daemon_stats(m)
    trace = tmp_path / "strace.out"
    proc = subprocess.run(
        ["strace", "-f", "-y", "-e", "trace=fsync,fdatasync", "-o", str(trace),
         sys.executable, str(REPO / "tests" / "workload.py"), str(m.path), "--commits", "25"],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    after = daemon_stats(m)
    calls = [line for line in trace.read_text().splitlines()
             if re.search(r"\b(fsync|fdatasync)\(\d+<" + re.escape(str(m.path)), line)
             and "= 0" in line]
    on_dirs = [c for c in calls if re.search(r"\(\d+<" + re.escape(str(m.path)) + r"/?>", c)]
    on_files = len(calls) - len(on_dirs)
    assert on_files >= 25 * 2, "SQLite FULL sync should fsync journal and db every commit"
    assert after["fsync"] - before["fsync"] == on_files
    assert after["fsyncdir"] - before["fsyncdir"] == len(on_dirs)
    # Every commit the daemon made was acknowledged by W replicas (else fsync had failed).
    assert after["commits"] > before["commits"]
