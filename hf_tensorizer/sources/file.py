"""Local files: positional reads (thread-safe, no shared file position), O_DIRECT, atomic writes."""

from __future__ import annotations

import fcntl
import os
import re
import stat
import sys
import tempfile
import weakref
from collections.abc import Callable, Sequence

from ..errors import SinkError, SourceError, TruncatedFileError, UsageError
from .base import Sink, Source

_IOV_MAX = 1024
# A save starts the disk writing each WRITEBACK_BYTES written, instead of leaving it all to the final fsync: the
# kernel's own writeback starts only past dirty_background_ratio (GBs on a server), so a save was "copy everything
# to the page cache, then wait for the disk"; now the disk works while the rest is copied and the fsync waits for
# the tail. At most 2 x WRITEBACK_BYTES are dirty and not yet under writeback at any time.
WRITEBACK_BYTES = 32 << 20
_SYNC_FILE_RANGE_WAIT_BEFORE, _SYNC_FILE_RANGE_WRITE = 1, 2
_sync_file_range: list[Callable[[int, int, int, int], int] | None] = []  # learnt on first use (Linux only)


def _start_writeback(fd: int, offset: int, nbytes: int, *, wait_before: bool = False) -> bool:
    """Start writing ``nbytes`` at ``offset`` of ``fd`` to the disk now (``sync_file_range``); with ``wait_before``
    first wait for writeback already under way in that range. Returns False where unsupported (then the commit's
    fsync writes everything, as before). Durability is the fsync's job, never this call's."""
    if not _sync_file_range:
        fn = None
        if sys.platform.startswith("linux"):
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)  # the process's own symbols include libc
            fn = getattr(libc, "sync_file_range", None)
            if fn is not None:
                fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
                fn.restype = ctypes.c_int
        _sync_file_range.append(fn)
    fn = _sync_file_range[0]
    if fn is None:
        return False
    flags = _SYNC_FILE_RANGE_WRITE | (_SYNC_FILE_RANGE_WAIT_BEFORE if wait_before else 0)
    return fn(fd, offset, nbytes, flags) == 0  # an error (a file system without it): the fsync still does all


class FileSource(Source):
    """A local file read with ``os.preadv`` from any number of threads."""

    preferred_concurrency = 8

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self.uri = self.path
        self._fd = _open_regular(self.path)
        try:
            self.size = os.lseek(self._fd, 0, os.SEEK_END)  # st_size is 0 for a block device
        except OSError as exc:
            os.close(self._fd)
            raise SourceError(f"cannot read {self.path}: {exc.strerror}") from exc
        self._direct_fd: int | None = None
        self._finalizer = weakref.finalize(self, _close_fds, [self._fd])  # a source dropped without close()

    def fileno(self) -> int:
        return self._fd

    def direct_fileno(self) -> int | None:
        """A second descriptor opened with O_DIRECT (page cache bypassed), or None where unsupported."""
        if self._direct_fd is None and hasattr(os, "O_DIRECT") and self._fd >= 0:
            try:
                self._direct_fd = os.open(self.path, os.O_RDONLY | os.O_DIRECT)
                self._finalizer.detach()
                self._finalizer = weakref.finalize(self, _close_fds, [self._fd, self._direct_fd])
            except OSError:
                self._direct_fd = -1
        return None if self._direct_fd in (None, -1) else self._direct_fd

    def read_into(self, offset: int, buf: memoryview) -> None:
        self.read_into_many(offset, [buf])

    def read_into_many(self, offset: int, bufs: Sequence[memoryview], fd: int | None = None) -> None:
        if offset < 0:  # preadv at offset -1 reads at the file position (0): silently the wrong bytes
            raise UsageError(f"negative offset {offset}")
        fd = self._fd if fd is None else fd
        pending = [memoryview(b).cast("B") for b in bufs if len(b)]
        first = 0  # pending[first:] still need bytes (an index, not pop(0): that is quadratic in the buffers)
        while first < len(pending):
            batch = pending[first : first + _IOV_MAX]
            try:
                n = os.preadv(fd, batch, offset)
            except OSError as exc:
                raise SourceError(f"read of {self.path} at offset {offset} failed: {exc.strerror}") from exc
            if n == 0:
                raise TruncatedFileError(f"{self.path} ends at {offset}, before the data the index promises")
            offset += n
            while n:  # skip the buffers that are full, trim the partly filled one
                head = pending[first]
                if n >= len(head):
                    n -= len(head)
                    first += 1
                else:
                    pending[first] = head[n:]
                    n = 0

    def close(self) -> None:
        self._finalizer()  # closes the descriptors once; later calls do nothing
        self._fd = -1
        self._direct_fd = -1  # never reopened after close


