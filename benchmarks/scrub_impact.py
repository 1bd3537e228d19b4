"""Commit latency of a lightningd-style loop with and without a live scrub on the same mount.

    .venv/bin/python benchmarks/scrub_impact.py [--data-mib 256] [--commits 400] [--rate MB/S]

Makes a fresh n=2 k=1 volume under --root (default /var/tmp), fills it with --data-mib of
data, then runs the commit loop of tests/workload.py (SQLite, rollback journal,
synchronous=FULL) twice: alone, and while `lnmirror scrub MOUNTPOINT` runs.  Prints what it
measured on this run: p50/p99/max commit latency, commits/s, and the p99 ratio (the target
is <= 2x).  Everything it made is unmounted and removed."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
import workload  # noqa: E402

LNMIRROR = [str(REPO / ".venv" / "bin" / "lnmirror")]
MOUNT = [str(REPO / ".venv" / "bin" / "mount_lnmirror")]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def commit_loop(directory: str, commits: int, stop: threading.Event | None = None) -> list[float]:
    db = workload.open_db(directory)
    first = db.execute("SELECT intval FROM vars WHERE name='data_version'").fetchone()[0] + 1
    latencies = []
    try:
        for number in range(first, first + commits):
            if stop is not None and stop.is_set():
                break
            started = time.perf_counter()
            workload.commit_once(db, number)
            latencies.append(time.perf_counter() - started)
    finally:
        db.close()
    return latencies


def summary(latencies: list[float]) -> dict:
    return {"commits": len(latencies), "p50_ms": percentile(latencies, 0.5) * 1e3,
            "p99_ms": percentile(latencies, 0.99) * 1e3, "max_ms": max(latencies) * 1e3,
            "per_s": len(latencies) / sum(latencies)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", default="/var/tmp")
    p.add_argument("--data-mib", type=int, default=256)
    p.add_argument("--commits", type=int, default=400)
    p.add_argument("--rate", type=float, help="lnmirror scrub --rate (default: scrub's own)")
    args = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix="lnm-scrub-impact-", dir=args.root))
    mnt = root / "mnt"
    replicas = [root / "a", root / "b"]
    for d in [mnt, *replicas]:
        d.mkdir()
    key = root / "key"
    replica_args = [a for r in replicas for a in ("--replica", str(r))]
    daemon = None
    try:
        subprocess.run(LNMIRROR + ["init", *replica_args, "--key-file", str(key)], check=True,
                       capture_output=True)
        daemon = subprocess.Popen(MOUNT + [str(mnt), "-f", *replica_args, "--key-file", str(key)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        subprocess.run(LNMIRROR + ["status", str(mnt), "--wait", "30"], check=True,
                       capture_output=True)
        chunk = os.urandom(1 << 20)
        with open(mnt / "data", "wb") as f:
            for _ in range(args.data_mib):
                f.write(chunk)
            os.fsync(f.fileno())
        commit_loop(str(mnt), 20)  # warm up: schema, journal
        alone = summary(commit_loop(str(mnt), args.commits))
        scrub_cmd = LNMIRROR + ["scrub", str(mnt), "--json"] + (
            ["--rate", str(args.rate)] if args.rate else [])
        started = time.monotonic()
        scrub = subprocess.Popen(scrub_cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        stop = threading.Event()
        watcher = threading.Thread(target=lambda: (scrub.wait(), stop.set()), daemon=True)
        watcher.start()
        during = commit_loop(str(mnt), 10 * args.commits, stop)
        scrub.wait()
        scrub_seconds = time.monotonic() - started
        with_scrub = summary(during)
        print(f"machine: {os.cpu_count()} cores; volume n=2 k=1 on {args.root}; "
              f"{args.data_mib} MiB of data; lnmirror {' '.join(scrub_cmd[1:])}")
        print(f"scrub took {scrub_seconds:.1f}s ({args.data_mib * 2**20 / 1e6 / scrub_seconds:.0f} "
              f"MB/s of data), exit {scrub.returncode}")
        for name, s in (("alone", alone), ("during scrub", with_scrub)):
            print(f"{name:>13}: {s['commits']} commits, p50 {s['p50_ms']:.2f} ms, "
                  f"p99 {s['p99_ms']:.2f} ms, max {s['max_ms']:.1f} ms, {s['per_s']:.0f} commits/s")
        ratio = with_scrub["p99_ms"] / alone["p99_ms"]
        print(f"p99 ratio during/alone: {ratio:.2f}x (target <= 2x)")
        return 0
    finally:
        if daemon is not None:
            subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True)
            daemon.wait(120)
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
