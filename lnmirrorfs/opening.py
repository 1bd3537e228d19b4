"""Opening a replica set: read and cross-check the headers, load every replica's metadata
(each in a thread of its own, within the deadline), and roll back what the state choice
drops.  Which state is served is statechoice's business; serving it is the volume's."""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from collections.abc import Callable
from functools import partial

from . import codec, statechoice
from .replica import FAULTED, MISSING, ONLINE, Replica, ReplicaError, ReplicaInUse

log = logging.getLogger("lnmirrorfs.opening")


class VolumeError(Exception):
    """The replica set cannot be used as asked; the message is one line for the operator."""


def within(deadline: float, calls: list[Callable[[], object]]) -> list[object]:
    """Run each call in a thread of its own and return its result or exception; one still
    running at the deadline (a hung NAS) is left behind and answers TimeoutError."""
    results: list[object] = [TimeoutError(f"no answer within {deadline:g}s")] * len(calls)

    def run(position: int, call: Callable[[], object]) -> None:
        try:
            results[position] = call()
        except BaseException as exc:  # handed to the caller, who decides
            results[position] = exc

    threads = [threading.Thread(target=run, args=(i, call), daemon=True)
               for i, call in enumerate(calls)]
    for thread in threads:
        thread.start()
    end = time.monotonic() + deadline
    for thread in threads:
        thread.join(max(0.0, end - time.monotonic()))
    return results


def _open_one(path: str) -> Replica:
    if not os.path.isdir(path):
        return Replica(path, state=MISSING, reason="directory does not exist")
    return Replica.open(path)


def open_replicas(paths: list[str], master: bytes,
                  deadline: float = 10.0) -> tuple[list[Replica], codec.Keys]:
    """Open and cross-check the replica headers.  Missing directories come back MISSING,
    damaged headers and replicas that do not answer within the deadline FAULTED (the others
    may serve); a foreign replica, the wrong key, an unknown version or a copied replica is
    refused outright."""
    if not paths:
        raise VolumeError("no replicas given (use --replica DIR)")
    if len({os.path.abspath(p) for p in paths}) != len(paths):  # realpath could hang on a NAS
        raise VolumeError("the same replica directory is given twice")
    keys = codec.Keys.derive(master)
    replicas: list[Replica] = []
    for path, result in zip(paths, within(deadline, [partial(_open_one, p) for p in paths]),
                            strict=True):
        if isinstance(result, ReplicaError):
            raise VolumeError(str(result)) from None
        if isinstance(result, BaseException):
            why = (str(result) if isinstance(result, TimeoutError)
                   else f"cannot open: {type(result).__name__}: {result}")
            result = Replica(path, state=FAULTED, reason=why)
        replicas.append(result)
    headed = [r for r in replicas if r.header]
    if not headed:
        if any(r.header_damage for r in replicas):
            raise VolumeError("no replica has a readable header: " + "; ".join(
                f"{r.path}: {r.reason}" for r in replicas if r.state != ONLINE))
        raise VolumeError("none of the replica directories exists: "
                          + ", ".join(r.path for r in replicas))
    reference = next((r for r in headed if r.header.authentic(keys)), None)
    if reference is None:
        first = headed[0].header
        if first.key_check != codec.key_check(keys, first.volume_id):
            raise VolumeError(f"{headed[0].path}: wrong key for volume {first.volume_hex}")
        raise VolumeError(f"{headed[0].path}: replica header does not authenticate with this key")
    _check_headers(replicas, reference, keys)
    _infer_header(replicas, reference)
    if len(replicas) > reference.header.n:
        raise VolumeError(f"{len(replicas)} replicas given but the volume has n={reference.header.n}")
    return replicas, keys.using(reference.header.aead)


def open_returned(path: str, reference: Replica, keys: codec.Keys, held: set[int]) -> Replica:
    """A replica directory that had no header at open (missing, or it did not answer),
    open now: its replica, locked, if its header passes the checks of an open against
    `reference` and it holds a share none of `held`.  Raises ReplicaError otherwise (a
    thread's job: it touches the replica's filesystem)."""
    r = _open_one(path)
    if r.header is not None:
        try:
            _check_headers([r], reference, keys)
        except VolumeError as exc:
            raise ReplicaError(str(exc)) from None
    if r.header is None:
        raise ReplicaError(f"{path}: {r.reason}")
    if r.index in held:
        raise ReplicaError(f"{path}: share {r.index} is held by another replica")
    r.lock()
    return r


