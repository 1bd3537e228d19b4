"""Who takes part in a commit: the write quorum W each record needs, the shares an
operator took offline, and the ops that log a change of either in the next record
(quorum, offline/online, blame/absolve), which the state choice reads back."""

from __future__ import annotations

import logging
import os

from .opening import VolumeError
from .replica import MISSING, OFFLINE, ONLINE, Replica
from .replicaset import ReplicaSet
from .tree import Tree

log = logging.getLogger("lnmirrorfs.membership")
OFFLINE_REASON = "taken offline by the operator (lnmirror replace brings a new one in)"


def default_quorum(k: int, n: int) -> int:
    return max(k, n // 2 + 1)


class Membership:
    def __init__(self, replica_set: ReplicaSet, tree: Tree, k: int, n: int) -> None:
        self.replica_set = replica_set
        self.tree = tree
        self.k, self.n = k, n
        self.quorum = tree.quorum or default_quorum(k, n)
        self.wanted: int | None = None           # a W change the record after the term logs
        self.lowered = False                     # ...that holds at once (a replica taken offline)
        self.offlined: set[int] = set(tree.offline)  # shares taken offline, logged or about to be

    @property
    def replicas(self) -> list[Replica]:
        return self.replica_set.replicas

    def want(self, wanted: int | None) -> None:
        """A W asked for at mount that differs from the volume's is logged by the first
        record after the term's; until it is acknowledged the stricter of the two holds."""
        if wanted is None or wanted == self.tree.quorum:
            return
        if not self.k <= wanted <= self.n:
            raise VolumeError(f"quorum {wanted} must be between k={self.k} and n={self.n}")
        self.wanted = wanted

    def commit_quorum(self) -> int:
        """W for the next record: the stricter of the old and new W while a change is
        pending, except that taking a replica offline lowers it at once (the operator's
        call: the replica is gone, and waiting for it would never end)."""
        if self.lowered and self.wanted:
            return self.wanted
        return max(self.quorum, self.wanted or 0)

    def acknowledged(self) -> None:
        """A record reached W replicas: the W it logged (if any) holds now."""
        self.quorum = self.tree.quorum
        if self.wanted == self.quorum:
            self.wanted, self.lowered = None, False

    def check(self, can_join: int = 0) -> None:
        """Refuse to serve writes that could never be acknowledged (a mount would only
        give lightningd EIO on its first commit); scrub, which heals, does not ask.
        `can_join`: lagging replicas a catch-up is about to bring in."""
        usable = len(self.replica_set.online) + can_join
        if usable >= self.commit_quorum():
            return
        problems = [f"{r.path} is {r.state} ({r.reason})" for r in self.replicas
                    if r.state != ONLINE]
        if len(self.replicas) < self.n:
            problems.append(f"{self.n - len(self.replicas)} of the volume's {self.n} "
                            "replicas not given")
        absent = len(self.replicas) < self.n or any(r.state == MISSING for r in self.replicas)
        advice = ("bring the missing replicas back (or lnmirror replace a lost one)" if absent
                  else "heal them with lnmirror scrub --replica ... (unmounted)")
        raise VolumeError(f"only {usable} replica(s) writable, the write quorum is "
                          f"{self.commit_quorum()}: {'; '.join(problems)}; {advice}")

    # ---- naming a replica by its directory ----

    def replicas_at(self, path: str) -> list[Replica]:
        """The replicas opened at `path`.  The path as given is compared first: resolving
        symlinks touches every replica's filesystem, and the replica an operator names is
        often the one that hangs (call this in a thread, with the deadline)."""
        wanted = os.path.abspath(path)
        named = [r for r in self.replicas if os.path.abspath(r.path) == wanted]
        if named:
            return named
        wanted = os.path.realpath(path)
        return [r for r in self.replicas if os.path.realpath(r.path) == wanted]

    def share_of(self, path: str, named: list[Replica]) -> int:
        """The share the replica directory at `path` (opened as `named`) holds: from its
        header if readable, else the one no other replica given accounts for."""
        for r in named:
            if r.header:
                return r.index
        held = {r.index for r in self.replicas if r.header and r not in named}
        missing = sorted(set(range(self.n)) - held)
        if len(missing) != 1:
            raise VolumeError(f"cannot tell which share {path} held (shares not present: "
                              f"{missing}); give every other replica with --replica")
        return missing[0]

    def locate(self, path: str) -> tuple[int, list[Replica]]:
        """share_of and replicas_at in one call (for a thread)."""
        named = self.replicas_at(path)
        return self.share_of(path, named), named

    # ---- offline ----

    def take_offline(self, path: str, index: int, named: list[Replica]) -> str:
        """Run without a replica that is gone for good until `lnmirror replace` brings a new
        one in (as `zpool offline` does): it is never written or probed again, and W drops
        to what the others can reach.  The next record logs both (the state choice then
        blames it and proves with the lower W).  `index` and `named` come from locate.
        Returns the risk, in one line."""
        if index in self.offlined:
            raise VolumeError(f"{path} (share {index}) is offline already")
        left = self.n - len(self.offlined) - 1
        if left < self.k:
            raise VolumeError(f"taking {path} offline would leave {left} replica(s), fewer "
                              f"than the k={self.k} that hold a block")
        self.offlined.add(index)
        for r in self.replicas:
            if (r.header and r.index == index) or r in named:
                r.state, r.reason, r.offline = OFFLINE, OFFLINE_REASON, True
        if left < self.commit_quorum():
            self.wanted, self.lowered = left, True
        log.warning("replica %s (share %d) taken offline: %s", path, index, self.risk())
        return self.risk()

    def risk(self) -> str:
        if not self.offlined:
            return ""
        w = self.commit_quorum()
        return (f"share(s) {', '.join(map(str, sorted(self.offlined)))} offline: commits need "
                f"{w} of the {self.n - len(self.offlined)} replica(s) left, which can lose "
                f"{w - self.k} more without losing acknowledged changes; lnmirror replace "
                "restores full strength")

    # ---- the ops that log it ----

    def pending(self) -> bool:
        """Something for the next record to log even if nothing else changed."""
        return bool(self.wanted or self.offlined - set(self.tree.offline) or self._back()
                    or self.blame_ops(None))

    def ops(self, serving: int | None) -> list[dict]:
        """The membership, quorum and blame ops of the next record.  `serving`: the record
        this open serves (a replica missing at mount holds at most that)."""
        return self._offline_ops() + self._quorum_ops() + self.blame_ops(serving)

    def _offline_ops(self) -> list[dict]:
        """Log replicas taken offline, and offline ones a replace brought back (W goes back
        up to what it was, as far as the replicas left allow)."""
        ops = [{"op": "offline", "replica": i} for i in sorted(self.offlined - set(self.tree.offline))]
        back = self._back()
        for i in back:
            ops.append({"op": "online", "replica": i})
            self.offlined.discard(i)
        if back:
            restored = min(max(self.tree.offline[i] for i in back), self.n - len(self.offlined))
            if restored > self.quorum:
                self.wanted, self.lowered = restored, False
        return ops

    def _back(self) -> list[int]:
        """Shares logged offline that a replica holds, online, again (a replace)."""
        return sorted(i for i in self.tree.offline if any(
            r.header and r.index == i and r.state == ONLINE for r in self.replicas))

    def _quorum_ops(self) -> list[dict]:
        """A W asked for at mount is logged by the open's first record after its term."""
        return [{"op": "quorum", "w": self.wanted}] if self.wanted else []

    def blame_ops(self, serving: int | None) -> list[dict]:
        """Blame every share no online replica holds (faulted, stale, or missing: it gets
        no records from now on); absolve healed ones."""
        ops = []
        online = {r.index for r in self.replicas if r.header is not None and r.state == ONLINE}
        known = {r.index: r for r in self.replicas if r.header is not None}
        for index in range(self.n):
            blamed = index in self.tree.blame
            if index not in online and not blamed:
                r = known.get(index)
                last = r.last_seq if r is not None else serving
                since = None if last is None else last + 1
                ops.append({"op": "blame", "replica": index, "since": since,
                            "reason": (r.reason if r else "") or "missing at mount"})
            elif index in online and blamed:
                ops.append({"op": "absolve", "replica": index})
        return ops
