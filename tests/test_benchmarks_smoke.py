"""Smoke tests: the benchmark scripts run end to end and report every cell."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_codec_benchmark_smoke(tmp_path):
    out = tmp_path / "codec.json"  # keep a smoke run from overwriting real results
    proc = subprocess.run([sys.executable, "benchmarks/codec.py", "--seconds", "0.02", "--output", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr

    rows = set()
    for line in proc.stdout.splitlines():
        m = re.match(r"(\w+)\s+(\d+)Ki\s+(\d)/(\d)\s+\d+\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s*$", line)
        if m:
            assert all(float(x) > 0 for x in m.groups()[4:]), line
            rows.add((m[1], int(m[2]) * 1024, int(m[3]), int(m[4])))
    expected = {(cipher, bs, k, n) for cipher in ("xchacha20poly1305", "aegis256")
                for bs in (4096, 65536) for k, n in ((1, 2), (2, 3), (3, 5))}
    assert rows == expected, proc.stdout

    cells = json.loads(out.read_text())["cells"]
    assert {(c["cipher"], c["block_size"], c["k"], c["n"]) for c in cells} == expected
    assert all(c["encode"]["mb_per_s"] > 0 and c["decode_parity"]["seconds"] >= 0.02 for c in cells)


RUN_TARGETS = ("plain", "floor", "floor-data", "lnmirror-2", "lnmirror-3", "gocryptfs")
RUN_MEASUREMENTS = ("commit_delete", "commit_wal", "iops_4k_fdatasync", "seq_write", "seq_read",
                    "rand_read_4k", "daemon_rss", "scrub_live", "scrub", "restore")
HEADLINE = {"commit_delete": "commits_per_s", "commit_wal": "commits_per_s", "iops_4k_fdatasync": "iops",
            "seq_write": "mib_per_s", "seq_read": "mib_per_s", "rand_read_4k": "iops",
            "daemon_rss": "peak_rss_mib", "scrub_live": "during_p99_ms", "scrub": "mb_per_s",
            "restore": "mb_per_s"}
SCALE = ("fill_mib_per_s", "commits_per_s", "p50_ms", "p99_ms", "p99_9_ms", "max_ms", "unmount_s",
         "mount_s", "mount_empty_s", "peak_rss_mib")


def applies(target: str, measurement: str) -> bool:
    if measurement == "daemon_rss":
        return target != "plain"  # the kernel serves a plain directory
    if measurement == "scrub_live":
        return target.startswith("lnmirror")
    if measurement in ("scrub", "restore"):
        return not target.startswith("floor")  # nothing to verify or restore
    return True


def test_run_benchmark_smoke(tmp_path):
    """benchmarks/run.py --smoke: real mounts, every measurement on every target (gocryptfs
    when installed), the ratios to plain, floor and gocryptfs, the scale profile, no anomaly."""
    out = tmp_path / "run.json"
    env = dict(os.environ, LNMIRROR_KEYDIR=str(tmp_path / "keys"), LNMIRROR_RUNDIR=str(tmp_path / "run"))
    proc = subprocess.run([sys.executable, "benchmarks/run.py", "--smoke", "--output", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "command:" in proc.stdout and "machine: nproc=" in proc.stdout

    report = json.loads(out.read_text())
    assert report["params"]["reps"] == 1 and report["anomalies"] == []
    targets = report["targets"]
    measured = [name for name in RUN_TARGETS if not targets[name].get("skipped")]
    assert set(RUN_TARGETS) - set(measured) <= {"gocryptfs"}, targets  # absent: skipped with a note
    for name in measured:
        measurements = targets[name]["measurements"]
        for m in RUN_MEASUREMENTS:
            body = measurements[m]
            if not applies(name, m):
                assert body["not_applicable"], (name, m, body)
                continue
            assert "errors" not in body, (name, m, body)
            assert len(body["reps"]) == 1, (name, m, body)
            assert body["median"][HEADLINE[m]] > 0, (name, m, body)
            bases = [b for b in ("plain", "floor", "floor-data", "gocryptfs") if b in measured and b != name
                     and applies(b, m) and (b == "plain" or name.startswith("lnmirror"))]
            for base in bases:
                assert body[f"ratio_vs_{base}"][HEADLINE[m]] > 0, (name, m, base, body)
    lnm2 = targets["lnmirror-2"]["measurements"]
    assert lnm2["scrub"]["reps"][0]["result"] == "clean"
    assert lnm2["scrub_live"]["reps"][0]["scrub_result"] == "clean"
    assert lnm2["scrub_live"]["median"]["alone_commits_per_s"] > 0

    scale = report["scale"]["measurements"]
    assert all(scale[k] > 0 for k in SCALE), scale
    assert scale["commits"] == report["params"]["scale_commits"] and scale["bad_samples"] == 0
    assert scale["commits_over_50ms"] >= 0

    lines = proc.stdout.splitlines()
    head = next(line for line in lines if line.startswith("measurement"))
    assert "lnm2/floor " in head and "lnm2/floor-data" in head, head
    assert ("lnm2/gocryptfs" in head) == ("gocryptfs" in measured), head
    row = next(line for line in lines if line.startswith("SQLite commit, rollback journal"))
    assert len(re.findall(r"\(\d+\.\d+x\)", row)) == len(measured) - 1, row  # a ratio to plain each
    ratio_columns = len(measured) - 3  # lnm2/floor, lnm2/floor-data and (if measured) lnm2/gocryptfs
    assert len(re.findall(r" \d+\.\d+x(?= |$)", row)) == ratio_columns, row
    assert any(line.startswith("commit latency during a live scrub") for line in lines), proc.stdout
    assert any(line.startswith("scale profile: lnmirrorfs n=2 k=1") for line in lines), proc.stdout
