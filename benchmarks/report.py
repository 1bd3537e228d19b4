"""Statistics, ratios, the machine's description and the printed tables of the end-to-end
benchmark (run.py)."""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

from common import REPO

# (measurement, metric, unit, label): the rows of the main table
ROWS = (
    ("commit_delete", "commits_per_s", "commits/s", "SQLite commit, rollback journal"),
    ("commit_delete", "p50_ms", "ms", "  commit latency p50"),
    ("commit_delete", "p99_ms", "ms", "  commit latency p99"),
    ("commit_wal", "commits_per_s", "commits/s", "SQLite commit, WAL"),
    ("commit_wal", "p50_ms", "ms", "  commit latency p50"),
    ("commit_wal", "p99_ms", "ms", "  commit latency p99"),
    ("iops_4k_fdatasync", "iops", "IOPS", "4K pwrite+fdatasync"),
    ("iops_4k_fdatasync", "p50_ms", "ms", "  latency p50"),
    ("iops_4k_fdatasync", "p99_ms", "ms", "  latency p99"),
    ("seq_write", "mib_per_s", "MiB/s", "seq write + fsync"),
    ("seq_read", "mib_per_s", "MiB/s", "seq read, cold"),
    ("rand_read_4k", "iops", "IOPS", "4K random read, cold"),
    ("rand_read_4k", "p50_ms", "ms", "  latency p50"),
    ("scrub", "mb_per_s", "MB/s", "scrub (plain: cold read)"),
    ("scrub", "space_amplification", "x", "  disk bytes / logical bytes"),
    ("restore", "mb_per_s", "MB/s", "restore (plain: copy+fsync)"),
    ("daemon_rss", "peak_rss_mib", "MiB", "daemon peak RSS (VmHWM)"),
)
# the rows of the live-scrub table: metrics of measurement "scrub_live"
SCRUB_LIVE_ROWS = (
    ("alone_commits_per_s", "commits/s", "commit loop alone"),
    ("alone_p50_ms", "ms", "  p50"),
    ("alone_p99_ms", "ms", "  p99"),
    ("alone_max_ms", "ms", "  max"),
    ("during_commits_per_s", "commits/s", "during lnmirror scrub MOUNTPOINT"),
    ("during_p50_ms", "ms", "  p50"),
    ("during_p99_ms", "ms", "  p99"),
    ("during_max_ms", "ms", "  max"),
    ("p99_ratio", "x", "p99 during / alone"),
    ("scrub_seconds", "s", "live scrub time"),
    ("scrub_mb_per_s", "MB/s", "  logical bytes / time"),
)
SCALE_ROWS = (
    ("fill_mib_per_s", "MiB/s", "fill: 1 MiB writes, fsync per file"),
    ("commits_per_s", "commits/s", "commit loop, rollback journal"),
    ("p50_ms", "ms", "  commit latency p50"),
    ("p99_ms", "ms", "  commit latency p99"),
    ("p99_9_ms", "ms", "  commit latency p99.9"),
    ("max_ms", "ms", "  commit latency max"),
    ("commits_over_50ms", "commits", "  commits over 50 ms"),
    ("unmount_s", "s", "unmount (until the daemon exited)"),
    ("mount_s", "s", "mount, caches dropped"),
    ("mount_empty_s", "s", "  mount of the empty volume"),
    ("peak_rss_mib", "MiB", "daemon peak RSS (VmHWM), whole profile"),
)
BASES = ("plain", "floor", "floor-data", "gocryptfs")  # ratios of lnmirrorfs to each; others to plain only
RATIO_COLUMNS = (("lnmirror-2", "floor"), ("lnmirror-2", "floor-data"), ("lnmirror-2", "gocryptfs"))


# ---------------------------------------------------------------- statistics

