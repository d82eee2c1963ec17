"""A bounded pool of host staging buffers (pinned when the target is a GPU).

A buffer handed to an asynchronous device copy may only be reused once that copy has finished, so it
comes back to the pool together with a *fence* (a CUDA event). The pool never holds more than
``max_buffers`` buffers, which bounds the extra host memory of a load whatever the model size.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections import deque
from collections.abc import Iterator
from typing import Protocol

import torch

from ..errors import TensorizerError
from .memory import IO_ALIGN

PAGE = IO_ALIGN  # O_DIRECT reads need buffers, offsets and lengths aligned to this
PREWARM_TTL_S = 30.0  # a block made ahead of a load that no load takes within this is released

log = logging.getLogger(__name__)


class Fence(Protocol):
    """Completion of work that still reads a staging buffer (``torch.cuda.Event`` satisfies this)."""

    def query(self) -> bool: ...

    def synchronize(self) -> None: ...


ALLOCATIONS = ("lazy", "block", "hugepage")


class _HostBlock:
    """One anonymous mapping backed by transparent huge pages, optionally pinned with cudaHostRegister.

    Pinning 2 MiB pages costs far less than pinning 4 KiB ones (measured on an H200 machine: 288 MiB in
    0.068 s, against 0.129 s for torch's pinned allocations), and touching one byte per huge page up front
    faults the whole block in at once instead of page by page under the reader threads.
    """

    def __init__(self, nbytes: int, *, pin: bool) -> None:
        import mmap

        self.nbytes = -(-nbytes // (2 << 20)) * (2 << 20)
        self._map = mmap.mmap(-1, self.nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        try:
            self._map.madvise(getattr(mmap, "MADV_HUGEPAGE", 14))
        except (OSError, ValueError):
            pass
        self.tensor = torch.frombuffer(self._map, dtype=torch.uint8)
        self.tensor[:: 2 << 20].zero_()  # fault every huge page now (one write per page)
        self._registered = False
        self.pin = pin
        self.device = torch.cuda.current_device() if pin else None  # registration is per CUDA context
        if pin:
            err = int(torch.cuda.cudart().cudaHostRegister(self.tensor.data_ptr(), self.nbytes, 0))
            if err != 0:
                raise TensorizerError(f"cudaHostRegister of the {self.nbytes}-byte staging block failed: {err}")
            self._registered = True

    def close(self) -> None:
        if self._registered:
            torch.cuda.cudart().cudaHostUnregister(self.tensor.data_ptr())
            self._registered = False
        del self.tensor
        try:
            self._map.close()
        except BufferError:  # a slice is still referenced somewhere; the mapping goes with it
            pass


# Within reuse_blocks(), a closed pool's huge-page block waits here for the next pool instead of being unpinned
# and unmapped: the shards and device groups of one from_pretrained would otherwise pin a block each
# (0.03-0.07 s apiece on an H200). At most one block is kept; the outermost scope's end releases it.
_parked: list[_HostBlock] = []
_reuse_depth = 0
_park_lock = threading.Lock()


@contextlib.contextmanager
def reuse_blocks() -> Iterator[None]:
    """Keep one pinned staging block alive between the loads inside this block (nestable, any thread)."""
    global _reuse_depth
    with _park_lock:
        _reuse_depth += 1
    try:
        yield
    finally:
        with _park_lock:
            _reuse_depth -= 1
            release = list(_parked) if _reuse_depth == 0 else []
            if release:
                _parked.clear()
        for block in release:
            block.close()


def pool_shape(longest_chunk: int, readers: int, staging_bytes: int, chunks: int | None = None) -> tuple[int, int]:
    """``(buffer_bytes, max_buffers)`` of a load's pool: one buffer per reader plus two spare (a copy out of a buffer
    takes far less time than filling it), each a power of two (torch rounds pinned sizes up to one), within the
    staging cap and never more buffers than chunks."""
    buffer_bytes = 1 << max(12, (longest_chunk - 1).bit_length())
    count = min(readers + 2, staging_bytes // buffer_bytes, chunks if chunks is not None else readers + 2)
    return buffer_bytes, max(1, count)


def footprint(buffer_bytes: int, max_buffers: int) -> int:
    """Bytes of the one allocation a ``"block"``/``"hugepage"`` pool carves its buffers from (page-aligned)."""
    return -(-buffer_bytes // PAGE) * PAGE * max_buffers


# Blocks being made ahead of a load (prewarm_block), per (pin, device): a pool for the same device waits for that
# block instead of making (and pinning, under the driver lock) a second one. Made blocks wait in _parked.
_warming: dict[tuple[bool, int | None], threading.Thread] = {}
_prewarmed: set[int] = set()  # ids of parked blocks that came from prewarm_block and no pool took yet


def prewarm_block(nbytes: int, *, pin: bool, device: int | None = None) -> threading.Thread | None:
    """Make (and, with ``pin``, page-lock) a staging block of at least ``nbytes`` on a background thread.

    Pinning holds the CUDA driver lock and stalls every copy running meanwhile; started when a load is known (before
    its index is read, or while ``from_pretrained`` builds the model on meta) it is done before the first copy. The
    next pool for the same device takes the block, waiting for it if it is still being made; a block no pool takes
    within ``PREWARM_TTL_S`` is released. Failures are logged, never raised: the pool then makes its own block.

    Args:
        nbytes: the block size (rounded up to 2 MiB pages).
        pin: page-lock it for ``device`` (which also creates that device's CUDA context on the thread).
        device: the CUDA device index; ``None`` for an unpinned block.

    Returns:
        The thread making the block, or ``None`` when a big enough block is parked or being made already.
    """
    key = (pin, device if pin else None)
    with _park_lock:
        if key in _warming or any(b.nbytes >= nbytes and (b.pin, b.device) == key for b in _parked):
            return None
        thread = threading.Thread(target=_warm, args=(nbytes, key), name="hf_tensorizer-prewarm", daemon=True)
        _warming[key] = thread
    thread.start()
    return thread


def _warm(nbytes: int, key: tuple[bool, int | None]) -> None:
    pin, device = key
    block = None
    try:
        if pin:
            torch.cuda.set_device(device)  # this thread's current device: the block registers for it
        block = _HostBlock(nbytes, pin=pin)
    except Exception as exc:  # the load makes its own block, as without prewarming
        log.debug("staging block prewarm failed: %s", exc)
    finally:
        with _park_lock:
            _warming.pop(key, None)
            if block is not None:
                _parked.append(block)
                _prewarmed.add(id(block))
    if block is not None:
        timer = threading.Timer(PREWARM_TTL_S, _expire, args=(block,))
        timer.daemon = True
        timer.start()


def _expire(block: _HostBlock) -> None:
    """Release a prewarmed block that no pool took."""
    with _park_lock:
        if id(block) not in _prewarmed or not any(b is block for b in _parked):
            return
        _prewarmed.discard(id(block))
        _parked[:] = [b for b in _parked if b is not block]
    block.close()


def _take_block(nbytes: int, pin: bool) -> _HostBlock:
    """The parked block when it is big enough and pinned for the current device, else a new one. A block being
    made ahead of this load (:func:`prewarm_block`) is waited for first."""
    device = torch.cuda.current_device() if pin else None
    with _park_lock:
        warming = _warming.get((pin, device))
    if warming is not None:
        warming.join()
    with _park_lock:
        for i, block in enumerate(_parked):
            if block.nbytes >= nbytes and block.device == device and block.pin == pin:
                _prewarmed.discard(id(block))
                return _parked.pop(i)
    return _HostBlock(nbytes, pin=pin)


def _give_back_block(block: _HostBlock) -> None:
    """Park ``block`` for the next pool inside reuse_blocks(), else release it."""
    with _park_lock:
        if _reuse_depth > 0 and not _parked:
            _parked.append(block)
            return
    block.close()


class StagingPool:
    """Host buffers of ``buffer_bytes`` each, at most ``max_buffers`` of them.

    Buffers start on a page boundary (O_DIRECT needs it). ``acquire`` prefers a free buffer, then a new
    one while under the cap, then waits for the oldest in-flight fence.

    How buffers come to exist (``allocation``) matters on a GPU, since pinning memory holds a driver lock
    that stalls every other thread's copies while it runs:

    - ``"lazy"``: one ``torch.empty(pin_memory=True)`` per buffer, when first needed;
    - ``"block"``: all buffers carved from one pinned allocation made up front;
    - ``"hugepage"``: one huge-page mapping made up front and pinned in place with ``cudaHostRegister``.

    Closing the pool unpins and unmaps a ``"hugepage"`` block; ``"lazy"`` and ``"block"`` buffers go back to
    torch's pinned-memory cache, where the next load (or anything else in the process) reuses them.

    Args:
        buffer_bytes: size of each buffer.
        max_buffers: the cap; the pool's footprint is at most ``buffer_bytes * max_buffers``.
        pin: page-locked memory (requires CUDA); plain memory otherwise.
        allocation: ``"lazy"``, ``"block"`` or ``"hugepage"`` (see above).
    """

    def __init__(self, buffer_bytes: int, max_buffers: int, *, pin: bool, allocation: str = "lazy") -> None:
        if buffer_bytes <= 0 or max_buffers <= 0:
            raise ValueError("buffer_bytes and max_buffers must be positive")
        if allocation not in ALLOCATIONS:
            raise ValueError(f"allocation must be one of {ALLOCATIONS}, got {allocation!r}")
        self.buffer_bytes = buffer_bytes
        self.max_buffers = max_buffers
        self.pin = pin
        self.allocation = allocation
        self._free: list[torch.Tensor] = []
        self._in_flight: deque[tuple[Fence, torch.Tensor]] = deque()
        self._allocated = 0
        self._cond = threading.Condition()
        self._closed = False
        self._views: dict[int, memoryview] = {}
        self._block: _HostBlock | None = None
        self.peak_allocated = 0
        if allocation != "lazy":
            self._carve()

    @property
    def allocated(self) -> int:
        """How many buffers exist now."""
        return self._allocated

    def _carve(self) -> None:
        """Make every buffer now, as slices of one allocation."""
        stride = -(-self.buffer_bytes // PAGE) * PAGE
        total = footprint(self.buffer_bytes, self.max_buffers)
        if self.allocation == "hugepage":
            self._block = _take_block(total, self.pin)
            whole = self._block.tensor
        else:
            whole = self._aligned(total)
        self._free = [whole[i * stride : i * stride + self.buffer_bytes] for i in range(self.max_buffers)]
        self._allocated = self.peak_allocated = self.max_buffers

    def _aligned(self, nbytes: int) -> torch.Tensor:
        if self.pin:
            # cudaHostAlloc memory is page-aligned already; torch rounds pinned sizes up to a power of two
            buf = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
            if buf.data_ptr() % PAGE == 0:
                return buf
            del buf
        raw = torch.empty(nbytes + PAGE, dtype=torch.uint8, pin_memory=self.pin)
        skip = (-raw.data_ptr()) % PAGE
        return raw[skip : skip + nbytes]

    def _new_buffer(self) -> torch.Tensor:
        return self._aligned(self.buffer_bytes)

    def view(self, buf: torch.Tensor) -> memoryview:
        """A cached writable memoryview of a pool buffer (building one costs more than reading 4 KiB)."""
        key = buf.data_ptr()
        v = self._views.get(key)
        if v is None:
            from .memory import host_view

            v = self._views[key] = host_view(buf)
        return v

    def acquire(self, stop: threading.Event | None = None) -> torch.Tensor:
        """A buffer for the caller's exclusive use until it is released.

        Raises:
            TensorizerError: the pool was closed, or ``stop`` was set while waiting (another reader failed).
        """
        while True:
            with self._cond:
                if self._closed:
                    raise TensorizerError("staging pool is closed")
                while self._in_flight and self._in_flight[0][0].query():
                    self._free.append(self._in_flight.popleft()[1])
                if self._free:
                    return self._free.pop()
                if self._allocated < self.max_buffers:
                    self._allocated += 1
                    self.peak_allocated = max(self.peak_allocated, self._allocated)
                    grow = True
                elif self._in_flight:
                    fence, buf = self._in_flight.popleft()
                    grow = False
                else:  # every buffer is being filled by another reader
                    self._cond.wait(timeout=0.05)
                    if stop is not None and stop.is_set():
                        raise TensorizerError("load aborted")
                    continue
            if grow:
                try:
                    return self._new_buffer()
                except BaseException:
                    with self._cond:
                        self._allocated -= 1
                    raise
            fence.synchronize()
            return buf

    def release(self, buf: torch.Tensor, fence: Fence | None = None) -> None:
        """Give ``buf`` back; with a ``fence`` it is reused only after the fence completed."""
        with self._cond:
            if fence is None:
                self._free.append(buf)
            else:
                self._in_flight.append((fence, buf))
            self._cond.notify()

    def drain(self) -> None:
        """Wait for every in-flight fence."""
        with self._cond:
            pending = list(self._in_flight)
        for fence, _ in pending:
            fence.synchronize()

    def close(self) -> None:
        """Wait for in-flight copies, then drop every buffer and unpin what the pool pinned itself."""
        self.drain()
        with self._cond:
            self._closed = True
            self._free.clear()
            self._in_flight.clear()
            self._views.clear()
            self._allocated = 0
            self._cond.notify_all()
        if self._block is not None:
            _give_back_block(self._block)  # drained above: no copy reads it any more
            self._block = None
