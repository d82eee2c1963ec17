"""Reading what users already have: upstream CoreWeave ``tensorizer`` files and safetensors.

Both formats are detected by their first bytes in ``read_index``, so ``TensorDeserializer`` and every
helper built on it open them directly and stream them through the same engine (planning, reader
threads, staging, GPU copies). This module adds what needs more than one file or a key::

    TensorDeserializer("model.tensors")                                 # upstream, plain
    TensorDeserializer("model.tensors", encryption=EncryptionKey(raw))  # upstream, EncryptionParams.random()
    TensorDeserializer("model.tensors", encryption=Passphrase("pw"))    # upstream, EncryptionParams.from_string
    open_upstream("model.tensors", verify_hash=True)                    # + upstream's CRC32/SHA-256 checks
    load_safetensors_state_dict("path/or/uri/of/a/sharded/checkpoint", device="cuda")

See docs/compat.md.
"""

from __future__ import annotations

import json
import os
import posixpath
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch

from .engine import TensorDeserializer, read_index
from .engine.plan import Piece
from .engine.staging import reuse_blocks
from .errors import (
    DecryptionError,
    FormatError,
    HeaderTooLargeError,
    MissingKeyError,
    SourceError,
    TensorizerError,
    UsageError,
)
from .format.index import FileIndex
from .format.upstream import CRYPT_SCHEME, UpstreamIndex, verify_upstream_hashes
from .sources import open_source, scheme_of

__all__ = [
    "is_upstream",
    "load_safetensors_state_dict",
    "open_upstream",
    "safetensors_shards",
    "upstream_transform",
    "verify_upstream",
]

_MACBYTES = 16
_NONCE_MOD = 1 << 192
MAX_SHARD_INDEX_BYTES = 64 << 20


def is_upstream(index: FileIndex) -> bool:
    """True when ``index`` came from an upstream CoreWeave tensorizer file."""
    return isinstance(index, UpstreamIndex)


# ---- upstream encryption ---------------------------------------------------------------------------


def _derive_keys(index: UpstreamIndex, encryption: Any, uri: str) -> dict[tuple, bytes]:
    """One 32-byte key per distinct key-derivation record in the file (usually exactly one)."""
    from .constants import KEY_ENV
    from .crypto.keys import EncryptionKey, as_key_source

    if encryption is None:
        try:
            encryption = EncryptionKey.from_env(KEY_ENV)
        except MissingKeyError:
            raise MissingKeyError(
                f"{uri} is an encrypted tensorizer file: pass encryption=EncryptionKey(raw) for a key made by "
                f"EncryptionParams.random(), Passphrase(...) for EncryptionParams.from_string(), or set {KEY_ENV}"
            ) from None
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


def upstream_transform(
    index: FileIndex, encryption: Any = None, uri: str = "file"
) -> Callable[[Piece, memoryview], None]:
    """The engine transform that decrypts an upstream file's tensors in place.

    ``TensorDeserializer(..., encryption=...)`` calls this for upstream files; it is public for callers
    that drive the pipeline themselves. Each piece covers whole encryption chunks (the index's
    ``block_size`` is the file's chunk size), and each chunk is checked against its MAC.

    Args:
        index: an upstream index (``read_index`` of an upstream file).
        encryption: ``EncryptionKey``/32 raw bytes (files written with ``EncryptionParams.random()`` or a
            raw key) or ``Passphrase`` (``EncryptionParams.from_string``); ``None`` reads ``HF_TENSORIZER_KEY``.
        uri: for messages.

    Returns:
        ``transform(piece, view)``, safe to call from several reader threads.

    Raises:
        MissingKeyError: no key given or in the environment.
        DecryptionError: a key for an unencrypted file, a key of the wrong kind, or (when the transform
            runs) a chunk that fails authentication: wrong key or tampered data.
    """
    if not isinstance(index, UpstreamIndex):
        raise UsageError("upstream_transform needs the index of an upstream tensorizer file")
    if not index.encrypted:
        raise DecryptionError(f"{uri} is not encrypted, but a key was given: refusing an unauthenticated file")
    from nacl._sodium import ffi, lib  # pynacl's libsodium binding: decrypts straight into the tensor

    keys = _derive_keys(index, encryption, uri)
    local = threading.local()

    def transform(piece: Piece, view: memoryview) -> None:
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
        if scratch is None or len(scratch) < _MACBYTES + min(size, piece.length):
            scratch = local.buf = bytearray(_MACBYTES + size)
        out = ffi.from_buffer("unsigned char[]", view, require_writable=True)
        for k, off in enumerate(range(0, piece.length, size)):
            n = min(size, piece.length - off)
            i = first + k
            scratch[:_MACBYTES] = crypt["macs"][i]
            scratch[_MACBYTES : _MACBYTES + n] = view[off : off + n]
            nonce = ((base + i) % _NONCE_MOD).to_bytes(24, "little")
            if lib.crypto_secretbox_open_easy(out + off, ffi.from_buffer(scratch), _MACBYTES + n, nonce, key) != 0:
                raise DecryptionError(
                    f"tensor {piece.entry.name!r}: encryption chunk {i} failed authentication "
                    "(wrong key or passphrase, or the file was modified)"
                )

    return transform


