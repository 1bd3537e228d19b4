"""The control socket survives any client: garbage, non-objects, huge or unfinished
requests, slow dribblers, hundreds of concurrent connections, and clients that hang up
before their reply (a killed `lnmirror scrub`).  Afterwards the mount daemon is alive, FUSE
and `lnmirror status` work, earlier files read back and a write+fsync still succeeds.

Seeded: the seed is printed; rerun with LNMIRROR_FUZZ_SEED=<seed>.
"""

from __future__ import annotations

import json
import os
import random
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from conftest import lnmirror
from lnmirrorfs import control

# The daemon's per-request read deadline, shortened for the test (30 s by default).
READ_TIMEOUT = 4.0
CLIENTS = 400
MAX_REQUEST = control.MAX_REQUEST


def _connect(path: str, timeout: float = 30.0) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    sock.connect(path)
    return sock


def _read_reply(sock: socket.socket) -> bytes:
    raw = b""
    while not raw.endswith(b"\n"):
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        raw += chunk
    return raw


def _error_reply(raw: bytes, what: str) -> None:
    assert raw, f"{what}: no reply"
    reply = json.loads(raw)
    assert isinstance(reply, dict) and "error" in reply, f"{what}: {reply!r}"


def _send(sock: socket.socket, data: bytes) -> None:
    try:
        sock.sendall(data)
    except (BrokenPipeError, ConnectionResetError):
        pass  # the daemon stopped reading (too long): its reply is still queued for us


def _random_bytes(rng: random.Random, n: int) -> bytes:
    return bytes(rng.getrandbits(8) for _ in range(n))


def _client(path: str, kind: str, rng: random.Random) -> str:
    """One adversarial client; raises AssertionError if the daemon answered wrongly."""
    sock = _connect(path)
    with sock:
        if kind == "connect_close":
            return kind
        if kind == "scrub_close":  # a killed `lnmirror scrub`
            sock.sendall(json.dumps({"cmd": "scrub", "dry_run": rng.random() < 0.5}).encode()
                         + b"\n")
            return kind
        if kind == "status_close":  # a status whose caller timed out
            sock.sendall(b'{"cmd": "status"}\n')
            return kind
        if kind == "partial_close":
            sock.sendall(b'{"cmd": "sta')
            return kind
        if kind == "garbage":
            data = _random_bytes(rng, rng.randrange(1, 2000)).replace(b"\n", b"") + b"\n"
            sock.sendall(data)
            _error_reply(_read_reply(sock), kind)
        elif kind == "garbage_eof":  # no newline, then half-close: still a (bad) request
            sock.sendall(_random_bytes(rng, rng.randrange(1, 500)).replace(b"\n", b"") or b"x")
            sock.shutdown(socket.SHUT_WR)
            _error_reply(_read_reply(sock), kind)
        elif kind == "not_object":
            value = rng.choice([[], [1, 2], 3, -1.5, "status", None, True, [{"cmd": "status"}]])
            sock.sendall(json.dumps(value).encode() + b"\n")
            _error_reply(_read_reply(sock), kind)
        elif kind == "bad_fields":
            value = rng.choice([{}, {"cmd": None}, {"cmd": 7}, {"cmd": ["status"]},
                                {"cmd": "nope"}, {"cmd": "scrub", "rate": "fast"},
                                {"cmd": "scrub", "rate": -1}, {"cmd": "scrub", "rate": 0},
                                {"cmd": "scrub", "dry_run": "yes"}, {"cmd": "replace"},
                                {"cmd": "replace", "old": 1, "new": []},
                                {"cmd": "replace", "old": "/nonexistent/a",
                                 "new": "/nonexistent/b"}])
            sock.sendall(json.dumps(value).encode() + b"\n")
            _error_reply(_read_reply(sock), f"{kind} {value!r}")
        elif kind == "huge":
            size = MAX_REQUEST + rng.randrange(1, 3 * MAX_REQUEST)
            _send(sock, b'{"cmd": "status", "pad": "' + b"A" * size + b'"}\n')
            _error_reply(_read_reply(sock), kind)
        elif kind == "status":
            _send(sock, b'{"cmd": "status"}\n')
            reply = json.loads(_read_reply(sock))
            assert _busy(reply) or reply.get("state") in ("ONLINE", "DEGRADED"), reply
        elif kind == "two_lines":  # only the first line is the request
            _send(sock, b'{"cmd": "status"}\n{"cmd": "scrub"}\n')
            reply = json.loads(_read_reply(sock))
            assert _busy(reply) or "state" in reply, reply
        elif kind == "dribble":  # slow but within the deadline: served normally
            for byte in b'{"cmd": "status"}\n':
                _send(sock, bytes([byte]))  # a "busy" daemon has answered and closed already
                time.sleep(READ_TIMEOUT / 80)
            reply = json.loads(_read_reply(sock))
            assert _busy(reply) or "state" in reply, reply
        else:
            raise ValueError(kind)
    return kind


