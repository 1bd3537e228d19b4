"""`lnmirror restore`: write the last acknowledged state as plain files."""

from __future__ import annotations

import argparse
import sys

import trio

from ..restore import RestoreError, restore_tree
from .common import CliError, open_volume, volume_options


def cmd_restore(args: argparse.Namespace) -> int:
    if not args.replica:
        raise CliError("give the replica directories with --replica (or --config)")
    volume = open_volume(args.replica, args.key_file, volume_options(args), writable=False)
    try:
        counts = trio.run(restore_tree, volume, args.target, sys.stderr.isatty())
    except RestoreError as exc:
        raise CliError(str(exc)) from None
    except OSError as exc:
        raise CliError(f"restore failed: {exc.strerror or exc}") from None
    finally:
        volume.close()
    print(f"restored record {volume.tree.seq} to {args.target}: {counts['files']} files, "
          f"{counts['dirs']} directories, {counts['links']} extra hard links, "
          f"{counts['bytes']} bytes, all blocks verified")
    return 0
