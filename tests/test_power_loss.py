"""Power-loss harness: every replica sits on faultfs, which at a "power cut" drops every
write that was not fsynced and tears the newest one.  After each cut the volume must
restore with every acknowledged commit and mount again.  A negative control shows the
harness catches a filesystem that acknowledges fsync without syncing.

Replay a failure with LNMIRROR_POWER_SEED=<seed>."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time

import pytest

import workload
from conftest import REPO, FaultFSMount, make_volume, slow_enabled

ROUNDS = int(os.environ.get("LNMIRROR_POWER_ROUNDS", "50" if slow_enabled() else "3"))


@pytest.fixture
def faultfs(tmp_path):
    made = []

    def make(seed: int) -> FaultFSMount:
        fs = FaultFSMount(tmp_path, seed)
        made.append(fs)
        return fs
    yield make
    for fs in made:
        fs.stop()


def power_loss_round(v, fs: FaultFSMount, rng: random.Random, round_no: int,
                     min_acked: int = 0) -> tuple[int, int | None]:
    """Run the workload, cut the power; returns (last acknowledged commit, commits restored)."""
    m = v.mount()
    out_path = v.root / f"workload{round_no}.out"
    with open(out_path, "w") as out:
        worker = subprocess.Popen([sys.executable, str(REPO / "tests" / "workload.py"),
                                   str(m.path), "--commits", "100000"],
                                  stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while out_path.read_text().count("commit ") < min_acked and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(rng.uniform(0.3, 1.5))
        m.kill()          # the machine stops: the daemon gets no chance to flush
        fs.power_cut()    # ...and the disks lose what was not synced
        worker.wait(60)
    first, acked = workload.announced(out_path.read_text())
    target = v.root / f"restored{round_no}"
    proc = v.restore(target, check=False)
    if proc.returncode != 0:
        return acked, None
    restored = workload.check_db(str(target))
    if restored >= acked:
        workload.check_backup(str(target), first, acked)
    return acked, restored


def test_power_loss_keeps_every_acknowledged_commit(tmp_path, faultfs):
    seed = int(os.environ.get("LNMIRROR_POWER_SEED", random.randrange(1 << 30)))
    print(f"power seed {seed}")
    rng = random.Random(seed)
    fs = faultfs(seed)
    v = make_volume(tmp_path / "vol", n=3, k=2,
                    replica_paths=[fs.path / f"r{i}" for i in range(3)])
    try:
        for round_no in range(ROUNDS):
            acked, restored = power_loss_round(v, fs, rng, round_no)
            assert restored is not None, f"seed {seed} round {round_no}: restore failed"
            assert restored >= acked, f"seed {seed} round {round_no}: lost {restored}..{acked}"
        m = v.mount()  # and the volume mounts again after all that
        assert workload.check_db(str(m.path)) >= acked
        assert m.unmount() == 0
    finally:
        for m in v.mounts:
            m.kill()


def test_negative_control_lying_fsync_is_caught(tmp_path, faultfs):
    fs = faultfs(1)
    v = make_volume(tmp_path / "vol", n=2, k=1,
                    replica_paths=[fs.path / f"r{i}" for i in range(2)])
    fs.set(ignore_fsync=True)  # fsync says yes but keeps nothing
    try:
        acked, restored = power_loss_round(v, fs, random.Random(1), 0, min_acked=5)
    finally:
        for m in v.mounts:
            m.kill()
    assert acked > 0
    assert restored is None or restored < acked, "the harness failed to see lost commits"