def _check_headers(replicas: list[Replica], reference: Replica, keys: codec.Keys) -> None:
    ref = reference.header
    seen: dict[int, str] = {}
    for r in replicas:
        h = r.header
        if h is None:
            continue
        if h.volume_id != ref.volume_id:
            raise VolumeError(f"{r.path}: belongs to volume {h.volume_hex}, not "
                              f"{ref.volume_hex} like {reference.path}")
        if not h.authentic(keys):
            _unheader(r, "header does not authenticate (edited without the key, or damaged)")
            continue
        if (h.k, h.n, h.block_size, h.cipher) != (ref.k, ref.n, ref.block_size, ref.cipher):
            raise VolumeError(f"{r.path}: header disagrees with {reference.path} on "
                              "k/n/block size/cipher")
        if h.share_index >= h.n:
            _unheader(r, f"header names share {h.share_index}, the volume has only {h.n}")
            continue
        if h.share_index in seen:
            raise VolumeError(f"{r.path} and {seen[h.share_index]} are the same share "
                              f"{h.share_index}: a copied replica?")
        seen[h.share_index] = r.path


def _infer_header(replicas: list[Replica], reference: Replica) -> None:
    """A damaged header holds nothing the others do not, but its share index: with one
    replica damaged and one index unclaimed, that is its index.  The replica is then
    used if its log authenticates (which proves it is ours); a writable open rewrites it."""
    damaged = [r for r in replicas if r.header is None and r.header_damage]
    unclaimed = set(range(reference.header.n)) - {r.index for r in replicas if r.header}
    if len(damaged) == 1 and len(unclaimed) == 1:
        r = damaged[0]
        r.header = dataclasses.replace(reference.header, share_index=unclaimed.pop())
        r.state, r.reason = ONLINE, ""


def _unheader(r: Replica, why: str) -> None:
    r.header, r.header_damage = None, why
    r.state, r.reason = FAULTED, why


def rewrite_damaged_headers(replicas: list[Replica], views: list[statechoice.View],
                             keys: codec.Keys) -> None:
    for r, view in zip(replicas, views, strict=True):
        if r.header_damage and view.loaded is not None:
            try:
                r.write_header(keys)
            except OSError as exc:
                r.mark(FAULTED, f"damaged header cannot be rewritten: {exc.strerror}")
                continue
            log.warning("replica %s: header rewritten (share %d)", r.path, r.index)
            r.header_damage = ""


def roll_back(r: Replica, view: statechoice.View, choice: statechoice.Choice,
               keys: codec.Keys) -> statechoice.View:
    """A current replica whose log goes past the record served is reloaded up to it (its
    log is cut there when it is opened for writing)."""
    if choice.verdicts[view.name].state != ONLINE or view.loaded.tree.seq <= choice.serve:
        return view
    log.warning("replica %s: dropping records %d-%d: held by fewer than k=%d replicas, so "
                "never acknowledged", r.path, choice.serve + 1, view.loaded.tree.seq, r.header.k)
    reloaded = statechoice.View(view.name, view.index, loaded=r.load(keys, upto=choice.serve))
    if view is choice.source:
        choice.source = reloaded
    return reloaded


def view_of(r: Replica, keys: codec.Keys) -> statechoice.View:
    """Lock and load one replica for the state choice."""
    if r.header is None:
        return statechoice.View(r.path, None, problem=r.reason, missing=r.state == MISSING)
    try:
        r.lock()
        view = statechoice.View(r.path, r.index, loaded=r.load(keys))
        if r.header_damage:
            log.warning("replica %s: %s; its log authenticates: share %d", r.path,
                        r.header_damage, r.index)
        return view
    except ReplicaInUse as exc:
        raise VolumeError(str(exc)) from None
    except ReplicaError as exc:
        return statechoice.View(r.path, r.index, problem=str(exc).split(": ", 1)[-1])


# ---------------------------------------------------------------- the volume


def load_views(replicas: list[Replica], keys: codec.Keys, deadline: float) -> list[statechoice.View]:
    """Lock and load every replica at once, each in its own thread: one that does not answer
    within the deadline (a hung NAS) is FAULTED and left behind, the others go on."""
    views = []
    for r, view in zip(replicas, within(deadline, [partial(view_of, r, keys) for r in replicas]),
                       strict=True):
        if isinstance(view, VolumeError):
            raise view
        if isinstance(view, BaseException):
            why = (f"{view} while loading its metadata" if isinstance(view, TimeoutError)
                   else f"cannot load its metadata: {type(view).__name__}: {view}")
            view = statechoice.View(r.path, r.index if r.header else None, problem=why)
            r.header = None  # it may never answer: nothing below may touch it
            r.state, r.reason = FAULTED, view.problem
        views.append(view)
    return views
