"""Where a mount daemon logs, so that an operator can always read it.

- in the foreground (`-f`, systemd): stderr (the journal picks it up);
- daemonized: syslog when its socket (/dev/log) accepts us, else a log file;
- `--log-file PATH` / `-o log_file=PATH`: that file, always (in the foreground as well as
  stderr).

The default file is /var/log/lnmirror/<mountpoint name>-<hash>.log (LNMIRROR_LOGDIR moves
the directory; LNMIRROR_SYSLOG_SOCKET names another syslog socket, e.g. a missing one to
force the file).  `lnmirror status` shows where the log is (`log`, `log_file` in --json).
"""

from __future__ import annotations

import hashlib
import logging
import logging.handlers
import os

FILE_FORMAT = "%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s"
SYSLOG_FORMAT = "lnmirrorfs[%(process)d]: %(message)s"

# What setup() chose: shown by `lnmirror status` through the daemon's status reply.
_target: dict[str, str | None] = {"log": "stderr", "log_file": None}


class LogSetupError(Exception):
    """The log cannot be opened; the message is one line for the operator."""


def log_dir() -> str:
    return os.environ.get("LNMIRROR_LOGDIR", "/var/log/lnmirror")


def syslog_socket() -> str:
    return os.environ.get("LNMIRROR_SYSLOG_SOCKET", "/dev/log")


def default_log_file(mountpoint: str) -> str:
    """Readable (the mountpoint's last component) and unique (a hash of its real path)."""
    real = os.path.realpath(mountpoint)
    name = os.path.basename(real).lstrip(".") or "root"
    digest = hashlib.blake2b(real.encode(), digest_size=4).hexdigest()
    return os.path.join(log_dir(), f"{name}-{digest}.log")


def _file_handler(path: str) -> logging.Handler:
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), mode=0o750, exist_ok=True)
        handler = logging.handlers.WatchedFileHandler(path)  # follows logrotate's renames
    except OSError as exc:
        raise LogSetupError(f"cannot open log file {path}: {exc.strerror or exc}") from None
    handler.setFormatter(logging.Formatter(FILE_FORMAT))
    return handler


def _syslog_handler() -> logging.Handler | None:
    path = syslog_socket()
    if not os.path.exists(path):
        return None
    try:
        handler = logging.handlers.SysLogHandler(path)
    except OSError:  # a socket nobody listens on
        return None
    handler.setFormatter(logging.Formatter(SYSLOG_FORMAT))
    return handler


def setup(foreground: bool, mountpoint: str | None = None, log_file: str | None = None) -> str:
    """Point the `lnmirrorfs` logger at its destination; returns a description of it."""
    handlers: list[logging.Handler] = []
    if foreground:
        stream = logging.StreamHandler()
        stream.setFormatter(logging.Formatter(FILE_FORMAT))
        handlers.append(stream)
        _target.update(log="stderr", log_file=None)
    if log_file:
        handlers.append(_file_handler(log_file))
        _target.update(log=os.path.abspath(log_file), log_file=os.path.abspath(log_file))
    elif not foreground:
        syslog = _syslog_handler()
        if syslog:
            handlers.append(syslog)
            _target.update(log=f"syslog ({syslog_socket()})", log_file=None)
        else:
            path = default_log_file(mountpoint or "/")
            handlers.append(_file_handler(path))
            _target.update(log=path, log_file=path)
    logger = logging.getLogger("lnmirrorfs")
    logger.setLevel(logging.INFO)
    for old in logger.handlers:
        old.close()
    logger.handlers[:] = handlers
    return str(_target["log"])


def target() -> dict[str, str | None]:
    """{"log": where, human readable; "log_file": the file's path or None}."""
    return dict(_target)
