"""State choice: which replica holds the latest acknowledged state, and what each other
replica is (current, behind, diverged, blamed, damaged).  Pure: views in, a choice out.

The replicas hold one log written by one writer at a time (the mount), so this is the
question Raft's election restriction answers (docs/design.md, "Choosing the state"):

- every writable open is a new *term* (a number above every term seen, plus a random
  nonce); a record is identified by (term, seq) and never reused, even when records that
  were never acknowledged are dropped;
- log matching: two replicas whose term histories agree on record s hold the same records
  up to s (one writer per term appends in order);
- the served state is the log that is most up to date by (term number, seq): any
  acknowledged record is on W replicas, so if at least n - W + 1 replicas that have not
  provably lost acknowledged records are here, one of them holds it, and the most up to
  date log contains every record an older-or-equal log holds that was acknowledged;
- every record carries the commit point of its time: a replica whose log ends below the
  highest commit point anyone carries is STALE however many agree with it; a replica
  blamed by the served state is STALE until absolved; a replica with a damaged log or
  snapshot is FAULTED and counts for nothing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from .replay import Loaded
from .replica import FAULTED, MISSING, ONLINE, STALE
from .tree import Tree

TERM_NONCE_BITS = 32


class ChoiceError(Exception):
    """The replicas present cannot give a state that is safe to serve; one line why."""


@dataclass(frozen=True)
class View:
    """One replica as the state choice sees it."""

    name: str
    index: int | None
    loaded: Loaded | None = None
    problem: str = ""          # why there is nothing loaded (missing, unreadable...)
    missing: bool = False


@dataclass
class Verdict:
    state: str
    reason: str = ""
    fork: int = 0              # last record it shares with the served state (STALE ones)


@dataclass
class Choice:
    source: View               # the replica whose log is served
    serve: int                 # the record served: the source's last, unless rolled back
    commit: int                # highest record known acknowledged
    verdicts: dict[str, Verdict] = field(default_factory=dict)
    doubt: str = ""            # why the replicas here cannot prove this is the latest state
    max_term: int = 0

    @property
    def tree(self) -> Tree:
        return self.source.loaded.tree

    def new_term(self) -> int:
        """A term above every one seen, with a random nonce so that two opens that could
        not see each other's (failed) starts still never share a record identity."""
        number = (self.max_term >> TERM_NONCE_BITS) + 1
        nonce = int.from_bytes(os.urandom(TERM_NONCE_BITS // 8), "little")
        return number << TERM_NONCE_BITS | nonce


def term_number(term: int) -> int:
    return term >> TERM_NONCE_BITS


def freshness(tree: Tree) -> tuple[int, int, int]:
    """Raft's "at least as up to date": the last term's number, then the log's length
    (the nonce only breaks ties between failed opens, which wrote no data)."""
    return term_number(tree.term), tree.seq, tree.term


def fork_point(a: Tree, b: Tree) -> int:
    """The last record both states share: they agree on a prefix of the log, so the
    records where their term histories give the same term are 0..fork."""
    lo, hi = 0, min(a.seq, b.seq)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a.term_of(mid) == b.term_of(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def decide(views: list[View], n: int, k: int) -> Choice:
    """Choose the state to serve and classify every replica; ChoiceError if none is safe."""
    readable = [v for v in views if v.loaded is not None]
    healthy = [v for v in readable if not v.loaded.damage]
    if not healthy:
        raise ChoiceError("no replica has readable metadata: " + _reasons(views))
    source = max(healthy, key=lambda v: freshness(v.loaded.tree))
    served = source.loaded.tree
    commit = _check_commits(readable, source)
    forks = {v.name: fork_point(v.loaded.tree, served) for v in healthy}
    vouching = [v for v in healthy if _vouches(v, served, forks[v.name], commit)]
    choice = Choice(source, _serve_point(views, healthy, forks, served, commit, n, k), commit,
                    max_term=max(max(v.loaded.max_term, v.loaded.tree.term) for v in readable))
    for v in views:
        choice.verdicts[v.name] = _verdict(v, choice, forks.get(v.name, 0))
    choice.doubt = _doubt(views, vouching, choice, n)
    return choice


def _serve_point(views: list[View], healthy: list[View], forks: dict[str, int], served: Tree,
                 commit: int, n: int, k: int) -> int:
    """The source's last record, unless fewer than k replicas hold it whole (k > 1 only:
    the shares of the others are needed to read it).  Such a record is dropped only if it
    cannot have been acknowledged: the replicas that may hold it (those here that do, plus
    every one whose content is unknown: not here or unreadable, and not blamed before it,
    since the writer sends nothing to a blamed replica) are fewer than W.  A replica here
    whose log lacks it counts as not holding it, vouching or merely lagging (with W < n the
    slowest replica is routinely a record or two behind at a crash): were it an old copy of
    one that did, the record is lost, and that is the one case this cannot tell."""
    serve = served.seq
    quorum = served.quorum_since(commit)
    here = {v.index for v in healthy}
    while serve > commit and sum(forks[v.name] >= serve for v in healthy) < k:
        holders = sum(forks[v.name] >= serve for v in healthy)
        blamed = {i for i in served.blame if _blamed_by(served, i, serve)} - here
        if holders + (n - len(healthy) - len(blamed)) >= quorum:
            raise ChoiceError(f"record {serve} may have been acknowledged but only {holders} "
                              f"replica(s) here hold it, k={k} are needed to read it: "
                              + _reasons(views))
        serve -= 1
    holders = sum(forks[v.name] >= serve for v in healthy)
    if holders < k:
        raise ChoiceError(f"record {serve} was acknowledged but only {holders} replica(s) here "
                          f"hold it, k={k} are needed to read it: " + _reasons(views))
    return serve


def _check_commits(readable: list[View], source: View) -> int:
    """The highest commit point any replica carries; each must be in the served log."""
    served = source.loaded.tree
    commit = 0
    for v in readable:
        point = v.loaded.commit
        if point > served.seq:
            raise ChoiceError(
                f"record {point} was acknowledged ({v.name} says so) but no replica with an intact "
                f"log holds it ({source.name} ends at record {served.seq}): "
                f"{'; '.join(filter(None, [v.loaded.damage]))} -- restore from a copy that has it, "
                "or heal the damaged replica by hand")
        tree = v.loaded.tree
        if point <= tree.seq and tree.term_of(point) != served.term_of(point):
            raise ChoiceError(
                f"split brain: {v.name} and {source.name} hold different records {point} and both "
                "were acknowledged (two mounts wrote without seeing each other); nothing picks one "
                "for you: restore each alone, keep the right one, replace the others")
        commit = max(commit, point)
    return commit


def _vouches(v: View, served: Tree, fork: int, commit: int) -> bool:
    """Can this replica count toward the n - W + 1 that prove the served state is the latest?

    The proof is pigeonhole: any acknowledged record is on W replicas, so n - W + 1 genuine
    replicas include one that holds it (and the freshest log then holds it too).  Being
    behind does not spoil that; being an old copy does, and an old copy shows itself by
    lacking records known acknowledged.  A replica that lacks some counts only if the
    served state explains the lag: it was blamed, and its log ends exactly where the
    writer stopped sending to it."""
    if fork >= commit:
        return True
    since = served.blamed_since.get(v.index)
    seq = v.loaded.tree.seq
    # It may hold the record it was being sent when it faulted (written, but the sync
    # failed or came too late), never one after it.
    return (since is not None and fork == seq and since - 1 <= seq <= since
            and seq < served.blamed_at.get(v.index, 0))


def _blamed_by(tree: Tree, index: int | None, upto: int) -> bool:
    """Blamed by a record at or below `upto` (a blame in a record that may never have
    been acknowledged says only that the replica lacks that record)."""
    return index in tree.blame and tree.blamed_at.get(index, 0) <= upto


def _verdict(v: View, choice: Choice, fork: int) -> Verdict:
    if v.loaded is None:
        return Verdict(MISSING if v.missing else FAULTED, v.problem)
    if v.loaded.damage:
        return Verdict(FAULTED, v.loaded.damage)
    tree, served = v.loaded.tree, choice.tree
    # A blame in a record past the one served (never acknowledged, dropped) does not count.
    blamed = served.blame.get(v.index) if _blamed_by(served, v.index, choice.serve) else None
    if blamed is not None and v.index in tree.blame:
        blamed = None  # it holds the record that blamed it: a heal gave it the current state
    if fork >= choice.serve:
        if blamed is not None:
            return Verdict(STALE, f"blamed: {blamed}", fork)
        return Verdict(ONLINE, "", fork)
    if fork == tree.seq:
        if tree.seq < choice.commit:
            why = f"behind: at record {tree.seq}, record {choice.commit} was acknowledged"
        else:
            why = f"behind: at record {tree.seq} of {choice.serve}"
    else:
        why = (f"diverged after record {fork}: holds records {fork + 1}-{tree.seq} of an "
               "earlier mount that were never acknowledged")
    if blamed is not None:
        why += f" (blamed: {blamed})"
    return Verdict(STALE, why, fork)


def _doubt(views: list[View], vouching: list[View], choice: Choice, n: int) -> str:
    """Empty if the replicas here prove no newer acknowledged state exists elsewhere.

    A replica vouches unless it provably lost acknowledged records (it ends below the
    commit point, or the served state blames it): such a replica may be an old copy,
    and an old copy is no evidence about what the real one held.  Shares the operator
    took offline (in the served state) get no records after that: the pigeonhole runs
    over the others."""
    quorum = min([choice.tree.quorum_since(choice.commit)]
                 + [v.loaded.tree.quorum for v in vouching])
    offline = set(choice.tree.offline)
    vouching = [v for v in vouching if v.index not in offline]
    n -= len(offline)
    need = n - quorum + 1
    if len(vouching) >= need:
        return ""
    return (f"only {len(vouching)} of {n} replicas can vouch for record {choice.serve} being "
            f"the latest (need {need} with write quorum {quorum}): {_reasons(views, choice)}")


def _reasons(views: list[View], choice: Choice | None = None) -> str:
    out = []
    for v in views:
        if choice is not None:
            verdict = choice.verdicts[v.name]
            if verdict.state != ONLINE:
                out.append(f"{v.name} is {verdict.state} ({verdict.reason})")
        elif v.problem or (v.loaded and v.loaded.damage):
            out.append(f"{v.name}: {v.problem or v.loaded.damage}")
    return "; ".join(out) or "no other replica given"
