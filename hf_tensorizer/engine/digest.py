"""Per-block digests of tensor data. Both algorithms release the GIL on large buffers, so reader
threads verify, and writer threads hash, in parallel."""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Callable

from ..format.index import DIGESTS

_CRC32: list[Callable[..., int]] = []  # the implementation, picked on first use (importing isal costs ~10 ms)


def crc32(data: memoryview | bytes, value: int = 0) -> int:
    """CRC-32 of ``data`` (the same polynomial and values as ``zlib.crc32``), with the fastest implementation here.

    ISA-L's (``isal``, a dependency) folds with carry-less multiplies: 4.7 GB/s against zlib 1.2.13's 1.7 GB/s on
    one core of the 2-core dev VM (16 MiB blocks, busy machine); both release the GIL. zlib where the wheel is
    missing.
    """
    if not _CRC32:
        try:
            from isal.isal_zlib import crc32 as fast
        except ImportError:
            fast = zlib.crc32
        _CRC32.append(fast)
    return _CRC32[0](data, value)


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
