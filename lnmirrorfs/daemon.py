"""Running a mount: the trio main loop around pyfuse3, periodic writeback, the control
socket, signals, and the clean shutdown that flushes everything to the replicas."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Awaitable, Callable
from functools import partial

import pyfuse3
import trio

from . import control, logsetup, memory, scrub
from .fuse_ops import Operations, mount_options
from .volume import Volume

log = logging.getLogger("lnmirrorfs.daemon")
WRITEBACK_SECONDS = 5.0
RECONNECT_SECONDS = 2.0
# A live scrub holds the volume lock for this many blocks at a time (128 KiB at 4 KiB):
# lightningd's commit waits for one such chunk at most (see benchmarks/run.py (live scrub)).
LIVE_CHUNK_BLOCKS = 32
# The kernel reads ahead 128 KiB in a FUSE mount by default: one 128 KiB READ at a time, each
# waiting for the disk, then for the decryption.  With 1 MiB the kernel sends 1 MiB READs
# and has the next one out while one is decrypted: a cold sequential read of a 256 MiB file
# went from 98-116 to 161-210 MB/s (512 KiB and 2 MiB were no better).  Small random reads
# are unchanged: the kernel's first window for a 4 KiB read is a few pages whatever the cap.
READAHEAD_KB = 1024


async def _periodically(seconds: float, job: Callable[[], Awaitable[None]]) -> None:
    """Run `job` every `seconds`.  An error is logged and the next round goes on: a bug in
    housekeeping must not take the mount down (cancellation still ends it)."""
    while True:
        await trio.sleep(seconds)
        try:
            await job()
        except OSError as exc:
            log.error("%s failed: %s", job.__name__, exc)
        except Exception:
            log.exception("%s failed", job.__name__)


def _writeback(volume: Volume) -> Callable[[], Awaitable[None]]:
    async def writeback() -> None:
        """Like the kernel's dirty writeback: buffered data reaches the replicas within seconds."""
        await volume.replica_set.probe()  # faults a vanished or hung replica while idle
        try:
            if (volume.buffer.buffered() or volume.unused) and not volume.suspended:
                await volume.sync()
        finally:
            memory.trim()
    return writeback


async def _on_signals() -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for signum in signals:
            log.info("signal %d: unmounting", signum)
            pyfuse3.terminate()
            return


def _heal_progress(volume: Volume):
    """Where a running scrub or replace says how far it is (status shows it, in bytes)."""
    def progress(done: int, total: int) -> None:
        volume.heal_progress = {"done": done * volume.block_size, "total": total * volume.block_size}
    return progress


def _control_handler(volume: Volume) -> control.Handler:
    heal_lock = trio.Lock()  # one scrub or replace at a time; later ones wait their turn

    async def handle(request: dict) -> dict:
        command = request.get("cmd")
        if command == "status":
            return (await volume.status()) | logsetup.target()
        if command == "scrub":
            dry_run, rate = request.get("dry_run", False), request.get("rate")
            if not isinstance(dry_run, bool) and dry_run is not None:
                return {"error": f"dry_run must be true or false, not {dry_run!r}"}
            if rate is not None and (isinstance(rate, bool) or not isinstance(rate, int | float)
                                     or not rate > 0):
                return {"error": f"rate must be a positive number of MB/s, not {rate!r}"}
            async with heal_lock:
                try:
                    return (await scrub.scrub(volume, bool(dry_run), rate, _heal_progress(volume),
                                              LIVE_CHUNK_BLOCKS)).as_dict()
                finally:
                    volume.heal_progress = None
        if command == "replace":
            old, new = request.get("old"), request.get("new")
            if not (isinstance(old, str) and isinstance(new, str)):
                return {"error": "replace needs the old and new replica directories"}
            async with heal_lock:
                prepared = None
                with trio.move_on_after(volume.options.deadline):
                    prepared = await trio.to_thread.run_sync(
                        scrub.prepare_replacement, volume, old, new, abandon_on_cancel=True)
                if prepared is None:
                    return {"error": f"{old} or {new}: no answer within "
                                     f"{volume.options.deadline:g}s"}
                scrub.attach_replacement(volume, *prepared)
                try:
                    return (await scrub.scrub(volume, progress=_heal_progress(volume),
                                              chunk=LIVE_CHUNK_BLOCKS)).as_dict()
                finally:
                    volume.heal_progress = None
        if command == "offline":
            path = request.get("replica")
            if not isinstance(path, str):
                return {"error": "offline needs the replica directory"}
            return await volume.offline(path)
        return {"error": f"unknown command {command!r}"}
    return handle


