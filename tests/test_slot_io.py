"""Slot files written in runs (two pwritevs per run of a group) and read back in runs,
against a plain model: the last write of each slot wins.  In-process, on a real replica
directory, for the layouts of 512 and 4096-byte blocks with k = 1 and k = 2."""

from __future__ import annotations

import os
import random

import pytest

from conftest import make_volume
from lnmirrorfs import format
from lnmirrorfs.cli.common import read_key_file
from lnmirrorfs.codec import share_length
from lnmirrorfs.fileio import IOV_MAX, pwrite_all
from lnmirrorfs.volume import Volume


@pytest.mark.parametrize("block_size,k", [(512, 1), (4096, 1), (4096, 2)])
def test_slots_written_in_runs_read_back_as_written(tmp_path, block_size, k):
    v = make_volume(tmp_path / "vol", n=3, k=k, extra=("--block-size", str(block_size)))
    volume = Volume.open([str(r) for r in v.replicas], read_key_file(str(v.key)))
    replica = volume.replicas[0]
    layout = replica.layout
    share = share_length(block_size + volume.keys.cipher.overhead, k)
    rng = random.Random(block_size * 10 + k)
    expected: dict[tuple[int, int, int], bytes] = {}
    try:
        for round_ in range(40):
            slots = []
            for _ in range(rng.randrange(1, 3 * layout.group)):
                key = (rng.randrange(100, 103), rng.randrange(3 * layout.group), rng.randrange(2))
                if rng.random() < 0.5 and slots:  # runs: the next block of the last one
                    f, b, s, _ = slots[-1]
                    key = (f, b + 1, s)
                head, body = format.pack_slot(round_ + 1, rng.randbytes(16), rng.randbytes(share))
                slots.append((*key, (head, body)))
                expected[key] = head + body
            replica.write_slots(slots)
            wanted = sorted(expected) if round_ % 2 else list(expected)
            assert replica.read_slots(wanted) == [expected[key] for key in wanted]
    finally:
        volume.close()


def test_a_write_of_more_buffers_than_one_pwritev_takes(tmp_path):
    parts = [bytes([i % 256]) * 3 for i in range(IOV_MAX * 2 + 5)]
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        pwrite_all(fd, parts, 7)
        assert os.pread(fd, 10 << 20, 7) == b"".join(parts)
    finally:
        os.close(fd)


def test_a_synced_write_of_more_files_than_the_descriptor_cache_holds(tmp_path):
    """One write of slots in 300 files (a commit after a long ride-through): every file it
    wrote is synced by its own descriptor, none closed under it by the cache (it was:
    EBADF, or worse, the number reused by another replica's file and that one synced)."""
    v = make_volume(tmp_path / "vol", n=2, k=1)
    volume = Volume.open([str(r) for r in v.replicas], read_key_file(str(v.key)))
    replica = volume.replicas[0]
    share = share_length(volume.block_size + volume.keys.cipher.overhead, 1)
    slots = [(1000 + f, 0, 0, format.pack_slot(7, bytes(16), bytes([f % 256]) * share))
             for f in range(300)]
    try:
        replica.write_slots(slots)
        wanted = [(file_id, 0, 0) for file_id, _, _, _ in slots]
        assert replica.read_slots(wanted) == [b"".join(buffers) for *_, buffers in slots]
    finally:
        volume.close()
