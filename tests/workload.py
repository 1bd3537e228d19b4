"""A lightningd-style workload: what Core Lightning does to its data directory.

SQLite on lightningd's defaults (rollback journal, synchronous=FULL, 4 KiB pages), one
`data_version` bump per commit, ~1.5 KiB of payment data per commit, an append-only side
file like gossip_store, and a Unix socket like lightning-rpc in the same directory.

It prints `commit N` to stdout after commit N returned, so a harness that kills things
knows exactly which commits were acknowledged.  Run as a script or call `run()`.
"""

from __future__ import annotations

import argparse
import os
import socket
import sqlite3
import sys
import threading
import time

DB_NAME = "lightningd.sqlite3"
GOSSIP_NAME = "gossip_store"
BACKUP_NAME = "channel_backup"      # replaced by write-to-temp + fsync + rename
RECOVER_NAME = "emergency.recover"  # rewritten in place: truncate, write, fsync
SIDE_EVERY = 5
SOCKET_NAME = "lightning-rpc"
PAYLOAD = 1500


def open_db(directory: str, journal_mode: str = "delete") -> sqlite3.Connection:
    db = sqlite3.connect(os.path.join(directory, DB_NAME), isolation_level=None, timeout=30)
    db.execute(f"PRAGMA journal_mode={journal_mode}")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("CREATE TABLE IF NOT EXISTS vars (name TEXT PRIMARY KEY, intval INTEGER)")
    db.execute("CREATE TABLE IF NOT EXISTS payments (id INTEGER PRIMARY KEY, data BLOB)")
    db.execute("CREATE TABLE IF NOT EXISTS channels (id INTEGER PRIMARY KEY, state BLOB)")
    db.execute("INSERT OR IGNORE INTO vars VALUES ('data_version', 0)")
    return db


def commit_once(db: sqlite3.Connection, number: int) -> None:
    """One lightningd-like transaction: bump data_version, record a payment, touch a channel."""
    payload = (f"payment {number} ".encode() * 100)[:PAYLOAD]
    db.execute("BEGIN IMMEDIATE")
    db.execute("UPDATE vars SET intval = intval + 1 WHERE name = 'data_version'")
    db.execute("INSERT INTO payments VALUES (?, ?)", (number, payload))
    db.execute("INSERT OR REPLACE INTO channels VALUES (?, ?)", (number % 16, payload[:400]))
    db.execute("COMMIT")


def backup_content(number: int) -> bytes:
    return f"backup {number:08d}\n".encode() * 200


def rewrite_side_files(directory: str, number: int) -> None:
    """What lightningd and its plugins do beside the database: atomic replace by rename,
    and an in-place rewrite that truncates first."""
    tmp = os.path.join(directory, BACKUP_NAME + ".tmp")
    with open(tmp, "wb") as f:
        f.write(backup_content(number))
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, os.path.join(directory, BACKUP_NAME))
    with open(os.path.join(directory, RECOVER_NAME), "r+b" if number > SIDE_EVERY else "wb") as f:
        f.truncate(0)
        f.write(f"recover {number}\n".encode() * 50)
        f.flush()
        os.fsync(f.fileno())


def check_backup(directory: str, first: int, acked: int) -> None:
    """The renamed file is one whole version, and not older than the last version a run
    that announced commits first..acked wrote before announcing one of them."""
    path = os.path.join(directory, BACKUP_NAME)
    if not os.path.exists(path):
        assert acked < SIDE_EVERY, "channel_backup is missing"
        return
    data = open(path, "rb").read()
    number = int(data.split(b"\n", 1)[0].split()[1])
    assert data == backup_content(number), "channel_backup is not one whole version"
    written = acked - acked % SIDE_EVERY
    if written >= first:
        assert number >= written, f"channel_backup {number} older than {written}"


def announced(output: str) -> tuple[int, int]:
    """(first, last) commit numbers a run printed as acknowledged; (0, 0) for none."""
    numbers = [int(line.split()[1]) for line in output.splitlines() if line.startswith("commit ")]
    return (min(numbers), max(numbers)) if numbers else (0, 0)