# ---- upstream helpers ------------------------------------------------------------------------------


def verify_upstream(deserializer: TensorDeserializer) -> None:
    """Check every loaded tensor of an upstream file against its header's CRC32/SHA-256.

    Raises:
        UsageError: not an upstream file, or tensors were cast with ``dtype=``.
        HashMismatchError: naming the tensors whose bytes (or headers) do not match.
    """
    index = deserializer.index
    if not isinstance(index, UpstreamIndex):
        raise UsageError("verify_upstream needs a deserializer of an upstream tensorizer file")
    if deserializer.dtype is not None:
        raise UsageError("upstream hashes cover the stored bytes: verify without dtype=")
    verify_upstream_hashes(index, {n: deserializer[n] for n in deserializer})


def open_upstream(
    source: Any, *, encryption: Any = None, verify_hash: bool = False, **kwargs: Any
) -> TensorDeserializer:
    """Open an upstream tensorizer file through the engine.

    Args:
        source: path, URI or ``Source``.
        encryption: key or passphrase for encrypted files (see :func:`upstream_transform`).
        verify_hash: check upstream's per-tensor CRC32/SHA-256 after loading (the engine's own
            ``verify_hash`` works on hf_tensorizer block digests, which upstream files do not have).
        **kwargs: ``TensorDeserializer`` arguments (``device``, ``filter``, ``num_readers``, ...).

    Raises:
        FormatError: not an upstream file, or a malformed one.
        HashMismatchError: with ``verify_hash``, data does not match.
    """
    d = TensorDeserializer(source, encryption=encryption, **kwargs)
    try:
        if not isinstance(d.index, UpstreamIndex):
            raise FormatError(f"{source!s} is not an upstream tensorizer file")
        if verify_hash:
            verify_upstream(d)
    except BaseException:
        d.close()
        raise
    return d


# ---- safetensors -----------------------------------------------------------------------------------

_SHARD_INDEXES = ("model.safetensors.index.json", "diffusion_pytorch_model.safetensors.index.json")
_SINGLE_FILES = ("model.safetensors", "diffusion_pytorch_model.safetensors")
# The names a stock transformers / diffusers folder keeps its weights under, in the order they are looked for.
SAFETENSORS_NAMES = _SHARD_INDEXES + _SINGLE_FILES


def _join(base: str, name: str) -> str:
    return os.path.join(base, name) if scheme_of(base) == "file" else base.rstrip("/") + "/" + name


def _read_json(uri: str, **options: Any) -> Any:
    with open_source(uri, **options) as src:
        if src.size > MAX_SHARD_INDEX_BYTES:
            raise HeaderTooLargeError(f"{uri}: shard index of {src.size} bytes is too large")
        raw = src.read(0, src.size)
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise FormatError(f"{uri}: not valid UTF-8 JSON: {exc}") from None


def _shards_from_index(index_uri: str, **options: Any) -> tuple[list[str], dict[str, str]]:
    doc = _read_json(index_uri, **options)
    weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise FormatError(f"{index_uri}: no valid weight_map")
    base = os.path.dirname(index_uri) if scheme_of(index_uri) == "file" else index_uri.rsplit("/", 1)[0]
    files: list[str] = []
    for fname in weight_map.values():
        # shard names are plain file names next to the index: no traversal out of the checkpoint
        if fname in ("", ".", "..") or "/" in fname or "\\" in fname or posixpath.normpath(fname) != fname:
            raise FormatError(f"{index_uri}: invalid shard file name {fname!r}")
        if fname not in files:
            files.append(fname)
    return [_join(base, f) for f in files], {k: _join(base, v) for k, v in weight_map.items()}


