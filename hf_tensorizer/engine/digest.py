"""Per-block digests of tensor data. Both algorithms release the GIL on large buffers, so reader
threads verify, and writer threads hash, in parallel."""

from __future__ import annotations

import hashlib
from collections.abc import Callable

from ..format.checksum import crc32
from ..format.index import DIGESTS

__all__ = ["crc32", "digest_fn", "placeholder"]


def digest_fn(algorithm: str) -> Callable[[memoryview], str]:
    """A function mapping one block's bytes to its hex digest as stored in the index."""
    if algorithm == "crc32":
        return lambda b: f"{crc32(b) & 0xFFFFFFFF:08x}"
    if algorithm == "sha256":
        return lambda b: hashlib.sha256(b).hexdigest()
    if algorithm == "none":
        return lambda b: ""
    raise ValueError(f"unknown digest algorithm {algorithm!r}; choose one of {sorted(DIGESTS)}")


def placeholder(algorithm: str) -> str:
    """A digest of the right width, used while the layout is computed before data is hashed."""
    return "0" * DIGESTS[algorithm]
