"""A bounded pool of host staging buffers (pinned when the target is a GPU).

A buffer handed to an asynchronous device copy may only be reused once that copy has finished, so it
comes back to the pool together with a *fence* (a CUDA event). The pool never holds more than
``max_buffers`` buffers, which bounds the extra host memory of a load whatever the model size.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Protocol

import torch

from ..errors import TensorizerError

PAGE = 4096


class Fence(Protocol):
    """Completion of work that still reads a staging buffer (``torch.cuda.Event`` satisfies this)."""

    def query(self) -> bool: ...

    def synchronize(self) -> None: ...


class StagingPool:
    """Host buffers of ``buffer_bytes`` each, at most ``max_buffers`` of them, allocated on demand.

    Buffers start on a page boundary (O_DIRECT needs it). ``acquire`` prefers a free buffer, then a new
    one while under the cap, then waits for the oldest in-flight fence.

    Args:
        buffer_bytes: size of each buffer.
        max_buffers: the cap; the pool's footprint is at most ``buffer_bytes * max_buffers``.
        pin: allocate page-locked memory (requires CUDA); plain memory otherwise.
    """

    def __init__(self, buffer_bytes: int, max_buffers: int, *, pin: bool) -> None:
        if buffer_bytes <= 0 or max_buffers <= 0:
            raise ValueError("buffer_bytes and max_buffers must be positive")
        self.buffer_bytes = buffer_bytes
        self.max_buffers = max_buffers
        self.pin = pin
        self._free: list[torch.Tensor] = []
        self._in_flight: deque[tuple[Fence, torch.Tensor]] = deque()
        self._allocated = 0
        self._cond = threading.Condition()
        self._closed = False
        self.peak_allocated = 0

    @property
    def allocated(self) -> int:
        """How many buffers exist now."""
        return self._allocated

    def _new_buffer(self) -> torch.Tensor:
        if self.pin:
            # cudaHostAlloc memory is page-aligned already; torch rounds pinned sizes up to a power of two,
            # so a power-of-two buffer_bytes wastes nothing
            buf = torch.empty(self.buffer_bytes, dtype=torch.uint8, pin_memory=True)
            if buf.data_ptr() % PAGE == 0:
                return buf
            del buf
        raw = torch.empty(self.buffer_bytes + PAGE, dtype=torch.uint8, pin_memory=self.pin)
        skip = (-raw.data_ptr()) % PAGE
        return raw[skip : skip + self.buffer_bytes]

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
        """Wait for in-flight copies, then drop every buffer (pinned memory goes back to torch's cache)."""
        self.drain()
        with self._cond:
            self._closed = True
            self._free.clear()
            self._in_flight.clear()
            self._allocated = 0
            self._cond.notify_all()