def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    s = sorted(values)
    if not s:
        return float("nan")
    pos = (len(s) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def latency_stats(latencies: list[float]) -> dict:
    return {"p50_ms": percentile(latencies, 50) * 1e3, "p99_ms": percentile(latencies, 99) * 1e3,
            "p99_9_ms": percentile(latencies, 99.9) * 1e3, "max_ms": max(latencies) * 1e3,
            "mean_ms": statistics.fmean(latencies) * 1e3}


def medians(reps: list[dict]) -> dict:
    keys = [k for k, v in reps[0].items() if isinstance(v, int | float) and not isinstance(v, bool)]
    return {k: statistics.median(r[k] for r in reps if isinstance(r.get(k), int | float)) for k in keys
            if all(isinstance(r.get(k), int | float) for r in reps)}


def median_of(report: dict, target: str, measurement: str) -> dict:
    return report["targets"].get(target, {}).get("measurements", {}).get(measurement, {}).get("median", {})


def add_ratios(report: dict) -> None:
    """ratio_vs_plain for every target, and ratio_vs_floor / _floor-data / _gocryptfs for lnmirrorfs."""
    for name, t in report["targets"].items():
        bases = [b for b in BASES if b != name and (b == "plain" or name.startswith("lnmirror"))]
        for measurement, body in t.get("measurements", {}).items():
            for base in bases:
                against = median_of(report, base, measurement)
                if "median" in body and against:
                    body[f"ratio_vs_{base}"] = {k: v / against[k] for k, v in body["median"].items()
                                                if against.get(k)}


# ---------------------------------------------------------------- the machine

def machine_info(scratch: Path) -> dict:
    mem_kib = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    df = subprocess.run(["df", "-T", str(scratch)], capture_output=True, text=True).stdout.strip()
    fields = df.splitlines()[-1].split() if df else []
    git = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty"],
                         capture_output=True, text=True).stdout.strip()
    gocryptfs = shutil.which("gocryptfs")
    return {
        "nproc": os.cpu_count(), "cpu": cpu, "mem_total_gib": round(mem_kib / 2**20, 1),
        "kernel": platform.release(), "python": sys.version.split()[0],
        "scratch": str(scratch), "scratch_device": fields[0] if fields else None,
        "scratch_fstype": fields[1] if len(fields) > 1 else None, "df_T": df,
        "git": git or None, "lnmirrorfs_source_digest": source_digest(), "loadavg_at_start": loadavg(),
        "gocryptfs": subprocess.run([gocryptfs, "-version"], capture_output=True, text=True)
        .stdout.strip() if gocryptfs else None,
    }


