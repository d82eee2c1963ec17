"""Read planning and the staging pool: the engine logic every device target shares, checked on CPU.

The pool's fences here are a small real class backed by ``threading.Event``: the same protocol
(``query``/``synchronize``) that CUDA events satisfy on a GPU.
"""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path

import pytest
import torch
from helpers import RecordingSource, assert_same, random_tensor, write_file
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hf_tensorizer import TensorDeserializer, read_index
from hf_tensorizer.engine import staging
from hf_tensorizer.engine.pipeline import Verifier, load_cpu, load_staged
from hf_tensorizer.engine.plan import MAX_GAP, Chunk, Piece, aligned_span, block_of, plan_chunks
from hf_tensorizer.engine.staging import PAGE, StagingPool
from hf_tensorizer.errors import HashMismatchError, TensorizerError
from hf_tensorizer.format import TensorEntry
from hf_tensorizer.sources import FileSource

pytestmark = pytest.mark.timeout(120)
ALLOCATIONS = getattr(staging, "ALLOCATIONS", ("lazy",))  # how the pool makes its buffers
PLAN = settings(deadline=None, database=None, derandomize=True, max_examples=300,
                suppress_health_check=list(HealthCheck))  # fmt: skip


# ---- plan_chunks ---------------------------------------------------------------------------------


@st.composite
def layouts(draw: st.DrawFn) -> list[TensorEntry]:
    """Non-overlapping entries in file order with random sizes (zero included) and gaps."""
    n = draw(st.integers(0, 25))
    pos = draw(st.integers(0, 10_000))
    out = []
    for i in range(n):
        pos += draw(st.one_of(st.integers(0, 100), st.integers(0, 200_000)))
        length = draw(st.one_of(st.integers(0, 64), st.integers(0, 300_000)))
        out.append(TensorEntry(f"t{i}", torch.uint8, (length,), offset=pos, length=length))
        pos += length
    return out


def check_plan(entries: list[TensorEntry], chunks: list[Chunk], unit: int, max_gap: int) -> None:
    covered: dict[str, list[tuple[int, int]]] = {e.name: [] for e in entries}
    prev_end = -1
    for c in chunks:
        assert c.length <= unit, "chunk longer than the unit"
        if c.length:  # an empty tensor's chunk holds no bytes: its offset may repeat its neighbour's
            assert c.offset >= prev_end, "chunks not in file order or overlapping"
            prev_end = c.end
        assert c.pieces, "chunk without pieces"
        last_end = 0
        for j, p in enumerate(c.pieces):
            assert p.chunk_offset >= 0 and p.chunk_offset + p.length <= c.length, "piece outside its chunk"
            assert c.offset + p.chunk_offset == p.entry.offset + p.tensor_offset, "piece maps to the wrong bytes"
            if j:
                assert p.chunk_offset >= last_end, "pieces out of order"
                assert p.chunk_offset - last_end <= max_gap, "gap read inside a chunk exceeds max_gap"
            last_end = p.chunk_offset + p.length
            covered[p.entry.name].append((p.tensor_offset, p.length))
    for e in entries:  # every byte of every tensor exactly once (empty tensors: one empty piece)
        spans = sorted(covered[e.name])
        assert spans, f"{e.name} not planned"
        pos = 0
        for off, n in spans:
            assert off == pos, f"{e.name}: bytes missing or read twice at {pos}"
            pos += n
        assert pos == e.length


@PLAN
@given(entries=layouts(), unit=st.integers(1, 400_000), max_gap=st.sampled_from([0, 1, 4096, MAX_GAP]),
       shuffle=st.randoms(use_true_random=False))  # fmt: skip
