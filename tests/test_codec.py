"""Property tests for lnmirrorfs.codec: real keys, real AEAD, real zfec, no mocks.

Every test here asserts something the codec could get wrong: round trips through
encrypt + FEC for every 1 <= k <= n <= 6, recovery from any k shares, detection of
tampered or misplaced shares and blocks, paper-key error detection, and key separation.
"""

from __future__ import annotations

import base64
import string
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lnmirrorfs import codec, format

KN = [(k, n) for n in range(1, 7) for k in range(1, n + 1)]
BLOCK_SIZES = [512, 4096]
B32 = string.ascii_uppercase + "234567"
PAPER_LEN = (codec.KEY_BYTES + codec.PAPER_CHECK_BYTES) * 8 // 5  # 56

masters = st.binary(min_size=codec.KEY_BYTES, max_size=codec.KEY_BYTES)
volume_ids = st.binary(min_size=16, max_size=16)
u64 = st.integers(min_value=0, max_value=2**64 - 1)
block_sizes = st.sampled_from(BLOCK_SIZES)
kns = st.sampled_from(KN)
CIPHERS = list(codec.CIPHERS.values())
ciphers = st.sampled_from(CIPHERS)


def fast(n: int):
    return settings(max_examples=n, deadline=None)


@st.composite
def blocks(draw, k: int | None = None, n: int | None = None):
    """A block to encode: keys, location, k/n shape and exactly block_size plaintext bytes."""
    if k is None:
        k, n = draw(kns)
    bs = draw(block_sizes)
    return {
        "keys": codec.Keys.derive(draw(masters), draw(ciphers)),
        "vid": draw(volume_ids),
        "fid": draw(u64),
        "blk": draw(u64),
        "gen": draw(u64),
        "term": draw(u64),
        "k": k,
        "n": n,
        "bs": bs,
        "pt": draw(st.binary(min_size=bs, max_size=bs)),
    }


def encode(b: dict) -> list[tuple[bytes, bytes]]:
    return codec.encode_block(b["keys"], b["vid"], b["k"], b["n"], b["fid"], b["blk"], b["gen"],
                              b["term"], b["pt"])


def decode(b: dict, shares: dict[int, bytes]) -> bytes:
    return codec.decode_block(b["keys"], b["vid"], b["k"], b["n"], b["fid"], b["blk"], b["gen"],
                              b["term"], shares, b["bs"])


def checksum(b: dict, index: int, share: bytes, **moved) -> bytes:
    loc = {"vid": b["vid"], "fid": b["fid"], "blk": b["blk"], "gen": b["gen"], "term": b["term"], **moved}
    return codec.share_checksum(b["keys"], loc["vid"], loc["fid"], loc["blk"], loc["gen"], loc["term"],
                                index, share)


def ok(b: dict, index: int, stored: bytes, share: bytes, **moved) -> bool:
    """Does a share with the checksum its slot stores pass the check reads and scrub make?"""
    loc = {"vid": b["vid"], "fid": b["fid"], "blk": b["blk"], "gen": b["gen"], "term": b["term"], **moved}
    return codec.share_ok(b["keys"], loc["vid"], b["k"], loc["fid"], loc["blk"], loc["gen"],
                          loc["term"], index, stored, share)


def ctx(seq: int) -> bytes:
    """A record head's context bytes (what seal_record binds), here just a number."""
    return struct.pack("<Q", seq)


def flip(data: bytes, pos: int, bit: int) -> bytes:
    out = bytearray(data)
    out[pos] ^= 1 << bit
    return bytes(out)


# ---- block round trip and FEC ----

@pytest.mark.parametrize("k,n", KN)
@given(data=st.data())
@fast(12)
def test_block_round_trip(k, n, data):
    b = data.draw(blocks(k, n))
    pairs = encode(b)
    assert len(pairs) == n
    size = codec.share_length(b["bs"] + b["keys"].cipher.overhead, k)
    assert size == format.share_size(b["bs"], k, b["keys"].cipher.overhead)
    for i, (cs, share) in enumerate(pairs):
        assert len(share) == size
        assert len(cs) == codec.CHECKSUM_BYTES
        # k = 1: the share is the sealed block, its AEAD tag is its check (no checksum stored)
        assert cs == (codec.NO_CHECKSUM if k == 1 else checksum(b, i, share))
        assert ok(b, i, cs, share)
    assert decode(b, {i: s for i, (_, s) in enumerate(pairs)}) == b["pt"]
    assert decode(b, {i: pairs[i][1] for i in range(k)}) == b["pt"]
    # A fresh nonce every time: sealing the same block twice never gives the same shares.
    assert encode(b)[0][1] != pairs[0][1]


