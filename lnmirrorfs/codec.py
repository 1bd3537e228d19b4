"""Codec layer: pure functions for keys, block encryption, FEC and share checksums.

Nothing here touches files.  Every data block goes plaintext -> AEAD ciphertext ->
zfec k-of-n shares; each share carries its own keyed checksum so a bad share is
identified without trial decodes.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import itertools
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache

import zfec

# pynacl's own cffi binding of libsodium: nacl.bindings makes the same calls, but copies
# every input to bytes and checks each argument in Python, 40% of a 4 KiB block's time;
# here the buffers are passed as they are (the GIL is released during each call).
from nacl._sodium import ffi as _ffi
from nacl._sodium import lib as _sodium
from nacl.bindings import sodium_init

sodium_init()  # picks the CPU's fastest implementations (idempotent)

KEY_BYTES = 32
NONCE_BYTES = 24  # stored with every sealed block or record, whatever the cipher
CHECKSUM_BYTES = 16
NO_CHECKSUM = bytes(CHECKSUM_BYTES)
PAPER_CHECK_BYTES = 3
_PERSON = b"lnmirror-v1"


class CodecError(Exception):
    """A block or record failed authentication or could not be decoded."""


class PaperKeyError(ValueError):
    """A typed-in paper key is malformed or its checksum does not match."""


# ---- ciphers ----

Buffer = bytes | bytearray | memoryview


@dataclass(frozen=True)
class Cipher:
    """An AEAD a volume can use, chosen at init and named in every replica's header.

    Whatever the cipher, a sealed message is `nonce(24) || ciphertext || tag`: AEGIS-256
    takes a 32-byte nonce, which is the stored 24 bytes zero-extended (only uniqueness
    matters; storing 32 would push a 4 KiB block's body off its page, see format.SlotLayout)."""

    id: int
    name: str
    tag_bytes: int
    nonce_pad: bytes  # appended to the stored nonce to make the one the cipher takes
    encrypt: Callable = field(repr=False, compare=False)
    decrypt: Callable = field(repr=False, compare=False)

    @property
    def overhead(self) -> int:
        """Bytes a sealed message has beyond its plaintext."""
        return NONCE_BYTES + self.tag_bytes


XCHACHA20 = Cipher(1, "xchacha20poly1305", 16, b"",
                   _sodium.crypto_aead_xchacha20poly1305_ietf_encrypt,
                   _sodium.crypto_aead_xchacha20poly1305_ietf_decrypt)
AEGIS256 = Cipher(2, "aegis256", 32, bytes(8),
                  _sodium.crypto_aead_aegis256_encrypt, _sodium.crypto_aead_aegis256_decrypt)
CIPHERS = {c.id: c for c in (XCHACHA20, AEGIS256)}


def cipher_named(name: str) -> Cipher:
    """The cipher called `name`, or the fastest on this CPU for "auto"."""
    if name == "auto":
        return fastest_cipher()
    for cipher in CIPHERS.values():
        if cipher.name == name:
            return cipher
    raise ValueError(f"unknown cipher {name!r} (auto, "
                     + ", ".join(c.name for c in CIPHERS.values()) + ")")


def fastest_cipher() -> Cipher:
    """AEGIS-256 where the CPU has AES instructions (libsodium's AES-GCM needs them: its
    availability is the test), XChaCha20-Poly1305 otherwise (a Raspberry Pi 4): 4 KiB blocks
    seal in ~4 against ~9 us here, 64 KiB at 5 against 1.2 GB/s."""
    return AEGIS256 if _sodium.crypto_aead_aes256gcm_is_available() else XCHACHA20


assert (_sodium.crypto_aead_xchacha20poly1305_ietf_npubbytes(),
        _sodium.crypto_aead_xchacha20poly1305_ietf_abytes(),
        _sodium.crypto_aead_xchacha20poly1305_ietf_keybytes()) == (NONCE_BYTES, 16, KEY_BYTES)
assert (_sodium.crypto_aead_aegis256_npubbytes(), _sodium.crypto_aead_aegis256_abytes(),
        _sodium.crypto_aead_aegis256_keybytes()) == (NONCE_BYTES + 8, 32, KEY_BYTES)


def _subkey(master: bytes, purpose: bytes) -> bytes:
    # One independent key per purpose, so a leak of one use never helps another.
    return hashlib.blake2b(purpose, key=master, digest_size=KEY_BYTES, person=_PERSON).digest()


@dataclass(frozen=True)
class Keys:
    """Subkeys derived from the 32-byte master key."""

    block: bytes
    meta: bytes
    share: bytes
    check: bytes
    header: bytes
    cipher: Cipher = XCHACHA20  # the volume's AEAD, named in its header

    @classmethod
    def derive(cls, master: bytes, cipher: Cipher = XCHACHA20) -> Keys:
        if len(master) != KEY_BYTES:
            raise ValueError(f"master key must be {KEY_BYTES} bytes, got {len(master)}")
        return cls(
            block=_subkey(master, b"block"),
            meta=_subkey(master, b"meta"),
            share=_subkey(master, b"share"),
            check=_subkey(master, b"keycheck"),
            header=_subkey(master, b"header"),
            cipher=cipher,
        )

    def using(self, cipher: Cipher) -> Keys:
        """The same keys for a volume of that cipher (a header tells it once the key is known)."""
        return dataclasses.replace(self, cipher=cipher)


def new_master_key() -> bytes:
    return os.urandom(KEY_BYTES)


def key_check(keys: Keys, volume_id: bytes) -> bytes:
    """A value stored in every replica header that proves a key belongs to the volume."""
    return hashlib.blake2b(volume_id, key=keys.check, digest_size=CHECKSUM_BYTES).digest()


def header_mac(keys: Keys, body: bytes) -> bytes:
    """Keyed MAC of a replica header: its share index, k or n cannot be edited without the key."""
    return hashlib.blake2b(body, key=keys.header, digest_size=CHECKSUM_BYTES).digest()


# ---- paper key: base32 of key + 3-byte checksum, grouped for typing ----

def _paper_checksum(master: bytes) -> bytes:
    """CRC-24 (OpenPGP polynomial) of the key.  A mistyped base32 character flips at most
    5 adjacent bits, and a CRC-24 detects every burst of up to 24 bits: every single typo
    is caught, not just most."""
    crc = 0xB704CE
    for byte in master:
        crc ^= byte << 16
        for _ in range(8):
            crc <<= 1
            if crc & 0x1000000:
                crc ^= 0x1864CFB
    return (crc & 0xFFFFFF).to_bytes(PAPER_CHECK_BYTES, "big")


def encode_paper_key(master: bytes) -> str:
    """32 key bytes + 3 checksum bytes = 56 base32 characters, in groups of four."""
    text = base64.b32encode(master + _paper_checksum(master)).decode()
    return "-".join(text[i:i + 4] for i in range(0, len(text), 4))


def decode_paper_key(text: str) -> bytes:
    """Parse a paper key; forgives case, spaces, dashes and 0/1/8 typed for O/I/B."""
    cleaned = "".join(text.split()).replace("-", "").upper()
    cleaned = cleaned.translate(str.maketrans("018", "OIB"))
    expected_len = (KEY_BYTES + PAPER_CHECK_BYTES) * 8 // 5
    if len(cleaned) != expected_len:
        raise PaperKeyError(f"key must have {expected_len} characters not counting dashes and "
                            f"spaces, got {len(cleaned)}")
    try:
        raw = base64.b32decode(cleaned)
    except ValueError as exc:
        raise PaperKeyError(f"key has characters outside A-Z and 2-7: {exc}") from None
    master, check = raw[:KEY_BYTES], raw[KEY_BYTES:]
    if _paper_checksum(master) != check:
        raise PaperKeyError("key checksum does not match: a character is mistyped")
    return master


# ---- authenticated encryption ----

class _Nonces:
    """Unique 24-byte nonces: a random 16-byte prefix per process (drawn anew in a forked
    child, which would otherwise repeat its parent's) and a 64-bit counter.  A collision
    needs two processes to draw the same 128-bit prefix; a getrandom call per block cost
    more than the block's encryption (the encode thread gives up the GIL for each)."""

    _COUNTER = struct.Struct("<Q")

    def __init__(self) -> None:
        self._restart()
        os.register_at_fork(after_in_child=self._restart)

    def _restart(self) -> None:
        self._prefix = os.urandom(NONCE_BYTES - self._COUNTER.size)
        self._counter = itertools.count()  # next() is atomic: threads never share a value

    def next(self) -> bytes:
        return self._prefix + self._COUNTER.pack(next(self._counter))


_nonces = _Nonces()


def _seal(cipher: Cipher, key: bytes, plaintext: Buffer, aad: bytes,
          into: memoryview | None = None) -> Buffer:
    """nonce || AEAD(plaintext, aad): new bytes, or written `into` a writable buffer of
    exactly that size (returned)."""
    _check_key(key)
    nonce = _nonces.next()
    out = bytearray(NONCE_BYTES + len(plaintext) + cipher.tag_bytes) if into is None else into
    if len(out) != NONCE_BYTES + len(plaintext) + cipher.tag_bytes:
        raise ValueError(f"sealed buffer of {len(out)} bytes for {len(plaintext)} plaintext bytes")
    out[:NONCE_BYTES] = nonce
    cipher.encrypt(_ffi.from_buffer(out) + NONCE_BYTES, _ffi.NULL, _ffi.from_buffer(plaintext),
                   len(plaintext), aad, len(aad), _ffi.NULL, nonce + cipher.nonce_pad, key)
    return bytes(out) if into is None else into


def _open(cipher: Cipher, key: bytes, sealed: Buffer, aad: bytes) -> bytes:
    _check_key(key)
    if len(sealed) < cipher.overhead:
        raise CodecError("sealed data too short")
    plaintext = _opener(cipher, key)(sealed, aad)
    if plaintext is None:
        raise CodecError("authentication failed")
    return plaintext


@lru_cache(maxsize=8)  # a volume's block and metadata keys: not one closure per decryption
def _opener(cipher: Cipher, key: bytes) -> Callable[[Buffer, bytes], bytes | None]:
    """A function giving the plaintext of a sealed message (at least the cipher's overhead
    long: the caller checks that, and the key), or None if it does not authenticate; what
    every call shares is looked up once."""
    decrypt, nonce_pad, overhead = cipher.decrypt, cipher.nonce_pad, cipher.overhead
    null, from_buffer = _ffi.NULL, _ffi.from_buffer

    def opened(sealed: Buffer, aad: bytes) -> bytes | None:
        out = bytearray(len(sealed) - overhead)
        src = from_buffer(sealed)
        nonce = bytes(sealed[:NONCE_BYTES]) + nonce_pad if nonce_pad else src
        if decrypt(from_buffer(out), null, null, src + NONCE_BYTES, len(sealed) - NONCE_BYTES,
                   aad, len(aad), nonce, key) != 0:
            return None
        return bytes(out)
    return opened


def _check_key(key: bytes) -> None:
    # libsodium reads KEY_BYTES from the pointer whatever the buffer's length.
    if len(key) != KEY_BYTES:
        raise ValueError(f"key must be {KEY_BYTES} bytes, got {len(key)}")


_BLOCK_AAD = struct.Struct("<16sQQQQ")


VOLUME_ID_BYTES = 16


def _check_volume_id(volume_id: bytes) -> bytes:
    # struct's "16s" would silently pad or cut a wrong-length id, merging distinct volumes.
    if len(volume_id) != VOLUME_ID_BYTES:
        raise ValueError(f"volume id must be {VOLUME_ID_BYTES} bytes, got {len(volume_id)}")
    return volume_id


def block_aad(volume_id: bytes, file_id: int, block: int, gen: int, term: int) -> bytes:
    return _BLOCK_AAD.pack(_check_volume_id(volume_id), file_id, block, gen, term)


def encrypt_block(keys: Keys, volume_id: bytes, file_id: int, block: int, gen: int, term: int,
                  plaintext: bytes, into: memoryview | None = None) -> Buffer:
    """Seal one block (`into` that buffer, if given); the AAD pins it to its volume, file,
    index and the identity of the record that wrote it (generation and term: a rolled-back
    record's block never matches)."""
    return _seal(keys.cipher, keys.block, plaintext, block_aad(volume_id, file_id, block, gen, term),
                 into)


def decrypt_block(keys: Keys, volume_id: bytes, file_id: int, block: int, gen: int, term: int,
                  sealed: bytes) -> bytes:
    return _open(keys.cipher, keys.block, sealed, block_aad(volume_id, file_id, block, gen, term))


def decrypt_blocks(keys: Keys, volume_id: bytes, file_id: int,
                   sealed_blocks: list[tuple[int, int, int, Buffer]]) -> list[bytes | None]:
    """decrypt_block for (block, generation, term, sealed) of one file, None for each that
    does not authenticate, in one loop that checks and looks up what they share once: a
    cold read or a restore spent as long around each 4 KiB decryption as in it."""
    _check_key(keys.block)
    _check_volume_id(volume_id)
    opened, overhead, pack = _opener(keys.cipher, keys.block), keys.cipher.overhead, _BLOCK_AAD.pack
    return [opened(sealed, pack(volume_id, file_id, block, gen, term))
            if len(sealed) >= overhead else None
            for block, gen, term, sealed in sealed_blocks]


def seal_record(keys: Keys, volume_id: bytes, kind: bytes, context: bytes, plaintext: bytes) -> bytes:
    """Seal a metadata record (log entry or snapshot) bound to its kind and its head."""
    return _seal(keys.cipher, keys.meta, plaintext, _check_volume_id(volume_id) + kind + context)


def open_record(keys: Keys, volume_id: bytes, kind: bytes, context: bytes, sealed: bytes) -> bytes:
    return _open(keys.cipher, keys.meta, sealed, _check_volume_id(volume_id) + kind + context)


# ---- forward error correction ----

@lru_cache(maxsize=64)
def _encoder(k: int, n: int) -> zfec.Encoder:
    return zfec.Encoder(k, n)


@lru_cache(maxsize=64)
def _decoder(k: int, n: int) -> zfec.Decoder:
    return zfec.Decoder(k, n)


def share_length(data_length: int, k: int) -> int:
    return -(-data_length // k)


def fec_encode(data: Buffer, k: int, n: int) -> list[Buffer]:
    """Split data into n shares of which any k rebuild it (zero-padded to a multiple of k).
    With k = 1 every share is `data` itself, not a copy."""
    if k == 1:
        return [data] * n
    size = share_length(len(data), k)
    padded = bytes(data) + bytes(size * k - len(data))
    return _encoder(k, n).encode([padded[i * size:(i + 1) * size] for i in range(k)])


def fec_decode(shares: dict[int, bytes], k: int, n: int, data_length: int) -> bytes:
    """Rebuild data from at least k shares, given as {share index: share bytes}."""
    if len(shares) < k:
        raise CodecError(f"need {k} shares, have {len(shares)}")
    if k == 1:
        return bytes(next(iter(shares.values())))[:data_length]
    indexes = sorted(shares)[:k]
    primary = _decoder(k, n).decode([shares[i] for i in indexes], indexes)
    return b"".join(primary)[:data_length]


# ---- per-share checksums ----

_SHARE_CTX = struct.Struct("<16sQQQQB")


def share_checksum(keys: Keys, volume_id: bytes, file_id: int, block: int, gen: int, term: int,
                   share_index: int, share: bytes) -> bytes:
    """Keyed checksum of one share, bound to where it belongs so misplaced shares fail too."""
    h = hashlib.blake2b(key=keys.share, digest_size=CHECKSUM_BYTES)
    h.update(_SHARE_CTX.pack(_check_volume_id(volume_id), file_id, block, gen, term, share_index))
    h.update(share)
    return h.digest()


def slot_checksum(keys: Keys, volume_id: bytes, k: int, file_id: int, block: int, gen: int,
                  term: int, share_index: int, share: bytes) -> bytes:
    """What a slot stores beside its share: the share's checksum, or zeros with k = 1.  Then
    a share is the whole sealed block and its AEAD tag tells a bad one (share_ok); one
    BLAKE2b per replica per block was a third of a bulk write's CPU."""
    if k == 1:
        return NO_CHECKSUM
    return share_checksum(keys, volume_id, file_id, block, gen, term, share_index, share)


def share_ok(keys: Keys, volume_id: bytes, k: int, file_id: int, block: int, gen: int, term: int,
             share_index: int, checksum: bytes, share: bytes) -> bool:
    """Whether a share read from a slot is the one written there: its checksum holds, or with
    k = 1 the sealed block it is authenticates."""
    if k > 1:
        return checksum == share_checksum(keys, volume_id, file_id, block, gen, term,
                                          share_index, share)
    try:
        decrypt_block(keys, volume_id, file_id, block, gen, term, share)
    except CodecError:
        return False
    return True


def encode_block(keys: Keys, volume_id: bytes, k: int, n: int, file_id: int, block: int,
                 gen: int, term: int, plaintext: bytes,
                 into: memoryview | None = None) -> list[tuple[bytes, Buffer]]:
    """Encrypt (`into` that buffer, if given) then FEC-encode one block: returns n
    (checksum, share) pairs, share i for replica i."""
    sealed = encrypt_block(keys, volume_id, file_id, block, gen, term, plaintext, into)
    shares = fec_encode(sealed, k, n)
    return [(slot_checksum(keys, volume_id, k, file_id, block, gen, term, i, s), s)
            for i, s in enumerate(shares)]


def decode_block(keys: Keys, volume_id: bytes, k: int, n: int, file_id: int, block: int,
                 gen: int, term: int, shares: dict[int, bytes], block_size: int) -> bytes:
    """Rebuild and decrypt one block from at least k verified shares."""
    sealed = fec_decode(shares, k, n, block_size + keys.cipher.overhead)
    return decrypt_block(keys, volume_id, file_id, block, gen, term, sealed)
