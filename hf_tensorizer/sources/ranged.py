"""Byte ranges over a network: the retry policy, scatter bookkeeping and the transport-independent
:class:`RangedSource` (bounds, part splitting, resumable retries) shared by :mod:`.http` and :mod:`.s3`.
"""

from __future__ import annotations

import abc
import email.utils
import http.client
import math
import random
import socket
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

from .. import constants
from ..errors import SourceError, TruncatedFileError, UsageError
from .base import Source

__all__ = ["Cursor", "RangedSource", "RetryPolicy", "TransientError", "describe_error", "fill", "readinto1"]

T = TypeVar("T")


# --- retry policy ----------------------------------------------------------------------------------------


class TransientError(Exception):
    """A failure worth retrying (dropped connection, timeout, 5xx, 429). Internal to the transports.

    Args:
        message: what failed, without credentials.
        retry_after: the server's ``Retry-After`` in seconds, when it sent one.
    """

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter.

    Args:
        retries: consecutive failed attempts tolerated for one range (the count restarts when an attempt made
            progress, so a flaky link that still moves data is not cut off).
        backoff: first delay in seconds; doubles each consecutive failure.
        max_backoff: cap of one delay.
        max_retry_after: cap applied to a server's ``Retry-After``.
    """

    retries: int = constants.REMOTE_RETRIES
    backoff: float = 0.25
    max_backoff: float = 10.0
    max_retry_after: float = 120.0

    def delay(self, failures: int, retry_after: float | None = None) -> float:
        """Seconds to wait after the ``failures``-th consecutive failure (1-based)."""
        if retry_after is not None:
            return max(0.0, min(retry_after, self.max_retry_after))
        base = min(self.max_backoff, self.backoff * (2 ** max(0, failures - 1)))
        return base * random.uniform(0.5, 1.0)


def parse_retry_after(value: str | None) -> float | None:
    """``Retry-After`` as seconds from now (delta-seconds or an HTTP date); None when absent or unparsable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


# --- scatter cursor --------------------------------------------------------------------------------------


class Cursor:
    """Where the next received byte goes in a list of buffers; ``done`` counts bytes that landed."""

    def __init__(self, views: Sequence[memoryview]) -> None:
        self.views = [v for v in views if len(v)]
        self.total = sum(len(v) for v in self.views)
        self.done = 0
        self._index = 0
        self._pos = 0

    def next_view(self, limit: int) -> memoryview:
        view = self.views[self._index]
        return view[self._pos : self._pos + limit]

    def advance(self, n: int) -> None:
        self.done += n
        self._pos += n
        while self._index < len(self.views) and self._pos >= len(self.views[self._index]):
            self._pos -= len(self.views[self._index])
            self._index += 1


def fill(cursor: Cursor, expected: int, read: Callable[[memoryview, bool], int]) -> None:
    """Receive ``expected`` body bytes into ``cursor``, one ``read(view, first)`` call at a time.

    ``cursor.done`` always counts the bytes that landed, so a retry after a failure resumes at the exact byte.

    Raises:
        TransientError: the stream ended early (a retry asks for the rest).
    """
    got = 0
    while got < expected:
        n = read(cursor.next_view(expected - got), got == 0)
        if not n:
            raise TransientError(f"connection closed after {got} of {expected} bytes")
        cursor.advance(n)
        got += n


def _views_of(bufs: Sequence[memoryview | bytearray], offset: int, length: int) -> list[memoryview]:
    """The sub-views of ``bufs`` (taken as one contiguous run) covering ``[offset, offset + length)``."""
    out: list[memoryview] = []
    for b in bufs:
        n = len(b)
        if offset >= n:
            offset -= n
            continue
        take = min(n - offset, length)
        out.append(b[offset : offset + take])  # type: ignore[arg-type]
        length -= take
        offset = 0
        if not length:
            break
    return out


# --- shared machinery ------------------------------------------------------------------------------------