@pytest.mark.parametrize("k,n", KN)
@given(data=st.data())
@fast(12)
def test_any_k_shares_suffice(k, n, data):
    b = data.draw(blocks(k, n))
    pairs = encode(b)
    order = data.draw(st.permutations(range(n)))
    used = order[:data.draw(st.integers(min_value=k, max_value=n))]
    assert decode(b, {i: pairs[i][1] for i in used}) == b["pt"]


@given(b=blocks(), data=st.data())
@fast(60)
def test_fewer_than_k_shares_is_an_error(b, data):
    pairs = encode(b)
    order = data.draw(st.permutations(range(b["n"])))
    used = order[:data.draw(st.integers(min_value=0, max_value=b["k"] - 1))]
    with pytest.raises(codec.CodecError):
        decode(b, {i: pairs[i][1] for i in used})


@given(data=st.binary(max_size=300), kn=kns)
@fast(150)
def test_fec_round_trip_any_length(data, kn):
    k, n = kn
    shares = codec.fec_encode(data, k, n)
    assert len(shares) == n
    assert all(len(s) == codec.share_length(len(data), k) for s in shares)
    assert codec.fec_decode({i: shares[i] for i in range(n - k, n)}, k, n, len(data)) == data


# ---- tampering ----

@given(b=blocks(), data=st.data())
@fast(200)
def test_any_flipped_bit_in_a_share_fails_its_check(b, data):
    pairs = encode(b)
    i = data.draw(st.integers(min_value=0, max_value=b["n"] - 1))
    cs, share = pairs[i]
    last = len(share) - 1
    pos = data.draw(st.one_of(st.sampled_from([0, last]), st.integers(min_value=0, max_value=last)))
    bit = data.draw(st.integers(min_value=0, max_value=7))
    tampered = flip(share, pos, bit)
    assert ok(b, i, cs, share)
    assert not ok(b, i, cs, tampered)


@pytest.mark.parametrize("cipher", CIPHERS, ids=lambda c: c.name)
@pytest.mark.parametrize("k,n", KN)
def test_every_byte_position_of_every_share_is_checked(k, n, cipher):
    """Exhaustive over positions for one 512-byte block per shape (the random test samples)."""
    b = {"keys": codec.Keys.derive(bytes(range(32)), cipher), "vid": b"v" * 16, "fid": 3, "blk": 5,
         "gen": 7, "term": 9, "k": k, "n": n, "bs": 512, "pt": bytes(range(256)) * 2}
    for i, (cs, share) in enumerate(encode(b)):
        for pos in range(len(share)):
            assert not ok(b, i, cs, flip(share, pos, pos % 8)), (i, pos)


@given(b=blocks(), data=st.data())
@fast(200)
def test_flipped_data_byte_in_a_used_share_fails_aead(b, data):
    """Bypass the checksums: corrupt one of the k shares handed to decode_block.

    Shares are share_length(L, k) bytes for sealed length L, and the last primary share
    ends in pad = size*k - L zero bytes that are cut off after decoding.  zfec decoding is
    an invertible linear map applied column by column, so changing any used share at
    column p changes the rebuilt column p of the k primary shares.  For p < size - pad
    every byte of that column is sealed data (not padding), so the sealed block the AEAD
    sees is different and must be rejected, whichever shares (primary or parity) are used.
    """
    k, n = b["k"], b["n"]
    pairs = encode(b)
    used = data.draw(st.permutations(range(n)))[:k]
    victim = data.draw(st.sampled_from(used))
    sealed_len = b["bs"] + b["keys"].cipher.overhead
    size = codec.share_length(sealed_len, k)
    pad = size * k - sealed_len
    pos = data.draw(st.integers(min_value=0, max_value=size - pad - 1))
    bit = data.draw(st.integers(min_value=0, max_value=7))
    shares = {i: pairs[i][1] for i in used}
    shares[victim] = flip(shares[victim], pos, bit)
    with pytest.raises(codec.CodecError):
        decode(b, shares)