def test_plan_chunks_invariants(entries: list[TensorEntry], unit: int, max_gap: int, shuffle: random.Random) -> None:
    unit = max(unit, sum(e.length for e in entries) // 2000 + 1)  # at most a few thousand chunks per case
    given_order = list(entries)
    shuffle.shuffle(given_order)  # any input order
    chunks = plan_chunks(given_order, unit, max_gap=max_gap)
    check_plan(entries, chunks, unit, max_gap)


@PLAN
@given(entries=layouts(), block=st.sampled_from([4096, 65536]))
def test_verifying_plan_has_whole_blocks(entries: list[TensorEntry], block: int) -> None:
    for c in plan_chunks(entries, block):
        for p in c.pieces:
            if p.length:
                assert block_of(p, block) is not None, "a verified piece must be exactly one digest block"


def test_plan_splits_large_tensor_for_concurrency() -> None:
    big = TensorEntry("big", torch.uint8, (10 * 4096 + 5,), offset=4096, length=10 * 4096 + 5)
    chunks = plan_chunks([big], 4096)
    assert len(chunks) == 11 and [c.pieces[0].tensor_offset for c in chunks] == [i * 4096 for i in range(11)]
    assert chunks[-1].length == 5


def test_plan_skips_large_gaps_and_coalesces_small_ones() -> None:
    a = TensorEntry("a", torch.uint8, (10,), offset=0, length=10)
    b = TensorEntry("b", torch.uint8, (10,), offset=100, length=10)
    c = TensorEntry("c", torch.uint8, (10,), offset=100 + 10 + MAX_GAP + 1, length=10)
    chunks = plan_chunks([a, b, c], 1 << 20)
    assert [[p.entry.name for p in ch.pieces] for ch in chunks] == [["a", "b"], ["c"]]
    with pytest.raises(ValueError):
        plan_chunks([a], 0)


def test_block_of() -> None:
    e = TensorEntry("t", torch.uint8, (10_000,), offset=0, length=10_000)
    assert block_of(Piece(e, 0, 0, 4096), 4096) == 0
    assert block_of(Piece(e, 8192, 0, 10_000 - 8192), 4096) == 2
    assert block_of(Piece(e, 4096, 0, 100), 4096) is None  # partial block
    assert block_of(Piece(e, 100, 0, 4096), 4096) is None  # misaligned


@PLAN
@given(offset=st.integers(0, 1 << 40), length=st.integers(0, 1 << 24), align=st.sampled_from([512, 4096, 1 << 16]))
def test_aligned_span(offset: int, length: int, align: int) -> None:
    chunk = Chunk(offset, length)
    start, n = aligned_span(chunk, align, offset + length)
    assert start % align == 0 and n % align == 0
    assert start <= offset and start + n >= chunk.end
    assert offset - start < align and start + n - chunk.end < align


# ---- StagingPool ---------------------------------------------------------------------------------


def alloc(allocation: str) -> dict[str, str]:
    return {} if allocation == "lazy" else {"allocation": allocation}


class ThreadFence:
    """A fence completed later by another thread (what a CUDA event is to a host-to-device copy)."""

    def __init__(self) -> None:
        self.done = threading.Event()

    def query(self) -> bool:
        return self.done.is_set()

    def synchronize(self) -> None:
        self.done.wait()


@pytest.mark.parametrize("allocation", ALLOCATIONS)
def test_pool_cap_alignment_and_fences_under_contention(allocation: str) -> None:
    cap, size = 3, 10_000  # not a page multiple: alignment must not depend on the size
    pool = StagingPool(size, cap, pin=False, **alloc(allocation))
    lock = threading.Lock()
    fence_of: dict[int, ThreadFence | None] = {}  # buffer address -> fence it was released with
    held: set[int] = set()
    problems: list[str] = []
    completers: list[threading.Timer] = []

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(60):
            buf = pool.acquire()
            addr = buf.data_ptr()
            with lock:
                if addr % PAGE:
                    problems.append("buffer not page-aligned")
                if buf.numel() != size:
                    problems.append("wrong buffer size")
                if addr in held:
                    problems.append("buffer handed out twice")
                fence = fence_of.get(addr)
                if fence is not None and not fence.query():
                    problems.append("buffer handed out while its fence is pending")
                held.add(addr)
                if pool.allocated > cap or len(fence_of.keys() | {addr}) > cap:
                    problems.append("cap exceeded")
            buf[:16].fill_(seed)  # the caller owns it: write into it
            time.sleep(rng.random() * 0.001)
            with lock:
                held.discard(addr)
            if rng.random() < 0.7:  # most releases carry a copy that completes later
                fence = ThreadFence()
                with lock:
                    fence_of[addr] = fence
                t = threading.Timer(rng.random() * 0.003, fence.done.set)
                t.start()
                with lock:
                    completers.append(t)
                pool.release(buf, fence)
            else:
                with lock:
                    fence_of[addr] = None
                pool.release(buf)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not problems, problems[:5]
    assert pool.peak_allocated <= cap and len(fence_of) <= cap
    pool.close()
    for t in completers:
        t.join()
    with pytest.raises(TensorizerError, match="closed"):
        pool.acquire()


@pytest.mark.parametrize("allocation", ALLOCATIONS)
def test_pool_waits_for_the_oldest_fence_at_the_cap(allocation: str) -> None:
    pool = StagingPool(PAGE, 2, pin=False, **alloc(allocation))
    a, b = pool.acquire(), pool.acquire()
    fa, fb = ThreadFence(), ThreadFence()
    pool.release(a, fa)
    pool.release(b, fb)
    threading.Timer(0.05, fa.done.set).start()
    c = pool.acquire()  # at the cap, no free buffer: waits for a's fence, then reuses a
    assert fa.query() and not fb.query()
    assert c.data_ptr() == a.data_ptr()
    fb.done.set()
    pool.close()


@pytest.mark.parametrize("allocation", ALLOCATIONS)
def test_stop_event_aborts_a_waiting_acquire(allocation: str) -> None:
    pool = StagingPool(PAGE, 1, pin=False, **alloc(allocation))
    pool.acquire()  # the only buffer, never released (another reader is filling it)
    stop = threading.Event()
    errors: list[BaseException] = []

    def waiter() -> None:
        try:
            pool.acquire(stop)
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=waiter)
    t.start()
    stop.set()
    t.join(timeout=30)
    assert not t.is_alive(), "acquire ignored the stop event"
    assert len(errors) == 1 and isinstance(errors[0], TensorizerError) and "aborted" in str(errors[0])
    pool.close()


