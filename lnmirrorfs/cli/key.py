"""`lnmirror key --check`: check a typed-in paper key or a key file against a replica."""

from __future__ import annotations

import argparse
import getpass
import sys

from .. import codec
from ..replica import Replica, ReplicaError
from .common import CliError, read_key_file


def cmd_key(args: argparse.Namespace) -> int:
    try:
        header = Replica.open(args.replica).header
    except ReplicaError as exc:
        raise CliError(str(exc)) from None
    if args.key_file:
        master = read_key_file(args.key_file)
    else:
        try:
            master = codec.decode_paper_key(_read_paper_key())
        except codec.PaperKeyError as exc:
            raise CliError(str(exc), 1) from None
    if codec.key_check(codec.Keys.derive(master), header.volume_id) != header.key_check:
        raise CliError(f"the key is well-formed but not the key of volume {header.volume_hex}", 1)
    print(f"key OK for volume {header.volume_hex}")
    return 0


def _read_paper_key() -> str:
    """One line from stdin; on a terminal, prompted for and not echoed (it is the key)."""
    if not sys.stdin.isatty():
        return sys.stdin.readline()
    try:
        return getpass.getpass("paper key (not echoed): ")
    except EOFError:
        raise CliError("no paper key typed", 1) from None
