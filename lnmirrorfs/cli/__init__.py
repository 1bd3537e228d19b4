"""Command line: `lnmirror init|key|status|restore|scrub|replace` and `mount_lnmirror`.

Only arguments, key files, daemonizing and logging live here, one module per command
(`common` holds what they share).  Every failure an operator can cause ends in one line on
stderr and a non-zero exit.
"""

from __future__ import annotations

import argparse

from . import mount
from .common import CliError, add_replica_args, apply_config, run, setup_logging
from .init import DEFAULT_BLOCK_SIZE, cmd_init
from .key import cmd_key
from .restore import cmd_restore
from .scrub import cmd_replace, cmd_scrub
from .status import cmd_status

__all__ = ["CliError", "lnmirror_main", "lnmirror_parser", "mount_main", "mount_parser"]


def lnmirror_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lnmirror", description="lnmirrorfs volume management")
    sub = p.add_subparsers(dest="command", required=True)

    init = sub.add_parser("init", help="create a volume on empty replica directories")
    init.add_argument("--replica", action="append", required=True, metavar="DIR")
    init.add_argument("-k", type=int, default=1, help="shares needed to decode (default 1)")
    init.add_argument("--key-file", metavar="PATH",
                      help="where to write the key (default /etc/lnmirrorfs/VOLUME.key)")
    init.add_argument("--block-size", type=int, default=DEFAULT_BLOCK_SIZE)
    init.add_argument("--force", action="store_true", help="allow a single replica")
    init.add_argument("--from", dest="source", metavar="LIGHTNING_DIR",
                      help="import a stopped node's directory into the new volume")
    init.set_defaults(func=cmd_init)

    key = sub.add_parser("key", help="check a typed-in paper key (stdin) or a key file")
    key.add_argument("--check", action="store_true", required=True)
    key.add_argument("--replica", required=True, metavar="DIR")
    key.add_argument("--key-file", metavar="PATH")
    key.set_defaults(func=cmd_key)

    status = sub.add_parser("status", help="health of a mount or of replica directories")
    status.add_argument("mountpoint", nargs="?")
    add_replica_args(status)
    shown = status.add_mutually_exclusive_group()
    shown.add_argument("--json", action="store_true")
    shown.add_argument("--prometheus", action="store_true",
                       help="node_exporter textfile format")
    status.add_argument("--wait", type=float, metavar="SECONDS",
                        help="wait until the mount answers and accepts writes (exit 0), or fail")
    status.set_defaults(func=cmd_status)

    restore = sub.add_parser("restore", help="write the last acknowledged state as plain files")
    add_replica_args(restore)
    restore.add_argument("target")
    restore.set_defaults(func=cmd_restore)

    scrub_p = sub.add_parser("scrub", help="verify every share and heal (exit 0 clean, 1 repaired, "
                                           "2 unrepairable)")
    scrub_p.add_argument("mountpoint", nargs="?")
    add_replica_args(scrub_p)
    scrub_p.add_argument("--dry-run", action="store_true", help="report, change nothing")
    scrub_p.add_argument("--rate", type=float, metavar="MB/S", help="read at most this fast")
    scrub_p.add_argument("--json", action="store_true")
    scrub_p.set_defaults(func=cmd_scrub)

    replace = sub.add_parser("replace", help="resilver an empty directory in place of a dead replica")
    replace.add_argument("--mountpoint", help="the live mount to replace it in")
    add_replica_args(replace)
    replace.add_argument("old")
    replace.add_argument("new")
    replace.add_argument("--json", action="store_true")
    replace.set_defaults(func=cmd_replace)
    return p


def lnmirror_main(argv: list[str] | None = None) -> int:
    def main(argv):
        args = lnmirror_parser().parse_args(argv)
        apply_config(args)
        setup_logging(foreground=True)
        return args.func(args)
    return run(main, argv, "lnmirror")


def mount_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mount_lnmirror",
        description="mount an lnmirrorfs volume: mount_lnmirror MOUNTPOINT --replica A --replica B,"
                    " or as a mount helper: mount_lnmirror SOURCE MOUNTPOINT -o replica=A:B,key=K")
    p.add_argument("args", nargs="*", metavar="[SOURCE] MOUNTPOINT")
    add_replica_args(p)
    p.add_argument("-o", dest="options", action="append", default=[], metavar="OPT[,OPT...]")
    p.add_argument("-f", "--foreground", action="store_true")
    p.add_argument("--on-degraded", metavar="CMD",
                   help="shell command run when a replica faults or heals, or the quorum is lost "
                        "(env LNMIRROR_EVENT, LNMIRROR_REPLICA, LNMIRROR_REASON)")
    return p


def mount_main(argv: list[str] | None = None) -> int:
    return run(lambda argv: mount.mount(mount_parser().parse_args(argv)), argv, "mount_lnmirror")
