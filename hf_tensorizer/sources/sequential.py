"""One sequential GET that serves a load's reads in file order: what a remote read switches to when ranged GETs
are slow (see :mod:`.tuning`).

The engine's reader threads take chunks in file order and call ``read_into_many`` concurrently. Here the call for
the bytes where the open body stands goes next and receives them straight into its buffers; the others wait their
turn. A read that arrives behind the stream (a chunk whose thread was late and was skipped) is read with its own
ranged GET; a read ahead of it waits for the reads before it to arrive (``wait_s``: at least :data:`WAIT_S`, up to
what a ranged GET took to answer in the probe, which is what the late read would pay), then skips the gap (up to
:data:`MAX_SKIP` bytes, read and dropped) or opens a new body at its own offset. A body that breaks mid-read is
closed and the rest of that read goes through the normal retrying path (resuming at the exact byte); the next read
opens a new body. Every body is checked against the pinned object like a ranged response (validators, size,
``Content-Range``), so a load never mixes versions.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence

from .tuning import Sample
from .wire import Body, Budget, Cursor, TransientError, fill, views_of

__all__ = ["MAX_SKIP", "WAIT_S", "SequentialReader", "copy_into"]

WAIT_S = 0.05  # how long the stream waits for the read at its position before serving one further ahead
MAX_SKIP = 32 << 20  # a gap up to this is read and dropped; a larger one opens a new body
NEAR = 64 << 10  # a read this close after the stream's position is the next one (chunks skip tensor padding)


Opener = Callable[[int, int, Budget], Body]  # (first, last, budget) -> an open body of bytes first..last
Fetch = Callable[[int, Sequence[memoryview], Budget], None]  # the ranged, retrying read of the same source


class SequentialReader:
    """Serves reads of one object from one open-ended GET, in offset order.

    Args:
        size: the object's size.
        open_body: opens a body of bytes ``first..last`` (validated against the pinned object).
        fetch: the source's own ranged, retrying read, for reads behind the stream and after a broken body.
        record: receives one :class:`Sample` per read served from the stream.
        wait_s: how long the stream waits for the read at its position (and, at the start, for the reads of the
            first chunks to gather) before serving one further ahead.
    """

    def __init__(self, size: int, open_body: Opener, fetch: Fetch, record: Callable[[Sample], None],
                 wait_s: float = WAIT_S) -> None:  # fmt: skip
        self.size = size
        self.wait_s = wait_s
        self._open_body, self._fetch, self._record = open_body, fetch, record
        self._cv = threading.Condition()
        self._busy = False
        self._pos: int | None = None  # where the next read in file order starts
        self._body: Body | None = None
        self._body_pos = 0  # where the open body stands
        self._end = 0  # one past the open body's last byte
        self._served: dict[int, int] = {}  # reads the ranged path serves or served (start -> end): not waited for
        self._idle_since = time.monotonic()
        self._pending: Counter[int] = Counter()
        self._scratch = memoryview(bytearray(1 << 20))
        self._head: bytes | None = None  # the bytes the open body already passed (see adopt)
        self._head_start = 0
        self._closed = False

    def read(self, offset: int, views: Sequence[memoryview], budget: Budget) -> None:
        """Fill ``views`` (``total`` bytes at ``offset``) from the stream when it is this read's turn."""
        behind = False
        with self._cv:
            self._pending[offset] += 1
            try:
                while not self._closed:
                    if not self._busy:
                        while self._pos in self._served:  # read by ranged GETs: nobody comes for it here
                            self._pos = self._served.pop(self._pos)
                        pos = self._pos
                        if pos == offset:
                            break
                        if pos is not None and offset < pos:
                            behind = not self._in_head(offset)
                            break
                        if pos is not None and offset - pos <= NEAR and min(self._pending) == offset:
                            break  # the next read after the alignment padding between two chunks
                        # no earlier read is waiting and the one at the stream's position is late; before the
                        # first read there is no position to wait for, only the first reads to gather (WAIT_S)
                        wait = WAIT_S if pos is None else self.wait_s
                        if min(self._pending) == offset and time.monotonic() - self._idle_since >= wait:
                            break
                    self._cv.wait(min(WAIT_S, self.wait_s))
            finally:
                self._pending[offset] -= 1
                if not self._pending[offset]:
                    del self._pending[offset]
            behind = behind or self._closed
            if not behind:
                self._busy = True
        if behind:  # its own ranged GET; the stream stays where it is for the reads after it
            self._fetch(offset, views, budget)
            return
        try:
            self._serve(offset, views, budget)
        finally:
            with self._cv:
                self._busy = False
                self._idle_since = time.monotonic()
                self._cv.notify_all()

    def adopt(self, body: Body, start: int, pos: int, head: bytes | None = None) -> None:
        """Continue on ``body`` (an open body of bytes ``start``..the end), read up to ``pos`` already. ``head``
        (those bytes, when small: the load's first read) is kept until the body moves past it, so the reads that
        overlap it (the first chunk starts inside the header read) are served without a GET of their own."""
        with self._cv:
            self._body, self._body_pos, self._end = body, pos, start + body.expected
            self._head, self._head_start = head, start
            self._pos = start if head is not None else pos
            self._cv.notify_all()

    def served(self, start: int, end: int) -> None:
        """Bytes ``start..end-1`` are (being) read by ranged GETs: the stream does not wait for a read there."""
        with self._cv:
            self._served[start] = end
            self._cv.notify_all()

    def close(self) -> None:
        """Close the open body (its connection is dropped: the body was not read to its end)."""
        with self._cv:
            self._closed = True
            body, self._body = self._body, None
            self._cv.notify_all()
        if body is not None:
            body.finish(False)

    # --- internals (called with the stream held) -------------------------------------------------------------

    def _drop_body(self, ok: bool = False) -> None:
        body, self._body = self._body, None
        if body is not None:
            body.finish(ok)

    def _in_head(self, offset: int) -> bool:
        """Whether a read at ``offset`` starts in the kept head and the body stands right after it."""
        head = self._head
        return (
            head is not None
            and self._body is not None
            and self._head_start <= offset < self._body_pos == self._head_start + len(head)
        )

    def _serve(self, offset: int, views: Sequence[memoryview], budget: Budget) -> None:
        cursor = Cursor(views, budget)
        total = cursor.total
        t0 = time.monotonic()
        first_byte = t0
        try:
            if self._in_head(offset):  # the bytes the first read already took, then the body from where it stands
                assert self._head is not None
                copy_into(cursor, memoryview(self._head)[offset - self._head_start : offset - self._head_start + total])
            at = offset + cursor.done
            if cursor.done < total:
                self._head = None
                if self._body is not None and at != self._body_pos:
                    gap = at - self._body_pos
                    if 0 < gap <= MAX_SKIP and at < self._end:
                        self._skip(gap, budget)
                    else:
                        self._drop_body()
                if self._body is None:
                    self._body = self._open_body(at, self.size - 1, budget)
                    self._body_pos, self._end = at, at + self._body.expected
                    first_byte = time.monotonic()
                n = min(total - cursor.done, self._end - at)
                fill(cursor, n, self._body.read)
                self._body_pos = at + n
                if self._body_pos >= self._end:
                    self._drop_body(ok=True)
        except TransientError:
            self._drop_body()
        except BaseException:
            self._drop_body()  # where the body stands is unknown now: the next read opens a new one
            self._pos = None
            raise
        done = cursor.done
        self._pos = offset + total
        if done < total:  # a broken body, or a server that sent less: the rest through the retrying path
            self._fetch(offset + done, views_of(list(views), done, total - done), budget)
        else:
            self._record(Sample(total, t0, first_byte, time.monotonic(), 0))

    def _skip(self, gap: int, budget: Budget) -> None:
        assert self._body is not None
        while gap:
            n = min(gap, len(self._scratch))
            fill(Cursor([self._scratch[:n]], budget), n, self._body.read)
            gap -= n
            self._body_pos += n


def copy_into(cursor: Cursor, data: memoryview) -> None:
    """Scatter ``data`` into ``cursor``'s buffers from where it stands."""
    while len(data):
        dest = cursor.next_view(len(data))
        dest[:] = data[: len(dest)]
        cursor.advance(len(dest))
        data = data[len(dest) :]
