"""What every command shares: `CliError`, key files, the config file, opening a volume,
the replica arguments, running a command and logging."""

from __future__ import annotations

import argparse
import fcntl
import logging
import os
import stat
import sys
import tomllib
from typing import NoReturn

from .. import codec, control
from ..replica import Replica, ReplicaError
from ..volume import Options, Volume, VolumeError


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


# Keys a config file may set, and the argument each one fills when the command line did not.
_CONFIG_KEYS = {"replicas": "replica", "key_file": "key_file", "quorum": "quorum",
                "deadline": "deadline", "suspend_timeout": "suspend_timeout",
                "on_degraded": "on_degraded", "mountpoint": "mountpoint",
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
    options = Options(quorum=args.quorum, deadline=args.deadline or 10.0)
    timeout = getattr(args, "suspend_timeout", None)
    if timeout is not None:
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not (
                0 <= timeout <= 86400):
            raise CliError(f"suspend timeout {timeout!r} must be between 0 and 86400 seconds")
        options.suspend_timeout = float(timeout)
    return options


def open_volume(replicas: list[str], key_file: str | None, options: Options,
                writable: bool = True, serving: bool = False) -> Volume:
    master = resolve_key(replicas, key_file)
    try:
        return Volume.open(replicas, master, options, writable=writable, serving=serving)
    except VolumeError as exc:
        raise CliError(str(exc)) from None


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (`prog: message (see prog --help)`), exit 2,
    like every other refusal, instead of the usage text."""

    def error(self, message: str) -> NoReturn:
        raise CliError(f"{message} (see {self.prog} --help)")


def add_replica_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--replica", action="append", metavar="DIR",
                   help="a replica directory of the volume; give it once per replica")
    p.add_argument("--key-file", metavar="PATH",
                   help="the volume's key file (default /etc/lnmirrorfs/VOLUME.key)")
    p.add_argument("--quorum", type=int, metavar="W",
                   help="write quorum W (default: majority, at least k; both of two)")
    p.add_argument("--deadline", type=float, metavar="SECONDS",
                   help="seconds a replica may take for one request before it is FAULTED "
                        "(default 10)")
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
    except BrokenPipeError:  # `lnmirror status | head`: the reader left, nothing to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 141


# ---------------------------------------------------------------- daemon lock

def daemon_lock_path(mountpoint: str) -> str:
    """Next to the control socket: flock()ed by the process serving MOUNTPOINT for as long
    as it lives, i.e. until its last snapshot is written and the replicas are closed."""
    return os.path.splitext(control.socket_path(mountpoint))[0] + ".lock"


def hold_daemon_lock(mountpoint: str) -> int:
    """Take the daemon lock for this process (released when it exits); refuses when another
    mount_lnmirror still serves MOUNTPOINT."""
    path = daemon_lock_path(mountpoint)
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        owner = os.pread(fd, 32, 0).decode(errors="replace").strip()
        os.close(fd)
        raise CliError(f"{mountpoint} is still served by another mount_lnmirror (pid {owner}); "
                       f"wait for it: lnmirror status {mountpoint} --wait-unmounted 60") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def daemon_lock_held(mountpoint: str) -> bool:
    try:
        fd = os.open(daemon_lock_path(mountpoint), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # drops the shared lock, if taken


def setup_logging(verbose: bool = True) -> None:
    """An `lnmirror` command logs to stderr; without -v, warnings and errors only and
    without timestamps, so a command's output is its report.  (Mounts: logsetup.)"""
    logger = logging.getLogger("lnmirrorfs")
    logger.setLevel(logging.INFO if verbose else logging.WARNING)
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(
        "%(asctime)s %(levelname)s %(name)s: %(message)s" if verbose
        else "lnmirror: %(levelname)s: %(message)s"))
    logger.handlers[:] = [handler]
