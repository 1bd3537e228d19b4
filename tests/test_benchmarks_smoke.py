"""Smoke test: the codec benchmark script runs end to end and reports every cell."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_codec_benchmark_smoke(tmp_path):
    out = tmp_path / "codec.json"  # keep a smoke run from overwriting real results
    proc = subprocess.run([sys.executable, "benchmarks/codec.py", "--seconds", "0.02", "--output", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr

    rows = set()
    for line in proc.stdout.splitlines():
        m = re.match(r"\s*(\d+)Ki\s+(\d)/(\d)\s+\d+\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s*$", line)
        if m:
            assert all(float(x) > 0 for x in m.groups()[3:]), line
            rows.add((int(m[1]) * 1024, int(m[2]), int(m[3])))
    expected = {(bs, k, n) for bs in (4096, 65536) for k, n in ((1, 2), (2, 3), (3, 5))}
    assert rows == expected, proc.stdout

    cells = json.loads(out.read_text())["cells"]
    assert {(c["block_size"], c["k"], c["n"]) for c in cells} == expected
    assert all(c["encode"]["mb_per_s"] > 0 and c["decode_parity"]["seconds"] >= 0.02 for c in cells)
