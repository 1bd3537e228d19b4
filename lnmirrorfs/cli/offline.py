"""`lnmirror offline`: keep running without a replica that is gone for good, until
`lnmirror replace` brings a new one in (through the live mount, or on the locked replicas)."""

from __future__ import annotations

import argparse

import trio

from .. import control
from .common import CliError, open_volume, volume_options


def cmd_offline(args: argparse.Namespace) -> int:
    if args.mountpoint:
        try:
            reply = control.request(control.socket_path(args.mountpoint),
                                    {"cmd": "offline", "replica": args.old}, timeout=None)
        except OSError:
            raise CliError(f"no lnmirrorfs mount is serving {args.mountpoint}") from None
    elif args.replica:
        volume = open_volume(args.replica, args.key_file, volume_options(args))
        try:
            reply = trio.run(volume.offline, args.old)
        finally:
            volume.close()
    else:
        raise CliError("give a MOUNTPOINT or the --replica directories")
    if "error" in reply and "risk" not in reply:
        raise CliError(reply["error"])
    print(f"{args.old} is offline; {reply['risk']}")
    if not reply.get("recorded"):
        raise CliError(reply["error"], code=1)
    return 0