def _flood(path: str, count: int = 300) -> None:
    """More connections at once than the daemon serves: each gets its reply or 'busy'."""
    socks = []
    for _ in range(count):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(30)
        for _attempt in range(3000):  # a full listen backlog refuses with EAGAIN
            try:
                sock.connect(path)
                break
            except BlockingIOError:
                time.sleep(0.01)
        else:
            raise AssertionError("the control socket accepted no connection for 30 s")
        socks.append(sock)
    for sock in socks:
        _send(sock, b'{"cmd": "status"}\n')
    busy = 0
    for sock in socks:
        with sock:
            reply = json.loads(_read_reply(sock))
            assert "state" in reply or reply.get("error", "").startswith("busy"), reply
            busy += "error" in reply
    print(f"flood of {count} connections: {busy} told busy")


KINDS = ["connect_close", "scrub_close", "status_close", "partial_close", "garbage",
         "garbage_eof", "not_object", "bad_fields", "huge", "status", "two_lines", "dribble"]


def test_control_socket_survives_adversarial_clients(volume, monkeypatch):
    seed = int(os.environ.get("LNMIRROR_FUZZ_SEED") or random.randrange(1 << 32))
    print(f"control fuzz seed: {seed} (rerun with LNMIRROR_FUZZ_SEED={seed})")
    rng = random.Random(seed)
    monkeypatch.setenv("LNMIRROR_CONTROL_TIMEOUT", str(READ_TIMEOUT))
    m = volume.mount()
    files = {f"f{i}": _random_bytes(rng, rng.randrange(1, 100_000)) for i in range(5)}
    for name, data in files.items():
        with open(m.path / name, "wb") as f:
            f.write(data)
            os.fsync(f.fileno())
    path = control.socket_path(str(m.path))

    # Connections that never finish their line: they must not hold up anyone else, and the
    # daemon must drop them (with an error reply) once the read deadline has passed.
    stalled = [_connect(path) for _ in range(40)]
    for sock in stalled:
        sock.sendall(b'{"cmd": "status"')
    opened = time.monotonic()
    stop = threading.Event()
    io_errors: list[BaseException] = []

    def fuse_io() -> None:  # FUSE keeps serving while the socket is under fire
        n = 0
        try:
            while not stop.is_set():
                with open(m.path / "busy", "wb") as f:
                    f.write(b"x" * 5000 + str(n).encode())
                    os.fsync(f.fileno())
                n += 1
        except BaseException as exc:
            io_errors.append(exc)

    io_thread = threading.Thread(target=fuse_io)
    io_thread.start()
    try:
        status = control.request(path, {"cmd": "status"}, timeout=READ_TIMEOUT / 2)
        assert status.get("state") == "ONLINE", status
        assert time.monotonic() - opened < READ_TIMEOUT, "status waited for stalled clients"

        kinds = [rng.choice(KINDS) for _ in range(CLIENTS)]
        seeds = [rng.randrange(1 << 32) for _ in range(CLIENTS)]
        with ThreadPoolExecutor(max_workers=64) as pool:
            results = list(pool.map(lambda ks: _client(path, ks[0], random.Random(ks[1])),
                                    zip(kinds, seeds, strict=True)))
        assert len(results) == CLIENTS
        _flood(path)
        assert m.proc.poll() is None, f"mount daemon died:\n{m.output()}"

        for sock in stalled:  # long past the deadline by now, or soon
            sock.settimeout(READ_TIMEOUT + 10)
            _error_reply(_read_reply(sock), "unfinished request")
            sock.close()
        assert time.monotonic() - opened < 3 * READ_TIMEOUT + 60
    finally:
        stop.set()
        io_thread.join()
        for sock in stalled:
            sock.close()
    assert not io_errors, f"FUSE I/O failed during the fuzz: {io_errors[0]!r}\n{m.output()}"

    assert m.proc.poll() is None, f"mount daemon died:\n{m.output()}"
    proc = lnmirror("status", str(m.path), check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # Waits behind the scrubs of the clients that hung up (one scrub at a time), then runs.
    scrub = lnmirror("scrub", str(m.path), "--json", check=False)
    assert scrub.returncode in (0, 1), scrub.stdout + scrub.stderr
    for name, data in files.items():
        assert (m.path / name).read_bytes() == data
    with open(m.path / "after", "wb") as f:
        f.write(b"still writable")
        os.fsync(f.fileno())
    assert (m.path / "after").read_bytes() == b"still writable"
    assert m.proc.poll() is None, f"mount daemon died:\n{m.output()}"
    assert m.unmount() == 0, m.output()


def _busy(reply: dict) -> bool:
    """Over the connection cap the daemon answers at once that it is busy: a valid answer
    while hundreds of clients are connected."""
    return str(reply.get("error", "")).startswith("busy:")
