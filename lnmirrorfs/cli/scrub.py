"""`lnmirror scrub` and `lnmirror replace`: both heal, through the live mount or on the
locked replicas (`_heal`)."""

from __future__ import annotations

import argparse
import json
import os
import threading

import trio

from .. import control, scrub
from ..volume import Volume, VolumeError
from .common import CliError, open_volume, volume_options
from .progress import ProgressLine, progress_line


def cmd_scrub(args: argparse.Namespace) -> int:
    request = {"cmd": "scrub", "dry_run": args.dry_run, "rate": args.rate}
    report = _heal(args, request, lambda volume, progress: scrub.scrub(
        volume, args.dry_run, args.rate, progress), writable=not args.dry_run)
    return _print_report(args, report)


def cmd_replace(args: argparse.Namespace) -> int:
    request = {"cmd": "replace", "old": os.path.abspath(args.old), "new": os.path.abspath(args.new)}

    async def replace_offline(volume: Volume, progress) -> scrub.Report:
        scrub.replace(volume, args.old, args.new)
        return await scrub.scrub(volume, progress=progress)

    if args.replica:  # the dead replica itself need not (cannot) be opened
        old = os.path.realpath(args.old)
        args.replica = [r for r in args.replica if os.path.realpath(r) != old]
    # Resilvering the new replica is a repair by definition: that is success here.  A new
    # replica that could not be healed makes the result "unrepairable" (exit 2).
    code = _print_report(args, _heal(args, request, replace_offline))
    return 0 if code == scrub.Report.exit_code_for("repaired") else code


def _heal(args: argparse.Namespace, request: dict, offline, writable: bool = True) -> dict:
    """Ask the live mount to do it, or open the replicas (locked) and do it here."""
    if args.mountpoint:
        reply = _live(args.mountpoint, request, progress_line(request["cmd"]))
        if "error" in reply:
            raise CliError(reply["error"])
        return reply
    if not args.replica:
        raise CliError("give a MOUNTPOINT or --replica directories")
    volume = open_volume(args.replica, args.key_file, volume_options(args), writable=writable)
    line = progress_line(request["cmd"])
    try:
        progress = None if line is None else (
            lambda done, total: line.update(done * volume.block_size, total * volume.block_size))
        try:
            return trio.run(offline, volume, progress).as_dict()
        except VolumeError as exc:
            raise CliError(str(exc)) from None
    finally:
        if line:
            line.finish()
        volume.close()


def _live(mountpoint: str, request: dict, line: ProgressLine | None) -> dict:
    """The mount does the work; on a terminal, its progress (from status) is shown meanwhile."""
    path = control.socket_path(mountpoint)
    reply: dict = {}

    def ask() -> None:
        try:
            reply.update(control.request(path, request, timeout=None))
        except OSError:
            reply["error"] = f"no lnmirrorfs mount is serving {mountpoint}"

    worker = threading.Thread(target=ask, daemon=True)
    worker.start()
    while worker.is_alive():
        worker.join(0.5)
        if line and worker.is_alive():
            try:
                done = control.request(path, {"cmd": "status"}, timeout=5).get("heal_progress")
            except (OSError, ValueError):
                done = None
            if done:
                line.update(done["done"], done["total"])
    if line:
        line.finish()
    return reply


def _print_report(args: argparse.Namespace, report: dict) -> int:
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"scrub {report['result']}: {report['blocks']} blocks, {report['shares_checked']} "
              f"shares checked in {report['seconds']}s; {report['bad_shares']} bad shares, "
              f"{report['repaired_shares']} shares rewritten, {report['extra_files']} stray files")
        for path in report["healed_replicas"]:
            print(f"  healed replica {path}")
        for path in report["metadata_repaired"]:
            print(f"  metadata rewritten on {path}")
        for problem in report["unrepairable"]:
            print(f"  UNREPAIRABLE: {problem}")
    return scrub.Report.exit_code_for(report["result"])
