"""The POSIX surface lightningd and SQLite need, on a real mount, checked after remount too."""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import socket
import stat
import subprocess
import threading
import time
from pathlib import Path

import pytest


def remount(volume, m):
    assert m.unmount() == 0, m.output()
    return volume.mount()


def test_hsm_secret_mode_and_owner_survive_remount(volume, mounted):
    path = mounted.path / "hsm_secret"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
    os.write(fd, os.urandom(32))
    os.close(fd)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o400
    data = path.read_bytes()
    m = remount(volume, mounted)
    path = m.path / "hsm_secret"
    st = os.stat(path)
    assert stat.S_IMODE(st.st_mode) == 0o400 and st.st_uid == os.getuid()
    assert path.read_bytes() == data
    os.chmod(path, 0o600)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_permissions_enforced_for_other_users(mounted):
    secret = mounted.path / "hsm_secret"
    secret.write_bytes(b"x" * 32)
    os.chmod(secret, 0o400)
    os.chmod(mounted.path, 0o755)
    # A non-root user cannot read a 0400 root file: the kernel checks our modes.
    proc = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                           "cat", str(secret)], capture_output=True)
    assert proc.returncode != 0


def test_unlink_while_open_keeps_data_until_close(volume, mounted):
    path = mounted.path / "journal"
    with open(path, "wb+") as f:
        f.write(b"a" * 10000)
        f.flush()
        os.fsync(f.fileno())
        os.unlink(path)
        assert not path.exists()
        f.seek(0)
        assert f.read() == b"a" * 10000
        f.write(b"more")
        f.seek(0)
        assert len(f.read()) == 10004
    m = remount(volume, mounted)
    assert os.listdir(m.path) == []
    # The freed file's shares are gone from the replicas too.
    assert all(not os.listdir(r / "data") for r in volume.replicas)


def test_rename_over_open_target_like_gossip_store(volume, mounted):
    old = mounted.path / "gossip_store"
    old.write_bytes(b"old" * 5000)
    reader = open(old, "rb")
    mapped = mmap.mmap(reader.fileno(), 0, prot=mmap.PROT_READ)
    new = mounted.path / "gossip_store.tmp"
    new.write_bytes(b"new" * 7000)
    os.rename(new, old)
    assert old.read_bytes() == b"new" * 7000
    assert reader.read() == b"old" * 5000  # the old inode lives on while open
    assert mapped[:3] == b"old"
    mapped.close()
    reader.close()
    m = remount(volume, mounted)
    assert os.listdir(m.path) == ["gossip_store"]
    assert (m.path / "gossip_store").read_bytes() == b"new" * 7000


def test_symlink_hardlink_fifo_and_dirs(volume, mounted):
    p = mounted.path
    (p / "plugins").mkdir(0o750)
    (p / "plugins" / "data").write_text("plugin state")
    os.symlink("plugins/data", p / "link")
    os.link(p / "plugins" / "data", p / "hard")
    os.mkfifo(p / "fifo", 0o600)
    assert os.readlink(p / "link") == "plugins/data"
    assert os.stat(p / "hard").st_nlink == 2
    m = remount(volume, mounted)
    p = m.path
    assert (p / "link").read_text() == "plugin state"
    assert os.stat(p / "hard").st_ino == os.stat(p / "plugins" / "data").st_ino
    assert stat.S_ISFIFO(os.stat(p / "fifo").st_mode)
    assert stat.S_IMODE(os.stat(p / "plugins").st_mode) == 0o750
    with pytest.raises(OSError) as exc:
        os.rmdir(p / "plugins")
    assert exc.value.errno == errno.ENOTEMPTY


def test_fifo_carries_data(mounted):
    path = mounted.path / "fifo"
    os.mkfifo(path)
    received = []
    t = threading.Thread(target=lambda: received.append(open(path, "rb").read()))
    t.start()
    with open(path, "wb") as w:
        w.write(b"through the fifo")
    t.join(10)
    assert received == [b"through the fifo"]


def test_unix_socket_binds_and_accepts(mounted):
    os.chdir(mounted.path)
    try:
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind("lightning-rpc")
        server.listen(1)
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.connect("lightning-rpc")
        conn, _ = server.accept()
        client.sendall(b'{"method":"getinfo"}')
        assert conn.recv(100) == b'{"method":"getinfo"}'
        assert stat.S_ISSOCK(os.stat("lightning-rpc").st_mode)
        for s in (client, conn, server):
            s.close()
    finally:
        os.chdir("/")


