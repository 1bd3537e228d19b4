"""Scrub, status, restore and replace: bitrot, stale replicas, heal under a live workload."""

from __future__ import annotations

import itertools
import json
import os
import random
import re
import shutil
import subprocess
import sys

import pytest

import workload
from conftest import REPO, lnmirror, replica_layout
from lnmirrorfs import format


def scrub(v, *args: str) -> subprocess.CompletedProcess:
    return lnmirror("scrub", *v.replica_args(), "--json", *args, check=False)


def tree_bytes(root) -> dict[str, bytes]:
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            path = os.path.join(dirpath, name)
            out[os.path.relpath(path, root)] = open(path, "rb").read()
    return out


def snapshot_replicas(v) -> dict[str, bytes]:
    return {f"{r.name}/{k}": data for r in v.replicas for k, data in tree_bytes(r).items()
            if not k.endswith(format.LOCK_NAME)}


def write_files(m, rng: random.Random) -> dict[str, bytes]:
    files = {f"file{i}": rng.randbytes(rng.randrange(1, 60000)) for i in range(6)}
    for name, data in files.items():
        (m.path / name).write_bytes(data)
    return files


def flip_bytes(path, count: int, rng: random.Random, lo: int = 0, hi: int | None = None) -> None:
    data = bytearray(open(path, "rb").read())
    hi = len(data) if hi is None else min(hi, len(data))
    for i in rng.sample(range(lo, hi), min(count, hi - lo)):
        data[i] ^= 1 << rng.randrange(8)
    with open(path, "wb") as f:
        f.write(data)


@pytest.mark.parametrize("shape", [(2, 1), (3, 2), (5, 3)], ids=["n2k1", "n3k2", "n5k3"])
def test_bitrot_in_up_to_n_minus_k_replicas_is_healed(make_vol, shape, tmp_path):
    n, k = shape
    rng = random.Random(f"bitrot{n}{k}")
    v = make_vol(n=n, k=k)
    m = v.mount()
    files = write_files(m, rng)
    assert m.unmount() == 0
    # Damage every replica position in turn, up to n-k of them at once, data and metadata.
    for damaged in itertools.combinations(v.replicas, n - k):
        for r in damaged:
            for data_file in (r / "data").iterdir():
                flip_bytes(data_file, 40, rng)
        proc = scrub(v)
        report = json.loads(proc.stdout)
        assert proc.returncode == 1, proc.stdout + proc.stderr
        assert report["bad_shares"] > 0 and not report["unrepairable"]
        assert scrub(v).returncode == 0  # a second pass finds nothing
        for r in damaged:
            flip_bytes(r / "meta" / "snapshot", 3, rng, lo=16)  # past magic and seq
        proc = scrub(v)
        report = json.loads(proc.stdout)
        assert proc.returncode == 1, proc.stdout + proc.stderr
        assert sorted(report["healed_replicas"]) == sorted(str(r) for r in damaged)
        assert scrub(v).returncode == 0
    # Each k-subset alone now restores identical trees.
    for i, subset in enumerate(itertools.combinations(v.replicas, k)):
        out = tmp_path / f"out{i}"
        v.restore(out, replicas=list(subset))
        assert tree_bytes(out) == files


def test_more_than_n_minus_k_damaged_shares_is_unrepairable(make_vol):
    rng = random.Random(7)
    v = make_vol(n=3, k=2)
    m = v.mount()
    (m.path / "victim").write_bytes(rng.randbytes(20000))
    assert m.unmount() == 0
    for r in v.replicas[:2]:  # 2 of 3 shares of block 0 damaged, k=2: cannot decode
        data_file = next((r / "data").iterdir())
        body = replica_layout(r).body_offset(0)
        flip_bytes(data_file, 5, rng, lo=body, hi=body + 100)
    before = snapshot_replicas(v)
    proc = scrub(v)
    report = json.loads(proc.stdout)
    assert proc.returncode == 2
    assert any("/victim block 0" in u for u in report["unrepairable"])
    # The damaged block's shares were not "repaired" into something else: still unreadable.
    for key, data in snapshot_replicas(v).items():
        if "/data/" in key:
            assert data == before[key]


