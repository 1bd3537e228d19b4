"""End-to-end benchmark: lnmirrorfs against a plain directory, its floor and gocryptfs, measured here.

One command runs every measurement on every target and prints the tables: the main one,
commit latency during a live scrub, and the scale profile.

Targets, all under one scratch directory on one disk (a mkdtemp under /var/tmp, or under
--dir), removed at the end:

* ``plain``      -- a directory on the scratch filesystem: the physical limit;
* ``floor``      -- benchmarks/floorfs.py mounted with 2 replica directories: a pyfuse3 + trio
  filesystem with lnmirrorfs' FUSE settings and its durability barriers (per committing
  operation a pwrite + fdatasync of a small record on each replica's log, one worker thread
  per replica, W=2) but no data work: file data goes unsynced to one backing directory.  It
  is the floor of lnmirrorfs' protocol on this disk; "cold" there is caches dropped (its
  tree lives in the daemon's memory, so it is never remounted in between);
* ``floor-data`` -- the same with every record also carrying the bytes its operation made
  durable (``floorfs.py --carry-data``): each barrier flushes what lnmirrorfs' flushes, so
  lnm2/floor-data is what encryption, FEC, the tree and the slot files cost beyond it;
* ``lnmirror-2`` -- an lnmirrorfs volume, 2 replicas, k=1 (``lnmirror init`` + ``mount_lnmirror -f``);
* ``lnmirror-3`` -- an lnmirrorfs volume, 3 replicas, k=2;
* ``gocryptfs``  -- gocryptfs over one directory, if the ``gocryptfs`` binary is installed
  (skipped with a note otherwise; this script installs nothing).

Measurements, each repeated --reps times; the table shows the median of the reps, the
ratio to the plain directory's median of the same run, and the columns lnm2/floor,
lnm2/floor-data and lnm2/gocryptfs: lnmirror-2's median divided by theirs (the JSON holds
ratio_vs_plain for every target, and ratio_vs_floor, _floor-data and _gocryptfs for lnmirrorfs):

* ``commit_delete`` / ``commit_wal`` -- the lightningd-style SQLite loop of tests/workload.py
  (synchronous=FULL) in rollback-journal and WAL mode, on a fresh database per rep:
  ``workload.run()`` itself with each ``workload.commit_once`` timed, so the workload's side
  effects (gossip_store append, lightning-rpc ping, the files it replaces or rewrites every
  few commits) run as in the tests.  commits/s = commits / wall time from the first commit
  to the end of the loop (side effects included); p50/p99 = latency of commit_once alone.
* ``iops_4k_fdatasync`` -- 4 KiB pwrite + fdatasync at random 4 KiB-aligned offsets of a
  preallocated (fully written and fsynced) --iops-file-mib file.
* ``seq_write`` -- --seq-mib MiB in 1 MiB write()s, then fsync; time until fsync returns.
* ``seq_read`` -- the same file read in 1 MiB read()s from a cold start: caches dropped
  (sync; echo 3 > /proc/sys/vm/drop_caches) and, for FUSE targets, unmounted and mounted
  again first so the daemon's cache is cold too.
* ``rand_read_4k`` -- 4 KiB preads at random aligned offsets of that file after another cold
  start; POSIX_FADV_RANDOM is set first (as fio does) so kernel readahead stays out.  IOPS =
  reads / summed pread time: the check of each read's bytes between preads is not timed.
* ``scrub_live`` -- lnmirrorfs: commit latency during a live scrub.  The commit loop
  (workload.run, rollback journal, timed as above) runs --scrub-commits commits alone on a
  fresh database, then goes on while ``lnmirror scrub MOUNTPOINT`` verifies the mounted
  volume (what the steps above left in it), until the scrub ends (at most 10x as many
  commits).  Reported: p50/p99/max and commits/s of both loops, the p99 ratio, the scrub's
  wall time and logical MB/s; a scrub that does not exit 0 "clean" is an anomaly.
* ``scrub`` -- lnmirrorfs: wall time of ``lnmirror scrub`` on the unmounted volume, caches
  dropped; MB/s = logical bytes in the volume / time.  The volume then holds what the steps
  above left: the SQLite directories, the last rep's 4K-write file and its --seq-mib file.
  Also reported: bytes allocated on disk below the target (all replicas, logs included)
  divided by those logical bytes.  The same bytes are read cold from
  the plain directory (reading everything is what verifying it costs there) and checked by
  ``gocryptfs -fsck`` for gocryptfs.
* ``restore`` -- lnmirrorfs: wall time of ``lnmirror restore`` into a fresh directory (every
  file fsynced), caches dropped first; the plain and gocryptfs analogue is a cold copy of
  the tree with an fsync per file.  The restored big file's BLAKE2b is checked.
* ``daemon_rss`` -- FUSE targets: peak RSS (VmHWM of /proc/PID/status, reset through
  clear_refs and on a fresh mount) of the mount daemon while a --rss-mib file is written
  and fsynced; the file is deleted afterwards.  A plain directory has no daemon.

The scale profile (--scale-gib, default 3; --no-scale skips it) runs on a fresh lnmirror-2
volume (n=2 k=1) of its own: it is filled with that many GiB in 1 MiB write()s (files of
up to 256 MiB, an fsync each), then the commit loop runs --scale-commits commits (rollback
journal, timed as above): p50/p99/p99.9/max and the number of commits over 50 ms.  Then the
unmount is timed (fusermount3 -u until the daemon exited, its flush and snapshot included),
caches are dropped and the mount is timed (until the mountpoint is up), and 16 random MiB
are read back and checked.  Peak RSS: the highest VmHWM of the daemons (the first from the
mount of the empty volume to its exit, sampled every 50 ms; the second after its mount).

The space profile (--no-space skips it) runs on fresh lnmirror-2 (k=1) and lnmirror-3 (k=2)
volumes: --space-commits commits of the commit loop (rollback journal), unmount, and the
allocated bytes (st_blocks) of each replica directory against the logical bytes in the
volume; then a --space-mib file written once (1 MiB write()s, fsync), unmount, and each
replica's growth against the file's size.  The table gives the largest replica's figure.

Data read back is checked (chunk stamps on sequential reads, every random 4 KiB read
against the expected bytes, SQLite integrity and commit count, restored file digests);
a mismatch, a failed step, a non-zero daemon exit or a warning in a daemon's log is
listed under "anomalies" and makes the exit code 1.

As root, the script re-executes itself under ``unshare --mount --propagation private``: its
mounts stay invisible to other processes, so a mount namespace that some other program
creates meanwhile (``ip netns exec`` copies every mount) cannot keep a FUSE session alive
after ``fusermount3 -u`` (--shared-mounts turns this off).  A daemon that still does not
exit is ended by pid and the step is reported as failed.

MiB = 2**20 bytes (seq, RSS); MB = 10**6 bytes (scrub, restore).  Run as root (dropping
caches needs it; without it the numbers are marked warm) from the repository root:

    python benchmarks/run.py                 # defaults, 20-40 minutes
    python benchmarks/run.py --smoke         # tiny sizes, 1 rep, well under a minute

It prints the machine, the command line and the table, and writes everything (every rep)
to benchmarks/results/run.json (or --output).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from common import ANOMALIES, CACHE_NOTE, LOADS, REPO, anomaly, step
from measure import Pattern, measure_scale, measure_space, run_target
from report import (
    add_ratios,
    format_scale,
    format_scrub_live,
    format_space,
    format_table,
    loadavg,
    machine_info,
    source_digest,
)
from targets import NAMES, Lnmirror, Target, make_target, mounts_below

DEFAULT_OUTPUT = REPO / "benchmarks" / "results" / "run.json"
NS_MARK = "LNMIRROR_BENCH_PRIVATE_NS"

FULL = {"commits": 500, "iops_ops": 1000, "iops_file_mib": 16, "seq_mib": 512, "randread_ops": 2000,
        "rss_mib": 2048, "scrub_commits": 400, "scale_gib": 3.0, "scale_commits": 3000,
        "space_commits": 10000, "space_mib": 256, "reps": 3}
SMOKE = {"commits": 20, "iops_ops": 50, "iops_file_mib": 16, "seq_mib": 8, "randread_ops": 50,
         "rss_mib": 16, "scrub_commits": 10, "scale_gib": 0.02, "scale_commits": 30,
         "space_commits": 30, "space_mib": 4, "reps": 1}
HELP = {"reps": "repetitions per measurement", "commits": "commits per SQLite loop",
        "iops_ops": "4K pwrite+fdatasync ops", "iops_file_mib": "size of the preallocated 4K-write file",
        "seq_mib": "sequential file size", "randread_ops": "cold 4K random reads",
        "rss_mib": "file written while watching daemon RSS",
        "scrub_commits": "commits alone before the live scrub", "scale_gib": "GiB in the scale volume",
        "scale_commits": "commits of the scale profile",
        "space_commits": "commits before the space profile's first count",
        "space_mib": "file written once in the space profile"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true",
                   help="tiny sizes and 1 rep: " + ", ".join(f"{k}={v}" for k, v in SMOKE.items()))
    for key, text in HELP.items():
        p.add_argument("--" + key.replace("_", "-"), type=type(FULL[key]),
                       help=f"{text} (default {FULL[key]})")
    p.add_argument("--no-scale", action="store_true", help="skip the scale profile")
    p.add_argument("--no-space", action="store_true", help="skip the space profile")
    p.add_argument("--targets", default=",".join(NAMES), help=f"comma-separated subset of {','.join(NAMES)}")
    p.add_argument("--dir", type=Path, default=Path("/var/tmp"),
                   help="the scratch directory is made (and removed) inside this one (default /var/tmp)")
    p.add_argument("--keep", action="store_true", help="keep the scratch directory (debugging)")
    p.add_argument("--shared-mounts", action="store_true",
                   help="mount in the host's mount namespace (default: a private one when root)")
    p.add_argument("--output", type=Path, default=DEFAULT_OUTPUT,
                   help=f"JSON results file (default {DEFAULT_OUTPUT})")
    args = p.parse_args(argv)
    profile = SMOKE if args.smoke else FULL
    args.params = {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in profile.items()}
    for k, v in args.params.items():
        if v <= 0 or (isinstance(v, int) and v < 1):
            p.error(f"--{k.replace('_', '-')} must be positive")
    args.target_names = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = set(args.target_names) - set(NAMES)
    if unknown:
        p.error(f"unknown targets: {', '.join(sorted(unknown))}")
    return args


def private_mount_namespace(args: argparse.Namespace, argv: list[str] | None) -> str:
    """Run in a mount namespace of our own (re-executing under unshare(1)), so no other process
    gets copies of our mounts: a namespace some other program creates while we are mounted
    would otherwise keep the FUSE session alive after fusermount3 -u, and the daemon with it."""
    if os.environ.get(NS_MARK) == str(os.getpid()):
        return "private (unshare --mount --propagation private)"
    if args.shared_mounts:
        return "the host's (--shared-mounts)"
    if argv is not None or os.geteuid() != 0 or not shutil.which("unshare"):
        return "the host's (a private one needs root, unshare(1) and running as a script)"
    probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "true"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        return f"the host's (unshare failed: {probe.stderr.strip()})"
    sys.stdout.flush()
    os.environ[NS_MARK] = str(os.getpid())  # unshare(1) execs in place: the pid stays ours
    os.execvp("unshare", ["unshare", "--mount", "--propagation", "private", sys.executable] + sys.argv)
    raise AssertionError("not reached")


def measure_target(target: Target, entry: dict, keep: bool, run: Callable[[], dict]) -> None:
    """Run `run` on `target` into entry["measurements"]; whatever happens, unmount it, report
    its daemon's log and (unless --keep) remove its directory to free the disk for the next."""
    entry["description"] = target.describe()
    try:
        entry["measurements"] = run()
        entry["mounts"] = target.mounts
    except Exception as exc:  # noqa: BLE001 - report, go on with the next target
        anomaly(target.name, f"failed: {type(exc).__name__}: {exc}")
        entry["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        target.close()
        target.check_log()
        if not keep:
            shutil.rmtree(target.root, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    namespace = private_mount_namespace(args, argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the finally blocks run
    args.dir.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="lnmirror-bench-", dir=args.dir)).resolve()
    env = dict(os.environ, LNMIRROR_KEYDIR=str(scratch / "keys"), LNMIRROR_RUNDIR=str(scratch / "run"),
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    command = shlex.join([sys.executable] + (sys.argv if argv is None else [sys.argv[0]] + argv))
    started_wall, started = time.time(), time.perf_counter()
    machine = machine_info(scratch)
    machine["mount_namespace"] = namespace
    print(f"command: {command}")
    print(f"machine: nproc={machine['nproc']} ({machine['cpu']}), memory={machine['mem_total_gib']} GiB, "
          f"kernel={machine['kernel']}, python={machine['python']}, repo={machine['git']} "
          f"(lnmirrorfs source {machine['lnmirrorfs_source_digest']})")
    print(f"scratch: {scratch}, filesystem {machine['scratch_fstype']} on {machine['scratch_device']} "
          "(df -T):")
    print("  " + machine["df_T"].replace("\n", "\n  "))
    print(f"mount namespace: {namespace}")
    print(f"gocryptfs: {machine['gocryptfs'] or 'not installed'}")
    print(f"load average at start: {machine['loadavg_at_start']} (other work on this machine skews numbers)")
    print("params: " + ", ".join(f"{k}={v}" for k, v in args.params.items()), flush=True)

    pattern = Pattern()
    report: dict = {"benchmark": "run", "command": command, "started_unix": started_wall,
                    "machine": machine, "params": args.params, "targets": {}}
    targets: list[Target] = []
    try:
        for name in args.target_names:
            if name == "gocryptfs" and not shutil.which("gocryptfs"):
                note = "gocryptfs is not installed (Debian: apt-get install gocryptfs)"
                print(f"{name}: skipped: {note}", flush=True)
                report["targets"][name] = {"skipped": note}
                continue
            target = make_target(name, scratch, env)
            targets.append(target)
            report["targets"][name] = {}

            def run(target: Target = target) -> dict:
                step(target.name, "setup")
                target.setup()
                return run_target(target, args.params, pattern)

            measure_target(target, report["targets"][name], args.keep, run)
        if args.no_scale:
            report["scale"] = {"skipped": "--no-scale"}
        else:
            target = Lnmirror(scratch / "scale", env, 2, 1)
            targets.append(target)
            report["scale"] = {}
            measure_target(target, report["scale"], args.keep,
                           lambda: measure_scale(target, args.params, pattern))
        report["space"] = {}
        for n, k in ((2, 1), (3, 2)):
            if args.no_space:
                report["space"] = {"skipped": "--no-space"}
                break
            space = Lnmirror(scratch / f"space-{n}", env, n, k)
            targets.append(space)
            report["space"][space.name] = {}
            measure_target(space, report["space"][space.name], args.keep,
                           lambda space=space: measure_space(space, args.params, pattern))
    finally:
        for target in targets:
            target.close()
        left = mounts_below(scratch)
        if left:
            print(f"! mounts still present, not removing {scratch}: {left}", file=sys.stderr)
        elif not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)

    add_ratios(report)
    report["duration_s"] = time.perf_counter() - started
    report["loadavg_at_end"] = loadavg()
    loads = LOADS or [0.0]
    report["loadavg_1min_at_steps"] = {"min": min(loads), "median": statistics.median(loads),
                                       "max": max(loads)}
    report["lnmirrorfs_source_changed_during_run"] = source_digest() != machine["lnmirrorfs_source_digest"]
    report["cold_cache_note"] = CACHE_NOTE[0] if CACHE_NOTE else "caches dropped before every cold step"
    report["anomalies"] = ANOMALIES
    main_table = format_table(report) if report["targets"] else ""  # --targets '': the scale profile only
    for section in (main_table, format_scrub_live(report), format_scale(report), format_space(report)):
        if section:
            print()
            print(section)
    if ANOMALIES:
        print(f"\nanomalies ({len(ANOMALIES)}):")
        for line in ANOMALIES:
            print(f"  {line}")
    if CACHE_NOTE:
        print(f"note: {CACHE_NOTE[0]}")
    if report["lnmirrorfs_source_changed_during_run"]:
        print("note: lnmirrorfs/*.py changed during the run: later mounts ran other code than earlier ones")
    at_steps = report["loadavg_1min_at_steps"]
    print(f"\ntotal time {report['duration_s']:.1f}s; load average at end {report['loadavg_at_end']}; "
          f"1-minute load at the {len(LOADS)} steps: min {at_steps['min']:.2f}, "
          f"median {at_steps['median']:.2f}, max {at_steps['max']:.2f} (2 cores)")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.output}")
    return 1 if ANOMALIES else 0


if __name__ == "__main__":
    sys.exit(main())
