"""The transport-independent :class:`RangedSource` shared by :mod:`.http`, :mod:`.s3` and :mod:`.fsspec`: bounds,
part splitting, resumable retries, and the transfer that adapts to the server (:mod:`.tuning`, :mod:`.sequential`).
The low-level pieces (retry policy, cursor, :func:`fill`, :class:`Body`) live in :mod:`.wire` and are re-exported.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

from .. import constants
from ..errors import SourceError, TruncatedFileError, UsageError
from .base import Source
from .sequential import WAIT_S, SequentialReader
from .tuning import CpuMeter, Decision, Gate, Sample, Tuner
from .wire import (
    Body,
    Budget,
    Cursor,
    RetryPolicy,
    TransientError,
    describe_error,
    fill,
    parse_retry_after,
    readinto1,
    views_of,
)

__all__ = [
    "Body",
    "Budget",
    "Cursor",
    "RangedSource",
    "RetryPolicy",
    "TransientError",
    "describe_error",
    "fill",
    "parse_retry_after",
    "readinto1",
]

T = TypeVar("T")
HEAD_KEEP = 1 << 20  # the first read's bytes kept for the reads that overlap it, when the stream carries on from it
# The first read goes open-ended only on objects at least this large: a GET that is then dropped has made the server
# send what fits in the socket buffers (a few MB on loopback), which is the whole of a small object and would make
# N distributed ranks pull N extra copies of it; on a large object it is a small share and the stream can pay off.
OPEN_ENDED_MIN = 16 << 20


# --- shared machinery ------------------------------------------------------------------------------------


class RangedSource(Source):
    """Bounds checks, part splitting, the resumable retry loop and the adaptive transfer shared by the remote
    sources.

    Subclasses set ``uri`` and ``size`` and implement :meth:`_open_body` (one request for a byte range whose body
    is then read into a :class:`Cursor`; raises :class:`TransientError` for failures worth retrying), or override
    :meth:`_attempt` when their transport has no streaming body (then reads never switch to one stream).

    How many ranged GETs are in flight, and whether reads switch to one sequential GET, adapts to the server as it
    reads (:mod:`.tuning`); ``tuning`` says what ran and why.

    Args:
        concurrency: parallel ranged requests one large read is split into, and the most in flight at once; also
            ``preferred_concurrency``. Given explicitly, it holds the transfer (no adaptation).
        part_size: reads larger than 1.5 × this are split into parts of about this size. Given explicitly, it holds
            the transfer too.
        policy: the retry policy.
        can_stream: whether reads may switch to one sequential GET (default: whether the class has ``_open_body``).
    """

    def __init__(self, *, concurrency: int | None, part_size: int | None, policy: RetryPolicy,
                 can_stream: bool | None = None) -> None:  # fmt: skip
        held = ", ".join(f"{k}={v}" for k, v in (("concurrency", concurrency), ("part_size", part_size)) if v)
        concurrency = constants.REMOTE_CONCURRENCY if concurrency is None else concurrency
        part_size = constants.REMOTE_PART_BYTES if part_size is None else part_size
        if concurrency < 1:
            raise UsageError(f"concurrency must be >= 1, got {concurrency}")
        if part_size < 1:
            raise UsageError(f"part_size must be >= 1, got {part_size}")
        self.concurrency = concurrency
        self.preferred_concurrency = concurrency
        self.part_size = part_size
        self.policy = policy
        self._executor: ThreadPoolExecutor | None = None
        self._executor_lock = threading.Lock()
        self._closed = False
        if not held and not constants.REMOTE_ADAPT:
            held = "HF_TENSORIZER_REMOTE_ADAPT=0"
        if can_stream is None:  # a transport with a streaming body (``_open_body``) can read one sequential GET
            can_stream = type(self)._open_body is not RangedSource._open_body
        meter = None if held else CpuMeter()  # a step up needs idle cores (sources/tuning.py, step 3)
        self._tuner = Tuner(max_concurrency=concurrency, can_stream=can_stream, held=held or None,
                            cpu=meter.read if meter else None)  # fmt: skip
        self._tune_lock = threading.Lock()
        self._gate = Gate(self._tuner.current.concurrency)
        self._sequential: SequentialReader | None = None
        self._ranged: dict[int, int] = {}  # reads sent as ranged GETs while probing (start -> end)
        self.open_s = 0.0  # how long opening the object took (subclasses time their HEAD): the first read's yardstick
        self._first = can_stream and not held  # the first read goes as one open-ended GET (tuning step 0)

    @property
    def tuning(self) -> dict[str, object]:
        """What the transfer does now and why: ``mode`` (``ranged``, ``stream`` or ``held``), ``concurrency``,
        ``reason``, the aggregate ``rates`` (bytes/s) measured per concurrency (0: the stream) and the ``steps``."""
        with self._tune_lock:
            return self._tuner.report()

    def hold_transfer(self, why: str) -> None:
        """Stop adapting: the caller chose the transfer's shape (``why`` names it, e.g. ``"num_readers=4"``)."""
        with self._tune_lock:
            if self._tuner.current.mode != "stream" or not self._tuner.settled:
                self._apply(self._tuner.hold(why))

    # public API -----------------------------------------------------------------------------------------

    def read_into(self, offset: int, buf: memoryview) -> None:
        self.read_into_many(offset, [buf])

    def read_into_many(self, offset: int, bufs: Sequence[memoryview]) -> None:
        views = [memoryview(b).cast("B") for b in bufs]
        total = sum(len(v) for v in views)
        if offset < 0:
            raise UsageError(f"negative offset {offset}")
        if offset + total > self.size:
            raise TruncatedFileError(f"{self.uri} is {self.size} bytes; cannot read {total} bytes at offset {offset}")
        if total == 0:
            return
        if self._closed:
            raise SourceError(f"{self.uri}: source is closed")
        budget = Budget(self.uri, self.policy, f"reading bytes {offset}-{offset + total - 1}")
        first = False
        if self._first and offset == 0:  # a load's first read: its header
            with self._tune_lock:
                first, self._first = self._first and self.size >= OPEN_ENDED_MIN, False
        seq = self._sequential
        if seq is not None and self._tuner.current.mode == "stream":
            seq.read(offset, views, budget)
            return
        nparts = math.ceil(total / self.part_size)
        if self.concurrency == 1 or total <= self.part_size * 3 // 2 or nparts < 2:
            if not self._fetch(
                offset, views, budget, divertable=True, first=first
            ):  # the reads switched to one stream while this one waited for its turn
                seq = self._sequential
                if seq is None:
                    raise SourceError(f"{self.uri}: source closed during a read")
                seq.read(offset, views, budget)
            return
        step = math.ceil(total / nparts)
        futures: list[Future[None]] = []
        pool = self._pool_executor()
        for start in range(0, total, step):
            length = min(step, total - start)
            futures.append(pool.submit(self._fetch, offset + start, views_of(views, start, length), budget))
        # Wait for every part even after a failure: returning early would let workers keep writing into
        # buffers the caller believes are free again.
        error: BaseException | None = None
        for fut in futures:
            exc = fut.exception()
            if exc is not None and error is None:
                error = exc
        if error is not None:
            raise error

    def close(self) -> None:
        self._closed = True
        seq, self._sequential = getattr(self, "_sequential", None), None
        if seq is not None:
            seq.close()
        with self._executor_lock:
            if self._executor is not None:
                self._executor.shutdown(wait=False)
                self._executor = None

    # subclass hook --------------------------------------------------------------------------------------

    def _attempt(self, first: int, last: int, cursor: Cursor) -> None:
        """Request bytes ``first..last`` (inclusive) and write them at the cursor.

        May return early (a server may send less than asked); must raise :class:`TransientError` for a
        failure worth retrying and a :class:`SourceError` for a permanent one.
        """
        body = self._open_body(first, last, cursor.budget or Budget(self.uri, self.policy, "reading"))
        ok = False
        try:
            fill(cursor, body.expected, body.read)
            ok = True
        finally:
            body.finish(ok)

    def _open_body(self, first: int, last: int, budget: Budget) -> Body:
        """Send one request for bytes ``first..last`` and return its checked, unread body (see :class:`Body`).

        Raises:
            TransientError: worth a retry.
            SourceError: a permanent failure (the object changed, access denied...).
        """
        raise NotImplementedError(f"{type(self).__name__} implements _attempt or _open_body")

    # internals ------------------------------------------------------------------------------------------

    def _pool_executor(self) -> ThreadPoolExecutor:
        with self._executor_lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(self.concurrency, thread_name_prefix="hf-tensorizer-part")
            return self._executor

    def _fetch(self, start: int, views: Sequence[memoryview], budget: Budget, divertable: bool = False,
               first: bool = False) -> bool:  # fmt: skip
        """Fill ``views`` with the bytes from ``start``: retries resume at the first byte not yet received.

        ``first``: the source's first read, sent as one open-ended GET (tuning step 0, :meth:`_first_attempt`).
        Returns False, with nothing read, when ``divertable`` and the reads switched to one stream while this one
        waited for its turn (the caller reads it from the stream); True once filled."""
        cursor = Cursor(views, budget)
        total = cursor.total
        failures = 0
        attempts = 0
        # Progress resets ``failures``; this bound still guarantees termination against a server that drops
        # every connection after a few bytes.
        max_attempts = self.policy.retries + 1 + total // (256 << 10)
        while cursor.done < total:
            if self._closed:
                raise SourceError(f"{self.uri}: source closed during a read")
            before = cursor.done
            attempts += 1
            try:
                limit = self._gate.acquire(divertable and attempts == 1)
                if not limit:
                    return False
                if divertable and attempts == 1 and not self._tuner.settled:  # a stream chosen later skips it
                    with self._tune_lock:
                        self._ranged[start] = start + total
                try:
                    t0 = time.monotonic()
                    if first and attempts == 1:
                        self._first_attempt(start, cursor)
                    else:
                        self._attempt(start + cursor.done, start + total - 1, cursor)
                finally:
                    self._gate.release()
                if attempts == 1 and cursor.done == total:
                    self._record(Sample(total, t0, cursor.first_byte or t0, time.monotonic(), limit))
                if cursor.done > before:
                    failures = 0
                    continue
                exc = TransientError("the server sent no data")
            except TransientError as err:
                exc = err
            if cursor.done > before:
                failures = 0
            failures += 1
            if failures > self.policy.retries or attempts >= max_attempts:
                raise SourceError(
                    f"{self.uri}: reading bytes {start + cursor.done}-{start + total - 1} failed after "
                    f"{attempts} attempts: {exc}"
                ) from exc
            budget.wait(failures, exc)
        return True

    def _first_attempt(self, start: int, cursor: Cursor) -> None:
        """The first attempt of the source's first read (a load's header): one open-ended GET from ``start``, timed
        to its first byte (tuning step 0). When the tuner switches to one stream on it, the body carries on as the
        stream; otherwise it is dropped once the read has its bytes. Failures raise as :meth:`_attempt`'s do."""
        budget = cursor.budget or Budget(self.uri, self.policy, "reading")
        t0 = time.monotonic()
        body = self._open_body(start, self.size - 1, budget)
        ttfb = time.monotonic() - t0
        keep = False
        try:
            fill(cursor, cursor.total, body.read)
            with self._tune_lock:
                decision = self._tuner.first_read(ttfb, self.open_s)
                if decision is not None and not self._closed:
                    self._apply(decision)
                    if self._sequential is not None:
                        small = cursor.total <= HEAD_KEEP  # kept for the first chunk, which starts inside it
                        head = b"".join(cursor.views) if small else None
                        self._sequential.adopt(body, start, start + cursor.total, head)
                        keep = True
        finally:
            if not keep:
                body.finish(False)  # not read to its end: the connection is dropped

    def _force(self, mode: str, why: str) -> None:
        """Settle the transfer on ``mode`` (``"ranged"`` or ``"stream"``): for tests and diagnostics."""
        with self._tune_lock:
            self._apply(self._tuner.force(mode, why))

    def _record(self, sample: Sample) -> None:
        with self._tune_lock:
            self._tuner.total = self._tuner.total or getattr(self, "size", 0)
            decision = self._tuner.add(sample)
            if decision is not None:
                self._apply(decision)

    def _apply(self, decision: Decision) -> None:
        """Put a decision in force (called with the tuning lock held)."""
        if decision.mode == "stream":
            if self._sequential is None and not self._closed:
                wait = min(2.0, max(WAIT_S, self._tuner.ttfb))  # waiting for a late read beats its own GET
                self._sequential = SequentialReader(self.size, self._open_body, self._fetch, self._record, wait)
                for start, end in self._ranged.items():  # read, or being read, by ranged GETs: not waited for
                    self._sequential.served(start, end)
                self._ranged.clear()
                self._gate.set_limit(self._gate.limit, diverted=True)  # reads waiting for a slot go to the stream
        else:
            self._gate.set_limit(decision.concurrency)

    def _retrying(self, what: str, fn: Callable[[Budget], T]) -> T:
        """Run ``fn`` (one request, no body streaming) with the retry policy, under one :class:`Budget`."""
        budget = Budget(self.uri, self.policy, what)
        failures = 0
        while True:
            try:
                return fn(budget)
            except TransientError as exc:
                failures += 1
                if failures > self.policy.retries:
                    raise SourceError(f"{self.uri}: {what} failed after {failures} attempts: {exc}") from exc
                budget.wait(failures, exc)
