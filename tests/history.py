"""Randomized histories against the real Volume code, Jepsen style, in-process and seeded.

One history is a random sequence of what happens to a node's replicas: acknowledged and
failed changes, kills at any point of a commit (each replica got the record, part of it,
or nothing), replicas vanishing and coming back, a replica replaced by an older copy of
itself, bit flips in logs, snapshots, headers and data, power cuts of a replica's
filesystem (writes since its last sync dropped or torn, files created since undone),
quorum changes between mounts, scrubs and replaces.  Every step runs the real replica
store, state choice, catch-up and scrub on real directories (on tmpfs, for speed).

The oracle keeps the set of states the volume may legitimately serve: after an
acknowledged change exactly one; a change that failed adds the state with it (it may
have reached some replicas).  After every open it checks:
  - the state served is one of them, whenever the replicas present include n - W + 1
    that hold every acknowledged record (`holders`: not an old copy, not damaged, not
    lagging); with fewer, nothing can be proven and a writable open must refuse;
  - once a writable open acknowledged its first change, the state it served is the only
    one left (what an EIO'd change left behind is served only if it stays served);
  - a refusal has a message naming a replica or the reason, and happens only when the
    replicas present cannot prove the latest state or cannot give W writable ones.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import random
import shutil
import stat
import threading
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import trio

from lnmirrorfs import codec, format, scrub
from lnmirrorfs.membership import default_quorum
from lnmirrorfs.namespace import Namespace
from lnmirrorfs.replica import ONLINE, Replica, ReplicaError
from lnmirrorfs.slotfiles import DELETED_SUFFIX
from lnmirrorfs.tree import HOLE, Tree, entry_gen, entry_slot
from lnmirrorfs.volume import INLINE_BLOCKS, Options, Volume, VolumeError

# A change that misses W fails at once (the mount's ride-through is tested on real mounts).
# Snapshots are taken in the background every few records (the mount: every 16 MiB of log).
OPTIONS = {"deadline": 5.0, "suspend_timeout": 0.0, "snapshot_log_bytes": 3000}

NAMES = [b"f0", b"f1", b"f2", b"f3"]
COMMIT_FATES = ("none", "torn", "slots", "synced")  # the fates that cut the commit itself
BLOCK_SIZES = (512, 4096)  # 512: many blocks per file; 4096: a body per page, punched alone
# A catch-up that fails midway (fewer than k good shares of some block) has overwritten
# slots the replica's own older state used: the README's known limits say so.
CATCH_UP_FAILED = "could not be caught up"
LATE_SECONDS = 0.02  # a slow replica's part of a commit waits at most this for the others


# Per replica directory: the slots (file name, block, generation) that write_slots wrote
# and synced (a bulk commit's data, before its record; a heal's), which a power cut keeps.
_SYNCED_SLOTS: dict[str, set[tuple[str, int, int]]] = {}


@contextlib.contextmanager
def _tracking_synced_slots():
    """Replica.write_slots records what it synced in _SYNCED_SLOTS while the histories run
    (a fate's crash still replaces it per replica)."""
    write_slots = Replica.write_slots

    def write_slots_tracked(self: Replica, slots: list) -> None:
        write_slots(self, slots)
        synced = _SYNCED_SLOTS.setdefault(self.path, set())
        for file_id, block, slot, buffers in slots:
            synced.add((format.data_name(file_id, slot), block,
                        format.unpack_slot(bytes(buffers[0]))[0]))
    Replica.write_slots = write_slots_tracked
    try:
        yield
    finally:
        Replica.write_slots = write_slots
        _SYNCED_SLOTS.clear()


class Violation(AssertionError):
    pass


class DataLost(Exception):
    """More shares of a block were damaged or missing than k-of-n tolerates: EIO is the
    right answer and the rest of the history has nothing left to check."""


State = tuple  # (sorted ((name, content), ...), W)


def freeze(files: dict[bytes, bytes], quorum: int) -> State:
    return tuple(sorted(files.items())), quorum


def show(states) -> str:
    """States in a message: names, sizes and a digest of each content, and W."""
    def one(state: State) -> str:
        files = ", ".join(f"{name.decode()}:{len(data)}:{hashlib.blake2b(data, digest_size=3).hexdigest()}"
                          for name, data in state[0])
        return f"{{{files}}} W={state[1]}"
    return " | ".join(one(s) for s in sorted(states)) if isinstance(states, set) else one(states)


@dataclass
class Stats:
    histories: int = 0
    steps: int = 0
    opens: int = 0
    refused: int = 0
    unproven: int = 0
    acked: int = 0
    failed: int = 0
    kills: int = 0
    resumed: int = 0   # records left pending by a failed change, completed while mounted
    faults: dict[str, int] = field(default_factory=dict)

    def add(self, other: Stats) -> None:
        for name in ("histories", "steps", "opens", "refused", "unproven", "acked", "failed",
                     "kills", "resumed"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for key, value in other.faults.items():
            self.faults[key] = self.faults.get(key, 0) + value


class History:
    def __init__(self, seed: int, root: Path, block_size: int | None = None,
                 inline_blocks: int | None = None) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        # drawn apart, so a seed's history with 512-byte blocks is what it always was
        self.block = block_size or random.Random(f"block size {seed}").choice(BLOCK_SIZES)
        # A write here is at most 3 blocks: with the mount's INLINE_BLOCKS every commit
        # would carry its data in the log, and a commit that writes its slots first, then
        # the record (a bulk write), would never be cut by a crash.
        self.options = dict(OPTIONS, inline_blocks=inline_blocks or random.Random(
            f"inline blocks {seed}").choice([INLINE_BLOCKS, 1]))
        self.cipher = random.Random(f"cipher {seed}").choice(list(codec.CIPHERS.values()))
        self.root = root
        self.n = self.rng.choice([2, 2, 3, 3])
        self.k = self.rng.choice([1, 1, 2]) if self.n == 3 else 1
        self.w = default_quorum(self.k, self.n)    # W of the state the open volume holds
        self.w_unconfirmed: int | None = None
        self.master = codec.new_master_key()
        self.paths = [root / f"r{i}" for i in range(self.n)]
        for path in self.paths:
            _SYNCED_SLOTS.pop(str(path), None)
        self.away: dict[int, Path] = {}            # vanished replicas: where they are now
        self.copies: dict[int, Path] = {}          # old copies kept to be swapped in
        self.holder = [True] * self.n              # holds every acknowledged record
        self.data_damage: dict[int, int] = {}      # replica -> data slots flipped (scrub clears)
        self.flipped: set[int] = set()  # replicas whose log or snapshot was flipped
        self.states: set[State] = {freeze({}, self.w)}  # what may be served
        self.volume: Volume | None = None
        self.writable = False
        self.started = False                        # this open acknowledged a change
        self.files: dict[bytes, bytes] = {}         # what the open volume holds
        self.open_seq = 0                           # last record before this open
        # Per replica, its last sync point in this open (the open, or a snapshot it wrote
        # since, which synced its data files first): (record, the data files then).
        self.synced: dict[int, tuple[int, set[str]]] = {}
        self.trace: list[str] = []
        self.late = threading.Event()               # released: slow replicas' parts go on
        self.stats = Stats(histories=1)
        self._create()

    # ---- setup ----

    def _create(self) -> None:
        keys = codec.Keys.derive(self.master, self.cipher)
        volume_id = os.urandom(16)
        tree = Tree.new(self.block, 0, 0, 0, self.w)
        for index, path in enumerate(self.paths):
            path.mkdir()
            header = format.Header(volume_id, self.k, self.n, index, self.block,
                                   codec.key_check(keys, volume_id), self.cipher.id)
            Replica.create(str(path), header, keys, tree).close()

    def note(self, what: str) -> None:
        self.trace.append(what)
        self.stats.steps += 1

    def fault(self, kind: str) -> None:
        self.stats.faults[kind] = self.stats.faults.get(kind, 0) + 1

    def fail(self, why: str) -> None:
        raise Violation(f"seed {self.seed} (n={self.n} k={self.k} block {self.block} "
                        f"{self.cipher.name}): {why}\n  steps: "
                        + "; ".join(self.trace[-40:]))

    # ---- the run ----

    def run(self, steps: int) -> Stats:
        try:
            for _ in range(steps):
                self.step()
                self.note_syncs()
            self.close_volume(clean=self.rng.random() < 0.5)
            self.return_all()
            self.final_check()
        except Violation:
            raise
        except DataLost:
            self.fault("data lost beyond n-k")
        except Exception as exc:  # any other failure of the code under test, with its history
            self.fail(f"{type(exc).__name__}: {exc}")
        finally:
            if self.volume is not None:
                self.volume.close()
        return self.stats

    def step(self) -> None:
        r = self.rng.random()
        if self.volume is None:
            if r < 0.45:
                self.open(writable=True)
            elif r < 0.55:
                self.open(writable=False)
                self.close_volume(clean=False)
            elif r < 0.65:
                self.vanish_or_return()
            elif r < 0.72:
                self.take_or_swap_copy()
            elif r < 0.80:
                self.bit_flip()
            elif r < 0.90:
                self.offline_scrub()
            else:
                self.replace()
            return
        if not self.writable:
            self.close_volume(clean=False)
        elif r < 0.65:
            self.change()
        elif r < 0.75:
            self.close_volume(clean=False)   # kill -9: memory gone, replicas as they are
            self.maybe_power_cut()
        elif r < 0.85:
            self.close_volume(clean=True)
        elif r < 0.93:
            self.vanish_or_return()
        else:
            self.bring_back()

    # ---- opening ----

    def provable(self) -> bool:
        """Are n - W + 1 replicas that hold every acknowledged record present?"""
        present = [i for i in range(self.n) if i not in self.away and self.holder[i]]
        lowest = min([w for _, w in self.states] + [self.w_unconfirmed or self.n])
        return len(present) >= self.n - lowest + 1

    def open(self, writable: bool) -> None:
        quorum = None
        if writable and self.rng.random() < 0.15:
            quorum = self.rng.randint(self.k, self.n)
        self.note(f"open {'rw' if writable else 'ro'}" + (f" W={quorum}" if quorum else ""))
        self.stats.opens += 1
        provable = self.provable()
        try:
            volume = Volume.open([str(p) for p in self.paths], self.master,
                                 Options(quorum=quorum, **self.options), writable=writable)
        except VolumeError as exc:
            self.stats.refused += 1
            self.refused(str(exc), writable, provable)
            return
        self.volume, self.writable, self.started = volume, writable, False
        self.wanted_quorum = quorum
        self.open_seq = volume.tree.seq
        self.synced = {i: (self.open_seq, self._data_files(i)) for i in range(self.n)}
        try:
            served = freeze(trio.run(self.read_all), volume.tree.quorum)
        except OSError as exc:
            if not self.reads_may_fail():
                self.fail(f"read of the served state failed: {exc}")
            self.close_volume(clean=False)
            return
        self.files, self.w = dict(served[0]), served[1]
        if writable:
            try:
                volume.members.check()
            except VolumeError as exc:
                self.refused(str(exc), writable, provable)
                self.close_volume(clean=False)
                return
        if volume.choice.doubt:
            self.stats.unproven += 1
            if provable:
                self.fail(f"doubt although n - W + 1 holders are here: "
                          f"{volume.choice.doubt}")
        elif provable and served not in self.states:
            self.fail(f"served {show(served)} but only {show(self.states)} may be served")

    def reads_may_fail(self) -> bool:
        """Is EIO fair for some file of what an open serves?  Yes with flipped data slots,
        and with a replica here that lost records to a flipped log or snapshot and was not
        proven current since: what it serves may be older than records it applied before
        the flip, such as a free of a file that state still has, whose data is gone from
        it (seed 217957919)."""
        return bool(self.data_damage) or any(i not in self.away and not self.holder[i]
                                             for i in self.flipped)

    def refused(self, message: str, writable: bool, provable: bool) -> None:
        self.note(f"refused: {message[:120]}")
        if not message.strip():
            self.fail("refusal without a message")
        if not provable:
            return
        if "cannot prove" in message or "vouch" in message:
            self.fail(f"refused as unprovable although the holders are here: {message}")
        # With the holders here, only too few writable replicas or damage may refuse.
        allowed = ("writable", "STALE", "FAULTED", "MISSING", "damaged", "acknowledged")
        if not writable and not self.data_damage and "acknowledged" not in message:
            self.fail(f"read-only open refused although provable: {message}")
        if not any(word in message for word in allowed):
            self.fail(f"refusal names no cause: {message}")

    async def read_all(self) -> dict[bytes, bytes]:
        volume = self.volume
        out = {}
        for path, node in volume.tree.walk():
            if stat.S_ISREG(node.mode):
                out[path] = await volume.read(node.ino, 0, volume.buffer.size_of(node))
        return out

    def close_volume(self, clean: bool) -> None:
        volume = self.volume
        if volume is None:
            return
        self.note_syncs()  # a power cut may follow within this step
        self.note("unmount" if clean and self.writable else "kill")
        self.check_whole(volume)
        if clean and self.writable and not volume.suspended:
            try:
                trio.run(self._clean_close)
            except OSError:  # its commit (blame, a W change) may have reached some replicas
                self.states.add(freeze(self.files, self.new_quorum()))
            if volume.term_started:  # the unmount committed (blame, orphans) and snapshotted
                self.states = {freeze(self.files, volume.tree.quorum)}
                self.w_unconfirmed = None  # its snapshot records what was acknowledged
                self.holders_from(volume)
        else:
            self.stats.kills += 1
        volume.close()
        self.volume = None

    def check_whole(self, volume: Volume) -> None:
        """Every replica's own latest state is whole, also on one that faulted in this open
        and fell behind: each block its tree points at is in its data files or its log, for it may
        be all that is left one day (served alone, or restore --unproven).  A freed file's
        removal or a slot overwrite that ran on a replica lacking the record that allowed
        it breaks this at once, not only in the rare history that then serves it alone.
        Checked while the volume's threads are quiet (settled); replicas whose data was
        flipped, or whose log or snapshot does not load whole, are skipped."""
        self.settle()
        keys = codec.Keys.derive(self.master, self.cipher)
        for r in volume.replicas:
            if (r.header is None or r.state == ONLINE  # an online one serves: reads check it
                    or r.index in self.away or r.index in self.data_damage
                    or r.reason.startswith(CATCH_UP_FAILED)):  # a known limit (README)
                continue
            seq, lost = lost_blocks(r.path, keys)
            if lost:
                ino, block, wanted, found = lost[0]
                self.fail(f"r{r.index}'s own state (record {seq}) lost inode {ino} block "
                          f"{block}: its slot holds generation {found}, not {wanted}")

    async def _clean_close(self) -> None:
        volume = self.volume
        await volume.sync()
        async with volume.lock:
            await volume.snapshot()

    # ---- changes ----

    def change(self) -> None:
        volume = self.volume
        names = sorted(self.files)
        choices = ["create"] if len(names) < len(NAMES) else []
        if names:
            choices += ["write", "write", "write", "unlink", "rename"]
        op = self.rng.choice(choices)
        new = dict(self.files)
        if op == "create":
            name = self.rng.choice([n for n in NAMES if n not in self.files])
            new[name] = b""
            args = (name,)
        elif op == "write":
            name = self.rng.choice(names)
            offset = self.rng.randrange(0, 3 * self.block)
            data = bytes([self.rng.randrange(256)]) * self.rng.randrange(1, 3 * self.block)
            old = bytearray(new[name])
            if len(old) < offset:
                old.extend(bytes(offset - len(old)))
            old[offset:offset + len(data)] = data
            new[name] = bytes(old)
            args = (name, offset, data)
        elif op == "unlink":
            name = self.rng.choice(names)
            del new[name]
            args = (name,)
        else:
            name, target = self.rng.choice(names), self.rng.choice(NAMES)
            if name == target:
                return
            new[target] = new.pop(name)
            args = (name, target)
        fates = self.fates()
        self.note(f"{op} {args[0].decode()}" + (f" fates={fates}" if fates else ""))
        was_suspended = bool(volume.suspended)
        self.inject(fates)
        try:
            trio.run(self._apply, op, args)
        except OSError as exc:
            if exc.errno not in (errno.EIO, errno.EROFS):
                self.fail(f"{op} failed with {exc!r}")
            self.stats.failed += 1
            if not was_suspended:
                self.states.add(freeze(new, self.new_quorum()))
            self.uninject()
            if any(f == "torn" for f in fates.values()) or self.rng.random() < 0.5:
                self.close_volume(clean=False)
                self.maybe_power_cut()
            return
        self.uninject()
        self.stats.acked += 1
        self.files = new
        old_w, self.w = self.w, self.new_quorum()
        # A W change is trusted only once a later record shows it was acknowledged: until
        # then the volume rightly proves with the lower of the two.
        self.w_unconfirmed = min(old_w, self.w) if old_w != self.w else None
        self.states = {freeze(new, self.w)}
        self.started = True
        self.holders_from(volume, fates)
        if any(fates.values()) and self.rng.random() < 0.5:
            self.close_volume(clean=False)   # killed right after the acknowledgement
            self.maybe_power_cut()

    def bring_back(self) -> None:
        """The daemon's loop while mounted: faulted replicas that answer again are caught
        up and rejoin, and a record left pending past the suspend timeout completes.  What
        a failed change left in memory (its buffered data stays, as a page cache's would)
        is then committed by a sync, and from there the mount's view is acknowledged."""
        volume = self.volume
        pending = volume.pending
        self.note("bring back" + (" (pending)" if pending else ""))
        trio.run(volume.bring_back)
        self.settle()
        if volume.pending is not None:
            return
        if pending is not None:
            self.stats.resumed += 1
        try:
            memory = trio.run(self.read_all)
        except OSError:
            if len(volume.online) >= self.k:
                raise
            # Fewer than k replicas left: a block not in memory cannot be read (after a bulk
            # commit only each file's last block stays cached).  The node can do nothing.
            self.close_volume(clean=False)
            return
        try:
            trio.run(volume.sync)
        except OSError:
            self.states.add(freeze(memory, volume.commit_quorum()))
            self.close_volume(clean=False)
            return
        self.settle()
        old_w, self.w = self.w, volume.tree.quorum
        self.files = memory
        if old_w != self.w:  # the sync logged a W asked for at open: trusted after a later record
            self.w_unconfirmed = min(old_w, self.w)
        self.states = {freeze(memory, self.w)}
        self.holders_from(volume)

    def new_quorum(self) -> int:
        """The first change of an open also logs the W it was asked for."""
        return self.wanted_quorum if not self.started and self.wanted_quorum else self.w

    async def _apply(self, op: str, args: tuple) -> None:
        volume = self.volume
        names = Namespace(volume)
        if op == "create":
            await names.mknod(1, args[0], stat.S_IFREG | 0o644, 0, 0)
        elif op == "write":
            node = names.lookup(1, args[0])
            await volume.write(node.ino, args[1], args[2])
            await volume.sync(node.ino)
        elif op == "unlink":
            await names.unlink(1, args[0], want_dir=False)
        else:
            await names.rename(1, args[0], 1, args[1])

    def fates(self) -> dict[int, str]:
        """Per replica, what a crash inside this commit leaves (most commits: nothing)."""
        if self.rng.random() > 0.25:
            return {}
        return {i: self.rng.choice([*COMMIT_FATES, "snapshot", "cut"])
                for i in range(self.n) if self.rng.random() < 0.5}

    def inject(self, fates: dict[int, str]) -> None:
        """Cut the replica's part of the commit where its fate says, as a crash would:
        nothing written, the data slots but not the record (a record too big for the log;
        an inline record's slots are deferred until after it), a torn record, or the whole
        record with the sync reporting an error.  The cut is
        made inside the real Replica.commit, which faults its replica as on any error.
        The last two let the commit through and cut a background snapshot it starts:
        before its snapshot is written, or before the log is cut after it.

        A replica whose part fails is often slow too: half of them start it only once the
        change returned (or LATE_SECONDS passed, if W needs them), so what the volume
        queues after the acknowledgement (a free, a snapshot) waits behind a part that
        fails.  Left to the threads, that order came about once in a thousand histories."""
        self.late = threading.Event()
        for r in self.volume.replicas:
            fate = fates.get(r.index) if r.header else None
            if fate in COMMIT_FATES and self.rng.random() < 0.5:
                r.worker.submit(partial(self.late.wait, LATE_SECONDS), lambda result, error: None)
            if fate == "none":  # an inline record's slots are written after it (deferred)
                r.write_slots = r._append = _crash
            elif fate == "slots":
                r._append = _crash
            elif fate == "torn":
                r._append = _torn_append(r, self.rng.random())
            elif fate == "synced":  # the whole record reached the disk, the sync said EIO
                r._append = _torn_append(r, 1.0)
            elif fate == "snapshot":
                r._write_cut_snapshot = _crash
            elif fate == "cut":
                r._cut_log = _crash

    def uninject(self) -> None:
        self.late.set()
        if self.volume is None:
            return
        self.settle()
        for r in self.volume.replicas:
            r.__dict__.pop("write_slots", None)
            r.__dict__.pop("_append", None)
            r.__dict__.pop("_write_cut_snapshot", None)
            r.__dict__.pop("_cut_log", None)

    def settle(self) -> None:
        """Wait until every replica worker finished what it was given (the commit returned
        at W answers; the others' outcome must be known before the next step)."""
        while self.volume.snapshots.writing or any(r.worker and r.worker.pending
                                              for r in self.volume.replicas):
            time.sleep(0.0005)
        self.volume.replica_set.report_changes()

    def holders_from(self, volume: Volume, fates: dict[int, str] | None = None) -> None:
        """After an acknowledged record: the replicas that got it hold everything."""
        online = {r.index for r in volume.replicas if r.header is not None and r.state == ONLINE}
        missed = {i for i, fate in (fates or {}).items() if fate in COMMIT_FATES}
        self.holder = [i in online and i not in missed for i in range(self.n)]

    # ---- faults between opens ----

    def vanish_or_return(self) -> None:
        if self.away and (self.rng.random() < 0.6 or len(self.away) == self.n):
            index = self.rng.choice(sorted(self.away))
            os.rename(self.away.pop(index), self.paths[index])
            self.note(f"return r{index}")
            return
        index = self.rng.randrange(self.n)
        if index in self.away:
            return
        away = self.root / f"away{index}"
        os.rename(self.paths[index], away)
        self.away[index] = away
        self.note(f"vanish r{index}")
        self.fault("vanish")

    def return_all(self) -> None:
        for index in sorted(self.away):
            os.rename(self.away.pop(index), self.paths[index])

    def take_or_swap_copy(self) -> None:
        index = self.rng.randrange(self.n)
        if index in self.away:
            return
        if index in self.copies and self.rng.random() < 0.5:
            shutil.rmtree(self.paths[index])
            os.rename(self.copies.pop(index), self.paths[index])
            self.holder[index] = False
            self.note(f"old copy of r{index} swapped in")
            self.fault("old copy")
        else:
            if index in self.copies:
                shutil.rmtree(self.copies.pop(index))
            self.copies[index] = self.root / f"copy{index}"
            shutil.copytree(self.paths[index], self.copies[index])
            self.note(f"copy r{index}")

    def bit_flip(self) -> None:
        index = self.rng.randrange(self.n)
        if index in self.away:
            return
        path = self.paths[index]
        where = self.rng.choice(["log", "snapshot", "header", "data"])
        if where == "data":
            files = sorted((path / "data").iterdir()) if (path / "data").is_dir() else []
            if not files or self.n - self.k < 1 or any(i != index for i in self.data_damage):
                return  # keep at most n - k replicas with damaged data (else EIO is fair)
            target = self.rng.choice(files)
        else:
            target = {"log": path / "meta" / "log", "snapshot": path / "meta" / "snapshot",
                      "header": path / format.HEADER_NAME}[where]
        raw = bytearray(target.read_bytes()) if target.exists() else bytearray()
        end = len(raw.rstrip(b"\0"))
        if end == 0:
            return
        raw[self.rng.randrange(end)] ^= 1 << self.rng.randrange(8)
        mode = target.stat().st_mode
        target.chmod(0o600)
        target.write_bytes(bytes(raw))
        target.chmod(stat.S_IMODE(mode))
        if where == "data":
            self.data_damage[index] = self.data_damage.get(index, 0) + 1
        else:
            self.holder[index] = False
            self.flipped.add(index)
        self.note(f"flip {where} of r{index}")
        self.fault(f"flip {where}")

    def maybe_power_cut(self) -> None:
        """A power cut of one replica's filesystem right after the kill: slots written
        since its last sync are dropped or torn, data files created since are gone, a freed
        file's rename to .deleted is undone.  Log records were synced before they counted,
        so they survive (a torn in-flight one is the commit's fate)."""
        if self.rng.random() > 0.3:
            return
        index = self.rng.randrange(self.n)
        if index in self.away:
            return
        path = self.paths[index]
        data = path / "data"
        if not data.is_dir():
            return
        created = (self._data_files(index) - self.synced.get(index, (0, set()))[1]
                   - {name for name, _, _ in _SYNCED_SLOTS.get(str(path), ())})
        for name in sorted(created):
            if self.rng.random() < 0.5:
                (data / name).unlink(missing_ok=True)
        for name in sorted(self._data_files(index)):  # a freed file's rename, undone
            if name.endswith(DELETED_SUFFIX) and self.rng.random() < 0.5:
                os.replace(data / name, data / name[:-len(DELETED_SUFFIX)])
        layout = format.SlotLayout.of(self.block, self.k, self.cipher.overhead)
        for name in sorted(n for n in self._data_files(index) if not n.endswith(DELETED_SUFFIX)):
            f = data / name
            raw = bytearray(f.read_bytes())
            for block in range(layout.blocks_in(len(raw))):
                if self.rng.random() < 0.2 and self._unsynced(index, name, block):
                    _tear(raw, layout, block, self.rng.randrange(layout.size))
            f.write_bytes(bytes(raw))
        self.note(f"power cut r{index}")
        self.fault("power cut")

    def _unsynced(self, index: int, name: str, block: int) -> bool:
        """Was this block's slot in this slot file written by a record of the open just
        killed (inline, not synced)?  A snapshot the replica wrote since (a catch-up's, a
        scrub's) synced it first, and write_slots syncs what it writes."""
        raw = (self.paths[index] / "data" / name).read_bytes()
        offset = format.SlotLayout.of(self.block, self.k, self.cipher.overhead).head_offset(block)
        gen = format.unpack_slot(raw[offset:offset + format.SLOT_HEAD_SIZE])[0]
        if (name, block, gen) in _SYNCED_SLOTS.get(str(self.paths[index]), ()):
            return False
        return gen > self.synced.get(index, (self.open_seq,))[0]

    def note_syncs(self) -> None:
        """A snapshot a replica wrote during the last step synced its data files and
        directory: what it had then survives a power cut.  (Seen per step, so files
        created later in the same step count as synced too: a little less harsh.)"""
        if self.volume is None:
            return
        for index in range(self.n):
            seq = self._snapshot_seq(index)
            if index not in self.away and seq > self.synced.get(index, (0,))[0]:
                self.synced[index] = (seq, self._data_files(index))

    def _snapshot_seq(self, index: int) -> int:
        try:
            raw = (self.paths[index] / "meta" / "snapshot").read_bytes()
            return format.unpack_snapshot(raw)[0]
        except (OSError, format.FormatError):  # none yet, or flipped: assume nothing synced since open
            return 0

    def _data_files(self, index: int) -> set[str]:
        """The replica's data files, where it is now: one away at an open comes back with
        the files it had, all synced long ago (a power cut must not count them as new)."""
        data = self.away.get(index, self.paths[index]) / "data"
        return set(os.listdir(data)) if data.is_dir() else set()

    # ---- operator actions ----

    def offline_scrub(self) -> None:
        self.note("scrub")
        provable = self.provable()
        try:
            volume = Volume.open([str(p) for p in self.paths], self.master, Options(**self.options))
        except VolumeError as exc:
            self.refused(str(exc), True, provable)
            return
        self.volume, self.writable, self.started = volume, True, False
        self.wanted_quorum = None
        self.open_seq = volume.tree.seq
        served = (freeze(trio.run(self.read_all), volume.tree.quorum)
                  if not self.reads_may_fail() else None)
        if served is not None and provable and not volume.choice.doubt and served not in self.states:
            self.fail(f"scrub served {show(served)} but only {show(self.states)} may be served")
        report = trio.run(scrub.scrub, volume)
        if not report.unrepairable:
            self.data_damage.clear()
        if volume.term_started:  # the scrub's result was recorded: its state is the one
            self.states = {freeze(self.read_or_lost(), volume.tree.quorum)}
            self.holders_from(volume)
        volume.close()
        self.volume = None

    def read_or_lost(self) -> dict[bytes, bytes]:
        try:
            return trio.run(self.read_all)
        except OSError as exc:
            if not self.reads_may_fail():
                self.fail(f"read failed without damaged data: {exc}")
            raise DataLost(str(exc)) from None

    def replace(self) -> None:
        """A replica that is gone for good is replaced by an empty directory."""
        if not self.away:
            return
        index = self.rng.choice(sorted(self.away))
        self.note(f"replace r{index}")
        provable = self.provable()
        others = [str(p) for i, p in enumerate(self.paths) if i not in self.away]
        try:
            volume = Volume.open(others, self.master, Options(**self.options))
        except VolumeError as exc:
            self.refused(str(exc), True, provable)
            return
        try:
            volume.members.locate(str(self.paths[index]))  # two gone: refused
            shutil.rmtree(self.away.pop(index))
            self.paths[index].mkdir()
            self.holder[index] = False
            scrub.replace(volume, str(self.paths[index]), str(self.paths[index]))
            self.volume, self.writable = volume, True
            trio.run(scrub.scrub, volume)
            if volume.term_started:
                self.states = {freeze(self.read_or_lost(), volume.tree.quorum)}
                self.holders_from(volume)
        except VolumeError as exc:  # two gone: which share is which cannot be told
            self.note(f"replace refused: {exc}")
        finally:
            volume.close()
            self.volume = None

    def final_check(self) -> None:
        """With every replica back and a scrub, the volume must be whole and current."""
        self.offline_scrub()
        if not self.provable():
            return
        try:
            volume = Volume.open([str(p) for p in self.paths], self.master,
                                 Options(**self.options), writable=False)
        except VolumeError as exc:
            self.refused(str(exc), False, True)
            return
        try:
            self.volume = volume
            served = freeze(self.read_or_lost(), volume.tree.quorum)
            if served not in self.states:
                self.fail(f"final state {show(served)} not in {show(self.states)}")
        finally:
            volume.close()
            self.volume = None


def lost_blocks(path: str, keys: codec.Keys) -> tuple[int, list[tuple[int, int, int, int]]]:
    """The blocks a replica's own latest state points at that neither its data files nor
    its log hold: (its record, [(inode, block, generation wanted, generation found)]).
    Nothing if its metadata does not load whole (a damage of its own, found elsewhere)."""
    alone = Replica.open(path)
    try:
        try:
            loaded = alone.load(keys) if alone.header else None
        except ReplicaError:
            loaded = None
        if loaded is None:  # a flipped header or snapshot: unreadable on its own
            return 0, []
        if loaded.damage:
            return loaded.tree.seq, []
        alone.overlay = loaded.redo  # what only its log holds counts
        lost = []
        for ino, node in loaded.tree.inodes.items():
            if not stat.S_ISREG(node.mode):
                continue
            wanted = [(b, e) for b, e in enumerate(node.blocks) if e != HOLE]
            raws = alone.read_slots([(ino, b, entry_slot(e)) for b, e in wanted])
            lost += [(ino, b, entry_gen(e), format.unpack_slot(raw)[0])
                     for (b, e), raw in zip(wanted, raws, strict=True)
                     if format.unpack_slot(raw)[0] != entry_gen(e)]
        return loaded.tree.seq, lost
    finally:
        alone.close()


def _tear(raw: bytearray, layout: format.SlotLayout, block: int, cut: int) -> None:
    """A slot write torn `cut` bytes in (head, then body): the rest of it reads as zeros."""
    for offset, size in ((layout.head_offset(block), layout.head_size),
                         (layout.body_offset(block), layout.body_size)):
        start, end = offset + min(cut, size), min(offset + size, len(raw))
        if start < end:
            raw[start:end] = bytes(end - start)
        cut = max(0, cut - size)


def _crash(*args, **kwargs) -> None:
    raise OSError(errno.EIO, "crash injected")


def _torn_append(r: Replica, where: float):
    def append(record: bytes) -> None:
        type(r)._append(r, record[:int(len(record) * where)])
        raise OSError(errno.EIO, "crash injected (torn record)")
    return append


def run_histories(seeds: range, root: Path, steps: int, block_size: int | None = None,
                  inline_blocks: int | None = None) -> Stats:
    total = Stats(histories=0)
    with _tracking_synced_slots():
        for seed in seeds:
            where = root / f"h{seed}"
            where.mkdir()
            try:
                total.add(History(seed, where, block_size, inline_blocks).run(steps))
            finally:
                shutil.rmtree(where, ignore_errors=True)
    return total