def check_db(directory: str) -> int:
    """Verify integrity and that commits 1..N are all there; returns N (the data_version)."""
    db = sqlite3.connect(os.path.join(directory, DB_NAME))
    try:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master")}
        if "payments" not in tables:
            return 0  # cut short before its schema was committed
        row = db.execute("SELECT intval FROM vars WHERE name='data_version'").fetchone()
        version = row[0] if row else 0
        ids = [row[0] for row in db.execute("SELECT id FROM payments ORDER BY id")]
        assert ids == list(range(1, version + 1)), f"payments {ids[:3]}.. do not match {version}"
        for number, data in db.execute("SELECT id, data FROM payments"):
            assert data == (f"payment {number} ".encode() * 100)[:PAYLOAD]
        return version
    finally:
        db.close()


class RpcSocket:
    """A listening Unix socket in the data directory, exercised like lightning-rpc."""

    def __init__(self, directory: str) -> None:
        path = os.path.join(directory, SOCKET_NAME)
        if os.path.exists(path):
            os.unlink(path)
        # bind() takes a path of at most 107 bytes: go there first, as lightningd does.
        cwd = os.getcwd()
        os.chdir(directory)
        try:
            self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.server.bind(SOCKET_NAME)
            self.server.listen(1)
            self.client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.client.connect(SOCKET_NAME)
        finally:
            os.chdir(cwd)
        self.conn, _ = self.server.accept()

    def ping(self, number: int) -> None:
        message = f'{{"id":{number},"method":"getinfo"}}'.encode()
        self.client.sendall(message)
        assert self.conn.recv(4096) == message

    def close(self) -> None:
        for s in (self.client, self.conn, self.server):
            s.close()


def run(directory: str, commits: int, journal_mode: str = "delete", start: int | None = None,
        announce=None) -> int:
    """Run `commits` commits; returns the last acknowledged commit number."""
    db = open_db(directory, journal_mode)
    first = start if start is not None else db.execute(
        "SELECT intval FROM vars WHERE name='data_version'").fetchone()[0] + 1
    rpc = RpcSocket(directory)
    gossip = os.open(os.path.join(directory, GOSSIP_NAME), os.O_WRONLY | os.O_CREAT | os.O_APPEND,
                     0o600)
    number = first - 1
    try:
        for number in range(first, first + commits):
            commit_once(db, number)
            if number % SIDE_EVERY == 0:
                rewrite_side_files(directory, number)
            if announce:
                announce(number)
            os.write(gossip, f"gossip {number:08d}\n".encode() * 8)
            rpc.ping(number)
    finally:
        os.close(gossip)
        rpc.close()
        db.close()
    return number


class CommitLoop:
    """lightningd's pace: a SQLite commit (rollback journal, synchronous=FULL) every 50 ms,
    in a thread; records every error and the last acknowledged commit."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.acked = 0
        self.errors: list[str] = []
        self.slowest = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        db = open_db(self.directory)
        self.first = db.execute("SELECT intval FROM vars WHERE name='data_version'").fetchone()[0]
        try:
            while not self._stop.is_set():
                started = time.monotonic()
                try:
                    commit_once(db, self.first + self.acked + 1)
                except Exception as exc:  # noqa: BLE001 - any error is what the test looks for
                    self.errors.append(repr(exc))
                    return
                self.slowest = max(self.slowest, time.monotonic() - started)
                self.acked += 1
                time.sleep(0.05)
        finally:
            db.close()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(60)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("directory")
    p.add_argument("--commits", type=int, default=100)
    p.add_argument("--journal-mode", default="delete", choices=["delete", "wal"])
    args = p.parse_args()

    def announce(number: int) -> None:
        print(f"commit {number}", flush=True)

    started = time.perf_counter()
    last = run(args.directory, args.commits, args.journal_mode, announce=announce)
    print(f"done {last} in {time.perf_counter() - started:.3f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
