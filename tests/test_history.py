"""Randomized history test of state choice, catch-up and heal (see tests/history.py).

    LNMIRROR_HISTORIES=N        histories to run (CI default below; the soak runs more)
    LNMIRROR_HISTORY_SEED=S     first seed (histories S .. S+N-1); replay one with N=1
    LNMIRROR_HISTORY_STEPS=K    steps per history
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import pytest
from history import run_histories

from conftest import slow_enabled
from lnmirrorfs.volume import INLINE_BLOCKS

DEFAULT_HISTORIES = 1000
# Histories that once found a bug, kept so it stays found: (seed, steps, block size, the
# bulk-commit threshold (Options.inline_blocks), what it was).
FOUND = [
    (5618, 30, 512, INLINE_BLOCKS, "a free ran on a replica whose part of the unlink failed late"),
    (700395, 60, 512, INLINE_BLOCKS, "the power-cut model deleted files of a replica away at the open"),
    (718035156, 30, 512, INLINE_BLOCKS,
     "scrub removed files of an unacknowledged unlink an older state still used"),
    (901465, 60, 4096, INLINE_BLOCKS, "a read-only open read only the source, whose copy of an "
                                      "older block had rotted, not the two replicas one "
                                      "unacknowledged record behind"),
    (900068, 60, 4096, INLINE_BLOCKS,
     "that fallback took a STALE replica's bad k=1 share for the block (None)"),
    (217957919, 30, 512, INLINE_BLOCKS, "the oracle: a flipped log rolled the only replica back "
                                        "past a free it had applied, and a read-only open's EIO "
                                        "for that file is fair"),
    (3000136, 30, 4096, 1, "the power-cut model tore slots that write_slots had synced"),
    (3001335, 30, 512, 1, "with fewer than k replicas left, bring back read blocks a bulk commit "
                          "had not left cached"),
]


def _run(count: int, steps: int) -> None:
    first = int(os.environ.get("LNMIRROR_HISTORY_SEED", time.time_ns() % 1_000_000_000))
    count = int(os.environ.get("LNMIRROR_HISTORIES", count))
    steps = int(os.environ.get("LNMIRROR_HISTORY_STEPS", steps))
    print(f"\nhistories: seeds {first}..{first + count - 1}, {steps} steps each "
          f"(replay: LNMIRROR_HISTORY_SEED={first} LNMIRROR_HISTORIES={count})")
    started = time.monotonic()
    with tempfile.TemporaryDirectory(dir="/dev/shm" if os.path.isdir("/dev/shm") else None) as root:
        stats = run_histories(range(first, first + count), Path(root), steps)
    print(f"{stats.histories} histories, {stats.steps} steps, {stats.opens} opens "
          f"({stats.refused} refused, {stats.unproven} unproven), {stats.acked} acknowledged "
          f"and {stats.failed} failed changes, {stats.kills} kills, {stats.resumed} resumed, "
          f"faults {stats.faults}, "
          f"in {time.monotonic() - started:.0f}s")
    assert stats.acked > count  # the histories did something


def test_random_histories():
    _run(DEFAULT_HISTORIES, 30)


@pytest.mark.parametrize("seed, steps, block_size, inline_blocks, found", FOUND,
                         ids=[str(f[0]) for f in FOUND])
def test_histories_that_found_a_bug(seed: int, steps: int, block_size: int, inline_blocks: int,
                                    found: str, tmp_path):
    run_histories(range(seed, seed + 1), tmp_path, steps, block_size=block_size,
                  inline_blocks=inline_blocks)  # as when found


@pytest.mark.slow
@pytest.mark.skipif(not slow_enabled(), reason="soak")
def test_random_histories_soak():
    _run(5000, 60)
