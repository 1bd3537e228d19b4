"""The namespace model: inodes, directory entries, block maps, and the ops that change them.

The same `apply` runs when the mount commits an op and when a replica's log is replayed,
so the state in memory and the state a restore rebuilds cannot drift apart.  Ops are
plain JSON-able dicts; they are validated by the volume before they are committed.
"""

from __future__ import annotations

import bisect
import json
import stat
import struct
import sys
import zlib
from array import array
from dataclasses import dataclass, field, replace

ROOT_INO = 1
HOLE = 0
# A dump: magic, the length of a JSON head (everything but the block maps), the head, then
# every inode's block map as raw little-endian u64s in the head's order; zlib over it all.
_DUMP_MAGIC = b"LNTREE3\n"
_DUMP_HEAD = struct.Struct("<8sQ")


def name_to_json(name: bytes) -> str:
    return name.decode("utf-8", "surrogateescape")


def name_from_json(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


def block_entry(gen: int, slot: int) -> int:
    """A block map entry packs the generation and which of the two slots holds it."""
    return gen << 1 | slot


def entry_gen(entry: int) -> int:
    return entry >> 1


def entry_slot(entry: int) -> int:
    return entry & 1


@dataclass
class Inode:
    ino: int
    mode: int
    uid: int
    gid: int
    nlink: int = 1
    size: int = 0
    atime_ns: int = 0
    mtime_ns: int = 0
    ctime_ns: int = 0
    rdev: int = 0
    target: bytes = b""
    entries: dict[bytes, int] | None = None
    blocks: array = field(default_factory=lambda: array("Q"))

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def is_reg(self) -> bool:
        return stat.S_ISREG(self.mode)

    def trim_blocks(self, block_size: int) -> None:
        """Drop block map entries wholly beyond the end of the file."""
        keep = -(-self.size // block_size)
        if len(self.blocks) > keep:
            del self.blocks[keep:]

    def to_json(self) -> dict:
        """Everything but the block map, which a snapshot stores as raw bytes."""
        out = {"ino": self.ino, "mode": self.mode, "uid": self.uid, "gid": self.gid,
               "nlink": self.nlink, "size": self.size, "atime": self.atime_ns,
               "mtime": self.mtime_ns, "ctime": self.ctime_ns, "rdev": self.rdev}
        if self.target:
            out["target"] = name_to_json(self.target)
        if self.entries is not None:
            out["entries"] = {name_to_json(k): v for k, v in self.entries.items()}
        if self.blocks:
            out["nblocks"] = len(self.blocks)
        return out

    @classmethod
    def from_json(cls, d: dict) -> Inode:
        node = cls(d["ino"], d["mode"], d["uid"], d["gid"], d["nlink"], d["size"],
                   d["atime"], d["mtime"], d["ctime"], d["rdev"],
                   name_from_json(d.get("target", "")))
        if "entries" in d:
            node.entries = {name_from_json(k): v for k, v in d["entries"].items()}
        return node

    def copy(self) -> Inode:
        return replace(self, entries=None if self.entries is None else dict(self.entries),
                                   blocks=array("Q", self.blocks))


def _le_bytes(a: array) -> bytes:
    if sys.byteorder == "little":
        return a.tobytes()
    b = array("Q", a)
    b.byteswap()
    return b.tobytes()


def _array_from_le(raw: bytes) -> array:
    a = array("Q")
    a.frombytes(raw)
    if sys.byteorder != "little":
        a.byteswap()
    return a


class TreeError(Exception):
    """A log or snapshot describes an impossible change: the replica's metadata is corrupt."""


def encode_ops(ops: list[dict]) -> bytes:
    return json.dumps(ops, separators=(",", ":")).encode()


def decode_ops(raw: bytes) -> list[dict]:
    ops = json.loads(raw)
    if not isinstance(ops, list):
        raise TreeError("record is not a list of ops")
    return ops


class Tree:
    """The whole volume's metadata at record `seq`, written in `term` at `time_ms`.

    `terms` is the term history: (first record, term) for every writable open whose
    records this state contains, oldest first.  Two replicas whose histories give the
    same term for a record hold the same records up to it (log matching)."""

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self.seq = 0
        self.term = 0
        self.time_ms = 0
        self.terms: list[tuple[int, int]] = [(0, 0)]
        self.quorum = 0                     # W, the write quorum; set at init, changed by ops
        self.commit = 0                     # highest record known acknowledged in this state
        self.quorums: list[tuple[int, int]] = []  # (record, W) for every W change, oldest first
        self.next_ino = ROOT_INO + 1
        self.inodes: dict[int, Inode] = {}
        self.blame: dict[int, str] = {}
        self.blamed_at: dict[int, int] = {}   # the record that blamed each share
        self.blamed_since: dict[int, int] = {}  # the first record it lacks, when known
        self.error_counts: dict[int, dict[str, int]] = {}  # per share index, across mounts
        self.offline: dict[int, int] = {}  # shares the operator took offline: the W before
        self.last_scrub: dict = {}

    @classmethod
    def new(cls, block_size: int, uid: int, gid: int, now_ns: int, quorum: int) -> Tree:
        tree = cls(block_size)
        tree.quorum = quorum
        tree.quorums = [(0, quorum)]
        tree.time_ms = now_ns // 1_000_000
        tree.inodes[ROOT_INO] = Inode(ROOT_INO, stat.S_IFDIR | 0o755, uid, gid, nlink=2,
                                      atime_ns=now_ns, mtime_ns=now_ns, ctime_ns=now_ns,
                                      entries={})
        return tree

    # ---- reading ----

    def get(self, ino: int) -> Inode:
        return self.inodes[ino]

    def child(self, parent: int, name: bytes) -> Inode | None:
        ino = self.inodes[parent].entries.get(name)
        return None if ino is None else self.inodes[ino]

    def walk(self, ino: int = ROOT_INO, prefix: bytes = b""):
        """Yield (relative path, inode) for every entry below ino, parents before children."""
        for name, child_ino in sorted(self.inodes[ino].entries.items()):
            node = self.inodes[child_ino]
            path = prefix + name
            yield path, node
            if node.is_dir:
                yield from self.walk(child_ino, path + b"/")

    def path_of(self, ino: int) -> str:
        """A name of an inode, for reports ("(unlinked)" if it has none)."""
        for path, node in self.walk():
            if node.ino == ino:
                return "/" + path.decode(errors="replace")
        return f"(unlinked inode {ino})"

    def quorum_since(self, seq: int) -> int:
        """The smallest W any record after `seq` may have been acknowledged under (a W
        change counts only from the record that logged it)."""
        before = [w for at, w in self.quorums if at <= seq]
        return min(before[-1:] + [w for at, w in self.quorums if at > seq], default=self.quorum)

    def term_of(self, seq: int) -> int:
        """The term that wrote record `seq` of this state (0 for the empty initial state)."""
        position = bisect.bisect_right(self.terms, (seq, float("inf"))) - 1
        return self.terms[max(position, 0)][1]

    # ---- changing ----

    def apply(self, seq: int, term: int, time_ms: int, ops: list[dict], commit: int = 0) -> None:
        if seq != self.seq + 1:
            raise TreeError(f"record {seq} does not follow {self.seq}")
        if term < self.term:
            raise TreeError(f"record {seq} has term {term} below {self.term}")
        for op in ops:
            try:
                getattr(self, "_op_" + op["op"])(seq, op)
            except (KeyError, AttributeError, TypeError) as exc:
                raise TreeError(f"record {seq}: bad op {op.get('op')!r}: {exc!r}") from None
        if term != self.term:
            self.terms.append((seq, term))
        self.seq, self.term, self.time_ms = seq, term, time_ms
        self.commit = max(self.commit, commit)

    def _op_mknod(self, seq: int, op: dict) -> None:
        now = op["time"]
        node = Inode(op["ino"], op["mode"], op["uid"], op["gid"], rdev=op.get("rdev", 0),
                     target=name_from_json(op.get("target", "")),
                     atime_ns=now, mtime_ns=now, ctime_ns=now)
        parent = self.inodes[op["parent"]]
        if node.is_dir:
            node.entries = {}
            node.nlink = 2
            parent.nlink += 1
        self.inodes[node.ino] = node
        self.next_ino = max(self.next_ino, node.ino + 1)
        self._add_entry(parent, name_from_json(op["name"]), node.ino, now)

    def _op_link(self, seq: int, op: dict) -> None:
        node = self.inodes[op["ino"]]
        node.nlink += 1
        node.ctime_ns = op["time"]
        self._add_entry(self.inodes[op["parent"]], name_from_json(op["name"]), node.ino,
                        op["time"])

    def _op_unlink(self, seq: int, op: dict) -> None:
        self._remove_entry(self.inodes[op["parent"]], name_from_json(op["name"]), op["time"])

    def _op_rename(self, seq: int, op: dict) -> None:
        old_parent = self.inodes[op["parent"]]
        new_parent = self.inodes[op["new_parent"]]
        name, new_name, now = name_from_json(op["name"]), name_from_json(op["new_name"]), op["time"]
        ino = old_parent.entries[name]
        if new_parent.entries.get(new_name) == ino:
            return  # rename of a hard link onto itself: POSIX says do nothing
        if new_name in new_parent.entries:
            self._remove_entry(new_parent, new_name, now)
        del old_parent.entries[name]
        node = self.inodes[ino]
        if node.is_dir and old_parent is not new_parent:
            old_parent.nlink -= 1
            new_parent.nlink += 1
        node.ctime_ns = now
        old_parent.mtime_ns = old_parent.ctime_ns = now
        self._add_entry(new_parent, new_name, ino, now)

    def _op_setattr(self, seq: int, op: dict) -> None:
        node = self.inodes[op["ino"]]
        for key, attr in (("mode", "mode"), ("uid", "uid"), ("gid", "gid"),
                          ("atime", "atime_ns"), ("mtime", "mtime_ns"), ("ctime", "ctime_ns")):
            if key in op:
                setattr(node, attr, op[key])
        if "size" in op:
            node.size = op["size"]
            node.trim_blocks(self.block_size)

    def _op_write(self, seq: int, op: dict) -> None:
        node = self.inodes[op["ino"]]
        blocks = node.blocks
        for packed in op["blocks"]:
            index, slot = packed >> 1, packed & 1
            if index >= len(blocks):
                blocks.extend([HOLE] * (index + 1 - len(blocks)))
            blocks[index] = block_entry(seq, slot)
        node.size = op["size"]
        node.mtime_ns = node.ctime_ns = op["mtime"]
        node.trim_blocks(self.block_size)

    def _op_term(self, seq: int, op: dict) -> None:
        """A writable open starts: the first record of every term is this one."""

    def _op_quorum(self, seq: int, op: dict) -> None:
        w = op["w"]
        if not isinstance(w, int) or w < 1:
            raise TypeError(f"quorum {w!r}")
        self.quorum = w
        self.quorums.append((seq, w))

    def _op_offline(self, seq: int, op: dict) -> None:
        """The operator runs without this share until it is replaced (the record's quorum
        op, after this one, lowers W to what the others can reach)."""
        self.offline[op["replica"]] = self.quorum

    def _op_online(self, seq: int, op: dict) -> None:
        self.offline.pop(op["replica"], None)

    def _op_free(self, seq: int, op: dict) -> None:
        del self.inodes[op["ino"]]

    def _op_blame(self, seq: int, op: dict) -> None:
        self.blame[op["replica"]] = op["reason"]
        self.blamed_at[op["replica"]] = seq
        if op.get("since") is not None:
            self.blamed_since[op["replica"]] = op["since"]

    def _op_absolve(self, seq: int, op: dict) -> None:
        self.blame.pop(op["replica"], None)
        self.blamed_at.pop(op["replica"], None)
        self.blamed_since.pop(op["replica"], None)

    def _op_errors(self, seq: int, op: dict) -> None:
        self.error_counts[op["replica"]] = op["counts"]

    def _op_scrubbed(self, seq: int, op: dict) -> None:
        self.last_scrub = op["report"]

    def _add_entry(self, parent: Inode, name: bytes, ino: int, now: int) -> None:
        parent.entries[name] = ino
        parent.mtime_ns = parent.ctime_ns = now

    def _remove_entry(self, parent: Inode, name: bytes, now: int) -> None:
        node = self.inodes[parent.entries.pop(name)]
        parent.mtime_ns = parent.ctime_ns = now
        node.ctime_ns = now
        if node.is_dir:
            node.nlink = 0
            parent.nlink -= 1
        else:
            node.nlink -= 1

    def orphans(self) -> list[int]:
        """Inodes no name points to any more (kept only while open)."""
        return [ino for ino, node in self.inodes.items() if node.nlink == 0]

    # ---- snapshot serialization ----

    def dump(self, with_commit: bool = True) -> bytes:
        """The whole state, compressed.  Without the commit point (which replicas may know
        to different heights) two dumps compare the states themselves.

        The block maps, nearly all of a big volume's metadata, are copied out as raw bytes
        and compressed by zlib, which releases the GIL: a dump in another thread barely
        slows the event loop."""
        doc = {"seq": self.seq, "term": self.term, "time_ms": self.time_ms,
               "terms": self.terms, "quorum": self.quorum, "quorums": self.quorums,
               "commit": self.commit if with_commit else None,
               "next_ino": self.next_ino, "block_size": self.block_size,
               "blame": {str(k): v for k, v in self.blame.items()},
               "blamed_at": {str(k): v for k, v in self.blamed_at.items()},
               "blamed_since": {str(k): v for k, v in self.blamed_since.items()},
               "errors": {str(k): v for k, v in self.error_counts.items()},
               "offline": {str(k): v for k, v in self.offline.items()},
               "last_scrub": self.last_scrub,
               "inodes": [n.to_json() for n in self.inodes.values()]}
        head = json.dumps(doc, separators=(",", ":")).encode()
        maps = [_le_bytes(n.blocks) for n in self.inodes.values() if n.blocks]
        return zlib.compress(b"".join([_DUMP_HEAD.pack(_DUMP_MAGIC, len(head)), head, *maps]), 1)

    @classmethod
    def load(cls, raw: bytes) -> Tree:
        try:
            raw = zlib.decompress(raw)
            magic, head_len = _DUMP_HEAD.unpack_from(raw)
            if magic != _DUMP_MAGIC:
                raise ValueError("not a tree dump")
            pos = _DUMP_HEAD.size + head_len
            doc = json.loads(raw[_DUMP_HEAD.size:pos])
            tree = cls(doc["block_size"])
            tree.seq = doc["seq"]
            tree.term = doc["term"]
            tree.time_ms = doc["time_ms"]
            tree.terms = [(first, term) for first, term in doc["terms"]]
            tree.quorum = doc["quorum"]
            tree.quorums = [(seq, w) for seq, w in doc["quorums"]]
            tree.commit = doc["commit"]
            tree.next_ino = doc["next_ino"]
            tree.blame = {int(k): v for k, v in doc["blame"].items()}
            tree.blamed_at = {int(k): v for k, v in doc["blamed_at"].items()}
            tree.blamed_since = {int(k): v for k, v in doc["blamed_since"].items()}
            tree.error_counts = {int(k): v for k, v in doc["errors"].items()}
            tree.offline = {int(k): v for k, v in doc["offline"].items()}
            tree.last_scrub = doc["last_scrub"]
            for d in doc["inodes"]:
                node = Inode.from_json(d)
                end = pos + 8 * d.get("nblocks", 0)
                if end > len(raw):
                    raise ValueError("block maps are truncated")
                node.blocks = _array_from_le(raw[pos:end])
                pos = end
                tree.inodes[node.ino] = node
            if pos != len(raw):
                raise ValueError("bytes after the block maps")
        except (ValueError, KeyError, TypeError, zlib.error, struct.error) as exc:
            raise TreeError(f"snapshot does not parse: {exc!r}") from None
        return tree

    def copy(self) -> Tree:
        """An independent copy (a snapshot is dumped from one while the mount goes on)."""
        tree = Tree(self.block_size)
        for name, value in self.__dict__.items():
            if name != "inodes":
                setattr(tree, name, _copy_value(value))
        tree.inodes = {ino: node.copy() for ino, node in self.inodes.items()}
        return tree


def _copy_value(value):
    if isinstance(value, dict):
        return {k: _copy_value(v) for k, v in value.items()}
    if isinstance(value, list):
        return list(value)
    return value
