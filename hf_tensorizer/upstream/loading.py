"""Opening upstream tensorizer files through the engine, and checking their per-tensor hashes."""

from __future__ import annotations

from typing import Any

from ..crypto.keys import KeySpec
from ..engine import TensorDeserializer
from ..engine.memory import as_bytes, host_view
from ..errors import FormatError, HashMismatchError, UsageError
from ..format.index import FileIndex
from .format import UpstreamIndex, hash_matches


def is_upstream(index: FileIndex) -> bool:
    """True when ``index`` came from an upstream CoreWeave tensorizer file."""
    return isinstance(index, UpstreamIndex)


def verify_upstream(deserializer: TensorDeserializer) -> None:
    """Check every loaded tensor of an upstream file against its header's CRC32/SHA-256.

    Upstream hashes cover the per-tensor header and the whole tensor, so they are checked per tensor after
    loading (GPU tensors are copied back to the host).

    Raises:
        UsageError: not an upstream file, or tensors were cast with ``dtype=``.
        HashMismatchError: naming the tensors whose bytes (or headers) do not match.
    """
    index = deserializer.index
    if not isinstance(index, UpstreamIndex):
        raise UsageError("verify_upstream needs a deserializer of an upstream tensorizer file")
    if deserializer.dtype is not None:
        raise UsageError("upstream hashes cover the stored bytes: verify without dtype=")
    bad = []
    for name in deserializer:
        info, entry = index.upstream.get(name), index.tensors[name]
        if info is None:
            continue
        t = deserializer[name]
        data = host_view(as_bytes(t.detach().contiguous().cpu())) if entry.length else memoryview(b"")
        if not hash_matches(info, data):
            bad.append(name)
    if bad:
        raise HashMismatchError(f"upstream hashes do not match for tensors {bad[:10]}", tensors=bad)


def open_upstream(
    source: Any, *, encryption: KeySpec | None = None, verify_hash: bool = False, **kwargs: Any
) -> TensorDeserializer:
    """Open an upstream tensorizer file through the engine.

    Args:
        source: path, URI or ``Source``.
        encryption: key or passphrase for encrypted files (see :func:`~.crypto.upstream_transform`).
        verify_hash: check upstream's per-tensor CRC32/SHA-256 after loading (the engine's own ``verify_hash``
            works on hf_tensorizer block digests, which upstream files do not have).
        **kwargs: ``TensorDeserializer`` arguments (``device``, ``filter``, ``num_readers``, ...).

    Returns:
        The open deserializer (close it, or use it as a context manager).

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