def test_a_read_spread_over_the_replicas_falls_back_block_by_block(make_vol, tmp_path):
    """A 1 MiB read is cut into one run per replica; a bad block in either run is read from
    the other replica, whichever run each replica was given."""
    rng = random.Random(11)
    v = make_vol(n=2, k=1)
    m = v.mount()
    data = rng.randbytes(64 * 4096)
    (m.path / "big").write_bytes(data)
    assert m.unmount() == 0
    layout = replica_layout(v.replicas[0])
    for r, blocks in zip(v.replicas, [(5, 60), (6, 61)], strict=True):
        for data_file in (r / "data").iterdir():
            for block in blocks:
                body = layout.body_offset(block)
                flip_bytes(data_file, 3, rng, lo=body, hi=body + layout.body_size)
    v.restore(tmp_path / "out")
    assert (tmp_path / "out" / "big").read_bytes() == data
    report = json.loads(scrub(v).stdout)
    assert report["bad_shares"] == 4 and not report["unrepairable"], report


def test_stale_replica_is_caught_up_at_mount_with_exactly_what_it_missed(make_vol, tmp_path):
    v = make_vol(n=3, k=1)
    m = v.mount()
    (m.path / "before").write_bytes(b"b" * 9000)
    (m.path / "kept").write_bytes(b"k" * 40960)  # 10 blocks
    assert m.unmount() == 0
    away = v.replicas[2].with_name("away")
    os.rename(v.replicas[2], away)
    m = v.mount()
    (m.path / "after").write_bytes(b"a" * 9000)  # 3 blocks
    with open(m.path / "kept", "r+b") as f:  # 1 block
        f.seek(8192)
        f.write(b"K" * 4096)
    (m.path / "before").unlink()  # a deletion it must learn about
    assert m.unmount() == 0
    os.rename(away, v.replicas[2])
    m = v.mount()
    # Back in place it is behind; the mount gives it exactly the 4 blocks born since.
    assert re.search(r"caught up from record \d+ to \d+: 4 shares rewritten", m.output()), m.output()
    status = json.loads(m.status("--json").stdout)
    assert [r["state"] for r in status["replicas"]] == ["ONLINE"] * 3
    assert (m.path / "after").read_bytes() == b"a" * 9000
    assert sorted(os.listdir(m.path)) == ["after", "kept"]
    proc = lnmirror("scrub", str(m.path), "--json", check=False)
    assert proc.returncode == 1, proc.stdout + proc.stderr  # "before"'s data file was left over
    report = json.loads(proc.stdout)
    assert report["bad_shares"] == 0 and report["extra_files"] == 1, report
    assert m.unmount() == 0
    outs = []
    for r in v.replicas:  # every replica, with one other to prove it current
        out = tmp_path / f"out-{r.name}"
        v.restore(out, replicas=[r, v.replicas[0] if r != v.replicas[0] else v.replicas[1]])
        outs.append(tree_bytes(out))
    kept = b"k" * 8192 + b"K" * 4096 + b"k" * (40960 - 12288)
    assert outs[0] == outs[1] == outs[2] == {"after": b"a" * 9000, "kept": kept}
    assert not (v.replicas[2] / "data" / format.data_name(2, 0)).exists()  # "before" is gone


def test_stale_replica_with_damaged_data_is_never_read_wrong_and_scrub_heals_it(make_vol):
    """Catch-up trusts what a lagging replica already held; damage to that is scrub's job,
    and until scrub runs a bad share is detected and read from another replica."""
    v = make_vol(n=2, k=1)
    m = v.mount()
    (m.path / "old").write_bytes(b"o" * 40960)
    assert m.unmount() == 0
    for f in (v.replicas[1] / "data").iterdir():
        flip_bytes(f, 50, random.Random(2))
    m = v.mount()
    assert (m.path / "old").read_bytes() == b"o" * 40960
    proc = lnmirror("scrub", str(m.path), "--json", check=False)
    assert proc.returncode == 1 and json.loads(proc.stdout)["bad_shares"] > 0, proc.stdout
    assert lnmirror("scrub", str(m.path), check=False).returncode == 0
    assert m.unmount() == 0


