"""Open binary file objects as sources and sinks: ``open(..., "rb")``, ``io.BytesIO``, an fsspec file, a pipe.

The object starts at the file object's position when it is handed over (like ``torch.load``): after writing into a
``BytesIO``, ``seek(0)`` before reading it back. Reads leave that position as it was (``read_index(f)`` then
``TensorDeserializer(f)`` works). The caller keeps ownership: ``close()`` of these sources and sinks never closes
the file object.

Reading needs random access, so a source picks the fastest way the object allows:

- a regular file with a descriptor: ``os.preadv`` on it from any number of threads (no shared position; when the
  object starts at byte 0, ``fileno()`` is exposed, so mmap and the page-cache checks work as for a path);
- any other seekable object (``BytesIO``, fsspec files): ``seek`` + ``readinto`` under a lock;
- a non-seekable stream (a pipe, a socket, an HTTP response): copied once to an anonymous temporary file (in
  ``TMPDIR``), then read like a regular file; the stream is consumed.

Writing is sequential; a seekable object can rewrite the head (one pass), a non-seekable one cannot (the serializer
then hashes in a first pass). ``abort`` truncates a seekable object back to where writing started.
"""

from __future__ import annotations

import io
import os
import stat
import tempfile
import threading
from collections.abc import Sequence
from typing import IO, Any

from ..errors import SinkError, SourceError, TruncatedFileError, UsageError
from .base import Sink, Source

__all__ = ["FileObjectSink", "FileObjectSource", "is_readable_file", "is_writable_file"]

_SPOOL_CHUNK = 8 << 20


def is_readable_file(obj: Any) -> bool:
    """True for an object with a ``read`` method that is not a path (what :func:`open_source` wraps)."""
    return not isinstance(obj, (str, bytes, os.PathLike)) and callable(getattr(obj, "read", None))


def is_writable_file(obj: Any) -> bool:
    """True for an object with a ``write`` method that is not a path (what :func:`open_sink` wraps)."""
    return not isinstance(obj, (str, bytes, os.PathLike)) and callable(getattr(obj, "write", None))


def _seekable(f: Any) -> bool:
    try:
        return bool(f.seekable()) if hasattr(f, "seekable") else False
    except (OSError, ValueError):
        return False


def _regular_fd(f: Any) -> int | None:
    """The descriptor of ``f`` when it is a regular file (pread-able), else None."""
    try:
        fd = f.fileno()
        return fd if isinstance(fd, int) and stat.S_ISREG(os.fstat(fd).st_mode) else None
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        return None


def _check_binary(f: Any) -> None:
    if isinstance(f, io.TextIOBase):
        raise UsageError(f"{_name_of(f)} is open in text mode; open it in binary mode ('rb' / 'wb')")


def _name_of(f: Any) -> str:
    name = getattr(f, "name", None) or getattr(f, "path", None)
    return f"<file object {name}>" if isinstance(name, str) else f"<{type(f).__name__}>"


class FileObjectSource(Source):
    """Random-access reads of an open binary file object (see the module docstring for the three modes).

    Args:
        fileobj: an object with ``read`` (and ``readinto``/``seek`` when it has them).

    Raises:
        SourceError: reading the object (or spooling a stream) failed.
        UsageError: a seekable object positioned at its end (written just now: ``seek(0)`` first).
    """

    preferred_concurrency = 8

    def __init__(self, fileobj: IO[bytes]) -> None:
        _check_binary(fileobj)
        self.uri = _name_of(fileobj)
        self._file = fileobj
        self._lock = threading.Lock()
        self._spool: IO[bytes] | None = None
        self._closed = False
        try:
            if _seekable(fileobj):
                self._base = fileobj.tell()
                end = fileobj.seek(0, os.SEEK_END)
                fileobj.seek(self._base)
                if end == self._base and end > 0:
                    raise UsageError(f"{self.uri} is positioned at its end ({end} bytes); seek(0) before reading it")
                self.size = end - self._base
                self._fd = _regular_fd(fileobj)
            else:
                self._spool = tempfile.TemporaryFile(prefix="hf-tensorizer-spool-")  # noqa: SIM115 - lives with the source
                self.size = _copy_stream(fileobj, self._spool)
                self._base, self._fd = 0, self._spool.fileno()
        except Exception as exc:  # the caller's object may raise anything: a typed error, always
            if self._spool is not None:
                self._spool.close()
            if isinstance(exc, UsageError):
                raise
            raise SourceError(f"cannot read {self.uri}: {_describe(exc)}") from exc
        self.preferred_concurrency = 8 if self._fd is not None else 1

    def fileno(self) -> int | None:
        """The descriptor when the object is a whole regular file (from byte 0: mmap and page-cache checks map the
        file, not a window of it); None otherwise."""
        return None if self._closed or self._base else self._fd

    def read_into(self, offset: int, buf: memoryview) -> None:
        self.read_into_many(offset, [buf])

    def read_into_many(self, offset: int, bufs: Sequence[memoryview]) -> None:
        views = [memoryview(b).cast("B") for b in bufs if len(b)]
        total = sum(len(v) for v in views)
        if offset < 0:
            raise UsageError(f"negative offset {offset}")
        if offset + total > self.size:
            raise TruncatedFileError(f"{self.uri} is {self.size} bytes; cannot read {total} bytes at offset {offset}")
        if self._closed:
            raise SourceError(f"{self.uri}: source is closed")
        pos = self._base + offset
        for view in views:
            try:
                self._fill(pos, view)
            except (OSError, ValueError) as exc:
                raise SourceError(f"read of {self.uri} at offset {pos - self._base} failed: {exc}") from exc
            except Exception as exc:  # the caller's object raised something else: still a typed error
                raise SourceError(f"read of {self.uri} at offset {pos - self._base} failed: {_describe(exc)}") from exc
            pos += len(view)

    def _fill(self, pos: int, view: memoryview) -> None:
        got = 0
        while got < len(view):
            if self._fd is not None:
                n = os.preadv(self._fd, [view[got:]], pos + got)
            else:
                with self._lock:  # seek + read is one step: another thread must not move the position between
                    self._file.seek(pos + got)
                    try:
                        n = _readinto(self._file, view[got:])
                    finally:  # the object keeps the position it was handed over with: it can be opened again
                        self._file.seek(self._base)
            if not n:
                raise TruncatedFileError(f"{self.uri} ended at {pos + got - self._base}, before the bytes it promised")
            got += n

    def close(self) -> None:
        """Forget the file object (left open: it is the caller's); remove the spool of a stream."""
        self._closed = True
        if self._spool is not None:
            self._spool.close()
            self._spool = None

    def __repr__(self) -> str:
        return f"FileObjectSource({self.uri}, size={self.size})"


