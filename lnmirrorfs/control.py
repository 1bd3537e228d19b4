"""Control socket: how `lnmirror status` (and later scrub) talk to a live mount.

One JSON request line in, one JSON reply line out.  The socket lives outside the mount
and outside the replicas (network filesystems cannot hold sockets), in LNMIRROR_RUNDIR.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable

import trio

MAX_REQUEST = 1 << 16
# A client has this long to send its request line (LNMIRROR_CONTROL_TIMEOUT overrides it,
# for tests), and the same to take its reply; a handler (a scrub) may take as long as it needs.
READ_TIMEOUT = 30.0
# More connections than this at once get an error reply straight away: each costs a file
# descriptor, and the replicas must never run out of those because of control clients.
MAX_CONNECTIONS = 128
BACKLOG = 128

log = logging.getLogger("lnmirrorfs.control")


def run_dir() -> str:
    return os.environ.get("LNMIRROR_RUNDIR", "/run/lnmirror")


def socket_path(mountpoint: str) -> str:
    """Derived from the mountpoint, so `lnmirror status MOUNTPOINT` finds it."""
    digest = hashlib.blake2b(os.path.realpath(mountpoint).encode(), digest_size=8).hexdigest()
    return os.path.join(run_dir(), f"{digest}.sock")


def read_timeout() -> float:
    try:
        return float(os.environ.get("LNMIRROR_CONTROL_TIMEOUT") or READ_TIMEOUT)
    except ValueError:
        return READ_TIMEOUT


Handler = Callable[[dict], Awaitable[dict]]


class BadRequest(Exception):
    """A request that is not one JSON object on one line of at most MAX_REQUEST bytes."""


async def serve(path: str, handler: Handler, task_status=trio.TASK_STATUS_IGNORED) -> None:
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    if os.path.exists(path):
        os.unlink(path)  # left by a daemon that was killed
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.bind(path)
    os.chmod(path, 0o600)
    sock.listen(BACKLOG)
    task_status.started()
    try:
        await trio.serve_listeners(partial_connection(handler), [trio.SocketListener(sock)])
    finally:
        try:
            os.unlink(path)
        except OSError:
            pass


def partial_connection(handler: Handler) -> Callable[[trio.SocketStream], Awaitable[None]]:
    """The per-connection task (trio runs one per client).  Nothing a client does, or fails
    to do, escapes it: an exception here would end serve_listeners and with it the mount."""
    active = 0

    async def on_connection(stream: trio.SocketStream) -> None:
        nonlocal active
        active += 1
        try:
            async with stream:
                if active > MAX_CONNECTIONS:
                    await _reply(stream, {"error": f"busy: more than {MAX_CONNECTIONS} "
                                                   "control connections, try again"})
                else:
                    await _serve_one(stream, handler)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            log.info("control client went away before its reply: %s", exc)
        except Exception:
            log.exception("control connection failed")
        finally:
            active -= 1
    return on_connection


async def _serve_one(stream: trio.SocketStream, handler: Handler) -> None:
    timeout = read_timeout()
    raw = reply = None
    with trio.move_on_after(timeout) as scope:
        try:
            raw = await _read_line(stream)
        except BadRequest as exc:
            reply = {"error": str(exc)}
    if scope.cancelled_caught:
        reply = {"error": f"no complete request line within {timeout:g} s"}
    if reply is None:
        if raw is None:
            return  # connected and hung up without a word
        try:
            request = _parse(raw)
        except BadRequest as exc:
            reply = {"error": str(exc)}
        else:
            try:
                reply = await handler(request)
            except Exception as exc:  # a bad request must not end the mount
                reply = {"error": f"{type(exc).__name__}: {exc}"}
    await _reply(stream, reply)


async def _reply(stream: trio.SocketStream, reply: dict) -> None:
    with trio.move_on_after(read_timeout()):
        await stream.send_all(json.dumps(reply).encode() + b"\n")


async def _read_line(stream: trio.SocketStream) -> bytes | None:
    """The first line (or everything up to EOF); None if the client sent nothing at all."""
    raw = bytearray()
    while True:
        end = raw.find(b"\n")
        if end > MAX_REQUEST or (end < 0 and len(raw) > MAX_REQUEST):
            raise BadRequest(f"request longer than {MAX_REQUEST} bytes")
        if end >= 0:
            return bytes(raw[:end])
        chunk = await stream.receive_some(65536)
        if not chunk:
            return bytes(raw) if raw else None
        raw += chunk


def _parse(raw: bytes) -> dict:
    try:
        request = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise BadRequest(f"request is not JSON: {exc}") from None
    if not isinstance(request, dict):
        raise BadRequest(f"request must be a JSON object, not {type(request).__name__}")
    return request


def request(path: str, message: dict, timeout: float | None = 30.0) -> dict:
    """Blocking client call; raises OSError if no mount is listening or it hung up."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        give_up = time.monotonic() + (timeout if timeout is not None else READ_TIMEOUT)
        while True:
            try:
                sock.connect(path)
                break
            except BlockingIOError:  # the listen backlog is full: the daemon is busy
                if time.monotonic() > give_up:
                    raise
                time.sleep(0.01)
        sock.sendall(json.dumps(message).encode() + b"\n")
        raw = b""
        while not raw.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            raw += chunk
    if not raw.endswith(b"\n"):
        raise ConnectionError(f"the mount closed {path} without a reply")
    return json.loads(raw)
