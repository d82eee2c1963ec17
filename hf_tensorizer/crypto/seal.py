"""Sealing tensor blocks and authenticating the header. Design and threat model: docs/security.md.

Every primitive is libsodium's, reached through PyNaCl: XSalsa20-Poly1305 (``crypto_secretbox``) for
data, keyed BLAKE2b (``crypto_generichash``) for key derivation, nonces and the header tag.

Key schedule (``K`` is the master key from a :class:`~hf_tensorizer.crypto.keys.KeySource`)::

    F      = BLAKE2b(key=K, person="hftz-file-v1",  data=salt)       # salt: 32 random bytes per file
    K_data = BLAKE2b(key=F, person="hftz-data-v1")                    # secretbox key
    K_nonc = BLAKE2b(key=F, person="hftz-nonce-v1")
    K_auth = BLAKE2b(key=F, person="hftz-index-v1")                   # header tag key
    check  = BLAKE2b(key=F, person="hftz-check-v1", 16 bytes)         # tells "wrong key" from "tampered"
    nonce(tensor, i) = BLAKE2b(key=K_nonc, person="hftz-nonce-v1", data=u64le(i) || utf8(name), 24 bytes)

A block's ciphertext has exactly the plaintext's length (the file layout does not change); its 16-byte
Poly1305 tag lives in the tensor's ``crypt.macs`` list in the index, and the index itself is covered by
the 32-byte header tag in the preamble.
"""

from __future__ import annotations

import ctypes
import dataclasses
import struct
import threading
from collections.abc import Callable
from typing import Any

from ..errors import DecryptionError, EncryptionError, TensorizerError
from ..format.index import PREAMBLE_SIZE, FileIndex, Preamble, encode_header, encode_index, whole_block
from .keys import KeySource, nacl_module

SCHEME = "xsalsa20poly1305-blake2b-v1"
FILE_SALT_BYTES = 32
MAC_BYTES = 16
NONCE_BYTES = 24
TAG_BYTES = 32
_ZERO_TAG = b"\0" * TAG_BYTES
_MAC_HEX = "0" * (2 * MAC_BYTES)


def _sodium() -> tuple[Any, Any]:
    """PyNaCl's cffi handle on libsodium. Its calls release the GIL, so blocks open in parallel."""
    nacl_module()
    from nacl._sodium import ffi, lib

    if not hasattr(lib, "crypto_secretbox_open_easy"):  # pragma: no cover - PyNaCl < 1.5
        raise EncryptionError("PyNaCl >= 1.5 is needed for encrypted files")
    return ffi, lib


def _blake(key: bytes, person: bytes, data: bytes = b"", size: int = 32) -> bytes:
    return nacl_module().bindings.crypto_generichash_blake2b_salt_personal(
        data, digest_size=size, key=key, person=person
    )


def _equal(a: bytes, b: bytes) -> bool:
    return len(a) == len(b) and bool(nacl_module().bindings.sodium_memcmp(a, b))


class FileKeys:
    """The subkeys of one file, derived from the master key and the file's salt."""

    __slots__ = ("auth_key", "check", "data_key", "nonce_key")

    def __init__(self, master: bytes, salt: bytes) -> None:
        f = _blake(master, b"hftz-file-v1", salt)
        self.data_key = _blake(f, b"hftz-data-v1")
        self.nonce_key = _blake(f, b"hftz-nonce-v1")
        self.auth_key = _blake(f, b"hftz-index-v1")
        self.check = _blake(f, b"hftz-check-v1", size=16)

    def nonce(self, name: str, block: int) -> bytes:
        """The nonce of block ``block`` of tensor ``name``: binds the ciphertext to its place."""
        return _blake(self.nonce_key, b"hftz-nonce-v1", struct.pack("<Q", block) + name.encode("utf-8"), NONCE_BYTES)


def new_section(source: KeySource) -> tuple[dict[str, Any], FileKeys]:
    """A fresh ``encryption`` index section (random salts) and the keys it describes."""
    kdf = source.new_kdf()
    salt = nacl_module().utils.random(FILE_SALT_BYTES)
    keys = FileKeys(source.master_key(kdf), salt)
    return {"scheme": SCHEME, "kdf": kdf, "salt": salt.hex(), "key_check": keys.check.hex()}, keys