def test_close_wakes_a_waiting_acquire_and_drains_fences() -> None:
    pool = StagingPool(PAGE, 1, pin=False)
    buf = pool.acquire()
    errors: list[BaseException] = []

    def waiter() -> None:
        try:
            pool.acquire()
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=waiter)
    t.start()
    time.sleep(0.02)
    fence = ThreadFence()
    pool.release(buf, fence)  # the waiter may now take it only once the fence completed
    threading.Timer(0.05, fence.done.set).start()
    t.join(timeout=30)
    assert not t.is_alive() and not errors and fence.query()

    pool2 = StagingPool(PAGE, 2, pin=False)
    fence2 = ThreadFence()
    pool2.release(pool2.acquire(), fence2)
    threading.Timer(0.05, fence2.done.set).start()
    pool2.close()  # waits for the in-flight copy before dropping the buffer
    assert fence2.query() and pool2.allocated == 0
    pool.close()


def test_reuse_blocks_keeps_one_drained_block_between_pools() -> None:
    """Inside reuse_blocks() a closed pool's huge-page block serves the next pool that fits (what the shards and
    device groups of one from_pretrained do, so each does not pin a block again), only after its fences
    completed; two pools open at once never share one; the outermost scope's end releases it."""

    def block_of(pool: StagingPool) -> object:
        return pool._block

    outside_a = StagingPool(PAGE, 4, pin=False, allocation="hugepage")
    first = block_of(outside_a)
    outside_a.close()
    outside_b = StagingPool(PAGE, 4, pin=False, allocation="hugepage")
    assert block_of(outside_b) is not first and first._map.closed  # no scope: released at close
    outside_b.close()
    with staging.reuse_blocks():
        a = StagingPool(PAGE, 4, pin=False, allocation="hugepage")
        kept = block_of(a)
        fence = ThreadFence()
        a.release(a.acquire(), fence)
        threading.Timer(0.05, fence.done.set).start()
        a.close()  # drains: the fence has completed before the block is parked
        assert fence.query() and not kept._map.closed
        with staging.reuse_blocks():  # nested: still one scope
            b = StagingPool(PAGE, 2, pin=False, allocation="hugepage")  # smaller: fits in the kept block
            assert block_of(b) is kept
            c = StagingPool(PAGE, 2, pin=False, allocation="hugepage")  # b still holds it: c gets its own
            own = block_of(c)
            assert own is not kept
            buf = b.acquire()
            buf.fill_(7)  # the reused block is writable memory
            b.release(buf)
            b.close()
            c.close()  # one block parked at most: c's is released
            assert own._map.closed and staging._parked == [kept]
        big = StagingPool(64 << 20, 1, pin=False, allocation="hugepage")  # larger than the kept block
        assert block_of(big) is not kept
        big.close()
    assert kept._map.closed and not staging._parked  # the outer scope's end released what was kept


def test_pool_rejects_bad_sizes() -> None:
    with pytest.raises(ValueError):
        StagingPool(0, 1, pin=False)
    with pytest.raises(ValueError):
        StagingPool(PAGE, 0, pin=False)


# ---- the staged pipeline on CPU destinations --------------------------------------------------------


@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    """~3 MiB of tensors of mixed sizes: larger than any pool used below."""
    tensors = {f"layer{i}.w": random_tensor(torch.bfloat16, (256, 512), i) for i in range(10)}
    tensors.update({f"layer{i}.b": random_tensor(torch.float32, (7 + i,), 100 + i) for i in range(10)})
    tensors["empty"] = torch.zeros(0, 3)
    path = tmp_path_factory.mktemp("staged") / "model.tensors"
    write_file(path, tensors, block_size=65536)
    return path, tensors


