"""`lnmirror status`: health of a live mount or of replica directories, as text, JSON or
Prometheus textfile metrics."""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import socket
import threading
import time

import trio

from .. import control, format
from .common import CliError, daemon_lock_held, open_volume, volume_options


def cmd_status(args: argparse.Namespace) -> int:
    if args.wait_unmounted is not None:
        if args.wait is not None or args.json or args.prometheus:
            raise CliError("--wait-unmounted prints no status: give it without --wait, --json "
                           "and --prometheus")
        if not args.mountpoint:
            raise CliError("--wait-unmounted needs the MOUNTPOINT (or mountpoint in the config)")
        return wait_unmounted(args.mountpoint, args.replica or [], args.wait_unmounted)
    if args.mountpoint:
        try:
            status = _live_status(args.mountpoint, args.wait)
        except CliError:
            if not args.prometheus:
                raise
            # A cron job writing node_exporter metrics: say "not mounted" in the metrics.
            print(format_prometheus_unmounted(args.mountpoint), end="")
            return 1
    elif args.replica:
        volume = open_volume(args.replica, args.key_file, volume_options(args), writable=False)
        try:
            status = trio.run(volume.status)
        finally:
            volume.close()
    else:
        raise CliError("give a MOUNTPOINT or --replica directories")
    healthy = status.get("state") == "ONLINE" and not status.get("doubt") and all(
        r["state"] == "ONLINE" and not r.get("header_damage") for r in status.get("replicas", []))
    if args.json:
        print(json.dumps(status, indent=2))
    elif args.prometheus:
        print(format_prometheus(status), end="")
    else:
        print(format_status(status))
    if args.wait is not None:
        return 0 if status["state"] in ("ONLINE", "DEGRADED") else 1
    return 0 if healthy else 1


def _live_status(mountpoint: str, wait: float | None) -> dict:
    """Ask the mount; with --wait, keep asking until it answers and accepts writes."""
    deadline = time.monotonic() + (wait or 0)
    while True:
        try:
            status = control.request(control.socket_path(mountpoint), {"cmd": "status"})
            if wait is None or status.get("state") in ("ONLINE", "DEGRADED"):
                break
        except OSError:
            status = None
        if time.monotonic() >= deadline:
            if status is None:
                raise CliError(f"no lnmirrorfs mount is serving {mountpoint}")
            break
        time.sleep(0.2)
    status["mounted"] = os.path.abspath(mountpoint)
    return status


def wait_unmounted(mountpoint: str, replicas: list[str], seconds: float) -> int:
    """After `fusermount3 -u`: wait until no daemon serves MOUNTPOINT any more (its control
    socket does not answer and its daemon lock is free: it has written its snapshot and
    exited) and no process holds the replicas' locks."""
    deadline = time.monotonic() + seconds
    sock = control.socket_path(mountpoint)
    try:  # a mount still answering names its replicas
        replicas = replicas or [r["path"] for r in
                                control.request(sock, {"cmd": "status"}, timeout=5)["replicas"]]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    while True:
        busy = ("its control socket answers" if _answers(sock) else
                "its daemon is still writing its snapshot" if daemon_lock_held(mountpoint) else
                _locked_replica(replicas, deadline - time.monotonic()))
        if not busy:
            print(f"{mountpoint}: no mount serves it; every replica is closed")
            return 0
        if time.monotonic() >= deadline:
            raise CliError(f"{mountpoint} is still in use after {seconds:g}s: {busy}", 1)
        time.sleep(0.1)


def _answers(path: str) -> bool:
    """Does a daemon accept connections on this control socket?  (A socket file left by a
    killed daemon refuses them.)"""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        try:
            s.connect(path)
        except (FileNotFoundError, ConnectionRefusedError):
            return False
        except OSError:
            return True  # there, but not answering in time: something still serves it
    return True


