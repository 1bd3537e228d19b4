"""The block cache against a plain model: a list of keys in use order, evicted from the front."""

import stat

from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import make_volume
from lnmirrorfs.block_cache import BlockCache
from lnmirrorfs.cli.common import read_key_file
from lnmirrorfs.namespace import Namespace
from lnmirrorfs.volume import INLINE_BLOCKS, Volume

CAPACITY = 5
inos = st.integers(1, 3)
indexes = st.integers(0, 6)
steps = st.lists(st.one_of(
    st.tuples(st.just("put"), inos, indexes),
    st.tuples(st.just("get"), inos, indexes),
    st.tuples(st.just("discard"), inos, indexes),
    st.tuples(st.just("drop"), inos, indexes),
    st.tuples(st.just("clear"), inos, indexes),
), max_size=60)


@settings(max_examples=500, deadline=None)
@given(steps)
def test_the_cache_holds_what_the_model_holds(history: list[tuple[str, int, int]]) -> None:
    cache = BlockCache(CAPACITY * 4096, 4096)
    order: list[tuple[int, int]] = []  # least recently used first
    values: dict[tuple[int, int], bytes] = {}
    for step, (what, ino, index) in enumerate(history):
        key = (ino, index)
        if what == "put":
            data = step.to_bytes(4, "big")
            cache.put(ino, index, data)
            if key in order:
                order.remove(key)
            order.append(key)
            values[key] = data
            while len(order) > CAPACITY:
                values.pop(order.pop(0))
        elif what == "get":
            assert cache.get(ino, index) == values.get(key)
            if key in order:
                order.remove(key)
                order.append(key)
        elif what == "discard":
            cache.discard(ino, index)
            if key in order:
                order.remove(key)
                del values[key]
        elif what == "drop":  # the inode's blocks from `index` on
            cache.drop(ino, index)
            for gone in [k for k in order if k[0] == ino and k[1] >= index]:
                order.remove(gone)
                del values[gone]
        else:
            cache.clear()
            order.clear()
            values.clear()
        assert len(cache) == len(order)
    for (ino, index), data in values.items():
        assert cache.get(ino, index) == data


async def test_a_commit_too_big_to_cache_leaves_no_older_version_cached(tmp_path):
    """A small commit caches its blocks; a big one rewrites them and caches only its last
    block: the older versions of the others must not be read back."""
    v = make_volume(tmp_path / "vol", n=2, k=1)
    volume = Volume.open([str(r) for r in v.replicas], read_key_file(str(v.key)))
    bs = volume.block_size
    node = await Namespace(volume).mknod(1, b"f", stat.S_IFREG | 0o644, 0, 0)
    try:
        await volume.write(node.ino, 0, b"o" * 8 * bs)
        await volume.sync(node.ino)
        await volume.write(node.ino, 0, b"N" * (INLINE_BLOCKS + 8) * bs)
        await volume.sync(node.ino)
        assert await volume.read(node.ino, 5 * bs, bs) == b"N" * bs
    finally:
        volume.close()
