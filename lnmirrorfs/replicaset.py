"""The replica set: jobs run on every replica's worker within the deadline, faults marked
and told once, the health probe, and reconnecting faulted replicas that answer again.

It knows replicas, not the tree: what a reconnected replica must be given to rejoin is
heal's business, and which records it must hold is the volume's."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from functools import partial

import trio

from . import codec
from .opening import open_returned
from .replay import Loaded
from .replica import FAULTED, ONLINE, STALE, Replica, ReplicaError

log = logging.getLogger("lnmirrorfs.replicaset")
Event = Callable[[str, str, str], None]
HUNG_DEADLINES = 3  # a faulted replica's call hung this many deadlines: give it new threads
MAX_ABANDONED = 4   # ...at most this many times per replica (a NAS hung for days leaks no more)
IDLE_POLL_SECONDS = 0.05
BACKLOG_POLL_SECONDS = 0.002  # a replica drains a bulk commit's shares in tens of ms


class ReplicaSet:
    def __init__(self, replicas: list[Replica], deadline: float) -> None:
        self.replicas = replicas
        self.deadline = deadline
        self.on_event: Event = lambda event, path, reason: None
        # Replica states last reported to `on_event`, so each change is told once.
        self._reported = {r.path: r.state for r in replicas}
        self._reconnecting = trio.Lock()
        self._abandoned: dict[str, int] = {}  # per replica path: threads left behind hung
        self._looking: set[str] = set()  # paths of absent replicas being opened in a thread

    @property
    def online(self) -> list[Replica]:
        return [r for r in self.replicas if r.usable]

    @property
    def standby(self) -> list[Replica]:
        """STALE replicas that can be read: behind or diverged, so read only as a last
        resort, for a block whose exact version they hold (BlockReader)."""
        return [r for r in self.replicas if r.state == STALE and r.worker is not None]

    def close(self) -> None:
        for r in self.replicas:
            r.close(self.deadline)

    async def run_jobs(self, calls: list[tuple[Replica, Callable[[], object]]], need: int,
                       sizes: dict[Replica, int] | None = None) -> dict:
        """Run one job per replica; return {replica: result} once `need` succeeded, all
        answered, or the deadline passed (then the silent ones are marked FAULTED).
        `sizes`: the bytes each replica's job holds while queued (see wait_backlog)."""
        self.check_deadlines()
        if not calls:
            self.report_changes()  # check_deadlines may just have faulted one
            return {}
        token = trio.lowlevel.current_trio_token()
        answers: list[tuple[Replica, object, BaseException | None]] = []
        decided = trio.Event()

        def on_done(replica: Replica, result: object, error: BaseException | None) -> None:
            # In the worker thread: wake the trio side once, when the outcome is decided,
            # rather than once per answer (each wake-up is a syscall and a scheduler pass).
            answers.append((replica, result, error))
            successes = sum(1 for answer in answers if answer[2] is None)
            if successes >= need or len(answers) == len(calls):
                try:
                    token.run_sync_soon(decided.set)
                except trio.RunFinishedError:
                    pass

        for replica, job in calls:
            replica.worker.submit(job, partial(on_done, replica), sizes.get(replica, 0) if sizes else 0)
        with trio.move_on_after(self.deadline):
            await decided.wait()
        results: dict[Replica, object] = {}
        answered: set[Replica] = set()
        for replica, result, error in list(answers):
            answered.add(replica)
            if error is None:
                results[replica] = result
            else:
                self.fault(replica, f"{type(error).__name__}: {error}")
        if len(results) < need:
            for replica, _ in calls:
                if replica not in answered:
                    self.fault(replica, f"no answer within {self.deadline:g}s")
        self.report_changes()
        return results

    async def wait_backlog(self, replicas: list[Replica], limit: int) -> None:
        """Wait, up to the deadline, until none of these replicas has more than `limit`
        bytes of jobs queued.  With W < n the slowest replica's records are left to it in
        the background, each holding its shares: a bulk write would pile them up without
        bound (n=3 k=2: 129 MB peak RSS writing 1 GiB).  So the writer slows to the
        slowest replica's pace once it is that far behind; a hung one is faulted at the
        deadline (check_deadlines) and waited for no more."""
        def behind() -> bool:
            return any(r.usable and r.worker.queued_bytes > limit for r in replicas)
        if not behind():  # the usual case, on every record: no cancel scope to set up
            return
        with trio.move_on_after(self.deadline):
            while behind():
                await trio.sleep(BACKLOG_POLL_SECONDS)

    async def wait_idle(self, replicas: list[Replica]) -> None:
        """Wait, up to the deadline, until these replicas' workers have no job left."""
        with trio.move_on_after(self.deadline):
            while any(r.worker and r.worker.pending for r in replicas):
                await trio.sleep(IDLE_POLL_SECONDS)

    def report_changes(self) -> None:
        """Tell `on_event` about replicas that faulted or came back since the last call
        (a worker thread may have marked its replica FAULTED on its own)."""
        for r in self.replicas:
            before = self._reported.get(r.path)
            if r.state == before:
                continue
            self._reported[r.path] = r.state
            if r.state == ONLINE:
                self.on_event("healed", r.path, "")
            elif before == ONLINE or before is None:
                self.on_event("faulted", r.path, r.reason)

    def check_deadlines(self) -> None:
        """A replica whose oldest job is past the deadline is FAULTED even if the others
        made the quorum without it: otherwise a hung NAS would just pile up work."""
        now = time.monotonic()
        for r in self.replicas:
            since = r.worker.oldest_pending() if r.worker else None
            if r.state != FAULTED and since is not None and now - since > self.deadline:
                self.fault(r, f"no answer within {self.deadline:g}s")

    def fault(self, replica: Replica, reason: str) -> None:
        if replica.state == ONLINE:
            log.warning("replica %s faulted: %s", replica.path, reason)
        replica.mark(FAULTED, reason)

    async def probe(self) -> dict[Replica, tuple[int, int]]:
        """Ask every online replica, in its own worker and within the deadline, that its
        directory is there and how big its filesystem is: a vanished or hung replica is
        FAULTED while the node is idle, and no statvfs ever runs on the event loop."""
        online = self.online
        return await self.run_jobs([(r, r.probe) for r in online], len(online))

    async def reconnect(self, keys: codec.Keys) -> dict[Replica, Loaded]:
        """Faulted replicas whose worker is idle again (a hung one came back, or its job
        failed): take each one's lock again, check it is the same replica, and read what
        its log holds.  Those that answer are returned, still FAULTED, for a catch-up.
        A replica an operator took offline, or one that needs a full heal, is left alone."""
        async with self._reconnecting:
            await self._rediscover(keys)
            self._abandon_hung_workers()
            faulted = [r for r in self.replicas if r.state == FAULTED and r.header and r.worker
                       and not r.worker.pending and not r.offline and not r.heal_needed]
            if not faulted:
                return {}
            answers = await self.run_jobs([(r, partial(_reload, r, keys)) for r in faulted],
                                          len(faulted))
            for r in faulted:
                if r not in answers:
                    log.debug("replica %s still away: %s", r.path, r.reason)
            return answers

    def _abandon_hung_workers(self) -> None:
        """A faulted replica whose call has hung for several deadlines (a dead NAS or sshfs
        connection that never answers, even once its directory is mounted anew) gets fresh
        threads; the old ones are left behind with their call.  Should that call return one
        day, what it wrote went to the old mount's files, or to a slot a later record owns,
        whose generation then no longer matches: a bad share that reads skip and scrub heals."""
        now = time.monotonic()
        for r in self.replicas:
            since = r.worker.oldest_pending() if r.worker else None
            if (r.state == FAULTED and since is not None
                    and now - since > HUNG_DEADLINES * self.deadline
                    and self._abandoned.get(r.path, 0) < MAX_ABANDONED):
                log.warning("replica %s: a call has hung for %.0fs; new threads take over",
                            r.path, now - since)
                self._abandoned[r.path] = self._abandoned.get(r.path, 0) + 1
                r.start_worker()

    async def _rediscover(self, keys: codec.Keys) -> None:
        """Replicas with no header since the open, because their directory was missing or
        did not answer (a NAS down at mount): one that is back, ours, and the share no
        other replica holds takes its place, FAULTED, for reconnect to catch it up."""
        reference = next(r for r in self.replicas if r.header)
        for r in [r for r in self.replicas if r.header is None and not r.header_damage
                  and not r.offline and r.path not in self._looking]:
            held = {other.index for other in self.replicas if other.header}
            found = None
            self._looking.add(r.path)
            try:
                with trio.move_on_after(self.deadline):
                    found = await trio.to_thread.run_sync(
                        self._look, r.path, reference, keys, held, abandon_on_cancel=True)
            except (ReplicaError, OSError) as exc:
                log.debug("replica %s still away: %s", r.path, exc)
            if found is None:
                continue
            found.start_worker()
            found.mark(FAULTED, f"back after being away at mount ({r.reason}): catching up")
            log.warning("replica %s is back (share %d); catching it up", r.path, found.index)
            self.replicas[self.replicas.index(r)] = found

    def _look(self, path: str, reference: Replica, keys: codec.Keys, held: set[int]) -> Replica:
        """open_returned, in a thread; until it returns (a NAS that still does not answer)
        no other is started on its path, so the abandoned threads do not pile up."""
        try:
            return open_returned(path, reference, keys, held)
        finally:
            self._looking.discard(path)


def _reload(r: Replica, keys: codec.Keys) -> Loaded:
    r.reopen()
    return r.load(keys)