def test_scrub_during_sqlite_workload_loses_nothing(make_vol):
    v = make_vol(n=3, k=2)
    m = v.mount()
    workload.run(str(m.path), 30)
    worker = subprocess.Popen([sys.executable, str(REPO / "tests" / "workload.py"), str(m.path),
                               "--commits", "150"], stdout=subprocess.PIPE, text=True)
    scrubs = 0
    while worker.poll() is None and scrubs < 20:
        proc = lnmirror("scrub", str(m.path), "--json", check=False)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        scrubs += 1
    out, _ = worker.communicate(timeout=300)
    assert worker.returncode == 0 and "done 180" in out
    assert scrubs >= 2
    assert workload.check_db(str(m.path)) == 180
    assert m.unmount() == 0
    assert scrub(v).returncode == 0


def test_restore_from_every_k_subset_is_identical(make_vol, tmp_path):
    v = make_vol(n=3, k=2)
    m = v.mount()
    rng = random.Random(3)
    files = write_files(m, rng)
    (m.path / "sub").mkdir(0o700)
    os.symlink("../file1", m.path / "sub" / "link")
    workload.run(str(m.path), 10)
    assert m.unmount() == 0
    trees = []
    for i, subset in enumerate(itertools.combinations(v.replicas, 2)):
        out = tmp_path / f"out{i}"
        v.restore(out, replicas=list(subset))
        assert os.readlink(out / "sub" / "link") == "../file1"
        assert oct(os.stat(out / "sub").st_mode & 0o777) == "0o700"
        trees.append(tree_bytes(out))
        assert workload.check_db(str(out)) == 10
    assert trees[0] == trees[1] == trees[2]
    assert all(trees[0][name] == data for name, data in files.items())


def test_replace_vanished_replica_while_mounted(make_vol, tmp_path):
    v = make_vol(n=2, k=1)
    m = v.mount()
    workload.run(str(m.path), 20)
    shutil.rmtree(v.replicas[1])
    new = tmp_path / "new"
    new.mkdir()
    proc = lnmirror("replace", "--mountpoint", str(m.path), str(v.replicas[1]), str(new),
                    "--json", check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert json.loads(proc.stdout)["healed_replicas"] == [str(new)]
    workload.run(str(m.path), 5)  # the replacement takes part in new commits
    assert m.unmount() == 0
    v.restore(tmp_path / "out", replicas=[new])  # the new replica alone restores everything
    assert workload.check_db(str(tmp_path / "out")) == 25


def test_split_brain_is_reported_never_resolved(make_vol, tmp_path):
    v = make_vol(n=2, k=1)
    old = [tmp_path / "old0", tmp_path / "old1"]
    for r, copy in zip(v.replicas, old, strict=True):
        shutil.copytree(r, copy)
    m = v.mount()
    (m.path / "history").write_text("one")
    assert m.unmount() == 0
    # The same volume, started again from the old copies, takes another path...
    m = v.mount(replicas=old, name="mnt-old")
    (m.path / "history").write_text("two")
    assert m.unmount() == 0
    # ...so a replica of each history holds the same record number with other content.
    mixed = [v.replicas[0], old[1]]
    before = {p: (p / "meta" / "log").read_bytes() for p in mixed}
    for command in ("status", "scrub", "restore"):
        args = [command, *v.replica_args(mixed)] + ([str(tmp_path / "out")] if command == "restore"
                                                    else [])
        proc = lnmirror(*args, check=False)
        assert proc.returncode == 2 and "split brain" in proc.stderr, proc.stderr
        assert str(mixed[0]) in proc.stderr and str(mixed[1]) in proc.stderr
    assert {p: (p / "meta" / "log").read_bytes() for p in mixed} == before