async def _main(volume: Volume, control_path: str, mountpoint: str) -> None:
    async with volume.lock:
        await volume.start_term()  # before serving: the first change pays no extra record
    await volume.free_orphans()
    memory.freeze_startup()
    async with trio.open_nursery() as nursery:
        await nursery.start(control.serve, control_path, _control_handler(volume))
        nursery.start_soon(_periodically, WRITEBACK_SECONDS, _writeback(volume))
        # Faulted replicas that answer again are caught up and rejoin, and a mount suspended
        # past its timeout resumes once W replicas hold the pending record: never a remount.
        nursery.start_soon(_periodically, RECONNECT_SECONDS, volume.bring_back)
        nursery.start_soon(_on_signals)
        nursery.start_soon(partial(trio.to_thread.run_sync, _widen_readahead, mountpoint,
                                   abandon_on_cancel=True))
        volume.background = nursery
        await pyfuse3.main()
        volume.background = None
        nursery.cancel_scope.cancel()
    if volume.suspended:
        log.error("unmounted %s with the write quorum lost (%s): changes not acknowledged "
                  "were not kept", mountpoint, volume.suspended)
        return
    try:
        await volume.sync()
        await volume.record_errors()
        async with volume.lock:
            await volume.snapshot()
    except OSError as exc:  # e.g. faulted replicas left fewer than W: say so, no traceback
        log.error("unmount: buffered changes could not be made durable: %s", exc)
        raise SystemExit(1) from None
    log.info("unmounted %s cleanly at record %d", mountpoint, volume.tree.seq)


def event_hook(command: str | None, mountpoint: str):
    """An `on_event` for the volume: log the event and run the operator's command for it
    (in its own thread, so a slow alert script never holds up the mount)."""
    def on_event(event: str, replica: str, reason: str) -> None:
        if event == "faulted":
            log.warning("replica %s FAULTED: %s", replica, reason)
        elif event == "healed":
            log.warning("replica %s healed: back ONLINE", replica)
        elif event == "resumed":
            log.warning("resumed: writes accepted again")
        else:
            log.error("%s: %s", event, reason or replica)
        if not command:
            return
        env = dict(os.environ, LNMIRROR_EVENT=event, LNMIRROR_REPLICA=replica,
                   LNMIRROR_REASON=reason, LNMIRROR_MOUNTPOINT=mountpoint)
        threading.Thread(target=_run_hook, args=(command, env), daemon=True).start()
    return on_event


def _run_hook(command: str, env: dict) -> None:
    try:
        proc = subprocess.run(command, shell=True, env=env, stdin=subprocess.DEVNULL,
                              capture_output=True, timeout=120)
        if proc.returncode:
            log.error("hook %r exited %d: %s", command, proc.returncode,
                      proc.stderr.decode(errors="replace").strip()[:500])
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.error("hook %r failed: %s", command, exc)


def _widen_readahead(mountpoint: str) -> None:
    """Set the mount's read-ahead to READAHEAD_KB (sysfs, root only; else the default
    stays).  In a thread of its own once we serve: the kernel resets the read-ahead when
    it takes our answer to its INIT, and holds every other request until then, so the
    stat that names the mount's device returns only once that is over."""
    try:
        device = os.stat(mountpoint).st_dev
        with open(f"/sys/class/bdi/{os.major(device)}:{os.minor(device)}/read_ahead_kb", "w") as f:
            f.write(str(READAHEAD_KB))
    except OSError as exc:
        log.info("read-ahead left at the kernel's default: %s", exc)


def serve(volume: Volume, mountpoint: str, extra_options: list[str], control_path: str,
          ready=None, hook: str | None = None) -> None:
    """Mount and serve until unmounted; `ready()` is called once the mount is up.  If it
    raises, the mount is undone and the exception propagates.  LNMIRROR_TEST_READY_DELAY
    (seconds, for tests) delays ready() with the mount already made."""
    volume.replica_set.on_event = event_hook(hook, mountpoint)
    pyfuse3.init(Operations(volume), mountpoint, mount_options(extra_options))
    clean = False
    try:
        log.info("mounted %s: volume %s, replicas %s, log %s", mountpoint,
                 volume.volume_id.hex(), " ".join(r.path for r in volume.replicas),
                 logsetup.target()["log"])
        if ready:
            # Tests only: hold the mount up but not yet "ready", to kill the parent meanwhile.
            time.sleep(float(os.environ.get("LNMIRROR_TEST_READY_DELAY") or 0))
            try:
                ready()
            except BaseException as exc:
                # Nobody could be told the mount is up (the mount_lnmirror that started us
                # died): take it down again rather than leave it behind, dead or alive.
                # Nothing was served yet, so unmounting cannot wait on the kernel.
                log.error("unmounting %s: %s", mountpoint, exc)
                clean = True
                raise
        trio.run(_main, volume, control_path, mountpoint)
        clean = True
    finally:
        # After a clean run this also unmounts when we were stopped by a signal; after a
        # crash it must not block on a kernel that still has requests for us.
        pyfuse3.close(unmount=clean)
        volume.close()
