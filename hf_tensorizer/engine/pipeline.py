"""The load pipeline: reader threads take chunks, read, verify, and hand bytes to the target.

Targets:
- ``cpu``: bytes are read straight into the final tensors' memory (scatter reads, no staging copy).
- ``cuda`` with ``pread``/``odirect``: each thread reads a chunk into a staging buffer from the
  bounded pool and issues asynchronous host-to-device copies on its own CUDA stream; an event recorded
  after them is the buffer's fence, so the buffer is reused only once its copies finished.
- ``cuda`` with ``register``: the file is memory-mapped and each chunk's page-cache pages are pinned in
  place (``cudaHostRegister``) and copied to the device with no CPU copy; pages are unpinned once the
  copy's event completed.
"""

from __future__ import annotations

import contextvars
import mmap
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

import torch

from ..errors import HashMismatchError, TensorizerError, TruncatedFileError
from ..format.index import FileIndex
from ..sources import Source
from .digest import digest_fn
from .memory import IO_ALIGN as PAGE
from .memory import as_bytes, host_view, populate_for_write
from .plan import Chunk, Piece, aligned_span, block_of

if TYPE_CHECKING:  # the staging pool is the CUDA paths' only: a CPU load does not import it
    from .staging import StagingPool

Transform = Callable[[Piece, memoryview], None]  # in-place per-piece step (decryption, hf_tensorizer.crypto)


@dataclass
class StageTimes:
    """Busy seconds per stage, summed over reader threads."""

    read: float = 0.0
    verify: float = 0.0
    transform: float = 0.0
    copy: float = 0.0
    wait: float = 0.0

    def add(self, other: StageTimes) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


@dataclass
class LoadMetrics:
    """What a load did and how fast. GB/s per stage = bytes / (busy seconds / threads)."""

    bytes: int = 0
    tensors: int = 0
    seconds: float = 0.0
    threads: int = 1
    strategy: str = ""
    chunks: int = 0
    staging_peak_bytes: int = 0
    bytes_read: int = 0  # from the source by this process (gaps included; a replicated load's share)
    exchange_seconds: float = 0.0  # replicated loads: waiting for and exchanging with the other ranks
    resident: float | None = None  # sampled share of a local file in the page cache at the start (None: not probed)
    stages: StageTimes = field(default_factory=StageTimes)
    transfer: dict[str, Any] = field(default_factory=dict)  # remote sources: mode, concurrency, reason (tuning.py)

    @property
    def gbps(self) -> float:
        return self.bytes / self.seconds / 1e9 if self.seconds > 0 else 0.0

    def stage_gbps(self, stage: str) -> float:
        busy = getattr(self.stages, stage) / max(1, self.threads)
        return self.bytes / busy / 1e9 if busy > 0 else float("inf")

    def as_dict(self) -> dict[str, float | int | str]:
        out: dict[str, float | int | str] = {
            "bytes": self.bytes, "tensors": self.tensors, "seconds": round(self.seconds, 6),
            "gbps": round(self.gbps, 3), "threads": self.threads, "strategy": self.strategy,
            "chunks": self.chunks, "staging_peak_bytes": self.staging_peak_bytes, "bytes_read": self.bytes_read,
            "exchange_seconds": round(self.exchange_seconds, 6),
        }  # fmt: skip
        if self.resident is not None:
            out["resident"] = round(self.resident, 3)
        if self.transfer:
            out.update({f"transfer_{k}": self.transfer[k] for k in ("mode", "concurrency", "reason")})
        for stage in (f.name for f in fields(self.stages)):
            busy = getattr(self.stages, stage)
            out[f"{stage}_busy_s"] = round(busy, 6)
            if busy > 0:
                out[f"{stage}_gbps"] = round(self.stage_gbps(stage), 3)
        return out


class Verifier:
    """Checks pieces against the index's per-block digests."""

    def __init__(self, index: FileIndex) -> None:
        self.block_size = index.block_size
        self.algorithm = index.digest
        self._fn = digest_fn(index.digest)

    def check(self, piece: Piece, data: memoryview) -> None:
        if self.algorithm == "none" or piece.length == 0:
            return
        block = block_of(piece, self.block_size)
        if block is None:  # the plan guarantees whole blocks when verifying
            raise TensorizerError(f"internal: piece of {piece.entry.name!r} is not a whole digest block")
        if self._fn(data) != piece.entry.digests[block]:
            raise HashMismatchError(
                f"tensor {piece.entry.name!r}: data block {block} does not match its {self.algorithm} digest",
                tensors=[piece.entry.name],
            )


class ChunkQueue:
    """Shared state of one load: the chunk queue, the first error, and per-thread timings."""

    def __init__(self, chunks: Sequence[Chunk]) -> None:
        self.chunks = chunks
        self._next = 0
        self._lock = threading.Lock()
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.times: list[StageTimes] = []

    def take(self) -> Chunk | None:
        with self._lock:
            if self.stop.is_set() or self._next >= len(self.chunks):
                return None
            c = self.chunks[self._next]
            self._next += 1
            return c

    def fail(self, exc: BaseException) -> None:
        with self._lock:
            if self.error is None:
                self.error = exc
        self.stop.set()


