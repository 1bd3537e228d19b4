"""`lnmirror restore`: write the last acknowledged state as plain files."""

from __future__ import annotations

import argparse
import sys

import trio

from ..restore import RestoreError, restore_tree
from .common import CliError, open_volume, volume_options
from .progress import progress_line
from .status import format_when


def cmd_restore(args: argparse.Namespace) -> int:
    if not args.replica:
        raise CliError("give the replica directories with --replica (or --config)")
    volume = open_volume(args.replica, args.key_file, volume_options(args), writable=False)
    record = f"record {volume.tree.seq} written {format_when(volume.tree.time_ms)}"
    doubt = volume.choice.doubt
    if doubt and not args.unproven:
        volume.close()
        raise CliError(f"cannot prove {record} is the latest state: {doubt}; give the missing "
                       "replicas, or add --unproven to restore it anyway")
    line = progress_line("restore")
    try:
        counts = trio.run(restore_tree, volume, args.target, line.update if line else None)
    except RestoreError as exc:
        raise CliError(str(exc)) from None
    except OSError as exc:
        raise CliError(f"restore failed: {exc.strerror or exc}") from None
    finally:
        if line:
            line.finish()
        volume.close()
    print(f"restored {record} to {args.target}: {counts['files']} files, "
          f"{counts['dirs']} directories, {counts['links']} extra hard links, "
          f"{counts['bytes']} bytes, all blocks verified")
    if doubt:
        print(f"WARNING: not proven to be the latest state: {doubt}", file=sys.stderr)
    elif len(args.replica) < volume.n:
        print(f"note: from {len(args.replica)} of {volume.n} replicas; an old copy of a replica "
              "cannot be told from the current one when no newer replica is given: check that "
              "the date above is the node's last activity", file=sys.stderr)
    return 0
