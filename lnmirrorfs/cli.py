"""Command line: `lnmirror init|key|status|restore` and `mount_lnmirror`.

Only arguments, key files, daemonizing and logging live here.  Every failure an operator
can cause ends in one line on stderr and a non-zero exit.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import stat
import sys
import time
import tomllib

import trio

from . import codec, control, format, logsetup, scrub
from .replica import Replica, ReplicaError
from .restore import RestoreError, check_node_stopped, import_tree, restore_tree
from .tree import Tree
from .volume import Options, Volume, VolumeError, default_quorum

log = logging.getLogger("lnmirrorfs")
DEFAULT_BLOCK_SIZE = 4096


class CliError(Exception):
    """Reported as `lnmirror: <message>` with exit code 2 (or the code given)."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


# ---------------------------------------------------------------- keys

def key_dir() -> str:
    return os.environ.get("LNMIRROR_KEYDIR", "/etc/lnmirrorfs")


def default_key_path(volume_id: bytes) -> str:
    return os.path.join(key_dir(), f"{volume_id.hex()}.key")


def read_key_file(path: str) -> bytes:
    try:
        st = os.stat(path)
        if st.st_mode & 0o077:
            raise CliError(f"key file {path} is accessible to group or others "
                           f"(mode {stat.S_IMODE(st.st_mode):04o}): chmod 400 {path}")
        with open(path) as f:
            text = f.read()
    except FileNotFoundError:
        raise CliError(f"key file {path} does not exist (give --key-file)") from None
    except OSError as exc:
        raise CliError(f"cannot read key file {path}: {exc.strerror}") from None
    try:
        return codec.decode_paper_key(text)
    except codec.PaperKeyError as exc:
        raise CliError(f"key file {path}: {exc}") from None


def write_key_file(path: str, master: bytes) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), mode=0o700, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
    except FileExistsError:
        raise CliError(f"key file {path} already exists; refusing to overwrite a key") from None
    with os.fdopen(fd, "w") as f:
        f.write(codec.encode_paper_key(master) + "\n")
        f.flush()
        os.fsync(f.fileno())


def resolve_key(replicas: list[str], key_file: str | None) -> bytes:
    """Read the key named on the command line, or the default one for the volume."""
    if key_file:
        return read_key_file(key_file)
    for path in replicas:
        try:
            return read_key_file(default_key_path(Replica.open(path).header.volume_id))
        except ReplicaError:
            continue
    raise CliError("no readable replica to find the volume's key file; give --key-file")


# ---------------------------------------------------------------- lnmirror init

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
    keys = codec.Keys.derive(master)
    key_path = args.key_file or default_key_path(volume_id)
    if os.path.exists(key_path):
        raise CliError(f"key file {key_path} already exists; refusing to overwrite a key")
    tree = Tree.new(args.block_size, os.getuid(), os.getgid(), time.time_ns(), default_quorum(k, n))
    write_key_file(key_path, master)
    for index, path in enumerate(args.replica):
        header = format.Header(volume_id, k, n, index, args.block_size,
                               codec.key_check(keys, volume_id))
        Replica.create(path, header, keys, tree).close()
    if args.source:
        _import_or_undo(args, master, key_path)
    print(f"created volume {volume_id.hex()}: k={k} n={n} write quorum "
          f"{default_quorum(k, n)}, block size {args.block_size}")
    for index, path in enumerate(args.replica):
        print(f"  replica {index}: {path}")
    print(f"key file: {key_path} (mode 0400)")
    print("paper key, write it down and keep it apart from the replicas "
          "(without it nothing can be restored):")
    print(f"  {codec.encode_paper_key(master)}")
    return 0


def _import_or_undo(args: argparse.Namespace, master: bytes, key_path: str) -> None:
    """Copy --from into the new volume and verify it; on failure leave nothing behind."""
    volume = Volume.open(args.replica, master, Options())
    try:
        async def run() -> dict:
            counts = await import_tree(volume, args.source)
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


# ---------------------------------------------------------------- lnmirror key

def cmd_key(args: argparse.Namespace) -> int:
    try:
        header = Replica.open(args.replica).header
    except ReplicaError as exc:
        raise CliError(str(exc)) from None
    if args.key_file:
        master = read_key_file(args.key_file)
    else:
        if sys.stdin.isatty():
            print("paper key: ", end="", file=sys.stderr, flush=True)
        try:
            master = codec.decode_paper_key(sys.stdin.readline())
        except codec.PaperKeyError as exc:
            raise CliError(str(exc), 1) from None
    if codec.key_check(codec.Keys.derive(master), header.volume_id) != header.key_check:
        raise CliError(f"the key is well-formed but not the key of volume {header.volume_hex}", 1)
    print(f"key OK for volume {header.volume_hex}")
    return 0


