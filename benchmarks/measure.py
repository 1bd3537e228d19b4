"""The measurements of the end-to-end benchmark (run.py); its docstring says what each one
measures and how.  Each returns the figures of one rep (or of every rep) as dicts."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import stat
import subprocess
import threading
import time
from pathlib import Path

from common import MIB, PAGE, RssWatch, anomaly, drop_caches, proc_status, step
from report import latency_stats, medians
from targets import LNMIRROR, Lnmirror, Target, is_mounted

import workload  # tests/workload.py (common puts tests/ on the path)

MEASUREMENTS = ("commit_delete", "commit_wal", "iops_4k_fdatasync", "seq_write", "seq_read",
                "rand_read_4k", "daemon_rss", "scrub_live", "scrub", "restore")
SLOW_COMMIT = 0.050  # seconds: the scale profile counts commits slower than this

def tree_bytes(root: Path) -> tuple[int, int]:
    """(logical bytes of regular files, counting each inode once; number of files)."""
    seen = set()
    total = files = 0
    for dirpath, _, names in os.walk(root):
        for name in names:
            st = os.lstat(os.path.join(dirpath, name))
            if stat.S_ISREG(st.st_mode) and (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_size
                files += 1
    return total, files


def disk_bytes(root: Path) -> int:
    """Allocated bytes (st_blocks) below root, like du."""
    total = 0
    for dirpath, _, names in os.walk(root):
        for name in names:
            total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
    return total


def file_digest(path: Path) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while chunk := f.read(MIB):
            h.update(chunk)
    return h.hexdigest()


class Pattern:
    """The content of every big file: a random MiB, its first 8 bytes the chunk number."""

    def __init__(self) -> None:
        self.base = bytearray(os.urandom(MIB))
        self.buf = bytearray(self.base)

    def chunk(self, index: int) -> bytearray:
        self.buf[:8] = index.to_bytes(8, "little")
        return self.buf

    def expected(self, offset: int, length: int) -> bytes:
        out = bytearray()
        while length:
            index, within = divmod(offset, MIB)
            take = min(length, MIB - within)
            out += bytes(self.chunk(index)[within:within + take])
            offset += take
            length -= take
        return bytes(out)

    def digest(self, mib: int) -> str:
        h = hashlib.blake2b(digest_size=16)
        for i in range(mib):
            h.update(self.chunk(i))
        return h.hexdigest()



class _Stop(Exception):
    """Raised in place of a commit once the caller's stop event is set."""


def timed_commits(directory: Path, commits: int, journal_mode: str = "delete",
                  stop: threading.Event | None = None) -> tuple[list[float], float]:
    """workload.run() itself, with its commit_once timed call by call: the loop, its side
    effects and their order stay exactly the workload's.  It ends early, after at least one
    commit, once `stop` is set.  Returns (latency of each commit, seconds from the first
    commit to the end of the loop); the database is checked to hold every commit."""
    directory.mkdir(exist_ok=True)
    latencies: list[float] = []
    first: list[float] = []
    commit_once = workload.commit_once

    def timed_commit(db, number: int) -> None:
        if stop is not None and stop.is_set() and latencies:
            raise _Stop
        t0 = time.perf_counter()
        if not first:
            first.append(t0)  # open_db's table setup is not part of the loop
        commit_once(db, number)
        latencies.append(time.perf_counter() - t0)

    before = workload.check_db(str(directory)) if (directory / workload.DB_NAME).exists() else 0
    workload.commit_once = timed_commit
    try:
        try:
            last = workload.run(str(directory), commits, journal_mode)
        except _Stop:
            last = before + len(latencies)
        elapsed = time.perf_counter() - first[0]
    finally:
        workload.commit_once = commit_once
    found = workload.check_db(str(directory))
    expected = before + (commits if stop is None else len(latencies))
    if found != expected or last != expected or found != before + len(latencies):
        anomaly(str(directory), f"{journal_mode}: {len(latencies)} commits timed, run() returned {last}, "
                                f"the database holds {found}; expected {expected}")
    return latencies, elapsed


