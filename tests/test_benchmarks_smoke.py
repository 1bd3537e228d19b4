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
        m = re.match(r"\s*(\d+)Ki\s+(\d)/(\d)\s+\d+\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s*$", line)
        if m:
            assert all(float(x) > 0 for x in m.groups()[3:]), line
            rows.add((int(m[1]) * 1024, int(m[2]), int(m[3])))
    expected = {(bs, k, n) for bs in (4096, 65536) for k, n in ((1, 2), (2, 3), (3, 5))}
    assert rows == expected, proc.stdout

    cells = json.loads(out.read_text())["cells"]
    assert {(c["block_size"], c["k"], c["n"]) for c in cells} == expected
    assert all(c["encode"]["mb_per_s"] > 0 and c["decode_parity"]["seconds"] >= 0.02 for c in cells)


RUN_TARGETS = ("plain", "lnmirror-2", "lnmirror-3")
RUN_MEASUREMENTS = ("commit_delete", "commit_wal", "iops_4k_fdatasync", "seq_write", "seq_read",
                    "rand_read_4k", "scrub", "restore", "daemon_rss")
HEADLINE = {"commit_delete": "commits_per_s", "commit_wal": "commits_per_s", "iops_4k_fdatasync": "iops",
            "seq_write": "mib_per_s", "seq_read": "mib_per_s", "rand_read_4k": "iops",
            "scrub": "mb_per_s", "restore": "mb_per_s", "daemon_rss": "peak_rss_mib"}


def test_run_benchmark_smoke(tmp_path):
    """benchmarks/run.py --smoke: real mounts, every measurement on every target, no anomaly."""
    out = tmp_path / "run.json"
    env = dict(os.environ, LNMIRROR_KEYDIR=str(tmp_path / "keys"), LNMIRROR_RUNDIR=str(tmp_path / "run"))
    proc = subprocess.run([sys.executable, "benchmarks/run.py", "--smoke", "--output", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "command:" in proc.stdout and "machine: nproc=" in proc.stdout

    report = json.loads(out.read_text())
    assert report["params"]["reps"] == 1 and report["anomalies"] == []
    for name in RUN_TARGETS:
        measurements = report["targets"][name]["measurements"]
        for m in RUN_MEASUREMENTS:
            body = measurements[m]
            if name == "plain" and m == "daemon_rss":
                assert body["not_applicable"], body  # the kernel serves a plain directory
                continue
            assert "errors" not in body, (name, m, body)
            assert len(body["reps"]) == 1, (name, m, body)
            assert body["median"][HEADLINE[m]] > 0, (name, m, body)
            if name != "plain" and m != "daemon_rss":
                assert body["ratio_vs_plain"][HEADLINE[m]] > 0, (name, m, body)
    assert report["targets"]["lnmirror-2"]["measurements"]["scrub"]["reps"][0]["result"] == "clean"
    for line in proc.stdout.splitlines():
        if line.startswith("SQLite commit, rollback journal"):
            assert len(re.findall(r"\(\d+\.\d+x\)", line)) >= 2, line  # a ratio per lnmirror target
            break
    else:
        raise AssertionError(f"no table in the output:\n{proc.stdout}")