# ---------------------------------------------------------------- opening volumes

# Keys a config file may set, and the argument each one fills when the command line did not.
_CONFIG_KEYS = {"replicas": "replica", "key_file": "key_file", "quorum": "quorum",
                "deadline": "deadline", "on_degraded": "on_degraded", "mountpoint": "mountpoint",
                "log_file": "log_file"}


def apply_config(args: argparse.Namespace) -> None:
    """Fill unset arguments from the TOML file named by --config (the command line wins)."""
    path = getattr(args, "config", None)
    if not path:
        return
    try:
        with open(path, "rb") as f:
            config = tomllib.load(f)
    except OSError as exc:
        raise CliError(f"cannot read config file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise CliError(f"config file {path}: {exc}") from None
    unknown = set(config) - set(_CONFIG_KEYS)
    if unknown:
        raise CliError(f"config file {path}: unknown keys {', '.join(sorted(unknown))} "
                       f"(known: {', '.join(_CONFIG_KEYS)})")
    if "replicas" in config and not (isinstance(config["replicas"], list) and all(
            isinstance(r, str) for r in config["replicas"])):
        raise CliError(f"config file {path}: replicas must be a list of directory names")
    if getattr(args, "replica", None):
        config.pop("mountpoint", None)  # replicas named on the command line: act on those
    for key, attr in _CONFIG_KEYS.items():
        if key in config and hasattr(args, attr) and not getattr(args, attr):
            setattr(args, attr, config[key])


def volume_options(args: argparse.Namespace) -> Options:
    return Options(quorum=args.quorum, deadline=args.deadline or 10.0)


def open_volume(replicas: list[str], key_file: str | None, options: Options,
                writable: bool = True) -> Volume:
    master = resolve_key(replicas, key_file)
    try:
        return Volume.open(replicas, master, options, writable=writable)
    except VolumeError as exc:
        raise CliError(str(exc)) from None


# ---------------------------------------------------------------- lnmirror status

def cmd_status(args: argparse.Namespace) -> int:
    if args.mountpoint:
        status = _live_status(args.mountpoint, args.wait)
    elif args.replica:
        volume = open_volume(args.replica, args.key_file, volume_options(args), writable=False)
        try:
            status = volume.status()
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
    status["mounted"] = mountpoint
    return status


_STATES = ("ONLINE", "STALE", "FAULTED", "MISSING")


def format_prometheus(s: dict) -> str:
    """node_exporter textfile format: one gauge family per fact, labelled by volume/replica."""
    vol = f'volume="{s["volume"]}"'
    healthy = int(s["state"] == "ONLINE" and all(r["state"] == "ONLINE" for r in s["replicas"]))
    stale = sum(r["state"] != "ONLINE" for r in s["replicas"])
    scrub = s.get("last_scrub") or {}
    lines = [
        "# HELP lnmirror_volume_healthy 1 when the volume and every replica are ONLINE.",
        "# TYPE lnmirror_volume_healthy gauge",
        f"lnmirror_volume_healthy{{{vol}}} {healthy}",
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
    for r in s["replicas"]:
        for state in _STATES:
            lines.append(f'lnmirror_replica_state{{{vol},replica="{r["path"]}",state="{state}"}} '
                         f'{int(r["state"] == state)}')
    lines += ["# HELP lnmirror_replica_errors_total Read, write and checksum errors, across mounts.",
              "# TYPE lnmirror_replica_errors_total counter"]
    for r in s["replicas"]:
        for kind, count in r["errors"].items():
            lines.append(f'lnmirror_replica_errors_total{{{vol},replica="{r["path"]}",kind="{kind}"}} '
                         f"{count}")
    lines += ["# HELP lnmirror_replica_free_bytes Free space on the replica's filesystem.",
              "# TYPE lnmirror_replica_free_bytes gauge"]
    lines += [f'lnmirror_replica_free_bytes{{{vol},replica="{r["path"]}"}} {r["free_bytes"]}'
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
    lines = [f"volume {s['volume']}  k={s['k']} n={s['n']} quorum={s['quorum']}",
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


# ---------------------------------------------------------------- lnmirror restore

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
    try:
        counts = trio.run(restore_tree, volume, args.target, sys.stderr.isatty())
    except RestoreError as exc:
        raise CliError(str(exc)) from None
    except OSError as exc:
        raise CliError(f"restore failed: {exc.strerror or exc}") from None
    finally:
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


# ---------------------------------------------------------------- lnmirror scrub / replace

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
    return _print_report(args, _heal(args, request, replace_offline))


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


# ---------------------------------------------------------------- lnmirror main

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
    _replica_args(status)
    shown = status.add_mutually_exclusive_group()
    shown.add_argument("--json", action="store_true")
    shown.add_argument("--prometheus", action="store_true",
                       help="node_exporter textfile format")
    status.add_argument("--wait", type=float, metavar="SECONDS",
                        help="wait until the mount answers and accepts writes (exit 0), or fail")
    status.set_defaults(func=cmd_status)

    restore = sub.add_parser("restore", help="write the last acknowledged state as plain files")
    _replica_args(restore)
    restore.add_argument("target")
    restore.add_argument("--unproven", action="store_true",
                         help="restore even when the replicas given cannot prove their state is "
                              "the latest (too few of them, or some behind)")
    restore.set_defaults(func=cmd_restore)

    scrub_p = sub.add_parser("scrub", help="verify every share and heal (exit 0 clean, 1 repaired, "
                                           "2 unrepairable)")
    scrub_p.add_argument("mountpoint", nargs="?")
    _replica_args(scrub_p)
    scrub_p.add_argument("--dry-run", action="store_true", help="report, change nothing")
    scrub_p.add_argument("--rate", type=float, metavar="MB/S", help="read at most this fast")
    scrub_p.add_argument("--json", action="store_true")
    scrub_p.set_defaults(func=cmd_scrub)

    replace = sub.add_parser("replace", help="resilver an empty directory in place of a dead replica")
    replace.add_argument("--mountpoint", help="the live mount to replace it in")
    _replica_args(replace)
    replace.add_argument("old")
    replace.add_argument("new")
    replace.add_argument("--json", action="store_true")
    replace.set_defaults(func=cmd_replace)
    return p


def _replica_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--replica", action="append", metavar="DIR")
    p.add_argument("--key-file", metavar="PATH")
    p.add_argument("--quorum", type=int, help="write quorum W (default: majority, at least k)")
    p.add_argument("--deadline", type=float, help="seconds per replica request (default 10)")
    p.add_argument("--config", metavar="TOML", help="read replicas, key_file, quorum, deadline, "
                   "on_degraded, mountpoint from this file; the command line wins")


def run(main, argv: list[str] | None, prog: str) -> int:
    try:
        return main(argv)
    except CliError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        return 130


def lnmirror_main(argv: list[str] | None = None) -> int:
    def main(argv):
        args = lnmirror_parser().parse_args(argv)
        apply_config(args)
        _setup_logging(foreground=True)
        return args.func(args)
    return run(main, argv, "lnmirror")


# ---------------------------------------------------------------- mount_lnmirror

# mount(8) and systemd options that mean something to them, not to us or to FUSE.
_IGNORED_MOUNT_OPTIONS = {"defaults", "auto", "noauto", "nofail", "_netdev", "rw", "user",
                          "users", "nouser"}


def mount_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mount_lnmirror",
        description="mount an lnmirrorfs volume: mount_lnmirror MOUNTPOINT --replica A --replica B,"
                    " or as a mount helper: mount_lnmirror SOURCE MOUNTPOINT -o replica=A:B,key=K")
    p.add_argument("args", nargs="*", metavar="[SOURCE] MOUNTPOINT")
    _replica_args(p)
    p.add_argument("-o", dest="options", action="append", default=[], metavar="OPT[,OPT...]")
    p.add_argument("-f", "--foreground", action="store_true")
    p.add_argument("--on-degraded", metavar="CMD",
                   help="shell command run when a replica faults or heals, or the quorum is lost "
                        "(env LNMIRROR_EVENT, LNMIRROR_REPLICA, LNMIRROR_REASON)")
    p.add_argument("--log-file", metavar="PATH", help="log here (default when daemonized: syslog, "
                   "or /var/log/lnmirror/NAME.log without /dev/log)")
    return p


def parse_mount_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    """Returns the parsed arguments and the options to hand on to FUSE."""
    args = mount_parser().parse_args(argv)
    if len(args.args) > 2:
        raise CliError("too many positional arguments: give [SOURCE] MOUNTPOINT")
    source, args.mountpoint = ([None, None] + args.args)[-2:]
    replicas = list(args.replica or [])
    fuse_options = []
    for opt in ",".join(args.options).split(","):
        name, _, value = opt.partition("=")
        if not name or name in _IGNORED_MOUNT_OPTIONS or name.startswith("x-"):
            continue
        if name == "replica":
            replicas += [v for v in value.split(":") if v]
        elif name == "key":
            args.key_file = value
        elif name == "quorum":
            args.quorum = _number(int, name, value)
        elif name == "deadline":
            args.deadline = _number(float, name, value)
        elif name == "config":
            args.config = value
        elif name == "log_file":
            args.log_file = value
        elif name == "ro":
            raise CliError("read-only mounts are not supported; use lnmirror restore")
        else:
            fuse_options.append(opt)
    if not replicas and source and "/" in source:
        replicas = [v for v in source.split(":") if v]
    args.replica = replicas
    apply_config(args)
    if not args.replica:
        raise CliError("no replicas: give --replica DIR (or -o replica=A:B, or a config file)")
    if not args.mountpoint:
        raise CliError("no mountpoint: give MOUNTPOINT (or mountpoint in the config file)")
    if not os.path.isdir(args.mountpoint):
        raise CliError(f"mountpoint {args.mountpoint} does not exist or is not a directory")
    return args, fuse_options


def _number(kind, name: str, value: str):
    try:
        return kind(value)
    except ValueError:
        raise CliError(f"option {name}={value!r} is not a number") from None


def mount_main(argv: list[str] | None = None) -> int:
    return run(_mount, argv, "mount_lnmirror")


def _mount(argv: list[str] | None) -> int:
    from . import daemon  # pyfuse3 is needed only here

    args, fuse_options = parse_mount_args(argv)
    mountpoint = os.path.abspath(args.mountpoint)
    _setup_logging(args.foreground, mountpoint, args.log_file)  # before fork: errors on stderr
    if args.foreground:
        volume = _open_for_mount(args)
        daemon.serve(volume, mountpoint, fuse_options, control.socket_path(mountpoint),
                     hook=args.on_degraded)
        return 0
    return _daemonize(lambda ready: daemon.serve(
        _open_for_mount(args), mountpoint, fuse_options, control.socket_path(mountpoint), ready,
        hook=args.on_degraded))


def _open_for_mount(args: argparse.Namespace) -> Volume:
    volume = open_volume(args.replica, args.key_file, volume_options(args))
    try:
        volume.check_quorum()
    except VolumeError as exc:
        volume.close()
        raise CliError(str(exc)) from None
    _report_degraded(volume)
    return volume


def _report_degraded(volume: Volume) -> None:
    for r in volume.replicas:
        if r.state != "ONLINE":
            msg = f"mounting degraded: replica {r.path} is {r.state} ({r.reason})"
            log.warning(msg)
            print(f"mount_lnmirror: {msg}", file=sys.stderr)


def _daemonize(serve) -> int:
    """Fork; the child mounts and serves, the parent waits for 'ok' or an error line."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid:
        os.close(write_end)
        with os.fdopen(read_end, "rb") as pipe:
            message = pipe.read().decode(errors="replace").strip()
        if message == "ok":
            return 0
        print(message or "mount_lnmirror: the mount daemon died while starting", file=sys.stderr)
        return 1
    os.close(read_end)
    os.setsid()
    parent = os.getppid()

    def ready() -> None:  # raising here makes daemon.serve undo the mount
        try:
            if os.getppid() != parent:
                raise BrokenPipeError
            os.write(write_end, b"ok")
        except BrokenPipeError:
            raise CliError(f"mount_lnmirror (pid {parent}) died before the mount was ready", 1) \
                from None
        os.close(write_end)
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)

    code = 0
    try:
        serve(ready)
    except CliError as exc:
        _tell_parent(write_end, f"mount_lnmirror: {exc}")
        code = exc.code
    except Exception as exc:
        log.exception("mount daemon failed")
        _tell_parent(write_end, f"mount_lnmirror: {exc}")
        code = 1
    os._exit(code)


def _tell_parent(fd: int, message: str) -> None:
    try:
        os.write(fd, message.encode())
        os.close(fd)
    except OSError:
        pass  # already told 'ok' and closed: the error is in the log


def _setup_logging(foreground: bool, mountpoint: str | None = None,
                   log_file: str | None = None) -> None:
    try:
        logsetup.setup(foreground, mountpoint, log_file)
    except logsetup.LogSetupError as exc:
        raise CliError(str(exc), 1) from None