def test_o_append_log(volume, mounted):
    path = mounted.path / "log"
    fds = [os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644) for _ in range(2)]
    for i in range(50):
        os.write(fds[i % 2], f"line {i}\n".encode())
    for fd in fds:
        os.close(fd)
    expected = "".join(f"line {i}\n" for i in range(50))
    assert path.read_text() == expected
    m = remount(volume, mounted)
    assert (m.path / "log").read_text() == expected


def test_shared_writable_mmap_like_wal_shm(volume, mounted):
    path = mounted.path / "db-shm"
    with open(path, "wb+") as f:
        f.truncate(32768)
        mm = mmap.mmap(f.fileno(), 32768)
        mm[100:105] = b"hello"
        mm[20000:20003] = b"shm"
        mm.flush()
        mm.close()
        os.fsync(f.fileno())
    data = path.read_bytes()
    assert data[100:105] == b"hello" and data[20000:20003] == b"shm" and len(data) == 32768
    m = remount(volume, mounted)
    assert (m.path / "db-shm").read_bytes() == data


def test_locks_are_kernel_local(mounted):
    path = mounted.path / "lightningd-bitcoin.pid"
    with open(path, "w") as f:
        fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        # A second process cannot take the lock while we hold it.
        probe = ("import fcntl,sys; f=open(sys.argv[1],'a');\n"
                 "try:\n fcntl.lockf(f, fcntl.LOCK_EX|fcntl.LOCK_NB); sys.exit(0)\n"
                 "except OSError: sys.exit(3)")
        import sys
        assert subprocess.run([sys.executable, "-c", probe, str(path)]).returncode == 3


def test_o_direct_does_not_break(mounted):
    path = mounted.path / "direct"
    buf = mmap.mmap(-1, 4096)
    buf.write(b"d" * 4096)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o600)
    except OSError as exc:
        pytest.fail(f"O_DIRECT open failed: {exc}")
    os.write(fd, buf)
    os.close(fd)
    assert path.read_bytes() == b"d" * 4096


def test_truncate_extend_and_holes(volume, mounted):
    path = mounted.path / "sparse"
    with open(path, "wb") as f:
        f.write(b"x" * 5000)
        f.truncate(100)
        f.truncate(20000)
        f.seek(50000)
        f.write(b"end")
    data = path.read_bytes()
    assert data == b"x" * 100 + bytes(49900) + b"end"
    m = remount(volume, mounted)
    assert (m.path / "sparse").read_bytes() == data


def test_statfs_reports_replica_space(mounted, volume):
    st = os.statvfs(mounted.path)
    replica = os.statvfs(volume.replicas[0])
    assert st.f_bavail * st.f_frsize > 0
    assert abs(st.f_bavail * st.f_frsize - replica.f_bavail * replica.f_frsize) < 1 << 30


def test_errnos(mounted):
    p = mounted.path
    cases = [
        (lambda: os.stat(p / "missing"), errno.ENOENT),
        (lambda: os.mkdir(p), errno.EEXIST),
        (lambda: os.rmdir(p / "f"), errno.ENOTDIR),
        (lambda: os.unlink(p / "d"), errno.EISDIR),
        (lambda: os.rename(p / "d", p / "d" / "sub"), errno.EINVAL),
        (lambda: open(p / ("n" * 256), "w"), errno.ENAMETOOLONG),
        (lambda: os.listdir(p / "f"), errno.ENOTDIR),
    ]
    (p / "f").write_text("file")
    (p / "d").mkdir()
    for call, expected in cases:
        with pytest.raises(OSError) as exc:
            call()
        assert exc.value.errno == expected, call


def test_open_o_trunc_truncates_existing_file(volume, mounted):
    path = mounted.path / "config"
    path.write_bytes(b"x" * 10000)
    path.write_bytes(b"short")  # open(O_WRONLY|O_CREAT|O_TRUNC), as every editor does
    assert path.read_bytes() == b"short"
    m = remount(volume, mounted)
    assert (m.path / "config").read_bytes() == b"short"


def test_mount_reads_ahead_a_mebibyte(volume):
    """The daemon widens the mount's read-ahead (1 MiB READs for sequential reads), found
    by its mount point in mountinfo, escaped there: this one has a space in it."""
    from lnmirrorfs.daemon import READAHEAD_KB

    m = volume.mount(name="mount point")
    try:
        device = os.stat(m.path).st_dev
        bdi = Path(f"/sys/class/bdi/{os.major(device)}:{os.minor(device)}/read_ahead_kb")
        deadline = time.monotonic() + 10  # a thread of the daemon sets it once serving
        while int(bdi.read_text()) != READAHEAD_KB and time.monotonic() < deadline:
            time.sleep(0.05)
        assert int(bdi.read_text()) == READAHEAD_KB
    finally:
        assert m.unmount() == 0, m.output()