def run_threads(work: ChunkQueue, n: int, body: Callable[[int, StageTimes], None]) -> None:
    """Run ``body(thread_index, times)`` on ``n`` threads; re-raise the first failure here."""

    def main(i: int) -> None:
        times = StageTimes()
        try:
            body(i, times)
        except BaseException as exc:
            work.fail(exc)
        finally:
            with work._lock:
                work.times.append(times)

    if n == 1:
        main(0)
    else:
        # each reader runs in a copy of the caller's context: a source's deferred checks (Source.deferred_checks)
        # cover the reads of the threads a load starts
        threads = [threading.Thread(target=contextvars.copy_context().run, args=(main, i),
                                    name=f"hf-tensorizer-read-{i}") for i in range(n)]  # fmt: skip
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    if work.error is not None:
        raise work.error


# ---- CPU target --------------------------------------------------------------------------------------


def load_cpu(
    source: Source,
    chunks: Sequence[Chunk],
    dests: dict[str, torch.Tensor],
    *,
    threads: int,
    verifier: Verifier | None,
    transform: Transform | None = None,
) -> StageTimes:
    """Read every chunk straight into the destination tensors (``dests`` maps entry name to tensor)."""
    work = ChunkQueue(chunks)
    views = {name: host_view(t) for name, t in dests.items()}
    scratch = memoryview(bytearray(64 << 10))  # gap bytes between coalesced tensors: read and dropped

    def body(_: int, times: StageTimes) -> None:
        while (chunk := work.take()) is not None:
            iov: list[memoryview] = []
            pos = 0
            targets = []
            for p in chunk.pieces:
                gap = p.chunk_offset - pos
                while gap > 0:
                    k = min(gap, len(scratch))
                    iov.append(scratch[:k])
                    gap -= k
                view = views[p.entry.name][p.tensor_offset : p.tensor_offset + p.length]
                iov.append(view)
                targets.append((p, view))
                pos = p.chunk_offset + p.length
            t0 = time.perf_counter()
            for _, view in targets:
                populate_for_write(view)
            if chunk.length:
                source.read_into_many(chunk.offset, iov)
            t1 = time.perf_counter()
            times.read += t1 - t0
            for p, view in targets:
                if transform is not None:
                    transform(p, view)
                if verifier is not None:
                    verifier.check(p, view)
            times.verify += time.perf_counter() - t1

    run_threads(work, min(threads, max(1, len(chunks))), body)
    return _sum(work.times)


# ---- CUDA target through staging ---------------------------------------------------------------------


def load_staged(
    source: Source,
    chunks: Sequence[Chunk],
    dests: dict[str, torch.Tensor],
    *,
    threads: int,
    pool: StagingPool,
    verifier: Verifier | None,
    transform: Transform | None = None,
    direct_fd: int | None = None,
    file_size: int = 0,
) -> StageTimes:
    """Read chunks into pooled staging buffers and copy them to the device tensors asynchronously.

    With ``direct_fd`` (an O_DIRECT descriptor of a local file) reads are widened to page boundaries and
    bypass the page cache; otherwise ``source.read_into`` is used. Each buffer keeps one CUDA event for
    its whole life (re-recorded per chunk): creating events per chunk costs driver calls under the GIL.
    """
    device = next(iter(dests.values())).device if dests else torch.device("cpu")
    is_cuda = device.type == "cuda"
    flat = {name: as_bytes(t) for name, t in dests.items()}
    events: dict[int, torch.cuda.Event] = {}
    work = ChunkQueue(chunks)

    def run_chunks(stream: torch.cuda.Stream | None, times: StageTimes) -> None:
        while (chunk := work.take()) is not None:
            t0 = time.perf_counter()
            buf = pool.acquire(work.stop)
            fence = None
            try:  # the buffer goes back to the pool on every path, fenced once a copy was issued
                host = pool.view(buf)
                t1 = time.perf_counter()
                times.wait += t1 - t0
                base = _read_chunk(source, chunk, host, direct_fd, file_size)
                t2 = time.perf_counter()
                times.read += t2 - t1
                for p in chunk.pieces if transform is not None or verifier is not None else ():
                    data = host[base + p.chunk_offset : base + p.chunk_offset + p.length]
                    if transform is not None:
                        transform(p, data)
                        t_dec = time.perf_counter()
                        times.transform += t_dec - t2
                        t2 = t_dec
                    if verifier is not None:
                        verifier.check(p, data)
                t3 = time.perf_counter()
                times.verify += t3 - t2
                if stream is not None:
                    event = events.get(buf.data_ptr()) or events.setdefault(buf.data_ptr(), torch.cuda.Event())
                    _copy_pieces(chunk, buf, base, flat, event)
                    fence = event
                else:
                    _copy_pieces(chunk, buf, base, flat, None)
                times.copy += time.perf_counter() - t3
            finally:
                pool.release(buf, fence)

    def body(i: int, times: StageTimes) -> None:
        if not is_cuda:
            run_chunks(None, times)
            return
        stream = torch.cuda.Stream(device=device)
        with torch.cuda.stream(stream):  # one stream per reader: its copies overlap the others' reads
            run_chunks(stream, times)
        stream.synchronize()

    run_threads(work, min(threads, max(1, len(chunks))), body)
    pool.drain()
    return _sum(work.times)