@given(b=blocks(), data=st.data())
@fast(200)
def test_flipped_byte_anywhere_never_yields_wrong_plaintext(b, data):
    """Any position, padding included: decode_block either fails or returns the true block."""
    k, n = b["k"], b["n"]
    pairs = encode(b)
    used = data.draw(st.permutations(range(n)))[:k]
    victim = data.draw(st.sampled_from(used))
    pos = data.draw(st.integers(min_value=0, max_value=len(pairs[0][1]) - 1))
    bit = data.draw(st.integers(min_value=0, max_value=7))
    shares = {i: pairs[i][1] for i in used}
    shares[victim] = flip(shares[victim], pos, bit)
    try:
        out = decode(b, shares)
    except codec.CodecError:
        return
    assert out == b["pt"]


MOVES = ["blk", "fid", "gen", "term", "vid"]


@given(b=blocks(), move=st.sampled_from(MOVES), data=st.data())
@fast(200)
def test_moved_block_is_rejected(b, move, data):
    strategy = volume_ids if move == "vid" else u64
    new = data.draw(strategy.filter(lambda v: v != b[move]), label=f"new {move}")
    loc = {key: b[key] for key in ("vid", "fid", "blk", "gen", "term")}
    moved = {**loc, move: new}
    keys = b["keys"]

    sealed = codec.encrypt_block(keys, *loc.values(), b["pt"])
    assert codec.decrypt_block(keys, *loc.values(), sealed) == b["pt"]
    with pytest.raises(codec.CodecError):
        codec.decrypt_block(keys, *moved.values(), sealed)

    pairs = encode(b)
    for i, (cs, share) in enumerate(pairs):
        assert not ok(b, i, cs, share, **{move: new})
    with pytest.raises(codec.CodecError):
        decode({**b, move: new}, {i: pairs[i][1] for i in range(b["k"])})


@given(b=blocks(), other=masters)
@fast(60)
def test_block_under_another_key_is_rejected(b, other):
    keys2 = codec.Keys.derive(other, b["keys"].cipher)
    if keys2 == b["keys"]:
        return
    pairs = encode(b)
    for i, (cs, share) in enumerate(pairs):
        assert not ok({**b, "keys": keys2}, i, cs, share)
    with pytest.raises(codec.CodecError):
        decode({**b, "keys": keys2}, {i: pairs[i][1] for i in range(b["k"])})


@given(b=blocks().filter(lambda b: b["k"] > 1), data=st.data())
@fast(100)
def test_share_checksum_binds_share_index(b, data):
    """With k > 1 shares differ, so a share in another replica's place must fail.  (With
    k = 1 every share is the same sealed block: any replica's copy is as good.)"""
    n = b["n"]
    pairs = encode(b)
    i = data.draw(st.integers(min_value=0, max_value=n - 1))
    cs_i, share_i = pairs[i]
    for j in range(n):
        if j == i:
            continue
        # Share i with its stored checksum, presented as share j, does not validate.
        assert not ok(b, j, cs_i, share_i)
        assert pairs[j][0] != cs_i
        # Nor does share i's data pass share j's stored checksum.
        assert not ok(b, j, pairs[j][0], share_i)
    assert checksum(b, i, share_i) == cs_i


@given(master=masters, vid=volume_ids, fid=u64, blk=u64, gen=u64, cipher=ciphers, data=st.data())
@fast(50)
def test_too_short_sealed_data_is_rejected(master, vid, fid, blk, gen, cipher, data):
    keys = codec.Keys.derive(master, cipher)
    sealed = data.draw(st.binary(max_size=cipher.overhead - 1))
    with pytest.raises(codec.CodecError):
        codec.decrypt_block(keys, vid, fid, blk, gen, gen, sealed)
    with pytest.raises(codec.CodecError):
        codec.open_record(keys, vid, format.LOG_KIND, ctx(gen), sealed)


# ---- paper key ----

def cleaned(paper: str) -> str:
    return paper.replace("-", "")


def normalize_char(ch: str) -> str:
    """What decode_paper_key turns one typed character into (may be several or none)."""
    return "".join(ch.split()).replace("-", "").upper().translate(str.maketrans("018", "OIB"))


@given(master=masters)
@fast(100)
def test_paper_key_round_trip(master):
    paper = codec.encode_paper_key(master)
    groups = paper.split("-")
    assert len(groups) == PAPER_LEN // 4 and all(len(g) == 4 for g in groups)
    assert set(cleaned(paper)) <= set(B32)
    assert codec.decode_paper_key(paper) == master
    assert codec.decode_paper_key(paper + "\n") == master