def _readinto(f: Any, view: memoryview) -> int:
    """Read into ``view`` with the object's ``readinto`` (or ``read``); returns the byte count.

    Raises:
        TypeError: the object returned something other than a byte count / bytes (a text-mode object in disguise).
    """
    readinto = getattr(f, "readinto", None)
    if readinto is not None:
        n = readinto(view)
        if n is not None and (not isinstance(n, int) or isinstance(n, bool) or not 0 <= n <= len(view)):
            raise TypeError(f"readinto() returned {n!r:.40}, not a byte count up to {len(view)}")
        return n or 0
    data = f.read(len(view))
    if not isinstance(data, (bytes, bytearray, memoryview)) or len(data) > len(view):
        raise TypeError(f"read({len(view)}) returned {type(data).__name__}, not at most {len(view)} bytes "
                        "(open the file in binary mode)")  # fmt: skip
    view[: len(data)] = data
    return len(data)


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _copy_stream(src: Any, dst: IO[bytes]) -> int:
    """Copy ``src`` to its end into ``dst``; returns the byte count."""
    buf = bytearray(_SPOOL_CHUNK)
    view = memoryview(buf)
    total = 0
    while True:
        n = _readinto(src, view)
        if not n:
            break
        dst.write(view[:n])
        total += n
    dst.flush()
    return total


class FileObjectSink(Sink):
    """Writes into an open binary file object from its current position; the caller keeps and closes it.

    ``commit`` flushes; ``abort`` truncates a seekable object back to where writing started (a stream cannot take
    back what it sent).

    Args:
        fileobj: an object with ``write``.
    """

    def __init__(self, fileobj: IO[bytes]) -> None:
        _check_binary(fileobj)
        self.uri = _name_of(fileobj)
        self._file = fileobj
        self._start: int | None = None
        if _seekable(fileobj):
            try:
                self._start = fileobj.tell()
            except (OSError, ValueError):
                self._start = None
        self.can_rewrite_head = self._start is not None
        self._state = "open"

    def write(self, data: memoryview | bytes) -> None:
        self._check_open()
        view = memoryview(data).cast("B")
        try:
            while len(view):
                n = self._file.write(view)
                if n is not None and (not isinstance(n, int) or not 0 <= n <= len(view)):
                    raise TypeError(f"write() returned {n!r:.40}, not a byte count")
                view = view[len(view) if n is None else n :]  # raw files may write less; None: all of it
        except Exception as exc:  # the caller's object may raise anything: a typed error, always
            self.abort()
            raise SinkError(f"write to {self.uri} failed: {_describe(exc)}") from exc

    def rewrite_head(self, data: bytes) -> None:
        self._check_open()
        if self._start is None:
            raise SinkError(f"{self.uri} is not seekable: its head cannot be rewritten")
        try:
            end = self._file.tell()
            self._file.seek(self._start)
            self._file.write(data)
            self._file.seek(end)
        except Exception as exc:
            self.abort()
            raise SinkError(f"rewriting the head of {self.uri} failed: {_describe(exc)}") from exc

    def commit(self) -> None:
        self._check_open()
        try:
            flush = getattr(self._file, "flush", None)
            if flush is not None:
                flush()
        except Exception as exc:
            self.abort()
            raise SinkError(f"cannot flush {self.uri}: {_describe(exc)}") from exc
        self._state = "committed"

    def abort(self) -> None:
        if self._state != "open":
            return
        self._state = "aborted"
        if self._start is not None:
            try:  # best effort: leave the object as it was before the write began
                self._file.seek(self._start)
                self._file.truncate()
            except Exception:  # the caller's object: the write error is what matters
                pass

    def _check_open(self) -> None:
        if self._state != "open":
            raise SinkError(f"{self.uri}: sink already {self._state}")

    def __repr__(self) -> str:
        return f"FileObjectSink({self.uri}, state={self._state})"
