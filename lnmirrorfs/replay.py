"""Replaying a replica's metadata: its snapshot, then every record of its log that checks
out, into the tree it describes; where the log ends and why (a torn tail, or damage with
intact records behind it); and the slots only its log holds.  Reads only."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from . import codec, format
from .slotfiles import SlotKey
from .tree import Tree, TreeError, block_entry, decode_ops


class ReplayError(Exception):
    """The snapshot or the log cannot be read or does not authenticate."""


@dataclass
class Loaded:
    """What a replica's metadata says, for the state choice and for opening it.

    `tree` is the state at the end of the valid log; `redo` the slots its log carries that
    the tree still points at.  `commit` is the highest commit point in any authenticated
    record or snapshot of the replica, `max_term` the highest term, both including records
    behind damage; `damage` says why the log is damaged (a bad record with valid ones
    after it), "" if it is whole.  `touched` lists, per record after the snapshot, the
    blocks its writes went to (a replica that diverged needs exactly those rewritten)."""

    tree: Tree
    log_end: int
    log_records: int
    redo: dict[SlotKey, bytes]
    snapshot_seq: int = 0
    commit: int = 0
    max_term: int = 0
    damage: str = ""
    touched: list[tuple[int, list[tuple[int, int]]]] = field(default_factory=list)


def load(meta_path: str, header: format.Header, keys: codec.Keys, upto: int | None = None) -> Loaded:
    """Rebuild a replica's tree from its snapshot and log (up to record `upto`).  The log
    ends at the first record that is torn, forged or impossible; valid records after it
    mean damage."""
    vol = header.volume_id
    try:
        with open(os.path.join(meta_path, format.SNAPSHOT_NAME), "rb") as f:
            snap_seq, snap_term, sealed = format.unpack_snapshot(f.read())
        tree = Tree.load(codec.open_record(keys, vol, format.SNAPSHOT_KIND,
                                           format.snapshot_context(snap_seq, snap_term), sealed))
        if (tree.seq, tree.term) != (snap_seq, snap_term):
            raise TreeError("snapshot head does not match its contents")
        with open(os.path.join(meta_path, format.LOG_NAME), "rb") as f:
            raw = f.read()
    except (OSError, format.FormatError, codec.CodecError, TreeError) as exc:
        raise ReplayError(str(exc)) from None
    loaded = Loaded(tree, 0, 0, {}, snapshot_seq=tree.seq, commit=tree.commit,
                    max_term=tree.term)
    pos = 0
    while (frame := format.frame_at(raw, pos)) is not None:
        head = frame.head
        if upto is not None and head.seq > upto:
            break
        if head.seq <= tree.seq and _authentic(keys, header, frame):
            pos = loaded.log_end = frame.end  # already in the snapshot (crash before log reset)
            continue
        try:
            ops = decode_ops(codec.open_record(keys, vol, format.LOG_KIND, head.context(),
                                               frame.sealed))
            slots = _inline_slots(keys, header, head, ops, frame.inline)
            tree.apply(head.seq, head.term, head.time_ms, ops, head.commit)
        except (codec.CodecError, TreeError, ValueError, KeyError, TypeError):
            break
        loaded.redo.update(slots)
        loaded.touched.append((head.seq, [(op["ino"], packed >> 1) for op in ops
                                          if op["op"] == "write" for packed in op["blocks"]]))
        _note(loaded, head)
        pos = loaded.log_end = frame.end
        loaded.log_records += 1
    if upto is None:
        _look_behind(keys, header, raw, pos, loaded)
    loaded.redo = {key: raw for key, raw in loaded.redo.items() if still_current(tree, key, raw)}
    return loaded


def _authentic(keys: codec.Keys, header: format.Header, frame: format.Frame) -> bool:
    try:
        codec.open_record(keys, header.volume_id, format.LOG_KIND, frame.head.context(),
                          frame.sealed)
        return True
    except codec.CodecError:
        return False


def _note(loaded: Loaded, head: format.RecordHead) -> None:
    loaded.commit = max(loaded.commit, head.commit)
    loaded.max_term = max(loaded.max_term, head.term)


def _look_behind(keys: codec.Keys, header: format.Header, raw: bytes, pos: int,
                 loaded: Loaded) -> None:
    """Where the valid log ends, a torn tail leaves nothing but zeros after it; records
    that authenticate further on mean the log was damaged in the middle."""
    if raw.count(b"\0", pos) == len(raw) - pos:
        return
    end_seq = loaded.tree.seq
    last = format.frame_at(raw, pos)
    if last is not None and raw[last.end - 1] != 0:
        # A torn append leaves the end of the frame unwritten (the log is zero-filled
        # ahead); a frame written to its last byte that does not check out was damaged
        # later.  (A whole record whose last byte is zero, 1 in 256, still looks torn.)
        loaded.damage = f"log damaged after record {end_seq} (the next record is whole but corrupt)"
    for frame in format.frames_after(raw, pos):
        if frame.head.seq <= end_seq:
            continue
        if _authentic(keys, header, frame):
            _note(loaded, frame.head)
            if not loaded.damage:
                loaded.damage = (f"log damaged after record {end_seq} (record "
                                 f"{frame.head.seq} further on is intact)")


def _inline_slots(keys: codec.Keys, header: format.Header, head: format.RecordHead,
                  ops: list[dict], inline: bytes) -> dict[SlotKey, bytes]:
    """The slots a record carries, each checked: a torn record fails here as a whole."""
    if not inline:
        return {}
    size = header.layout.size
    out, pos = {}, 0
    for op in ops:
        if op["op"] != "write":
            continue
        for packed in op["blocks"]:
            raw = inline[pos:pos + size]
            pos += size
            gen, checksum, share = format.unpack_slot(raw)
            if gen != head.seq or not codec.share_ok(
                    keys, header.volume_id, header.k, op["ino"], packed >> 1, head.seq, head.term,
                    header.share_index, checksum, share):
                raise codec.CodecError(f"record {head.seq}: torn or damaged inline slot")
            out[(op["ino"], packed >> 1, packed & 1)] = raw
    if pos != len(inline):
        raise codec.CodecError(f"record {head.seq}: inline slots do not match its ops")
    return out


def still_current(tree: Tree, key: SlotKey, raw: bytes) -> bool:
    """Does the tree still point at this slot with this generation?"""
    ino, block, slot = key
    node = tree.inodes.get(ino)
    gen = format.unpack_slot(raw)[0]
    return (node is not None and block < len(node.blocks)
            and node.blocks[block] == block_entry(gen, slot))
