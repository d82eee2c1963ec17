"""Staging blocks made ahead of a load (issue 12): what waits for what, with real blocks and real threads.

On a GPU the block is page-locked (and the thread creates the CUDA context); the ordering is the same for an
unpinned block, which is what runs here. The CUDA path itself is in tests/test_cuda.py and the GPU script.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from hf_tensorizer import constants
from hf_tensorizer.engine import prewarm as prewarm_module
from hf_tensorizer.engine import staging
from hf_tensorizer.engine.prewarm import prewarm, staging_estimate
from hf_tensorizer.engine.staging import StagingPool, footprint, pool_shape, prewarm_block, reuse_blocks

MiB = 1 << 20


@pytest.fixture(autouse=True)
def _clean() -> Iterator[None]:
    """No parked or warming block leaks between tests."""
    yield
    for thread in list(staging._warming.values()):
        thread.join(5)
    with staging._park_lock:
        blocks, staging._parked[:] = list(staging._parked), []
        staging._prewarmed.clear()
    for block in blocks:
        block.close()


class _Made:
    """Counts the blocks made, and holds the prewarm thread's block back until ``release`` is set."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, *, fail: bool = False) -> None:
        self.blocks: list[Any] = []
        self.release = threading.Event()
        real = staging._HostBlock

        def make(nbytes: int, *, pin: bool) -> Any:
            if threading.current_thread().name == "hf_tensorizer-prewarm":
                assert self.release.wait(10)
                if fail:
                    raise OSError("no memory for the block")
            block = real(nbytes, pin=pin)
            self.blocks.append(block)
            return block

        monkeypatch.setattr(staging, "_HostBlock", make)


def _pool(nbytes: int) -> StagingPool:
    return StagingPool(nbytes // 4, 4, pin=False, allocation="hugepage")


def test_a_pool_waits_for_the_block_being_made_and_takes_it(monkeypatch: pytest.MonkeyPatch) -> None:
    made = _Made(monkeypatch)
    warming = prewarm_block(8 * MiB, pin=False)
    assert warming is not None
    pools: list[StagingPool] = []
    taker = threading.Thread(target=lambda: pools.append(_pool(8 * MiB)))
    taker.start()
    time.sleep(0.2)
    assert not pools  # the pool is waiting for the block, not making a second one
    made.release.set()
    taker.join(10)
    assert len(pools) == 1 and len(made.blocks) == 1
    assert pools[0]._block is made.blocks[0]
    assert not staging._parked and not staging._prewarmed
    pools[0].close()


def test_no_second_block_while_one_is_made_or_parked(monkeypatch: pytest.MonkeyPatch) -> None:
    made = _Made(monkeypatch)
    first = prewarm_block(8 * MiB, pin=False)
    assert first is not None
    assert prewarm_block(4 * MiB, pin=False) is None  # one is being made
    made.release.set()
    first.join(10)
    assert prewarm_block(8 * MiB, pin=False) is None  # a big enough one is parked
    assert prewarm_block(16 * MiB, pin=False) is not None  # too small for this load: a bigger one is made
    assert len(staging._warming) <= 1


def test_a_pool_that_needs_more_makes_its_own_and_the_block_expires(monkeypatch: pytest.MonkeyPatch) -> None:
    made = _Made(monkeypatch)
    made.release.set()
    monkeypatch.setattr(staging, "PREWARM_TTL_S", 0.3)
    prewarm_block(2 * MiB, pin=False).join(10)  # type: ignore[union-attr]
    pool = _pool(8 * MiB)
    assert pool._block is not made.blocks[0] and len(made.blocks) == 2
    pool.close()
    deadline = time.monotonic() + 5
    while staging._parked and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not staging._parked and not staging._prewarmed  # nobody took it: released


def test_a_failed_prewarm_costs_nothing_but_the_attempt(monkeypatch: pytest.MonkeyPatch) -> None:
    made = _Made(monkeypatch, fail=True)
    warming = prewarm_block(8 * MiB, pin=False)
    made.release.set()
    assert warming is not None
    warming.join(10)
    assert not staging._warming and not staging._parked
    pool = _pool(8 * MiB)  # makes its own block, no error
    assert len(made.blocks) == 1 and pool._block is made.blocks[0]
    pool.close()


def test_the_block_of_a_load_is_the_one_kept_for_its_other_groups(monkeypatch: pytest.MonkeyPatch) -> None:
    made = _Made(monkeypatch)
    made.release.set()
    with reuse_blocks():
        prewarm_block(8 * MiB, pin=False).join(10)  # type: ignore[union-attr]
        for _ in range(3):  # three shards / device groups of one load
            _pool(8 * MiB).close()
        assert len(made.blocks) == 1
    assert not staging._parked


def test_prewarm_starts_nothing_without_a_gpu_or_when_switched_off(monkeypatch: pytest.MonkeyPatch) -> None:
    assert prewarm("cpu") is None
    if not torch.cuda.is_available():
        assert prewarm("cuda") is None
    monkeypatch.setattr(constants, "PREWARM", 0)
    assert prewarm("cuda:0") is None
    assert prewarm_module.prewarm(0) is None


def test_the_estimate_is_the_block_a_default_load_makes() -> None:
    """What prewarm makes is what the reader's pool asks for (same shape), so the pool takes it."""
    readers = 6
    buffer, count = pool_shape(constants.CHUNK_BYTES, readers, constants.STAGING_BYTES)
    assert staging_estimate(num_readers=readers) == footprint(buffer, count) == (readers + 2) * constants.CHUNK_BYTES
    assert staging_estimate(chunk_bytes=3 * MiB, num_readers=2, staging_bytes=8 * MiB) == 2 * 4 * MiB  # capped
