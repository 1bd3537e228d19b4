"""`mount_lnmirror`: `-o` options (fstab / mount helper form), daemonizing, serving."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from .. import control, logsetup, memory
from ..volume import Volume, VolumeError
from .common import CliError, apply_config, hold_daemon_lock, open_volume, volume_options

log = logging.getLogger("lnmirrorfs")

# mount(8) and systemd options that mean something to them, not to us or to FUSE.
_IGNORED_MOUNT_OPTIONS = {"defaults", "auto", "noauto", "nofail", "_netdev", "rw", "user",
                          "users", "nouser"}


def parse_mount_args(args: argparse.Namespace) -> tuple[argparse.Namespace, list[str]]:
    """Folds `-o` options and the config file into the parsed arguments; returns them and
    the options to hand on to FUSE."""
    if len(args.args) > 2:
        raise CliError("too many positional arguments: give [SOURCE] MOUNTPOINT")
    source, args.mountpoint = ([None, None] + args.args)[-2:]
    replicas = list(args.replica or [])
    fuse_options = []
    nonempty = False
    options = ",".join(args.options).split(",")
    if source is not None:
        options = _without_helper_defaults(options)
    for opt in options:
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
        elif name == "suspend_timeout":
            args.suspend_timeout = _number(float, name, value)
        elif name == "config":
            args.config = value
        elif name == "log_file":
            args.log_file = value
        elif name == "nonempty":  # libfuse 3 has no such option: we check it ourselves
            nonempty = True
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
    if not nonempty:
        _check_empty_mountpoint(args.mountpoint)
    return args, fuse_options


def _without_helper_defaults(options: list[str]) -> list[str]:
    """mount.fuse3 (fstab, `mount -t fuse.mount_lnmirror`) appends `dev` and `suid` unless
    `nodev` / `nosuid` were given, as mount(8) would for a disk, and mount(8) itself never
    passes an operator's `suid` or `dev` on: drop them, so the mount is nosuid,nodev like a
    direct one (libfuse's default)."""
    return [opt for opt in options if opt not in ("dev", "suid")]


def _check_empty_mountpoint(path: str) -> None:
    """Files under a mountpoint would be hidden by the mount (and lightningd would not see
    them): mounting over them must be asked for."""
    try:
        entries = os.listdir(path)
    except OSError as exc:
        raise CliError(f"mountpoint {path}: {exc.strerror}") from None
    if entries:
        raise CliError(f"mountpoint {path} is not empty (the mount would hide what is in it); "
                       "empty it, or give -o nonempty")


def _number(kind, name: str, value: str):
    try:
        return kind(value)
    except ValueError:
        raise CliError(f"option {name}={value!r} is not a number") from None


def mount(parsed: argparse.Namespace) -> int:
    """Mount and serve (in the foreground with -f, else in a daemon once the mount is up)."""
    from .. import daemon  # pyfuse3 is needed only here

    args, fuse_options = parse_mount_args(parsed)
    mountpoint = os.path.abspath(args.mountpoint)
    _setup_logging(args.foreground, mountpoint, args.log_file)  # before fork: errors on stderr
    if args.foreground:
        volume = _open_for_mount(args, mountpoint)
        daemon.serve(volume, mountpoint, fuse_options, control.socket_path(mountpoint),
                     hook=args.on_degraded)
        return 0
    return _daemonize(lambda ready: daemon.serve(
        _open_for_mount(args, mountpoint), mountpoint, fuse_options, control.socket_path(mountpoint), ready,
        hook=args.on_degraded))


def _open_for_mount(args: argparse.Namespace, mountpoint: str) -> Volume:
    args.daemon_lock = hold_daemon_lock(mountpoint)  # kept open until this process exits
    memory.limit_arenas()  # before opening starts the replicas' threads
    volume = open_volume(args.replica, args.key_file, volume_options(args), serving=True)
    try:
        volume.members.check()
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
        code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])  # the child's, as with -f
        return code if code > 0 else 1
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


def _setup_logging(foreground: bool, mountpoint: str, log_file: str | None) -> None:
    try:
        logsetup.setup(foreground, mountpoint, log_file)
    except logsetup.LogSetupError as exc:
        raise CliError(str(exc), 1) from None