def safetensors_shards(uri_or_dir: str | os.PathLike[str], **options: Any) -> tuple[list[str], dict[str, str]]:
    """The safetensors files of a checkpoint, in order, and the expected ``tensor -> file`` map.

    Accepts a ``.safetensors`` file, a ``*.safetensors.index.json``, or a directory/URI prefix holding
    ``model.safetensors[.index.json]`` (or the diffusers names); a local directory with neither falls
    back to every ``*.safetensors`` in it. The map is empty when there is no shard index.

    Raises:
        FormatError: malformed shard index or nothing to load.
        SourceError: a remote location that has none of the expected files.
    """
    uri = os.fspath(uri_or_dir)
    if uri.endswith(".json"):
        return _shards_from_index(uri, **options)
    if uri.endswith(".safetensors"):
        return [uri], {}
    if scheme_of(uri) == "file":
        for name in _SHARD_INDEXES:
            if os.path.isfile(os.path.join(uri, name)):
                return _shards_from_index(os.path.join(uri, name))
        for name in _SINGLE_FILES:
            if os.path.isfile(os.path.join(uri, name)):
                return [os.path.join(uri, name)], {}
        found = sorted(f for f in os.listdir(uri) if f.endswith(".safetensors")) if os.path.isdir(uri) else []
        if not found:
            raise FormatError(f"no safetensors files in {uri}")
        return [os.path.join(uri, f) for f in found], {}
    last: Exception | None = None
    for name in _SHARD_INDEXES + _SINGLE_FILES:
        candidate = _join(uri, name)
        try:
            if name.endswith(".json"):
                return _shards_from_index(candidate, **options)
            open_source(candidate, **options).close()
            return [candidate], {}
        except SourceError as exc:
            last = exc
    raise SourceError(f"no safetensors checkpoint at {uri}: {last}")


def iter_safetensors_indexes(uri_or_dir: str | os.PathLike[str], **options: Any) -> Iterator[tuple[str, FileIndex]]:
    """``(shard uri, validated index)`` for every shard of a checkpoint (see :func:`safetensors_shards`)."""
    files, _ = safetensors_shards(uri_or_dir, **options)
    for f in files:
        with open_source(f, **options) as src:
            yield f, read_index(src)


def load_safetensors_state_dict(
    uri_or_dir: str | os.PathLike[str],
    *,
    device: str | torch.device | None = None,
    filter: Callable[[str], bool] | None = None,
    **kwargs: Any,
) -> dict[str, torch.Tensor]:
    """Stream every shard of a safetensors checkpoint through ``TensorDeserializer`` into one dict.

    Args:
        uri_or_dir: file, shard index, local directory, or URI prefix (``http(s)://``, ``s3://``, ``hf://``).
        device: target device of every tensor.
        filter: optional predicate on tensor names; other tensors' bytes are never read.
        **kwargs: ``TensorDeserializer`` and transport arguments (``dtype``, ``num_readers``, ``token``...).

    Returns:
        ``name -> tensor``, in shard order.

    Raises:
        FormatError: a malformed shard, a duplicate tensor across shards, or a tensor the shard index
            promises that its shard lacks.
    """
    files, weight_map = safetensors_shards(uri_or_dir, **_source_options(kwargs))
    out: dict[str, torch.Tensor] = {}
    with reuse_blocks():  # one pinned staging block for all shards, not one each
        for f in files:
            with TensorDeserializer(f, device=device, filter=filter, **kwargs) as d:
                for name in d:
                    if name in out:
                        raise FormatError(f"tensor {name!r} appears in more than one shard ({f})")
                    out[name] = d[name]
    missing = [k for k, v in weight_map.items() if k not in out and (filter is None or filter(k))]
    if missing:
        raise FormatError(f"tensors listed in the shard index are missing from their shards: {missing[:10]}")
    return out


def _source_options(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    engine = {"dtype", "lazy", "verify_hash", "num_readers", "chunk_bytes", "staging_bytes", "strategy", "mmap",
              "transform", "encryption"}  # fmt: skip
    return {k: v for k, v in kwargs.items() if k not in engine}
