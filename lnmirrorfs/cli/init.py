"""`lnmirror init`: create a volume on empty replica directories, optionally importing a
stopped node's directory."""

from __future__ import annotations

import argparse
import os
import shutil
import time

import trio

from .. import codec, format
from ..membership import default_quorum
from ..replica import Replica
from ..restore import RestoreError, check_node_stopped, import_tree
from ..tree import Tree
from ..volume import Options, Volume, VolumeError
from .common import CliError, default_key_path, write_key_file
from .progress import progress_line

DEFAULT_BLOCK_SIZE = 4096


def cmd_init(args: argparse.Namespace) -> int:
    n = len(args.replica)
    if n < 2 and not args.force:
        raise CliError("a single replica is no mirror; give at least two --replica (or --force)")
    k = args.k
    if not 1 <= k <= n:
        raise CliError(f"-k {k} must be between 1 and the number of replicas ({n})")
    if n > 255:
        raise CliError("at most 255 replicas")
    if args.block_size < 512 or args.block_size & (args.block_size - 1):
        raise CliError("--block-size must be a power of two of at least 512")
    if len(set(map(os.path.realpath, args.replica))) != n:
        raise CliError("the same replica directory is given twice")
    for path in args.replica:
        _check_new_replica_dir(path)
    if args.source:
        if not os.path.isdir(args.source):
            raise CliError(f"--from {args.source}: not a directory")
        try:
            check_node_stopped(args.source)
        except RestoreError as exc:
            raise CliError(str(exc)) from None
    volume_id = os.urandom(16)
    master = codec.new_master_key()
    keys = codec.Keys.derive(master, codec.cipher_named(args.cipher))
    key_path = args.key_file or default_key_path(volume_id)
    if os.path.exists(key_path):
        raise CliError(f"key file {key_path} already exists; refusing to overwrite a key")
    tree = Tree.new(args.block_size, os.getuid(), os.getgid(), time.time_ns(),
                    default_quorum(k, n))
    write_key_file(key_path, master)
    for index, path in enumerate(args.replica):
        header = format.Header(volume_id, k, n, index, args.block_size,
                               codec.key_check(keys, volume_id), keys.cipher.id)
        Replica.create(path, header, keys, tree).close()
    if args.source:
        _import_or_undo(args, master, key_path)
    print(f"created volume {volume_id.hex()}: k={k} n={n} write quorum "
          f"{default_quorum(k, n)}, block size {args.block_size}")
    if args.cipher == "auto":
        has = "has" if keys.cipher is codec.AEGIS256 else "has no"
        print(f"cipher {keys.cipher.name}: this CPU {has} AES instructions (any CPU reads it; "
              "AEGIS-256 is slow on one without them, e.g. a Raspberry Pi 4)")
    else:
        print(f"cipher {keys.cipher.name}")
    for index, path in enumerate(args.replica):
        print(f"  replica {index}: {path}")
    if n == 2 and k == 1:
        print("two replicas: every fsync waits for both, so either one failing makes "
              "writes fail (EIO) until it is back; a third replica keeps writing through one fault")
    print(f"key file: {key_path} (mode 0400)")
    print("paper key, write it down and keep it apart from the replicas "
          "(without it nothing can be restored):")
    print(f"  {codec.encode_paper_key(master)}")
    return 0


def _import_or_undo(args: argparse.Namespace, master: bytes, key_path: str) -> None:
    """Copy --from into the new volume and verify it; on failure leave nothing behind."""
    volume = Volume.open(args.replica, master, Options())
    try:
        line = progress_line("import")

        async def run() -> dict:
            counts = await import_tree(volume, args.source, line.update if line else None)
            if line:
                line.finish()
            async with volume.lock:
                await volume.snapshot()
            return counts
        counts = trio.run(run)
    except (RestoreError, OSError, VolumeError) as exc:
        volume.close()
        for path in args.replica:
            for name in os.listdir(path):
                full = os.path.join(path, name)
                shutil.rmtree(full) if os.path.isdir(full) else os.unlink(full)
        os.unlink(key_path)
        raise CliError(f"import of {args.source} failed, nothing was created: "
                       f"{getattr(exc, 'strerror', None) or exc}") from None
    volume.close()
    print(f"imported {args.source}: {counts['files']} files ({counts['bytes']} bytes), "
          f"{counts['dirs']} directories, {counts['links']} extra hard links, "
          f"{counts['skipped_sockets']} sockets skipped; every file read back and verified")


def _check_new_replica_dir(path: str) -> None:
    if not os.path.isdir(path):
        raise CliError(f"{path}: replica directory does not exist (create it first)")
    if os.path.exists(os.path.join(path, format.HEADER_NAME)):
        raise CliError(f"{path}: already belongs to an lnmirrorfs volume")
    if os.listdir(path):
        raise CliError(f"{path}: directory is not empty")
    if not os.access(path, os.W_OK):
        raise CliError(f"{path}: directory is not writable")
