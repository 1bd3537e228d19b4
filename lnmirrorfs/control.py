"""Control socket: how `lnmirror status` (and later scrub) talk to a live mount.

One JSON request line in, one JSON reply line out.  The socket lives outside the mount
and outside the replicas (network filesystems cannot hold sockets), in LNMIRROR_RUNDIR.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
from collections.abc import Awaitable, Callable

import trio

MAX_REQUEST = 1 << 16


def run_dir() -> str:
    return os.environ.get("LNMIRROR_RUNDIR", "/run/lnmirror")


def socket_path(mountpoint: str) -> str:
    """Derived from the mountpoint, so `lnmirror status MOUNTPOINT` finds it."""
    digest = hashlib.blake2b(os.path.realpath(mountpoint).encode(), digest_size=8).hexdigest()
    return os.path.join(run_dir(), f"{digest}.sock")


Handler = Callable[[dict], Awaitable[dict]]


async def serve(path: str, handler: Handler, task_status=trio.TASK_STATUS_IGNORED) -> None:
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    if os.path.exists(path):
        os.unlink(path)  # left by a daemon that was killed
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.bind(path)
    os.chmod(path, 0o600)
    sock.listen(8)
    task_status.started()
    try:
        await trio.serve_listeners(partial_connection(handler), [trio.SocketListener(sock)])
    finally:
        try:
            os.unlink(path)
        except OSError:
            pass


def partial_connection(handler: Handler):
    async def on_connection(stream: trio.SocketStream) -> None:
        async with stream:
            raw = b""
            while not raw.endswith(b"\n") and len(raw) < MAX_REQUEST:
                chunk = await stream.receive_some(4096)
                if not chunk:
                    return
                raw += chunk
            try:
                reply = await handler(json.loads(raw))
            except Exception as exc:  # a bad request must not end the mount
                reply = {"error": f"{type(exc).__name__}: {exc}"}
            await stream.send_all(json.dumps(reply).encode() + b"\n")
    return on_connection


def request(path: str, message: dict, timeout: float = 30.0) -> dict:
    """Blocking client call; raises OSError if no mount is listening."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        sock.sendall(json.dumps(message).encode() + b"\n")
        raw = b""
        while not raw.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            raw += chunk
    return json.loads(raw)