@given(master=masters, pos=st.integers(min_value=0, max_value=PAPER_LEN - 1), data=st.data())
@fast(300)
def test_paper_key_single_substitution_is_rejected(master, pos, data):
    text = cleaned(codec.encode_paper_key(master))
    new = data.draw(st.sampled_from(B32).filter(lambda c: c != text[pos]))
    with pytest.raises(codec.PaperKeyError):
        codec.decode_paper_key(text[:pos] + new + text[pos + 1:])


@pytest.mark.parametrize("master", [bytes(32), b"\xff" * 32, bytes(range(32)), bytes(range(100, 132))],
                         ids=["zeros", "ones", "ramp", "ramp100"])
def test_paper_key_every_substitution_is_rejected_exhaustive(master):
    text = cleaned(codec.encode_paper_key(master))
    for pos in range(PAPER_LEN):
        for new in B32:
            if new == text[pos]:
                continue
            with pytest.raises(codec.PaperKeyError):
                codec.decode_paper_key(text[:pos] + new + text[pos + 1:])


@given(master=masters, pos=st.integers(min_value=0, max_value=PAPER_LEN - 1),
       new=st.characters(exclude_categories=["Cs"]))
@fast(300)
def test_paper_key_substitution_with_any_character(master, pos, new):
    """Any typed character is either equivalent to the right one or makes the key rejected."""
    text = cleaned(codec.encode_paper_key(master))
    typed = text[:pos] + new + text[pos + 1:]
    if normalize_char(new) == text[pos]:
        assert codec.decode_paper_key(typed) == master
    else:
        with pytest.raises(codec.PaperKeyError):
            codec.decode_paper_key(typed)


@given(master=masters, data=st.data())
@fast(60)
def test_paper_key_forgives_case_dashes_spaces_and_lookalikes(master, data):
    text = cleaned(codec.encode_paper_key(master))
    out = []
    for ch in text:
        out.append(data.draw(st.sampled_from(["", "-", " ", "  ", "\t", "--", " - "])))
        choices = [ch, ch.lower()] + [d for d, c in zip("018", "OIB", strict=True) if c == ch]
        out.append(data.draw(st.sampled_from(choices)))
    out.append(data.draw(st.sampled_from(["", "\n", " \r\n", "-"])))
    assert codec.decode_paper_key("".join(out)) == master


@given(master=masters, data=st.data())
@fast(150)
def test_paper_key_wrong_length_is_rejected(master, data):
    text = cleaned(codec.encode_paper_key(master))
    length = data.draw(st.integers(min_value=0, max_value=2 * PAPER_LEN).filter(lambda n: n != PAPER_LEN))
    extra = data.draw(st.text(alphabet=B32, min_size=PAPER_LEN, max_size=PAPER_LEN))
    with pytest.raises(codec.PaperKeyError, match="characters"):
        codec.decode_paper_key((text + extra)[:length])


@given(text=st.one_of(st.text(), st.text(alphabet=B32 + "-018 abc=", min_size=50, max_size=70)))
@fast(300)
def test_paper_key_garbage_raises_only_paper_key_error(text):
    try:
        master = codec.decode_paper_key(text)
    except codec.PaperKeyError:
        return
    assert len(master) == codec.KEY_BYTES
    assert codec.decode_paper_key(codec.encode_paper_key(master)) == master


# ---- metadata records ----

kinds = st.one_of(st.sampled_from([format.LOG_KIND, format.SNAPSHOT_KIND]),
                  st.binary(min_size=1, max_size=12))


@given(master=masters, vid=volume_ids, kind=kinds, seq=u64, pt=st.binary(max_size=2000),
       cipher=ciphers, data=st.data())
@fast(150)
def test_record_bound_to_kind_seq_volume_and_key(master, vid, kind, seq, pt, cipher, data):
    keys = codec.Keys.derive(master, cipher)
    sealed = codec.seal_record(keys, vid, kind, ctx(seq), pt)
    assert len(sealed) == len(pt) + cipher.overhead
    assert codec.open_record(keys, vid, kind, ctx(seq), sealed) == pt

    other_kind = data.draw(kinds.filter(lambda x: x != kind), label="other kind")
    other_seq = data.draw(u64.filter(lambda x: x != seq), label="other seq")
    other_vid = data.draw(volume_ids.filter(lambda x: x != vid), label="other vid")
    other_master = data.draw(masters.filter(lambda x: x != master), label="other master")
    other_cipher = next(c for c in CIPHERS if c != cipher)
    for args in [(keys, vid, other_kind, ctx(seq)), (keys, vid, kind, ctx(other_seq)),
                 (keys, other_vid, kind, ctx(seq)), (keys.using(other_cipher), vid, kind, ctx(seq)),
                 (codec.Keys.derive(other_master, cipher), vid, kind, ctx(seq))]:
        with pytest.raises(codec.CodecError):
            codec.open_record(*args, sealed)

    # A record is not a block and a block is not a record (separate subkeys).
    with pytest.raises(codec.CodecError):
        codec.decrypt_block(keys, vid, 0, 0, seq, 0, sealed)

    pos = data.draw(st.integers(min_value=0, max_value=len(sealed) - 1), label="flip pos")
    with pytest.raises(codec.CodecError):
        codec.open_record(keys, vid, kind, ctx(seq), flip(sealed, pos, data.draw(st.integers(0, 7))))