def _locked_replica(replicas: list[str], timeout: float) -> str | None:
    """Why a replica is not free yet (it is locked, or its filesystem does not answer), or
    None.  Probed in a thread: a hung NAS must not hold the command past its timeout."""
    result: list[str | None] = ["the replicas do not answer"]

    def probe() -> None:
        for path in replicas:
            try:
                fd = os.open(os.path.join(path, format.LOCK_NAME), os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                continue  # no lock file, or no replica there: nobody holds it
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                result[0] = f"replica {path} is locked by a mount or another lnmirror command"
                return
            finally:
                os.close(fd)
        result[0] = None

    worker = threading.Thread(target=probe, daemon=True)
    worker.start()
    worker.join(max(timeout, 0.1))
    return result[0]


_STATES = ("ONLINE", "STALE", "FAULTED", "MISSING", "OFFLINE")


def _label(value: str) -> str:
    """A label value in the exposition format (backslash, quote and newline escaped)."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _mounted_and_healthy(labels: str, mounted: int, healthy: int) -> list[str]:
    return [
        "# HELP lnmirror_volume_mounted 1 when a mount answers on its control socket.",
        "# TYPE lnmirror_volume_mounted gauge",
        f"lnmirror_volume_mounted{{{labels}}} {mounted}",
        "# HELP lnmirror_volume_healthy 1 when the volume and every replica are ONLINE.",
        "# TYPE lnmirror_volume_healthy gauge",
        f"lnmirror_volume_healthy{{{labels}}} {healthy}",
    ]


def format_prometheus_unmounted(mountpoint: str) -> str:
    """What `status MOUNTPOINT --prometheus` says when no mount serves MOUNTPOINT."""
    labels = f'mountpoint="{_label(os.path.abspath(mountpoint))}"'
    return "\n".join(_mounted_and_healthy(labels, 0, 0)) + "\n"


def format_prometheus(s: dict) -> str:
    """node_exporter textfile format: one gauge family per fact, labelled by volume (and
    mountpoint, for a live mount) and replica."""
    vol = f'volume="{s["volume"]}"'
    if "mounted" in s:
        vol += f',mountpoint="{_label(s["mounted"])}"'
    healthy = int(s["state"] == "ONLINE" and all(r["state"] == "ONLINE" for r in s["replicas"]))
    stale = sum(r["state"] != "ONLINE" for r in s["replicas"])
    scrub = s.get("last_scrub") or {}
    lines = [
        *_mounted_and_healthy(vol, int("mounted" in s), healthy),
        "# HELP lnmirror_volume_writable 1 unless a write lost its quorum (SUSPENDED).",
        "# TYPE lnmirror_volume_writable gauge",
        f"lnmirror_volume_writable{{{vol}}} {int(s['state'] != 'SUSPENDED')}",
        "# HELP lnmirror_volume_record Sequence number of the newest acknowledged record.",
        "# TYPE lnmirror_volume_record counter",
        f"lnmirror_volume_record{{{vol}}} {s['record']}",
        "# HELP lnmirror_pending_heal Bad shares seen plus replicas not ONLINE, for scrub to fix.",
        "# TYPE lnmirror_pending_heal gauge",
        f"lnmirror_pending_heal{{{vol}}} {s['bad_shares'] + stale}",
        "# HELP lnmirror_replica_state 1 for the state each replica is in.",
        "# TYPE lnmirror_replica_state gauge",
    ]
    rep = {r["path"]: f'{vol},replica="{_label(r["path"])}"' for r in s["replicas"]}
    for r in s["replicas"]:
        for state in _STATES:
            lines.append(f'lnmirror_replica_state{{{rep[r["path"]]},state="{state}"}} '
                         f'{int(r["state"] == state)}')
    lines += ["# HELP lnmirror_replica_errors_total Read, write and checksum errors, across mounts.",
              "# TYPE lnmirror_replica_errors_total counter"]
    for r in s["replicas"]:
        for kind, count in r["errors"].items():
            lines.append(f'lnmirror_replica_errors_total{{{rep[r["path"]]},kind="{kind}"}} {count}')
    lines += ["# HELP lnmirror_replica_free_bytes Free space on the replica's filesystem.",
              "# TYPE lnmirror_replica_free_bytes gauge"]
    lines += [f'lnmirror_replica_free_bytes{{{rep[r["path"]]}}} {r["free_bytes"]}'
              for r in s["replicas"] if r["free_bytes"] is not None]
    if scrub:
        lines += ["# HELP lnmirror_last_scrub_timestamp_seconds When the last scrub finished.",
                  "# TYPE lnmirror_last_scrub_timestamp_seconds gauge",
                  f"lnmirror_last_scrub_timestamp_seconds{{{vol}}} {scrub['time']}",
                  "# HELP lnmirror_last_scrub_ok 1 if the last scrub found nothing unrepairable.",
                  "# TYPE lnmirror_last_scrub_ok gauge",
                  f"lnmirror_last_scrub_ok{{{vol},result=\"{scrub['result']}\"}} "
                  f"{int(scrub['result'] != 'unrepairable')}"]
    return "\n".join(lines) + "\n"


def format_status(s: dict) -> str:
    if "error" in s:
        return f"error: {s['error']}"
    lines = [f"volume {s['volume']}  k={s['k']} n={s['n']} quorum={s['quorum']} cipher={s['cipher']}",
             f"  state: {s['state']}" + (f" ({s['reason']})" if s["reason"] else ""),
             f"  record: {s['record']} written {format_when(s['written_ms'])}"
             f"   bad shares seen: {s['bad_shares']}",
             *([f"  NOT PROVEN LATEST: {s['doubt']}"] if s.get("doubt") else []),
             f"  last scrub: {_scrub_line(s.get('last_scrub') or {})}",
             *([f"  log: {s['log']}"] if s.get("log") else []),
             "",
             f"  {'SHARE':<6}{'STATE':<9}{'FREE':>9}  {'READ':>5}{'WRITE':>6}{'CKSUM':>6}  PATH"]
    for r in s["replicas"]:
        free = "-" if r["free_bytes"] is None else _human(r["free_bytes"])
        e = r["errors"]
        share = "-" if r["index"] is None else str(r["index"])
        lines.append(f"  {share:<6}{r['state']:<9}{free:>9}  {e['read']:>5}{e['write']:>6}"
                     f"{e['checksum']:>6}  {r['path']}" + (f"  ({r['reason']})" if r["reason"] else "")
                     + (f"  (header: {r['header_damage']}, run lnmirror scrub)"
                        if r.get("header_damage") else ""))
    for index, why in s.get("blamed", {}).items():
        lines.append(f"  share {index} is blamed by the others: {why} (heal with lnmirror scrub)")
    return "\n".join(lines)


def format_when(ms: int) -> str:
    """A record's time for operators: UTC, to the second."""
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ms / 1000))


def _scrub_line(scrub: dict) -> str:
    if not scrub:
        return "never"
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(scrub["time"]))
    return (f"{when}, {scrub['result']} ({scrub['blocks']} blocks, {scrub['bad_shares']} bad "
            f"shares, {scrub['repaired_shares']} rewritten, {scrub['unrepairable']} unrepairable)")


def _human(n: float) -> str:
    for unit in ("B", "K", "M", "G", "T"):
        if n < 1024 or unit == "T":
            return f"{n:.1f}{unit}" if unit != "B" else f"{int(n)}B"
        n /= 1024
    return str(n)