@pytest.mark.parametrize("allocation", ALLOCATIONS)
@pytest.mark.parametrize("direct", [False, True])
@pytest.mark.parametrize("verify", [False, True])
@pytest.mark.parametrize("threads", [1, 4])
def test_load_staged_bounded_by_pool(model_file, direct: bool, verify: bool, threads: int, allocation: str) -> None:  # type: ignore[no-untyped-def]
    path, tensors = model_file
    src = FileSource(path)
    idx = read_index(src)
    entries = idx.data_entries
    unit = 65536  # = the digest block, so verified pieces are whole blocks
    chunks = plan_chunks(entries, unit)
    direct_fd = src.direct_fileno() if direct else None
    if direct and direct_fd is None:
        pytest.skip("this filesystem has no O_DIRECT")
    buffer_bytes = unit + (2 * PAGE if direct else 0)
    max_buffers = 3
    pool = StagingPool(buffer_bytes, max_buffers, pin=False, **alloc(allocation))
    dests = {e.name: torch.empty(e.shape, dtype=e.dtype) for e in entries}
    assert idx.data_bytes > 10 * buffer_bytes * max_buffers  # the model is much larger than the pool
    load_staged(src, chunks, dests, threads=threads, pool=pool, verifier=Verifier(idx) if verify else None,
                direct_fd=direct_fd, file_size=src.size)  # fmt: skip
    assert pool.peak_allocated * buffer_bytes <= max_buffers * buffer_bytes
    assert 1 <= pool.peak_allocated <= max_buffers
    for name, t in tensors.items():
        assert_same(dests[name], t, name)
        assert dests[name].untyped_storage().nbytes() == t.numel() * t.element_size()  # not a pool view
    pool.close()
    src.close()


def test_load_staged_stops_on_corruption(tmp_path: Path) -> None:
    tensors = {f"t{i}": random_tensor(torch.uint8, (65536,), i) for i in range(6)}
    idx = write_file(tmp_path / "c", tensors, block_size=65536)
    with open(tmp_path / "c", "r+b") as f:
        f.seek(idx.tensors["t3"].offset + 100)
        f.write(b"\xff\x00\xff")
    src = FileSource(tmp_path / "c")
    pool = StagingPool(65536, 2, pin=False)
    dests = {e.name: torch.empty(e.shape, dtype=e.dtype) for e in idx.data_entries}
    with pytest.raises(HashMismatchError) as err:
        load_staged(src, plan_chunks(idx.data_entries, 65536), dests, threads=3, pool=pool, verifier=Verifier(idx))
    assert err.value.tensors == ["t3"]
    # every buffer came back, the one holding the bad chunk included
    assert len(pool._free) + len(pool._in_flight) == pool.allocated
    pool.close()
    src.close()


def test_load_cpu_reads_straight_into_tensors(model_file) -> None:  # type: ignore[no-untyped-def]
    path, tensors = model_file
    with RecordingSource(path) as src:
        idx = read_index(src)
        dests = {e.name: torch.empty(e.shape, dtype=e.dtype) for e in idx.data_entries}
        ptrs = {n: t.data_ptr() for n, t in dests.items()}
        load_cpu(src, plan_chunks(idx.data_entries, idx.block_size), dests, threads=2, verifier=Verifier(idx))
        for name, t in tensors.items():
            assert_same(dests[name], t, name)
            assert dests[name].data_ptr() == ptrs[name]  # filled in place, no replacement copy
        data_read = sum(n for o, n in src.ranges if o >= idx.data_offset)
        assert data_read <= idx.file_size - idx.data_offset  # each byte at most once


@pytest.mark.parametrize("allocation", ALLOCATIONS)
def test_deserializer_odirect_pool_respects_staging_bytes(model_file, allocation: str) -> None:  # type: ignore[no-untyped-def]
    path, tensors = model_file
    chunk = 64 << 10
    staging = 8 * chunk  # comfortably above (readers + 1) chunks: the cap must hold
    extra = {} if allocation == "lazy" else {"staging_allocation": allocation}
    with TensorDeserializer(path, strategy="odirect", chunk_bytes=chunk, staging_bytes=staging, num_readers=2,
                            **extra) as d:  # fmt: skip
        for name, t in tensors.items():
            assert_same(d[name], t, name)
        m = d.metrics
    if m.strategy == "odirect":
        assert 0 < m.staging_peak_bytes <= staging
        assert m.bytes > 4 * staging  # the model is larger than the pool


class SlowSource(FileSource):
    """A local file on a slow disk, without O_DIRECT: every read takes a few milliseconds."""

    def direct_fileno(self) -> int | None:
        return None

    def read_into(self, offset: int, buf: memoryview) -> None:
        time.sleep(0.005)
        super().read_into(offset, buf)


def test_deserializer_pool_never_exceeds_a_small_staging_cap(model_file) -> None:  # type: ignore[no-untyped-def]
    path, tensors = model_file
    chunk = 64 << 10
    staging = 2 * chunk  # room for two chunk buffers; four readers must share them, not grow the pool
    with TensorDeserializer(SlowSource(path), strategy="odirect", chunk_bytes=chunk, staging_bytes=staging,
                            num_readers=4) as d:  # fmt: skip
        for name, t in tensors.items():
            assert_same(d[name], t, name)
        assert d.metrics.staging_peak_bytes <= staging