def source_digest() -> str:
    """Of lnmirrorfs/*.py: every mount starts a new daemon, so edits during a run would mix versions."""
    h = hashlib.blake2b(digest_size=8)
    for path in sorted((REPO / "lnmirrorfs").glob("*.py")):
        h.update(path.name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


# ---------------------------------------------------------------- tables

def format_value(value: float) -> str:
    """Three significant digits, never exponent notation; a count as it is."""
    if isinstance(value, int):
        return str(value)
    for limit, digits in ((100, 0), (10, 1), (1, 2)):
        if abs(value) >= limit:
            return f"{value:.{digits}f}"
    return f"{value:.3f}"


def table(head: list[str], rows: list[list[str]], first: int = 42, width: int = 16) -> list[str]:
    """Lines of a table: the first two columns left-aligned (label, unit), the rest right."""
    def line(cells: list[str]) -> str:
        return f"{cells[0]:<{first}}{cells[1]:<10}" + "".join(f"{c:>{width}}" for c in cells[2:])
    top = line(head)
    return [top, "-" * len(top)] + [line(r) for r in rows] + ["-" * len(top)]


def cell(t: dict, measurement: str, metric: str) -> str:
    body = t.get("measurements", {}).get(measurement, {})
    if t.get("skipped"):
        return "skipped"
    if metric in body.get("median", {}):
        return format_value(body["median"][metric])
    return "FAILED" if "errors" in body or "error" in t else "-"


def ratio_label(a: str, b: str) -> str:
    return f"{a.replace('lnmirror-', 'lnm')}/{b}"


def format_table(report: dict) -> str:
    targets = report["targets"]
    names = list(targets)
    ratios = [(a, b) for a, b in RATIO_COLUMNS if targets.get(a, {}).get("measurements")
              and targets.get(b, {}).get("measurements")]
    rows = []
    for measurement, metric, unit, label in ROWS:
        cells = []
        for name in names:
            text = cell(targets[name], measurement, metric)
            base = median_of(report, "plain", measurement).get(metric)
            value = median_of(report, name, measurement).get(metric)
            if name != "plain" and base and value is not None:
                text += f" ({value / base:.2f}x)"
            cells.append(text)
        for a, b in ratios:
            ratio = targets[a]["measurements"][measurement].get(f"ratio_vs_{b}", {}).get(metric)
            cells.append(f"{ratio:.2f}x" if ratio else "-")
        rows.append([label, unit] + cells)
    lines = table(["measurement", "unit"] + names + [ratio_label(a, b) for a, b in ratios], rows)
    lines.append(f"median of {report['params']['reps']} rep(s); (Nx) = ratio to the plain directory's "
                 "median; for ms and RSS lower is better")
    for a, b in ratios:
        lines.append(f"{ratio_label(a, b)} = {a} / {b}, median by median")
    for name in names:
        t = targets[name]
        lines.append(f"{name}: " + (f"skipped: {t['skipped']}" if t.get("skipped") else t["description"]))
    return "\n".join(lines)


def format_scrub_live(report: dict) -> str:
    names = [n for n, t in report["targets"].items() if median_of(report, n, "scrub_live")
             or "errors" in t.get("measurements", {}).get("scrub_live", {})]
    if not names:
        return ""
    rows = [[label, unit] + [cell(report["targets"][n], "scrub_live", metric) for n in names]
            for metric, unit, label in SCRUB_LIVE_ROWS]
    lines = ["commit latency during a live scrub (tests/workload.py loop, rollback journal; "
             f"{report['params']['scrub_commits']} commits alone, then until the scrub ends)"]
    lines += table(["", "unit"] + names, rows)
    lines.append(f"median of {report['params']['reps']} rep(s)")
    return "\n".join(lines)


def format_scale(report: dict) -> str:
    scale = report.get("scale")
    if not scale:
        return ""
    if "skipped" in scale or "error" in scale:
        return f"scale profile: {scale.get('skipped') or 'FAILED: ' + scale['error']}"
    m = scale["measurements"]
    rows = [[label, unit, format_value(m[metric]) if metric in m else "-"]
            for metric, unit, label in SCALE_ROWS]
    lines = [f"scale profile: {scale['description']}, {m['mib'] / 1024:.2f} GiB in {m['files']} files, "
             f"then {m['commits']} commits"]
    lines += table(["", "unit", "lnmirror-2"], rows)
    return "\n".join(lines)


def format_space(report: dict) -> str:
    space = report.get("space")
    if not space:
        return ""
    if "skipped" in space:
        return f"space profile: {space['skipped']}"
    names = list(space)
    cells = {name: space[name].get("measurements") for name in names}
    first = next((m for m in cells.values() if m), None)
    if first is None:
        return "space profile: FAILED: " + "; ".join(space[name].get("error", "?") for name in names)
    rows = [[label, "x", *(format_value(m[metric]) if m else "FAILED" for m in cells.values())]
            for metric, label in (
                ("db_per_replica", f"database after {first['commits']} commits: disk / logical"),
                ("once_per_replica", f"a {first['once_bytes'] >> 20} MiB file written once: disk / logical"))]
    shapes = ", ".join(f"{n}: {space[n].get('description', '')}" for n in names)
    lines = ["space profile: allocated bytes of the largest replica (header, snapshot, log and slot "
             f"files) / logical bytes; fresh volumes ({shapes}), unmounted"]
    lines += table(["per replica", "unit", *names], rows)
    return "\n".join(lines)
