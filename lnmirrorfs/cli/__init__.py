"""Command line: `lnmirror init|key|status|restore|scrub|replace|offline` and `mount_lnmirror`.

Only arguments, key files, daemonizing and logging live here, one module per command
(`common` holds what they share).  Every failure an operator can cause ends in one line on
stderr and a non-zero exit.
"""

from __future__ import annotations

import argparse

from .. import codec
from . import mount
from .common import CliError, Parser, add_replica_args, apply_config, run, setup_logging
from .init import DEFAULT_BLOCK_SIZE, cmd_init
from .key import cmd_key
from .offline import cmd_offline
from .restore import cmd_restore
from .scrub import cmd_replace, cmd_scrub
from .status import cmd_status

__all__ = ["CliError", "lnmirror_main", "lnmirror_parser", "mount_main", "mount_parser"]


def _subcommand(sub, name: str, help: str, exits: str) -> argparse.ArgumentParser:
    """A subcommand with -v and its exit codes at the end of its --help."""
    p = sub.add_parser(name, help=help, description=help, epilog=f"exit codes: {exits}")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="log progress (INFO, with timestamps) to stderr; by default only warnings")
    return p


def lnmirror_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="lnmirror", description="lnmirrorfs volume management",
        epilog="exit codes: 0 success; 1 unhealthy / repaired / wrong key (see each command's "
               "--help); 2 bad input or refused, with one line on stderr")
    sub = p.add_subparsers(dest="command", required=True)

    init = _subcommand(sub, "init", "create a volume on empty replica directories",
                       "0 created, 2 refused (nothing is left behind)")
    init.add_argument("--replica", action="append", required=True, metavar="DIR",
                      help="an empty replica directory; give it once per replica (at least two)")
    init.add_argument("-k", type=int, default=1,
                      help="shares needed to decode a block, 1..number of replicas (default 1: "
                           "every replica holds a full copy)")
    init.add_argument("--key-file", metavar="PATH",
                      help="where to write the key (default /etc/lnmirrorfs/VOLUME.key); "
                           "must not exist yet")
    init.add_argument("--block-size", type=int, default=DEFAULT_BLOCK_SIZE, metavar="BYTES",
                      help=f"bytes per encrypted block, a power of two >= 512 "
                           f"(default {DEFAULT_BLOCK_SIZE}, SQLite's page size)")
    init.add_argument("--cipher", default="auto",
                      choices=["auto"] + [c.name for c in codec.CIPHERS.values()],
                      help="the AEAD for every block and record (default auto: aegis256 where the "
                           "CPU has AES instructions, else xchacha20poly1305, e.g. a Raspberry Pi 4; "
                           "either can be read on any CPU)")
    init.add_argument("--force", action="store_true", help="allow a single replica")
    init.add_argument("--from", dest="source", metavar="LIGHTNING_DIR",
                      help="import a stopped node's directory into the new volume")
    init.set_defaults(func=cmd_init)

    key = _subcommand(sub, "key", "check a typed-in paper key (stdin) or a key file",
                      "0 the key is the volume's, 1 wrong or mistyped key, 2 bad input")
    key.add_argument("--check", action="store_true", required=True,
                     help="check the key against the replica's header (the only action)")
    key.add_argument("--replica", required=True, metavar="DIR",
                     help="any replica directory of the volume")
    key.add_argument("--key-file", metavar="PATH",
                     help="check this key file instead of a paper key read from stdin "
                          "(prompted for, not echoed, on a terminal)")
    key.set_defaults(func=cmd_key)

    status = _subcommand(sub, "status", "health of a mount or of replica directories",
                         "0 volume and every replica ONLINE (with --wait: the mount accepts "
                         "writes; with --wait-unmounted: it is gone); 1 not healthy, not "
                         "mounted with --prometheus, still mounted after --wait-unmounted; "
                         "2 no mount answers, or bad input")
    status.add_argument("mountpoint", nargs="?", help="ask the live mount at this directory")
    add_replica_args(status)
    shown = status.add_mutually_exclusive_group()
    shown.add_argument("--json", action="store_true", help="print the status as JSON")
    shown.add_argument("--prometheus", action="store_true",
                       help="node_exporter textfile format")
    status.add_argument("--wait", type=float, metavar="SECONDS",
                        help="wait until the mount answers and accepts writes (exit 0), or fail")
    status.add_argument("--wait-unmounted", type=float, metavar="SECONDS",
                        help="after an unmount: wait until no daemon serves MOUNTPOINT and the "
                             "replicas' locks are free, i.e. the last snapshot is written "
                             "(exit 0), or exit 1 on timeout")
    status.set_defaults(func=cmd_status)

    restore = _subcommand(sub, "restore", "write the last acknowledged state as plain files",
                          "0 restored and verified, 2 refused or failed")
    add_replica_args(restore)
    restore.add_argument("target", help="an empty or new directory to write the files into")
    restore.add_argument("--unproven", action="store_true",
                         help="restore even when the replicas given cannot prove their state is "
                              "the latest (too few of them, or some behind)")
    restore.set_defaults(func=cmd_restore)

    scrub_p = _subcommand(sub, "scrub", "verify every share and heal",
                          "0 clean, 1 repaired (with --dry-run: problems found), "
                          "2 something is unrepairable, or bad input")
    scrub_p.add_argument("mountpoint", nargs="?",
                         help="scrub through the live mount at this directory")
    add_replica_args(scrub_p)
    scrub_p.add_argument("--dry-run", action="store_true", help="report, change nothing")
    scrub_p.add_argument("--rate", type=float, metavar="MB/S", help="read at most this fast")
    scrub_p.add_argument("--json", action="store_true", help="print the report as JSON")
    scrub_p.set_defaults(func=cmd_scrub)

    replace = _subcommand(sub, "replace", "resilver an empty directory in place of a dead replica",
                          "0 replaced and healed, 2 something is unrepairable, or bad input")
    replace.add_argument("--mountpoint", help="the live mount to replace it in")
    add_replica_args(replace)
    replace.add_argument("old", help="the dead replica directory (it need not exist any more)")
    replace.add_argument("new", help="the empty directory that takes its place")
    replace.add_argument("--json", action="store_true", help="print the report as JSON")
    replace.set_defaults(func=cmd_replace)

    offline = _subcommand(sub, "offline", "keep running without a replica that is gone for good "
                          "(until lnmirror replace brings in a new one)",
                          "0 taken offline and logged, 1 taken offline but not logged yet (the "
                          "write quorum is still lost), 2 refused or bad input")
    offline.add_argument("--mountpoint", help="the live mount to take it offline in")
    add_replica_args(offline)
    offline.add_argument("old", help="the replica directory that is gone (it need not exist)")
    offline.set_defaults(func=cmd_offline)
    return p