def commit_stats(latencies: list[float], elapsed: float) -> dict:
    return {"commits": len(latencies), "seconds": elapsed, "commits_per_s": len(latencies) / elapsed,
            **latency_stats(latencies)}


def measure_commits(target: Target, rep: int, params: dict, journal_mode: str) -> dict:
    directory = target.workdir / f"commit-{journal_mode}-{rep}"
    return commit_stats(*timed_commits(directory, params["commits"], journal_mode))


def measure_iops(target: Target, rep: int, params: dict, pattern: Pattern) -> dict:
    path = target.workdir / f"iops-{rep}"
    blocks = params["iops_file_mib"] * MIB // PAGE
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for i in range(params["iops_file_mib"]):
            os.write(fd, pattern.chunk(i))
        os.fsync(fd)
        rng = random.Random(rep)
        ops = params["iops_ops"]
        offsets = [rng.randrange(blocks) * PAGE for _ in range(ops)]
        payloads = [rng.randbytes(PAGE) for _ in range(min(ops, 64))]
        latencies = []
        started = time.perf_counter()
        for i, offset in enumerate(offsets):
            t0 = time.perf_counter()
            os.pwrite(fd, payloads[i % len(payloads)], offset)
            os.fdatasync(fd)
            latencies.append(time.perf_counter() - t0)
        elapsed = time.perf_counter() - started
        last = {offset: payloads[i % len(payloads)] for i, offset in enumerate(offsets)}
        bad = sum(1 for offset, data in last.items() if os.pread(fd, PAGE, offset) != data)
        if bad:
            anomaly(target.name, f"iops: {bad} of {len(last)} written 4K blocks read back wrong")
    finally:
        os.close(fd)
    if rep < params["reps"] - 1:
        path.unlink()
    return {"ops": ops, "seconds": elapsed, "iops": ops / elapsed, **latency_stats(latencies)}