def test_log_record_is_not_a_snapshot():
    keys = codec.Keys.derive(bytes(range(32)))
    vid = bytes(16)
    sealed = codec.seal_record(keys, vid, format.LOG_KIND, ctx(5), b"ops")
    with pytest.raises(codec.CodecError):
        codec.open_record(keys, vid, format.SNAPSHOT_KIND, ctx(5), sealed)


# ---- key derivation ----

@given(master=masters, other=masters)
@fast(100)
def test_keys_derive_separates_purposes(master, other):
    keys = codec.Keys.derive(master)
    subkeys = [keys.block, keys.meta, keys.share, keys.check, keys.header]
    assert all(len(s) == codec.KEY_BYTES for s in subkeys)
    assert len(set(subkeys)) == 5
    assert master not in subkeys
    assert codec.Keys.derive(master) == keys
    if other != master:
        keys2 = codec.Keys.derive(other)
        assert not set(subkeys) & {keys2.block, keys2.meta, keys2.share, keys2.check, keys2.header}
        assert codec.key_check(keys, bytes(16)) != codec.key_check(keys2, bytes(16))


@given(master=st.binary(max_size=100).filter(lambda m: len(m) != codec.KEY_BYTES))
@fast(100)
def test_keys_derive_rejects_wrong_length(master):
    with pytest.raises(ValueError, match="32 bytes"):
        codec.Keys.derive(master)


def test_paper_key_alphabet_is_rfc4648():
    # Guard the B32 constant the tests rely on.
    assert set(base64.b32encode(bytes(range(256))).decode().rstrip("=")) == set(B32)
    assert len(set(B32)) == 32


def test_nonces_never_repeat_across_threads_or_a_fork():
    """Sealing from several threads, and in a forked child, never reuses a nonce."""
    import os
    import threading

    keys = codec.Keys.derive(bytes(32))
    seen: list[bytes] = []

    def seal_many() -> None:
        for _ in range(2000):
            seen.append(codec.seal_record(keys, bytes(16), b"L", b"", b"x")[:codec.NONCE_BYTES])

    threads = [threading.Thread(target=seal_many) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child seals once and sends its nonce back
        os.write(write, codec.seal_record(keys, bytes(16), b"L", b"", b"x")[:codec.NONCE_BYTES])
        os._exit(0)
    os.waitpid(pid, 0)
    child = os.read(read, codec.NONCE_BYTES)
    os.close(read)
    os.close(write)
    parent = codec.seal_record(keys, bytes(16), b"L", b"", b"x")[:codec.NONCE_BYTES]
    assert len(set(seen)) == len(seen) == 8000
    assert child not in seen and child != parent
    assert child[:16] != parent[:16]  # the child drew a prefix of its own


# ---- ciphers ----

def test_auto_picks_aegis_exactly_where_the_cpu_has_aes_instructions():
    with open("/proc/cpuinfo") as f:
        flags = f.read().split()
    expected = codec.AEGIS256 if "aes" in flags else codec.XCHACHA20  # x86 "flags", ARM "Features"
    assert codec.cipher_named("auto") == expected
    assert codec.cipher_named("xchacha20poly1305") == codec.XCHACHA20
    with pytest.raises(ValueError, match="unknown cipher"):
        codec.cipher_named("rot13")


@pytest.mark.parametrize("cipher", CIPHERS, ids=lambda c: c.name)
def test_a_4k_block_leaves_a_page_aligned_body_with_either_cipher(cipher):
    """The stored nonce is 24 bytes for both: the sealed overhead stays under 64 bytes, so
    with k = 1 a 4 KiB block's body is exactly one page (stale bodies can be punched)."""
    layout = format.SlotLayout.of(4096, 1, cipher.overhead)
    assert layout.body_size == 4096 and layout.body_offset(0) % 4096 == 0
