"""`lnmirror scrub` and `lnmirror replace`: both heal, through the live mount or on the
locked replicas (`_heal`)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import trio

from .. import control, scrub
from ..volume import Volume, VolumeError
from .common import CliError, open_volume, volume_options


def cmd_scrub(args: argparse.Namespace) -> int:
    request = {"cmd": "scrub", "dry_run": args.dry_run, "rate": args.rate}
    report = _heal(args, request, lambda volume, progress: scrub.scrub(
        volume, args.dry_run, args.rate, progress), writable=not args.dry_run)
    return _print_report(args, report)


def cmd_replace(args: argparse.Namespace) -> int:
    request = {"cmd": "replace", "old": os.path.abspath(args.old), "new": os.path.abspath(args.new)}

    async def replace_offline(volume: Volume, progress) -> scrub.Report:
        scrub.attach_replacement(volume, args.old, args.new)
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
        try:
            reply = control.request(control.socket_path(args.mountpoint), request, timeout=None)
        except OSError:
            raise CliError(f"no lnmirrorfs mount is serving {args.mountpoint}") from None
        if "error" in reply:
            raise CliError(reply["error"])
        return reply
    if not args.replica:
        raise CliError("give a MOUNTPOINT or --replica directories")
    volume = open_volume(args.replica, args.key_file, volume_options(args), writable=writable)
    try:
        progress = _progress_bar() if sys.stderr.isatty() else None
        try:
            return trio.run(offline, volume, progress).as_dict()
        except VolumeError as exc:
            raise CliError(str(exc)) from None
    finally:
        volume.close()


def _progress_bar():
    started = time.monotonic()

    def show(done: int, total: int) -> None:
        elapsed = max(time.monotonic() - started, 1e-6)
        rate = done / elapsed
        eta = (total - done) / rate if rate else 0
        print(f"\rscrub: {done}/{total} blocks ({100 * done // max(total, 1)}%), "
              f"{rate:.0f} blocks/s, ETA {eta:.0f}s ", end="", file=sys.stderr, flush=True)
        if done >= total:
            print(file=sys.stderr)
    return show


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