def measure_seq(target: Target, rep: int, params: dict, pattern: Pattern) -> tuple[dict, dict, dict]:
    """Sequential write, cold sequential read, cold random 4K reads of one file."""
    mib = params["seq_mib"]
    path = target.workdir / f"seq-{rep}"
    elapsed = write_file(path, mib, pattern)
    write = {"mib": mib, "seconds": elapsed, "mib_per_s": mib / elapsed}

    cold = target.cold()
    fd = os.open(target.workdir / path.name, os.O_RDONLY)
    try:
        got = index = bad = 0
        started = time.perf_counter()
        while chunk := os.read(fd, MIB):
            if len(chunk) == MIB and int.from_bytes(chunk[:8], "little") != index:
                bad += 1
            got += len(chunk)
            index += 1
        elapsed = time.perf_counter() - started
    finally:
        os.close(fd)
    if got != mib * MIB or bad:
        anomaly(target.name, f"seq read: {got} bytes (expected {mib * MIB}), {bad} chunks misplaced")
    read = {"mib": got / MIB, "seconds": elapsed, "mib_per_s": got / MIB / elapsed, "cold": cold}

    cold = target.cold()
    rng = random.Random(1000 + rep)
    ops = params["randread_ops"]
    offsets = [rng.randrange(mib * MIB // PAGE) * PAGE for _ in range(ops)]
    fd = os.open(target.workdir / path.name, os.O_RDONLY)
    latencies = []
    bad = 0
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        started = time.perf_counter()
        for offset in offsets:
            t0 = time.perf_counter()
            data = os.pread(fd, PAGE, offset)
            latencies.append(time.perf_counter() - t0)
            if data != pattern.expected(offset, PAGE):  # checked outside the timed call
                bad += 1
        elapsed = time.perf_counter() - started
    finally:
        os.close(fd)
    if bad:
        anomaly(target.name, f"random read: {bad} of {ops} 4K reads returned wrong data")
    busy = sum(latencies)
    rand = {"ops": ops, "seconds": busy, "loop_seconds": elapsed, "iops": ops / busy, "cold": cold,
            **latency_stats(latencies)}
    if rep < params["reps"] - 1:
        (target.workdir / path.name).unlink()
    return write, read, rand


def measure_rss(target: Target, rep: int, params: dict, pattern: Pattern) -> dict:
    target.unmount()
    target.mount()  # a fresh daemon: its high-water mark covers this write only
    pid = target.daemon_pid()
    baseline = proc_status(pid)
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5\n")  # resets VmHWM to the current RSS
    except OSError:
        pass
    watch = RssWatch(pid)
    try:
        seconds = write_file(target.workdir / f"rss-{rep}", params["rss_mib"], pattern)
    finally:
        watch.stop()
    after = proc_status(pid)
    (target.workdir / f"rss-{rep}").unlink()
    time.sleep(0.2)
    after_unlink = proc_status(pid)["VmRSS"]
    return {"mib_written": params["rss_mib"], "seconds": seconds,
            "write_mib_per_s": params["rss_mib"] / seconds,
            "peak_rss_mib": after["VmHWM"] / 1024, "baseline_rss_mib": baseline["VmRSS"] / 1024,
            "sampled_peak_rss_mib": watch.peak_rss_kib / 1024,
            "rss_after_fsync_mib": after["VmRSS"] / 1024, "rss_after_unlink_mib": after_unlink / 1024}


def write_file(path: Path, mib: int, pattern: Pattern, first_chunk: int = 0) -> float:
    """`mib` pattern chunks in 1 MiB write()s, then fsync: the seconds until fsync returned."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        started = time.perf_counter()
        for i in range(first_chunk, first_chunk + mib):
            os.write(fd, pattern.chunk(i))
        os.fsync(fd)
        return time.perf_counter() - started
    finally:
        os.close(fd)


def measure_offline(target: Target, reps: int, seq_digest: tuple[str, str] | None) -> tuple[list, list]:
    """Scrub and restore the unmounted target, `reps` times each, from cold caches."""
    if target.fuse and not is_mounted(target.mountpoint):
        raise RuntimeError(f"{target.mountpoint} is not mounted: cannot count the volume's bytes")
    logical, files = tree_bytes(target.workdir)
    target.unmount()
    on_disk = disk_bytes(target.root if target.fuse else target.workdir)
    scrubs, restores = [], []
    for _ in range(reps):
        cold = drop_caches()
        started = time.perf_counter()
        info = target.scrub()
        elapsed = time.perf_counter() - started
        scrubs.append({"logical_bytes": logical, "files": files, "disk_bytes": on_disk,
                       "space_amplification": on_disk / logical if logical else None,
                       "seconds": elapsed, "mb_per_s": logical / elapsed / 1e6, "cold": cold, **info})
    for rep in range(reps):
        dest = target.root / f"restored-{rep}"
        cold = drop_caches()
        started = time.perf_counter()
        info = target.restore(dest)
        elapsed = time.perf_counter() - started
        restored, _ = tree_bytes(dest)
        if restored != logical:
            anomaly(target.name, f"restore wrote {restored} bytes of {logical}")
        if seq_digest is not None:
            name, digest = seq_digest
            if file_digest(dest / name) != digest:
                anomaly(target.name, f"restored {name} differs from what was written")
        restores.append({"logical_bytes": logical, "restored_bytes": restored, "seconds": elapsed,
                         "mb_per_s": logical / elapsed / 1e6, "cold": cold, **info})
        shutil.rmtree(dest)
    return scrubs, restores


def measure_scrub_live(target: Lnmirror, rep: int, params: dict) -> dict:
    """The commit loop alone, then while `lnmirror scrub MOUNTPOINT` runs on the same mount
    (until the scrub ends, at most 10 times as many commits)."""
    directory = target.workdir / f"scrub-live-{rep}"
    commits = params["scrub_commits"]
    alone = commit_stats(*timed_commits(directory, commits))
    logical, _ = tree_bytes(target.workdir)
    stop = threading.Event()
    scrub: dict = {}
    started = time.perf_counter()
    proc = subprocess.Popen(LNMIRROR + ["scrub", str(target.mountpoint), "--json"], env=target.env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def wait() -> None:
        scrub["stdout"], scrub["stderr"] = proc.communicate()
        scrub["seconds"] = time.perf_counter() - started
        stop.set()

    watcher = threading.Thread(target=wait, daemon=True)
    watcher.start()
    try:
        during = commit_stats(*timed_commits(directory, 10 * commits, stop=stop))
    finally:
        watcher.join(3600)
        if proc.poll() is None:
            proc.kill()
            raise RuntimeError("lnmirror scrub did not end within an hour (killed by pid)")
    try:
        result = json.loads(scrub["stdout"]).get("result")
    except ValueError:
        result = None
    if proc.returncode != 0 or result != "clean":
        anomaly(target.name, f"live scrub exit {proc.returncode}, result {result}: "
                             f"{(scrub['stdout'] + scrub['stderr']).strip()[:400]}")
    return {**{f"alone_{k}": v for k, v in alone.items()}, **{f"during_{k}": v for k, v in during.items()},
            "p99_ratio": during["p99_ms"] / alone["p99_ms"], "scrub_seconds": scrub["seconds"],
            "scrub_mb_per_s": logical / scrub["seconds"] / 1e6, "logical_bytes": logical,
            "scrub_exit": proc.returncode, "scrub_result": result}


def measure_scale(target: Lnmirror, params: dict, pattern: Pattern) -> dict:
    """The scale profile on a fresh volume: fill it, run the commit loop, unmount, mount
    again (caches dropped), check samples of the data; the daemons' peak RSS over all."""
    total = max(1, round(params["scale_gib"] * 1024))
    per_file = min(256, max(1, total // 4))
    target.init()
    started = time.perf_counter()
    target.mount()
    out: dict = {"mount_empty_s": time.perf_counter() - started}
    first = RssWatch(target.daemon_pid())
    try:
        step(target.name, f"scale: writing {total} MiB in files of {per_file} MiB")
        fill = 0.0
        for start in range(0, total, per_file):
            fill += write_file(target.workdir / f"scale-{start:06d}", min(per_file, total - start),
                               pattern, first_chunk=start)
        out |= {"mib": total, "files": -(-total // per_file), "fill_seconds": fill,
                "fill_mib_per_s": total / fill}
        step(target.name, f"scale: {params['scale_commits']} commits with {total} MiB in the volume")
        latencies, elapsed = timed_commits(target.workdir / "scale-commits", params["scale_commits"])
        out |= commit_stats(latencies, elapsed)
        out["commits_over_50ms"] = sum(1 for t in latencies if t > SLOW_COMMIT)
        step(target.name, "scale: unmount, drop caches, mount")
        started = time.perf_counter()
        target.unmount()
        out["unmount_s"] = time.perf_counter() - started
    finally:
        first.stop()
    drop_caches()
    started = time.perf_counter()
    target.mount()
    out["mount_s"] = time.perf_counter() - started
    second = RssWatch(target.daemon_pid())
    try:
        out["bad_samples"] = check_samples(target.workdir, total, per_file, pattern)
        if out["bad_samples"]:
            anomaly(target.name, f"scale: {out['bad_samples']} of 16 sampled MiB read back wrong")
    finally:
        second.stop()
    out |= {"peak_rss_mib": max(first.hwm_kib, second.hwm_kib) / 1024,
            "peak_rss_fill_commits_unmount_mib": first.hwm_kib / 1024,
            "peak_rss_mount_mib": second.hwm_kib / 1024}
    return out


def measure_space(target: Lnmirror, params: dict, pattern: Pattern) -> dict:
    """Disk bytes per replica on a fresh volume: after --space-commits commits of the
    lightningd-style loop (rollback journal), then for a --space-mib file written once
    (the growth it caused).  Each replica directory is counted whole (header, snapshot,
    log, slot files), unmounted, so the log has been cut by the unmount's snapshot."""
    target.init()
    target.mount()
    timed_commits(target.workdir / "db", params["space_commits"])
    db_logical, _ = tree_bytes(target.workdir)
    target.unmount()
    after_db = [disk_bytes(r) for r in target.replicas]
    target.mount()
    once = params["space_mib"] * MIB
    write_file(target.workdir / "written-once", params["space_mib"], pattern)
    target.unmount()
    after_once = [disk_bytes(r) for r in target.replicas]
    grown = [b - a for a, b in zip(after_db, after_once, strict=True)]
    return {"commits": params["space_commits"], "db_logical_bytes": db_logical,
            "db_replica_bytes": after_db, "db_per_replica": max(after_db) / db_logical,
            "once_bytes": once, "once_replica_growth": grown, "once_per_replica": max(grown) / once,
            "k": target.k, "n": target.n}


def check_samples(workdir: Path, total: int, per_file: int, pattern: Pattern, count: int = 16) -> int:
    """Read `count` random MiB of the scale files; the number that differ from what was written."""
    bad = 0
    for index in random.Random(7).sample(range(total), min(count, total)):
        start = index - index % per_file
        with open(workdir / f"scale-{start:06d}", "rb", buffering=0) as f:
            if os.pread(f.fileno(), MIB, (index - start) * MIB) != pattern.chunk(index):
                bad += 1
    return bad


def run_target(target: Target, params: dict, pattern: Pattern) -> dict:
    """Every measurement on one target: {measurement: {"reps": [...]}} or {"error": ...}."""
    reps = params["reps"]
    results: dict[str, dict] = {m: {"reps": []} for m in MEASUREMENTS}

    def attempt(names: tuple[str, ...], fn) -> None:
        try:
            target.ensure_mounted()
            out = fn()
            for name, value in zip(names, out if isinstance(out, tuple) else (out,), strict=True):
                # a dict is one rep; a list holds every rep (scrub and restore run theirs together)
                results[name]["reps"].extend(value if isinstance(value, list) else [value])
        except Exception as exc:  # noqa: BLE001 - one failed step must not end the run
            message = f"{type(exc).__name__}: {exc}"
            anomaly(target.name, f"{'/'.join(names)} failed: {message}")
            for name in names:
                results[name].setdefault("errors", []).append(message)

    for mode in ("delete", "wal"):
        step(target.name, f"SQLite commit loop, journal_mode={mode}")
        for rep in range(reps):
            attempt((f"commit_{mode}",),
                    lambda rep=rep, mode=mode: measure_commits(target, rep, params, mode))
    step(target.name, "4K pwrite+fdatasync")
    for rep in range(reps):
        attempt(("iops_4k_fdatasync",), lambda rep=rep: measure_iops(target, rep, params, pattern))
    step(target.name, "sequential write, cold sequential read, cold random 4K read")
    for rep in range(reps):
        attempt(("seq_write", "seq_read", "rand_read_4k"),
                lambda rep=rep: measure_seq(target, rep, params, pattern))
    if target.fuse:
        step(target.name, f"daemon RSS while writing {params['rss_mib']} MiB")
        for rep in range(reps):
            attempt(("daemon_rss",), lambda rep=rep: measure_rss(target, rep, params, pattern))
    else:
        results["daemon_rss"] = {"not_applicable": "no daemon: the kernel serves a plain directory"}
    if target.live_scrub:
        step(target.name, "commit loop alone and during a live scrub")
        for rep in range(reps):
            attempt(("scrub_live",), lambda rep=rep: measure_scrub_live(target, rep, params))
    else:
        results["scrub_live"] = {"not_applicable": "no live scrub"}
    if target.offline:
        step(target.name, "scrub and restore")
        seq_name = f"seq-{reps - 1}"
        seq_digest = (seq_name, pattern.digest(params["seq_mib"])) \
            if (target.workdir / seq_name).exists() else None
        attempt(("scrub", "restore"), lambda: measure_offline(target, reps, seq_digest))
    else:
        results["scrub"] = results["restore"] = {"not_applicable": "nothing to verify or restore"}
    for body in results.values():
        if body.get("reps"):
            body["median"] = medians(body["reps"])
    return results


