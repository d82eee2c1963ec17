"""Upstream tensorizer encryption: key derivation and the decrypting transform (no I/O, no engine).

Upstream encrypts each tensor in chunks with XSalsa20-Poly1305 (libsodium ``crypto_secretbox``): one nonce per
tensor, incremented per chunk, one MAC per chunk in the tensor's header. Keys are raw 32 bytes
(``EncryptionParams.random()``) or derived from a passphrase with Argon2id (``EncryptionParams.from_string``),
whose parameters the file carries and :mod:`hf_tensorizer.crypto.keys` bounds before use.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from ..crypto.keys import KeySpec, as_key_source, key_or_env, nacl_module
from ..errors import DecryptionError, TensorizerError, UsageError
from ..format.index import FileIndex
from .format import CRYPT_SCHEME, UpstreamIndex

MAC_BYTES = 16
_NONCE_MOD = 1 << 192


def derive_keys(index: UpstreamIndex, encryption: KeySpec | None, uri: str) -> dict[tuple, bytes]:
    """One 32-byte key per distinct key-derivation record in the file (usually exactly one).

    Raises:
        MissingKeyError: no key given and none in ``HF_TENSORIZER_KEY``.
        DecryptionError: a key of the wrong kind for the file's records.
    """
    encryption = key_or_env(
        encryption,
        f"{uri} is an encrypted tensorizer file: pass encryption=EncryptionKey(raw) for a key made by "
        "EncryptionParams.random(), Passphrase(...) for EncryptionParams.from_string(), or set HF_TENSORIZER_KEY",
    )
    source = as_key_source(encryption)
    keys: dict[tuple, bytes] = {}
    for e in index.tensors.values():
        if not e.length or e.crypt is None:
            continue  # no data, nothing to decrypt (upstream writes no crypt chunks for meta tensors)
        kdf = e.crypt.get("kdf")
        ident = (kdf["opslimit"], kdf["memlimit"], kdf["salt"]) if kdf else ()
        if ident in keys:
            continue
        record = {"alg": "none"}
        if kdf:  # the file's Argon2id parameters, bounded by hf_tensorizer.crypto's caps before use
            record = {"alg": "argon2id13", "opslimit": kdf["opslimit"], "memlimit": kdf["memlimit"],
                      "salt": kdf["salt"].hex()}  # fmt: skip
        keys[ident] = source.master_key(record)
    return keys


def upstream_transform(index: FileIndex, encryption: KeySpec | None = None, uri: str = "file") -> Callable[..., None]:
    """The engine transform that decrypts an upstream file's tensors in place.

    ``TensorDeserializer(..., encryption=...)`` uses this for upstream files; it is public for callers that
    drive the pipeline themselves. Each piece (``entry``, ``tensor_offset``, ``length``) covers whole
    encryption chunks (the index's ``block_size`` is the file's chunk size), each checked against its MAC.

    Args:
        index: an upstream index (``read_index`` of an upstream file).
        encryption: ``EncryptionKey``/32 raw bytes (files written with ``EncryptionParams.random()`` or a raw
            key) or ``Passphrase`` (``EncryptionParams.from_string``); ``None`` reads ``HF_TENSORIZER_KEY``.
        uri: for messages.

    Returns:
        ``transform(piece, view)``, safe to call from several reader threads.

    Raises:
        MissingKeyError: no key given or in the environment.
        DecryptionError: a key for an unencrypted file, a key of the wrong kind, or (when the transform runs) a
            chunk that fails authentication: wrong key or tampered data.
    """
    if not isinstance(index, UpstreamIndex):
        raise UsageError("upstream_transform needs the index of an upstream tensorizer file")
    if not index.encrypted:
        raise DecryptionError(f"{uri} is not encrypted, but a key was given: refusing an unauthenticated file")
    nacl_module()  # a clear error when pynacl is missing
    from nacl._sodium import ffi, lib  # libsodium itself: pynacl has no in-place API (decrypts into the tensor)

    keys = derive_keys(index, encryption, uri)
    local = threading.local()

    def transform(piece: Any, view: memoryview) -> None:
        crypt = piece.entry.crypt
        if crypt is None or piece.length == 0:
            return
        if crypt.get("scheme") != CRYPT_SCHEME:
            raise UsageError(f"tensor {piece.entry.name!r} is not upstream-encrypted")
        size: int = crypt["chunk_size"]
        if piece.tensor_offset % size:
            raise TensorizerError(f"internal: piece of {piece.entry.name!r} does not start on a crypt chunk")
        kdf = crypt.get("kdf")
        key = keys[(kdf["opslimit"], kdf["memlimit"], kdf["salt"]) if kdf else ()]
        first = piece.tensor_offset // size
        base = int.from_bytes(crypt["nonce"], "little")
        scratch = getattr(local, "buf", None)
        if scratch is None or len(scratch) < MAC_BYTES + min(size, piece.length):
            scratch = local.buf = bytearray(MAC_BYTES + size)
        out = ffi.from_buffer("unsigned char[]", view, require_writable=True)
        for k, off in enumerate(range(0, piece.length, size)):
            n = min(size, piece.length - off)
            i = first + k
            scratch[:MAC_BYTES] = crypt["macs"][i]
            scratch[MAC_BYTES : MAC_BYTES + n] = view[off : off + n]
            nonce = ((base + i) % _NONCE_MOD).to_bytes(24, "little")
            if lib.crypto_secretbox_open_easy(out + off, ffi.from_buffer(scratch), MAC_BYTES + n, nonce, key) != 0:
                raise DecryptionError(
                    f"tensor {piece.entry.name!r}: encryption chunk {i} failed authentication "
                    "(wrong key or passphrase, or the file was modified)"
                )

    return transform
