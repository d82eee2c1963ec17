"""Overlapping the round trips of many small remote requests (probes, small files, shard headers, uploads)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")

MAX_THREADS = 16


def concurrently(fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
    """``[fn(x) for x in items]`` on up to 16 threads, in order: remote round trips overlap. The first error is
    raised (after the others finished)."""
    if len(items) <= 1:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(min(MAX_THREADS, len(items)), thread_name_prefix="hf_tensorizer-fetch") as pool:
        return list(pool.map(fn, items))
