"""Invariant I6: replicas hold no file content, name, symlink target or metadata in clear."""

from __future__ import annotations

import os

MARKER = b"PLAINTEXT-MARKER-7f3a"


def test_replicas_hold_no_plaintext(volume, mounted):
    p = mounted.path
    name = "channel-" + MARKER.decode()
    (p / name).write_bytes(MARKER * 3000)           # content spanning many blocks
    (p / (name + "-dir")).mkdir()
    os.symlink("target-" + MARKER.decode(), p / "link")
    with open(p / "small", "wb") as f:             # a block-unaligned tail
        f.write(b"x" * 100 + MARKER)
        f.flush()
        os.fsync(f.fileno())
    assert mounted.unmount() == 0
    needles = [MARKER, MARKER[:12], MARKER.hex().encode(), b"channel-"]
    for replica in volume.replicas:
        for dirpath, _, files in os.walk(replica):
            for fname in files:
                assert MARKER.decode() not in fname
                data = open(os.path.join(dirpath, fname), "rb").read()
                for needle in needles:
                    assert needle not in data, f"{needle!r} in {dirpath}/{fname}"
    # ...yet the key brings it all back.
    out = volume.root / "restored"
    volume.restore(out)
    assert (out / name).read_bytes() == MARKER * 3000
    assert os.readlink(out / "link") == "target-" + MARKER.decode()
