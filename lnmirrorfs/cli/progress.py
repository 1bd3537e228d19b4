"""One live progress line on a terminal (bytes, rate, ETA); nothing when not a terminal."""

from __future__ import annotations

import sys
import time

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")


def human(n: float) -> str:
    for unit in _UNITS:
        if n < 1024 or unit == _UNITS[-1]:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


class ProgressLine:
    """`update(done, total)` in bytes redraws the line (at most 10 times a second)."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.started = time.monotonic()
        self.shown = 0.0
        self.drawn = False

    def update(self, done: int, total: int) -> None:
        now = time.monotonic()
        if now - self.shown < 0.1 and done < total:
            return
        self.shown = now
        elapsed = max(now - self.started, 1e-6)
        rate = done / elapsed
        eta = f"{(total - done) / rate:.0f}s" if rate > 0 else "?"
        percent = 100 * done // total if total else 100
        print(f"\r{self.label}: {human(done)} of {human(total)} ({percent}%), {human(rate)}/s, "
              f"ETA {eta}  ", end="", file=sys.stderr, flush=True)
        self.drawn = True

    def finish(self) -> None:
        if self.drawn:
            print(file=sys.stderr, flush=True)


def progress_line(label: str) -> ProgressLine | None:
    """A progress line if stderr is a terminal (cron and scripts get none)."""
    return ProgressLine(label) if sys.stderr.isatty() else None
