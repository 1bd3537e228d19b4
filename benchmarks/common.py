"""What every part of the end-to-end benchmark (run.py) shares: paths, units, the list of
anomalies, progress lines, dropping caches, reading a daemon's memory figures."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))  # tests/workload.py: the lightningd-style SQLite commit loop

MIB = 1 << 20
PAGE = 4096
ANOMALIES: list[str] = []
CACHE_NOTE: list[str] = []
LOADS: list[float] = []  # the 1-minute load average at every step: other work skews the figures


def anomaly(target: str, message: str) -> None:
    """Something measured or done went wrong: listed at the end, and the exit code is 1."""
    line = f"{target}: {message}"
    ANOMALIES.append(line)
    print(f"  ! {line}", flush=True)


def step(target: str, what: str) -> None:
    with open("/proc/loadavg") as f:
        LOADS.append(float(f.read().split()[0]))
    print(f"[{time.strftime('%H:%M:%S')}] {target}: {what} (load {LOADS[-1]:.2f})", flush=True)


def run_cmd(args: list[str], env: dict, timeout: float = 3600) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, env=env, cwd=REPO, timeout=timeout)


def drop_caches() -> bool:
    """sync, then drop the page cache, dentries and inodes; False if not allowed."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError as exc:
        if not CACHE_NOTE:
            CACHE_NOTE.append(f"cannot drop caches ({exc.strerror}): cold numbers are warm")
            print(f"  ! {CACHE_NOTE[0]}", flush=True)
        return False


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM ... of a process in KiB."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("Vm"):
                name, value = line.split(":", 1)
                out[name] = int(value.split()[0])
    return out


class RssWatch:
    """Samples a process's VmRSS and VmHWM every 50 ms, in a thread, until stopped or the
    process is gone: the last VmHWM seen is its peak up to its last 50 ms."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak_rss_kib = self.hwm_kib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.is_set():
            try:
                status = proc_status(self.pid)
            except (OSError, ValueError):
                return
            self.peak_rss_kib = max(self.peak_rss_kib, status.get("VmRSS", 0))
            self.hwm_kib = max(self.hwm_kib, status.get("VmHWM", 0))
            self._stop.wait(0.05)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
