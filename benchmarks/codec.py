"""Codec throughput: encode_block and decode_block, measured on this machine, this run.

For each cipher (XChaCha20-Poly1305, AEGIS-256), 4 KiB and 64 KiB blocks and k/n = 1/2, 2/3
and 3/5 it times

* encode: ``codec.encode_block`` -- AEAD seal, zfec encode to n shares and a keyed BLAKE2b
  checksum per share (none with k = 1: the AEAD tag checks the share);
* decode: ``codec.decode_block`` -- zfec decode from k shares and AEAD open.  Two cases:
  ``decode (data)`` gets the k primary shares 0..k-1 (zfec only concatenates), and
  ``decode (parity)`` gets the last k shares n-k..n-1, so as many shares as possible are
  parity shares and zfec must really reconstruct (what a read sees with replicas down).

Throughput is plaintext MB/s (1 MB = 10**6 bytes): block size times calls divided by the
time.perf_counter() time of a loop that runs for at least --seconds per cell (the number
of calls per timed round doubles until a round lasts that long).  Share checksum
verification, which the volume layer does before decode_block, is not part of decode.

Run from the repository root:

    python benchmarks/codec.py                  # ~0.5 s per cell
    python benchmarks/codec.py --seconds 0.05   # smoke test

It prints a table and writes the same numbers to benchmarks/results/codec.json (or --output).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from importlib import metadata
from pathlib import Path

from lnmirrorfs import codec

BLOCK_SIZES = (4096, 65536)
SHAPES = ((1, 2), (2, 3), (3, 5))
DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results" / "codec.json"
VOLUME_ID = bytes(range(16))
FILE_ID, BLOCK_INDEX, GEN, TERM = 42, 7, 1, 1 << 32


def time_loop(fn, min_seconds: float) -> tuple[int, float]:
    """Call fn until one timed round of calls lasts at least min_seconds; return (calls, seconds)."""
    fn()  # warm up (zfec encoder/decoder caches, first-call allocation)
    calls = 1
    while True:
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return calls, elapsed
        calls *= 2


def measure_cell(keys: codec.Keys, k: int, n: int, block_size: int, min_seconds: float) -> dict:
    plaintext = os.urandom(block_size)
    pairs = codec.encode_block(keys, VOLUME_ID, k, n, FILE_ID, BLOCK_INDEX, GEN, TERM, plaintext)
    shares = [share for _, share in pairs]
    data_shares = {i: shares[i] for i in range(k)}
    parity_shares = {i: shares[i] for i in range(n - k, n)}
    for subset in (data_shares, parity_shares):
        got = codec.decode_block(keys, VOLUME_ID, k, n, FILE_ID, BLOCK_INDEX, GEN, TERM, subset,
                                 block_size)
        if got != plaintext:
            raise RuntimeError(f"decode_block round trip failed for k={k} n={n} bs={block_size}")

    def encode() -> None:
        codec.encode_block(keys, VOLUME_ID, k, n, FILE_ID, BLOCK_INDEX, GEN, TERM, plaintext)

    def decoder(subset: dict[int, bytes]):
        def decode() -> None:
            codec.decode_block(keys, VOLUME_ID, k, n, FILE_ID, BLOCK_INDEX, GEN, TERM, subset, block_size)
        return decode

    cell = {"cipher": keys.cipher.name, "k": k, "n": n, "block_size": block_size,
            "share_size": len(shares[0]), "parity_shares_used": sum(1 for i in parity_shares if i >= k)}
    for name, fn in (("encode", encode), ("decode_data", decoder(data_shares)),
                     ("decode_parity", decoder(parity_shares))):
        calls, seconds = time_loop(fn, min_seconds)
        cell[name] = {"calls": calls, "seconds": seconds,
                      "mb_per_s": block_size * calls / seconds / 1e6,
                      "us_per_block": seconds / calls * 1e6}
    return cell


def run(min_seconds: float) -> list[dict]:
    master = codec.new_master_key()
    return [measure_cell(codec.Keys.derive(master, cipher), k, n, bs, min_seconds)
            for cipher in codec.CIPHERS.values() for bs in BLOCK_SIZES for k, n in SHAPES]


def format_table(cells: list[dict]) -> str:
    head = (f"{'cipher':<18} {'block':>7} {'k/n':>4} {'share':>6}  {'encode MB/s':>11}  "
            f"{'decode (data) MB/s':>18}  {'decode (parity) MB/s':>20}")
    lines = [head, "-" * len(head)]
    for c in cells:
        lines.append(f"{c['cipher']:<18} {c['block_size'] // 1024:>5}Ki {c['k']}/{c['n']:<2} "
                     f"{c['share_size']:>6}  "
                     f"{c['encode']['mb_per_s']:>11.1f}  {c['decode_data']['mb_per_s']:>18.1f}  "
                     f"{c['decode_parity']['mb_per_s']:>20.1f}")
    return "\n".join(lines)


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=0.5,
                        help="minimum timed wall time per measurement (default 0.5)")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT,
                        help=f"JSON results file (default {DEFAULT_OUTPUT})")
    args = parser.parse_args(argv)
    if args.seconds <= 0:
        parser.error("--seconds must be positive")

    started = time.time()
    cells = run(args.seconds)
    print(format_table(cells))

    result = {
        "benchmark": "codec",
        "unit": "plaintext MB/s (1 MB = 1e6 bytes)",
        "min_seconds_per_measurement": args.seconds,
        "started_unix": started,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "versions": {d: _version(d) for d in ("zfec", "pynacl")},
        "cells": cells,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