class RangedSource(Source):
    """Bounds checks, part splitting and the resumable retry loop shared by the remote sources.

    Subclasses set ``uri`` and ``size`` and implement :meth:`_attempt`, one request for a byte range that
    writes into a :class:`Cursor` and raises :class:`TransientError` for failures worth retrying.

    Args:
        concurrency: parallel ranged requests one large read is split into; also ``preferred_concurrency``.
        part_size: reads larger than 1.5 × this are split into parts of about this size.
        policy: the retry policy.
    """

    def __init__(self, *, concurrency: int, part_size: int, policy: RetryPolicy) -> None:
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
        nparts = math.ceil(total / self.part_size)
        if self.concurrency == 1 or total <= self.part_size * 3 // 2 or nparts < 2:
            self._fetch(offset, views)
            return
        step = math.ceil(total / nparts)
        futures: list[Future[None]] = []
        pool = self._pool_executor()
        for start in range(0, total, step):
            length = min(step, total - start)
            futures.append(pool.submit(self._fetch, offset + start, _views_of(views, start, length)))
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
        with self._executor_lock:
            if self._executor is not None:
                self._executor.shutdown(wait=False)
                self._executor = None

    # subclass hook --------------------------------------------------------------------------------------

    @abc.abstractmethod
    def _attempt(self, first: int, last: int, cursor: Cursor) -> None:
        """Request bytes ``first..last`` (inclusive) and write them at the cursor.

        May return early (a server may send less than asked); must raise :class:`TransientError` for a
        failure worth retrying and a :class:`SourceError` for a permanent one.
        """

    # internals ------------------------------------------------------------------------------------------

    def _pool_executor(self) -> ThreadPoolExecutor:
        with self._executor_lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(self.concurrency, thread_name_prefix="hf-tensorizer-part")
            return self._executor

    def _fetch(self, start: int, views: Sequence[memoryview]) -> None:
        """Fill ``views`` with the bytes from ``start``: retries resume at the first byte not yet received."""
        cursor = Cursor(views)
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
                self._attempt(start + cursor.done, start + total - 1, cursor)
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
            time.sleep(self.policy.delay(failures, exc.retry_after))

    def _retrying(self, what: str, fn: Callable[[], T]) -> T:
        """Run ``fn`` (one request, no body streaming) with the retry policy."""
        failures = 0
        while True:
            try:
                return fn()
            except TransientError as exc:
                failures += 1
                if failures > self.policy.retries:
                    raise SourceError(f"{self.uri}: {what} failed after {failures} attempts: {exc}") from exc
                time.sleep(self.policy.delay(failures, exc.retry_after))


def readinto1(resp: http.client.HTTPResponse, view: memoryview, first: bool) -> int:
    """At most one socket read from ``resp``'s body into ``view``; 0 at end of stream.

    ``HTTPResponse.readinto`` loops until the buffer is full, and when a read fails midway the bytes that already
    landed are not reported: a retry would fetch them again, and could not say where it resumed. This keeps
    http.client's bookkeeping (``length``, end of response) so the connection stays reusable.

    Args:
        resp: a response with a Content-Length (ranged bodies always have one).
        view: where the bytes go.
        first: this is the first read of the body: bytes buffered along with the headers are handed out alone, so
            no socket read can fail after some of them were copied.
    """
    if resp.fp is None or resp.chunked or resp.length is None:
        return resp.readinto(view)
    if len(view) > resp.length:
        view = view[: resp.length]
    if first:
        view = view[: len(resp.fp.peek(1))]
    if not len(view):
        return 0
    n = resp.fp.readinto1(view)
    if not n:
        resp.close()
        return 0
    resp.length -= n
    if not resp.length:
        resp.read(0)  # lets http.client mark the response complete (the connection becomes reusable)
    return n


def describe_error(exc: BaseException) -> str:
    """A short description of a network error (no URLs: http.client errors carry none)."""
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return "timed out"
    if isinstance(exc, http.client.IncompleteRead):
        return f"connection closed mid-body ({len(exc.partial)} bytes of the last slice received)"
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if text != type(exc).__name__ else text
