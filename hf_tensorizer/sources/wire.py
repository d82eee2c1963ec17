"""The low-level pieces every remote transport shares: the retry policy and deadline budget, the scatter cursor and
:func:`fill` (exact progress, so retries resume at the byte), the response :class:`Body`, and socket reads that
report partial progress (:func:`readinto1`). :mod:`.ranged` builds the sources on them; :mod:`.sequential` the
one-stream reads.
"""

from __future__ import annotations

import email.utils
import http.client
import math
import random
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .. import constants
from ..errors import NetworkLimitError

__all__ = [
    "Body",
    "Budget",
    "Cursor",
    "RetryPolicy",
    "TransientError",
    "describe_error",
    "fill",
    "parse_retry_after",
    "readinto1",
    "views_of",
]


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
    """Exponential backoff with jitter, and the bounds on time (docs/remote.md, "Timeouts and deadlines").

    Args:
        retries: consecutive failed attempts tolerated for one range (the count restarts when an attempt made
            progress, so a flaky link that still moves data is not cut off).
        backoff: first delay in seconds; doubles each consecutive failure.
        max_backoff: cap of one delay.
        max_retry_after: cap applied to a server's ``Retry-After``.
        deadline: seconds one operation (opening, or one read call with all its parts, retries and waits) may
            take; 0 turns it off. A ``Retry-After`` beyond what is left of it fails at once.
        min_rate: bytes per second a response body must deliver, measured over ``rate_window``; 0 turns it off.
        rate_window: seconds over which ``min_rate`` is measured.
        connect_retries: quick retries of a refused connection (a server restarting) before failing.
    """

    retries: int = constants.REMOTE_RETRIES
    backoff: float = 0.25
    max_backoff: float = 10.0
    max_retry_after: float = constants.REMOTE_MAX_RETRY_AFTER_S
    deadline: float = constants.REMOTE_DEADLINE_S
    min_rate: float = constants.REMOTE_MIN_RATE
    rate_window: float = constants.REMOTE_RATE_WINDOW_S
    connect_retries: int = constants.REMOTE_CONNECT_RETRIES

    def delay(self, failures: int, retry_after: float | None = None) -> float:
        """Seconds to wait after the ``failures``-th consecutive failure (1-based)."""
        if retry_after is not None:
            return max(0.0, min(retry_after, self.max_retry_after))
        base = min(self.max_backoff, self.backoff * (2 ** max(0, failures - 1)))
        return base * random.uniform(0.5, 1.0)


class Budget:
    """The time left to one operation (opening a source, or one read call with all its parts) under ``policy``.

    Args:
        uri: what messages name (already redacted).
        policy: the deadline and rate rule.
        what: the operation, for messages (``"opening"``, ``"reading bytes 0-99"``).
    """

    def __init__(self, uri: str, policy: RetryPolicy, what: str) -> None:
        self.uri = uri
        self.policy = policy
        self.what = what
        self.end = time.monotonic() + policy.deadline if policy.deadline > 0 else math.inf

    def remaining(self) -> float:
        """Seconds left before the deadline (``inf`` without one)."""
        return self.end - time.monotonic()

    def timeout(self, timeout: float) -> float:
        """A socket timeout that does not run (much) past the deadline."""
        return max(0.05, min(timeout, self.remaining()))

    def check(self, last: BaseException | None = None) -> None:
        """Raises:
        SourceError: the deadline has passed."""
        if time.monotonic() >= self.end:
            cause = f" (last error: {last})" if last is not None else ""
            raise NetworkLimitError(
                f"{self.uri}: {self.what} did not finish within the deadline of {self.policy.deadline:g} s{cause}; "
                "a slow link needs a larger deadline= (HF_TENSORIZER_REMOTE_DEADLINE)"
            )

    def wait(self, failures: int, exc: TransientError) -> None:
        """Sleep before the next attempt, never past the deadline.

        Raises:
            SourceError: the server's ``Retry-After`` reaches beyond the deadline, or the deadline passed.
        """
        left = self.remaining()
        if exc.retry_after is not None and exc.retry_after > left:
            raise NetworkLimitError(
                f"{self.uri}: {self.what}: the server asked to retry later (Retry-After: {exc.retry_after:g} s, "
                f"after {exc}), beyond the deadline of {self.policy.deadline:g} s ({max(0.0, left):.0f} s left)"
            )
        time.sleep(max(0.0, min(self.policy.delay(failures, exc.retry_after), left)))
        self.check(exc)

    def check_rate(self, received: int, seconds: float) -> None:
        """Raises:
        SourceError: a response delivered ``received`` bytes in ``seconds``, below the minimum rate."""
        if self.policy.min_rate > 0 and received < self.policy.min_rate * seconds:
            raise NetworkLimitError(
                f"{self.uri}: {self.what}: the server is too slow ({received} bytes in {seconds:.1f} s, below the "
                f"minimum of {self.policy.min_rate:g} bytes/s); a slow link needs a lower min_rate= "
                "(HF_TENSORIZER_REMOTE_MIN_RATE, 0 turns the rule off)"
            )


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

    def __init__(self, views: Sequence[memoryview], budget: Budget | None = None) -> None:
        self.budget = budget  # the operation's deadline and rate rule, checked as bytes land
        self.views = [v for v in views if len(v)]
        self.total = sum(len(v) for v in self.views)
        self.done = 0
        self.first_byte: float | None = None  # when the first response's body started (set by fill)
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
    With a :class:`Budget` on the cursor, a body trickling below its minimum rate (each socket read returns a
    little data, so no timeout fires) or running past its deadline fails.

    Raises:
        TransientError: the stream ended early (a retry asks for the rest).
        SourceError: too slow, or past the deadline.
    """
    budget = cursor.budget
    got = 0
    mark, mark_got = time.monotonic(), 0
    if cursor.first_byte is None:
        cursor.first_byte = mark
    while got < expected:
        n = read(cursor.next_view(expected - got), got == 0)
        if not n:
            raise TransientError(f"connection closed after {got} of {expected} bytes")
        cursor.advance(n)
        got += n
        if budget is not None:
            now = time.monotonic()
            if now - mark >= budget.policy.rate_window:
                budget.check_rate(got - mark_got, now - mark)
                mark, mark_got = now, got
            budget.check()


def views_of(bufs: Sequence[memoryview | bytearray], offset: int, length: int) -> list[memoryview]:
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


@dataclass
class Body:
    """An open response body from ``start`` on: ``expected`` bytes, read with ``read(view, first)`` (at most one
    socket read; 0 at the end; raises :class:`TransientError` when it breaks) and closed with ``finish(ok)``
    (``ok``: fully read, the connection may be reused)."""

    expected: int
    read: Callable[[memoryview, bool], int]
    finish: Callable[[bool], None]


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