def open_section(section: dict[str, Any], source: KeySource, uri: str = "file") -> FileKeys:
    """The keys of a file from its (not yet authenticated) ``encryption`` section.

    Raises:
        DecryptionError: unknown scheme, malformed section, or the key/passphrase does not fit.
    """
    if section.get("scheme") != SCHEME:
        raise DecryptionError(f"{uri}: unknown encryption scheme {section.get('scheme')!r}")
    kdf = section.get("kdf")
    salt = _unhex(section.get("salt"), FILE_SALT_BYTES)
    check = _unhex(section.get("key_check"), 16)
    if not isinstance(kdf, dict) or salt is None or check is None:
        raise DecryptionError(f"{uri}: malformed encryption section in the index")
    keys = FileKeys(source.master_key(kdf), salt)
    if not _equal(keys.check, check):
        raise DecryptionError(f"{uri}: wrong key or passphrase (or the encryption header was modified)")
    return keys


def _unhex(value: Any, n: int) -> bytes | None:
    if not isinstance(value, str) or len(value) != 2 * n:
        return None
    try:
        return bytes.fromhex(value)
    except ValueError:
        return None


# ---- header ----------------------------------------------------------------------------------------


def header_tag(keys: FileKeys, preamble: Preamble, raw_index: bytes) -> bytes:
    """The 32-byte tag over every preamble field (with the tag field zeroed) and the index bytes."""
    pre = dataclasses.replace(preamble, auth_tag=_ZERO_TAG).encode()
    return _blake(keys.auth_key, b"hftz-index-v1", pre + bytes(raw_index), TAG_BYTES)


def sealed_header(index: FileIndex, keys: FileKeys) -> bytes:
    """``encode_header(index)`` with its authentication tag filled in."""
    raw = encode_index(index)
    plain = encode_header(index)  # its preamble already has the tag field zeroed
    tag = _blake(keys.auth_key, b"hftz-index-v1", plain[:PREAMBLE_SIZE] + raw, TAG_BYTES)
    return encode_header(index, tag)