def _read_chunk(source: Source, chunk: Chunk, host: memoryview, direct_fd: int | None, file_size: int) -> int:
    """Fill ``host`` with the chunk; returns where the chunk starts inside it."""
    if not chunk.length:
        return 0
    if direct_fd is None:
        source.read_into(chunk.offset, host[: chunk.length])
        return 0
    start, length = aligned_span(chunk, PAGE, file_size)
    view = host[:length]
    got = 0
    try:
        while got < length:  # O_DIRECT: aligned offset, aligned buffer, aligned length; short only at EOF
            n = os.preadv(direct_fd, [view[got:]], start + got)
            if n == 0:
                break
            got += n
    except OSError:  # a filesystem that accepts O_DIRECT at open but not for this read: use the page cache
        source.read_into(chunk.offset, host[: chunk.length])
        return 0
    if got < chunk.end - start:
        raise TruncatedFileError(f"{source.uri} ends before offset {chunk.end}")
    return chunk.offset - start


def _copy_pieces(
    chunk: Chunk, buf: torch.Tensor, base: int, flat: dict[str, torch.Tensor], event: torch.cuda.Event | None
) -> None:
    """Copy each piece from ``buf`` to its tensor. With an ``event`` the copies are asynchronous on the
    current stream and the event is recorded after them; without one (CPU targets) they are synchronous."""
    for p in chunk.pieces:
        if p.length:
            flat[p.entry.name][p.tensor_offset : p.tensor_offset + p.length].copy_(
                buf[base + p.chunk_offset : base + p.chunk_offset + p.length], non_blocking=event is not None
            )
    if event is not None:
        event.record()


# ---- CUDA target from registered page cache ---------------------------------------------------------

_HOST_REGISTER_FLAGS = 8 | 2  # cudaHostRegisterReadOnly | cudaHostRegisterMapped (the file map is read-only)


def load_registered(
    fd: int, file_size: int, windows: Sequence[Chunk], dests: dict[str, torch.Tensor], *, threads: int
) -> StageTimes:
    """Copy straight from the page cache: map the file, pin each window's pages in place, DMA, unpin.

    ``windows`` come from ``plan_windows``: page-aligned and disjoint, since a page cannot be pinned twice.
    """
    mm = mmap.mmap(fd, file_size, prot=mmap.PROT_READ)
    mapped_end = -(-file_size // PAGE) * PAGE
    held = {"file": torch.frombuffer(mm, dtype=torch.uint8)}  # a view of the map; dropped before mm.close()
    base_addr = held["file"].data_ptr()
    cudart = torch.cuda.cudart()
    device = next(iter(dests.values())).device
    flat = {name: as_bytes(t) for name, t in dests.items()}
    work = ChunkQueue(windows)

    def unpin(event: torch.cuda.Event, addr: int) -> None:
        event.synchronize()  # a never-recorded event returns at once
        cudart.cudaHostUnregister(addr)

    def body(_: int, times: StageTimes) -> None:
        stream = torch.cuda.Stream(device=device)
        pending: list[tuple[torch.cuda.Event, int]] = []
        try:
            while (w := work.take()) is not None:
                length = min(-(-w.length // PAGE) * PAGE, mapped_end - w.offset)
                t0 = time.perf_counter()
                err = int(cudart.cudaHostRegister(base_addr + w.offset, length, _HOST_REGISTER_FLAGS))
                if err != 0:
                    clear = getattr(cudart, "cudaGetLastError", None)
                    if clear is not None:  # the failed call's error must not surface in a later, unrelated check
                        clear()
                    raise TensorizerError(f"cudaHostRegister of {length} bytes at {w.offset} failed: error {err}")
                t1 = time.perf_counter()
                times.read += t1 - t0
                event = torch.cuda.Event()
                pending.append((event, base_addr + w.offset))  # unpinned in `finally` whatever happens next
                with torch.cuda.stream(stream):
                    _copy_pieces(w, held["file"], w.offset, flat, event)
                times.copy += time.perf_counter() - t1
                while len(pending) > 2:
                    unpin(*pending.pop(0))
        finally:
            for item in pending:
                unpin(*item)

    try:
        run_threads(work, min(threads, max(1, len(windows))), body)
    finally:
        held.clear()
        flat.clear()
        try:
            mm.close()
        except BufferError:  # a view escaped somewhere; the map is freed with it
            pass
    return _sum(work.times)


def _sum(parts: list[StageTimes]) -> StageTimes:
    total = StageTimes()
    for p in parts:
        total.add(p)
    return total