def lnmirror_main(argv: list[str] | None = None) -> int:
    def main(argv):
        args = lnmirror_parser().parse_args(argv)
        apply_config(args)
        setup_logging(verbose=args.verbose)
        return args.func(args)
    return run(main, argv, "lnmirror")


def mount_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="mount_lnmirror",
        description="mount an lnmirrorfs volume: mount_lnmirror MOUNTPOINT --replica A --replica B,"
                    " or as a mount helper: mount_lnmirror SOURCE MOUNTPOINT -o replica=A:B,key=K",
        epilog="exit codes: 0 mounted (with -f: unmounted cleanly), 1 the daemon failed or could "
               "not make buffered changes durable at unmount, 2 bad input or refused (wrong key, "
               "replicas that cannot prove the latest state, ...)")
    p.add_argument("args", nargs="*", metavar="[SOURCE] MOUNTPOINT",
                   help="the (empty) directory to mount on; SOURCE (mount helper form) is free "
                        "text, or the replica list A:B")
    add_replica_args(p)
    p.add_argument("-o", dest="options", action="append", default=[], metavar="OPT[,OPT...]",
                   help="replica=A:B, key=PATH, quorum=W, deadline=SECONDS, "
                        "suspend_timeout=SECONDS, config=TOML, "
                        "nonempty; mount(8) options are ignored, the rest goes to FUSE "
                        "(e.g. allow_other)")
    p.add_argument("--suspend-timeout", type=float, metavar="SECONDS",
                   help="how long a change waits for the write quorum while replicas are away "
                        "before it fails with EIO (default 300; the mount resumes by itself)")
    p.add_argument("-f", "--foreground", action="store_true",
                   help="do not daemonize; log to stderr (systemd runs it like this)")
    p.add_argument("--log-file", metavar="PATH", help="log here (default when daemonized: syslog, "
                   "or /var/log/lnmirror/NAME.log without /dev/log)")
    p.add_argument("--on-degraded", metavar="CMD",
                   help="shell command run when a replica faults or heals, or the quorum is lost "
                        "(env LNMIRROR_EVENT, LNMIRROR_REPLICA, LNMIRROR_REASON)")
    return p


def mount_main(argv: list[str] | None = None) -> int:
    return run(lambda argv: mount.mount(mount_parser().parse_args(argv)), argv, "mount_lnmirror")