def verify_header(index: FileIndex, keys: FileKeys, uri: str = "file") -> dict[str, list[bytes]]:
    """Check the header tag, then the per-tensor ``crypt`` records. Returns each tensor's block MACs.

    Raises:
        DecryptionError: the tag does not match (header edited) or a crypt record is malformed.
    """
    pre = index.preamble
    if pre is None:
        raise TensorizerError("internal: index without its preamble")
    if not _equal(header_tag(keys, pre, index.raw_index), pre.auth_tag):
        raise DecryptionError(f"{uri}: header authentication failed: the index or preamble was modified")
    macs: dict[str, list[bytes]] = {}
    for e in index.data_entries:
        blocks = -(-e.length // index.block_size)
        items = (e.crypt or {}).get("macs")
        if not isinstance(items, list) or len(items) != blocks:
            raise DecryptionError(f"{uri}: tensor {e.name!r} has a malformed crypt record")
        decoded = [_unhex(m, MAC_BYTES) for m in items]
        if any(m is None for m in decoded):
            raise DecryptionError(f"{uri}: tensor {e.name!r} has a malformed MAC")
        macs[e.name] = decoded  # type: ignore[assignment]
    return macs


# ---- blocks ----------------------------------------------------------------------------------------


class BlockCipher:
    """Seals and opens single blocks. Thread-safe; opening from many threads runs in parallel.

    Args:
        keys: the file's subkeys.
        block_size: the largest block (sizes each thread's scratch buffer).
    """

    def __init__(self, keys: FileKeys, block_size: int) -> None:
        self._ffi, self._lib = _sodium()
        self.keys = keys
        self.block_size = block_size
        self._key = keys.data_key
        self._local = threading.local()

    def seal(self, name: str, block: int, plaintext: memoryview,
             out: bytearray | None = None) -> tuple[memoryview, bytes]:  # fmt: skip
        """Encrypt one block. Returns (ciphertext of the same length, 16-byte MAC).

        Args:
            name: the tensor's name (bound into the nonce).
            block: the block's number within the tensor.
            plaintext: the block's bytes.
            out: a buffer of at least ``len(plaintext) + 16`` bytes to seal into (its start is the result's
                memory: reuse it only once that is consumed); None allocates a fresh one.

        Raises:
            EncryptionError: libsodium failed, or ``out`` is too small.
        """
        n = len(plaintext)
        if out is None:
            out = bytearray(n + MAC_BYTES)  # fresh: a sink may keep a reference until it uploads
        elif len(out) < n + MAC_BYTES:
            raise EncryptionError(f"sealing buffer of {len(out)} bytes is too small for a block of {n}")
        ffi = self._ffi
        src = ffi.from_buffer(plaintext) if n else ffi.NULL
        rc = self._lib.crypto_secretbox_easy(ffi.from_buffer(out), src, n, self.keys.nonce(name, block), self._key)
        if rc != 0:
            raise EncryptionError(f"sealing block {block} of {name!r} failed")
        view = memoryview(out)
        return view[MAC_BYTES : MAC_BYTES + n], bytes(view[:MAC_BYTES])

    def open_into(self, name: str, block: int, mac: bytes, data: memoryview) -> None:
        """Decrypt ``data`` in place after checking its MAC.

        libsodium wants MAC || ciphertext contiguous, so the ciphertext is copied (GIL released) into a
        per-thread scratch buffer behind the MAC; the plaintext is written straight back into ``data``.

        Raises:
            DecryptionError: the MAC does not verify (tampered, moved, or from another file).
        """
        n = len(data)
        ffi = self._ffi
        scratch = getattr(self._local, "scratch", None)
        if scratch is None or len(scratch) < n + MAC_BYTES:
            buf = bytearray(max(n, self.block_size) + MAC_BYTES)
            scratch = self._local.scratch = ffi.from_buffer(buf)
            self._local.buf = buf  # keep the memory alive with the cdata
        dst = ffi.from_buffer(data, require_writable=True)
        ffi.memmove(scratch, mac, MAC_BYTES)
        ctypes.memmove(int(ffi.cast("uintptr_t", scratch)) + MAC_BYTES, int(ffi.cast("uintptr_t", dst)), n)
        rc = self._lib.crypto_secretbox_open_easy(dst, scratch, n + MAC_BYTES, self.keys.nonce(name, block), self._key)
        if rc != 0:
            raise DecryptionError(
                f"tensor {name!r}: block {block} failed authentication (tampered, reordered, or from another file)"
            )


def make_transform(index: FileIndex, keys: FileKeys, macs: dict[str, list[bytes]]) -> Callable[..., None]:
    """The engine's per-piece hook ``transform(piece, data)``: each piece (a tensor's ``entry``, the
    ``tensor_offset`` and ``length`` of its bytes) is one whole block, decrypted in place."""
    cipher = BlockCipher(keys, index.block_size)
    block_size = index.block_size

    def transform(piece: Any, data: memoryview) -> None:
        if piece.length == 0:
            return
        block = whole_block(piece.tensor_offset, piece.length, piece.entry.length, block_size)
        if block is None:
            raise TensorizerError(f"internal: piece of {piece.entry.name!r} is not a whole encryption block")
        name = piece.entry.name
        cipher.open_into(name, block, macs[name][block], data)

    return transform


class FileSealer:
    """Writer side of one encrypted file: fresh salts, per-block sealing, the signed header.

    Args:
        source: the key or passphrase.
        block_size: the file's block size.
    """

    def __init__(self, source: KeySource, block_size: int) -> None:
        self.section, self.keys = new_section(source)
        self.cipher = BlockCipher(self.keys, block_size)
        self.block_size = block_size

    def placeholders(self, sizes: dict[str, int]) -> dict[str, dict[str, Any]]:
        """``crypt`` records of final width for tensors of ``sizes`` (name -> bytes)."""
        return {n: {"macs": [_MAC_HEX] * -(-size // self.block_size)} for n, size in sizes.items()}

    def seal(self, name: str, block: int, plaintext: memoryview,
             out: bytearray | None = None) -> tuple[memoryview, str]:  # fmt: skip
        """Seal one block (into ``out`` when given, see :meth:`BlockCipher.seal`). Returns (ciphertext, MAC hex)."""
        ct, mac = self.cipher.seal(name, block, plaintext, out)
        return ct, mac.hex()

    def header(self, index: FileIndex) -> bytes:
        return sealed_header(index, self.keys)
