"""Crash harness: kill -9 the mount daemon in the middle of a lightningd-style workload.

After each crash every subset of replicas that can prove the latest state must restore a
database whose integrity check passes and which holds every commit the workload saw
acknowledged; the volume must mount again and carry on.  Seeds are printed for replay:
LNMIRROR_CRASH_SEED=<seed> pytest tests/test_crash.py.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import subprocess
import sys
import time

import pytest

import workload
from conftest import REPO, slow_enabled

ROUNDS = int(os.environ.get("LNMIRROR_CRASH_ROUNDS", "100" if slow_enabled() else "4"))


def crash_round(v, rng: random.Random, round_no: int) -> tuple[int, int]:
    """Run the workload, kill -9 the daemon at a random moment; returns the (first, last)
    commits it saw acknowledged."""
    m = v.mount()
    log_path = v.root / f"workload{round_no}.out"
    with open(log_path, "w") as out:
        worker = subprocess.Popen([sys.executable, str(REPO / "tests" / "workload.py"), str(m.path),
                                   "--commits", "100000",
                                   "--journal-mode", rng.choice(["delete", "wal"])],
                                  stdout=out, stderr=subprocess.STDOUT)
        time.sleep(rng.uniform(0.2, 1.5))
        m.kill()  # SIGKILL: no flush, no unmount handler
        worker.wait(60)
    return workload.announced(log_path.read_text())


def quorum_subsets(v, quorum: int):
    n = len(v.replicas)
    for size in range(n - quorum + 1, n + 1):
        yield from itertools.combinations(v.replicas, size)


@pytest.mark.parametrize("shape", [(2, 1), (3, 2)], ids=["n2k1", "n3k2"])
def test_kill_9_loses_no_acknowledged_commit(make_vol, shape):
    n, k = shape
    seed = int(os.environ.get("LNMIRROR_CRASH_SEED", random.randrange(1 << 30)))
    print(f"crash seed {seed}")
    rng = random.Random(seed)
    v = make_vol(n=n, k=k, name=f"n{n}k{k}")
    acked = 0
    for round_no in range(ROUNDS):
        first, last = crash_round(v, rng, round_no)
        acked = max(acked, last)
        for subset in quorum_subsets(v, quorum=max(k, n // 2 + 1)):
            if len(subset) < k:
                continue
            names = "-".join(r.name for r in subset)
            target = v.root / f"restore{round_no}-{names}"
            proc = v.restore(target, replicas=list(subset), check=False)
            if proc.returncode and len(subset) < n and "may have been acknowledged" in proc.stderr:
                continue  # correct refusal: the newest record may live on the missing replica
            assert proc.returncode == 0, f"seed {seed} round {round_no}: {proc.stderr}"
            found = workload.check_db(str(target))
            assert found >= acked, f"seed {seed} round {round_no}: lost commits {found}..{acked}"
            workload.check_backup(str(target), first, last)
    # After all the crashes the volume still mounts and the data is all there.
    m = v.mount()
    assert workload.check_db(str(m.path)) >= acked
    assert m.unmount() == 0


def test_times_set_alone_cost_no_record_and_are_durable_after_fsync(make_vol):
    """With the writeback cache the kernel sends its mtime before every fsync: a change of
    times alone is buffered (no record of its own: the fsync's record, or the periodic
    writeback's, carries it), and once an fsync returned it survives kill -9."""
    v = make_vol(n=2, k=1)
    m = v.mount()
    path = m.path / "f"
    path.write_bytes(b"data")

    def records() -> int:
        return json.loads(m.status("--json").stdout)["stats"]["commits"]

    before = records()
    fd = os.open(path, os.O_RDWR)
    try:
        for i in range(20):
            os.utime(path, ns=(i, i))  # times changed twice, then fsync: one record at most
            times = (1_500_000_000_123_456_789 + i, 1_600_000_000_987_654_321 + i)
            os.utime(path, ns=times)
            assert os.stat(path).st_mtime_ns == times[1]
            os.fsync(fd)
    finally:
        os.close(fd)
    assert records() - before <= 20, "a change of times alone must not cost a record of its own"
    m.kill()
    for replica in v.replicas:  # each replica alone (W=2) holds the fsynced times
        target = v.root / f"restore-{replica.name}"
        v.restore(target, replicas=[replica])
        st = os.stat(target / "f")
        assert (st.st_atime_ns, st.st_mtime_ns) == times