def _open_regular(path: str) -> int:
    """A read-only descriptor of ``path``, refusing what is not a regular file or a block device: opened
    non-blocking first, so a FIFO (or a device that waits) cannot block the open, then made blocking again.

    Raises:
        SourceError: the path cannot be opened, or is a FIFO, socket, character device or directory.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise SourceError(f"cannot open {path}: {exc.strerror}") from exc
    try:
        mode = os.fstat(fd).st_mode
        if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
            kind = "a FIFO" if stat.S_ISFIFO(mode) else "a directory" if stat.S_ISDIR(mode) else "not a regular file"
            raise SourceError(
                f"cannot read {path}: it is {kind} (weights are read from regular files or block devices)"
            )
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        fcntl.fcntl(fd, fcntl.F_SETFL, flags & ~os.O_NONBLOCK)
    except BaseException as exc:
        os.close(fd)
        if isinstance(exc, OSError) and not isinstance(exc, SourceError):
            raise SourceError(f"cannot open {path}: {exc.strerror}") from exc
        raise
    return fd


def _close_fds(fds: list[int | None]) -> None:
    for fd in fds:
        if fd is not None and fd >= 0:
            try:
                os.close(fd)
            except OSError:
                pass


class FileSink(Sink):
    """Writes to a temporary file beside ``path`` and renames it into place on commit.

    An error, Ctrl-C or (through the CLI) SIGTERM before ``commit`` removes the temporary file; only a process
    killed outright (SIGKILL, power loss) leaves a stray ``<name>.<random>.tmp``, never a file at ``path`` that
    looks complete. The next successful write of the same ``path`` removes such strays: the live writer holds an
    exclusive ``flock`` on its temporary file, so one that can be locked belongs to no running writer.
    """

    can_rewrite_head = True

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self.uri = self.path
        directory = os.path.dirname(os.path.abspath(self.path))
        try:
            os.makedirs(directory, exist_ok=True)
            fd, self._tmp = _locked_temp(self.path, directory)
        except OSError as exc:
            raise SinkError(f"cannot create a file in {directory}: {exc.strerror}") from exc
        self._f = os.fdopen(fd, "wb", buffering=0)
        self._done = False
        self._pos = 0  # bytes written (sequentially) so far
        self._flushed = 0  # bytes whose writeback has been started
        self._prev_flush = 0  # start of the range started before that one

    def write(self, data: memoryview | bytes) -> None:
        view = memoryview(data).cast("B")
        try:
            while len(view):
                n = self._f.write(view)
                view = view[n:]
                self._pos += n
        except OSError as exc:
            self.abort()
            raise SinkError(f"write to {self.path} failed: {exc.strerror}") from exc
        if self._pos - self._flushed >= WRITEBACK_BYTES:
            # wait for the range started last time (it had a whole window to finish: the disk keeps up, or the
            # writer slows to its pace instead of piling up dirty pages), then start this one
            fd = self._f.fileno()
            if self._flushed > self._prev_flush:
                _start_writeback(fd, self._prev_flush, self._flushed - self._prev_flush, wait_before=True)
            _start_writeback(fd, self._flushed, self._pos - self._flushed)
            self._prev_flush, self._flushed = self._flushed, self._pos

    def rewrite_head(self, data: bytes) -> None:
        os.pwrite(self._f.fileno(), data, 0)

    def commit(self) -> None:
        try:
            os.fsync(self._f.fileno())
            self._f.close()
            os.chmod(self._tmp, 0o644)
            os.replace(self._tmp, self.path)
        except OSError as exc:
            self.abort()
            raise SinkError(f"cannot commit {self.path}: {exc.strerror}") from exc
        self._done = True
        _remove_stale_temps(self.path)

    def abort(self) -> None:
        if self._done:
            return
        self._done = True
        try:
            self._f.close()
        finally:
            try:
                os.unlink(self._tmp)
            except FileNotFoundError:
                pass


def _locked_temp(path: str, directory: str) -> tuple[int, str]:
    """A new ``<name>.<random>.tmp`` beside ``path``, held with an exclusive ``flock`` ("a writer is alive")."""
    while True:
        fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=directory)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # a file system without flock: others then never remove our strays
            return fd, tmp
        if os.fstat(fd).st_nlink:
            return fd, tmp
        os.close(fd)  # a concurrent clean-up took it for a stray between mkstemp and flock: take another


def _remove_stale_temps(path: str) -> None:
    """Remove ``<path>.<random>.tmp`` files that no live writer holds (left by a killed write of ``path``)."""
    directory, name = os.path.split(os.path.abspath(path))
    pattern = re.compile(re.escape(name) + r"\.[a-z0-9_]{8}\.tmp")  # tempfile.mkstemp's 8 random characters
    try:
        candidates = [e for e in os.listdir(directory) if pattern.fullmatch(e)]
    except OSError:
        return
    for entry in candidates:
        stray = os.path.join(directory, entry)
        try:
            fd = os.open(stray, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # fails while its writer runs
            os.unlink(stray)
        except OSError:
            pass
        finally:
            os.close(fd)
