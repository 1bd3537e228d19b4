"""Several processes writing, renaming and fsyncing at once, readers during writes: no
lost update, no torn read, no deadlock; and everything survives a remount."""

from __future__ import annotations

import os
import subprocess
import sys

import workload

WRITER = r"""
import os, sys
root, me, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
log = os.open(os.path.join(root, "shared.log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
for i in range(rounds):
    tmp = os.path.join(root, f"w{me}.tmp")
    with open(tmp, "wb") as f:
        f.write(f"{me}:{i}:".encode() + bytes([me]) * 5000)
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, os.path.join(root, f"w{me}.current"))    # atomic replace, like gossip_store
    os.write(log, f"{me} {i}\n".encode())
    if i % 10 == 0:
        os.fsync(log)
os.fsync(log)
"""

READER = r"""
import os, sys, time
root, writers = sys.argv[1], int(sys.argv[2])
deadline = time.time() + 60
seen = 0
while time.time() < deadline and not os.path.exists(os.path.join(root, "stop")):
    for me in range(writers):
        try:
            data = open(os.path.join(root, f"w{me}.current"), "rb").read()
        except FileNotFoundError:
            continue
        head, _, body = data.partition(b":")
        index, _, body = body.partition(b":")
        # a reader sees the old file or the new one, never a mix or a short one
        assert head == str(me).encode() and body == bytes([me]) * 5000, data[:40]
        seen += 1
print(seen)
"""


def test_concurrent_writers_renamers_readers(volume, mounted, tmp_path):
    writers, rounds = 4, 40
    root = str(mounted.path)
    readers = [subprocess.Popen([sys.executable, "-c", READER, root, str(writers)],
                                stdout=subprocess.PIPE, text=True) for _ in range(2)]
    db_worker = subprocess.Popen([sys.executable, str(workload.__file__), root, "--commits", "60"],
                                 stdout=subprocess.DEVNULL)
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, root, str(me), str(rounds)])
             for me in range(writers)]
    for p in procs:
        assert p.wait(180) == 0
    assert db_worker.wait(180) == 0
    open(os.path.join(root, "stop"), "w").close()
    for r in readers:
        out, _ = r.communicate(timeout=60)
        assert r.returncode == 0 and int(out) > 0
    lines = open(os.path.join(root, "shared.log")).read().splitlines()
    assert sorted(lines) == sorted(f"{me} {i}" for me in range(writers) for i in range(rounds))
    for me in range(writers):
        assert open(os.path.join(root, f"w{me}.current"), "rb").read().startswith(
            f"{me}:{rounds - 1}:".encode())
    assert workload.check_db(root) == 60
    assert mounted.unmount() == 0
    m = volume.mount()
    assert len(open(m.path / "shared.log").read().splitlines()) == writers * rounds
    assert workload.check_db(str(m.path)) == 60
