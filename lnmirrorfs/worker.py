"""Worker threads: one thread running one replica's jobs in order, and a value made once
by whichever thread first needs it.  A hung replica blocks only its own worker."""

from __future__ import annotations

import collections
import queue
import threading
import time
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Worker:
    """One thread running one replica's jobs in order (a plain thread + queue: cheapest hop)."""

    def __init__(self, name: str) -> None:
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._submitted: collections.deque[float] = collections.deque()  # times of unfinished jobs
        # Bytes the unfinished jobs hold, as two totals each only one thread adds to (the
        # submitter's, the worker's), so that neither needs a lock.
        self._bytes_submitted = 0
        self._bytes_done = 0
        self.stopping = False  # stop() was called: jobs submitted now would never run
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    @property
    def pending(self) -> int:
        return len(self._submitted)

    @property
    def queued_bytes(self) -> int:
        return self._bytes_submitted - self._bytes_done

    def oldest_pending(self) -> float | None:
        """time.monotonic() of the oldest job not finished yet (None when idle)."""
        try:
            return self._submitted[0]
        except IndexError:
            return None

    def submit(self, job: Callable[[], object], done: Callable[[object, BaseException | None], None],
               size: int = 0) -> None:
        """Queue a job holding `size` bytes (a record and its shares) until it is done."""
        self._submitted.append(time.monotonic())
        self._bytes_submitted += size
        self._jobs.put((job, done, size))

    @property
    def thread(self) -> threading.Thread:
        return self._thread

    def runs_here(self) -> bool:
        """Is this its thread (not one a replacement left behind with a hung call)?"""
        return threading.current_thread() is self._thread

    def stop(self, timeout: float) -> bool:
        """Finish the queued jobs (replicas past quorum may still be writing), then end;
        False if a job still hangs after `timeout` (the thread is left behind)."""
        self.stopping = True
        self._jobs.put((None, None, 0))
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _loop(self) -> None:
        while self._run_next():
            pass

    def _run_next(self) -> bool:
        """Run one job.  A function of its own so the job (a commit's sealed blocks) is
        dropped as soon as it is done, not kept alive until the next job arrives."""
        job, done, size = self._jobs.get()
        if job is None:
            return False
        try:
            result, error = job(), None
        except BaseException as exc:  # handed to the caller, who decides
            result, error = None, exc
        self._submitted.popleft()
        self._bytes_done += size
        done(result, error)
        return True


class Once(Generic[T]):
    """A snapshot's sealed bytes or stale pages, made by whichever replica's thread asks
    first (off the event loop, once for all replicas)."""

    def __init__(self, make: Callable[[], T]) -> None:
        self._make: Callable[[], T] | None = make
        self._made: T | None = None
        self._lock = threading.Lock()

    def __call__(self) -> T:
        with self._lock:
            if self._make is not None:
                self._made, self._make = self._make(), None
            return self._made
