"""Local files: positional reads (thread-safe, no shared file position), O_DIRECT reads and writes, atomic writes."""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import queue
import re
import stat
import sys
import tempfile
import threading
import weakref
from collections.abc import Callable, Sequence

from .. import constants
from ..errors import SinkError, SourceError, TruncatedFileError, UsageError
from .base import Sink, Source

_IOV_MAX = 1024

# Saves write with O_DIRECT through DIRECT_BUFFERS page-aligned staging buffers of DIRECT_BUFFER_BYTES: through the
# page cache, a save paid a fresh page-cache page fault per 4 KiB written (0.8-1.7 s of system time for 0.6 GB on
# the dev VM) and then waited for the disk anyway at the fsync. One buffer fills while the others are on their
# way to the disk (a background thread: O_DIRECT writes block until the device has the bytes).
DIRECT_BUFFER_BYTES = 4 << 20
DIRECT_BUFFERS = 3
_DIRECT_ALIGN = 4096  # offsets, lengths and addresses of O_DIRECT writes (the largest logical block size in use)
_fallocate: list[Callable[[int, int, int, int], int] | None] = []  # learnt on first use (Linux only)
# File systems whose files are memory: a save there writes straight from the tensors through the page cache, which
# is the file. Staging for O_DIRECT would copy every byte twice (tmpfs serves O_DIRECT from its page cache since
# Linux 6.6) and fallocate would zero pages the writes then overwrite: 0.24 s against 0.19 s for 0.59 GB on the
# dev VM (docs/benchmarks.md).
MEMORY_FILE_SYSTEMS = frozenset({"tmpfs", "ramfs"})
_FS_TYPES: dict[int, str | None] = {}  # st_dev -> type; a reused device number costs speed only, never bytes


def mount_fs_type(mountinfo: str, major: int, minor: int) -> str | None:
    """The file system type of the mount of device ``major:minor`` in ``/proc/self/mountinfo`` text, or None.

    Each line is ``id parent major:minor root mount-point options [optional fields] - type source options``;
    spaces inside paths are escaped (``\\040``), so `` - `` only ever separates the two halves.
    """
    want = f"{major}:{minor}"
    for line in mountinfo.splitlines():
        fields = line.split(" ", 3)
        if len(fields) > 2 and fields[2] == want and " - " in line:
            fs_type = line.split(" - ", 1)[1].split(" ", 1)[0]
            if fs_type:
                return fs_type
    return None


def _memory_backed(fd: int) -> bool:
    """Whether ``fd``'s file lives on a file system of ``MEMORY_FILE_SYSTEMS`` (Linux; False elsewhere)."""
    if not sys.platform.startswith("linux"):
        return False
    dev = os.fstat(fd).st_dev
    if dev not in _FS_TYPES:
        try:
            with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
                text = f.read()
        except OSError:
            text = ""
        _FS_TYPES[dev] = mount_fs_type(text, os.major(dev), os.minor(dev))
    return _FS_TYPES[dev] in MEMORY_FILE_SYSTEMS


def _preallocate(fd: int, nbytes: int) -> bool:
    """Reserve ``nbytes`` for ``fd`` with the ``fallocate`` system call (never glibc's emulation, which writes
    zeros where the file system cannot). Returns False where unsupported; the writes then allocate as they go."""
    if not _fallocate:
        fn = None
        if sys.platform.startswith("linux"):
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)  # the process's own symbols include libc
            fn = getattr(libc, "fallocate64", None) or getattr(libc, "fallocate", None)
            if fn is not None:
                fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
                fn.restype = ctypes.c_int
        _fallocate.append(fn)
    fn = _fallocate[0]
    return fn is not None and nbytes > 0 and fn(fd, 0, 0, nbytes) == 0


def _set_direct(fd: int, on: bool) -> bool:
    """Turn O_DIRECT on or off for ``fd``; False where the file system refuses it (EINVAL)."""
    if not hasattr(os, "O_DIRECT"):
        return False
    try:
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        fcntl.fcntl(fd, fcntl.F_SETFL, (flags | os.O_DIRECT) if on else (flags & ~os.O_DIRECT))
    except OSError:
        return False
    return True


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

    With ``direct`` (the default, ``HF_TENSORIZER_DIRECT_WRITE=0`` turns it off) the bytes go to the disk with
    O_DIRECT through ``DIRECT_BUFFERS`` page-aligned buffers of ``DIRECT_BUFFER_BYTES`` (the memory a save uses
    beyond the tensors), bypassing the page cache: a file just written is then not cached. Where the file system
    refuses O_DIRECT (EINVAL) the same buffers are written through the page cache instead. The commit fsyncs
    either way, before the rename.

    Args:
        path: the file to write.
        direct: write with O_DIRECT; ``None`` follows ``HF_TENSORIZER_DIRECT_WRITE`` (on unless set to 0), except
            on tmpfs and ramfs (``MEMORY_FILE_SYSTEMS``), where the bytes go straight from the tensors into the
            file's memory. Pass ``False`` when the file is read again right away (the page cache then serves that
            read).

    Raises:
        SinkError: the file cannot be created.
    """

    can_rewrite_head = True
    copies_writes = True  # see Sink.copies_writes

    def __init__(self, path: str | os.PathLike[str], *, direct: bool | None = None) -> None:
        self.path = os.fspath(path)
        self.uri = self.path
        directory = os.path.dirname(os.path.abspath(self.path))
        try:
            os.makedirs(directory, exist_ok=True)
            fd, self._tmp = _locked_temp(self.path, directory)
        except OSError as exc:
            raise SinkError(f"cannot create a file in {directory}: {exc.strerror}") from exc
        self._fd = fd
        self._done = False
        self._pos = 0  # bytes written (sequentially) so far
        self._head: bytes | None = None  # a rewritten head, written at commit
        if direct is None:
            direct = constants.DIRECT_WRITE and not _memory_backed(fd)
        self._staged = _StagedWriter(fd, self.path) if direct and _set_direct(fd, True) else None

    @property
    def direct(self) -> bool:
        """Whether the bytes reach the file with O_DIRECT (False: buffered, by choice or as a fallback)."""
        return self._staged is not None and self._staged.direct

    def expect_size(self, nbytes: int) -> None:
        """Reserve the file's final size on the disk up front (``fallocate``; nothing where unsupported)."""
        if self._staged is not None and self._pos == 0:
            _preallocate(self._fd, nbytes)

    def write(self, data: memoryview | bytes) -> None:
        view = memoryview(data).cast("B")
        try:
            if self._staged is not None:
                self._staged.write(view)
                self._pos += len(view)
                return
            while len(view):
                n = os.write(self._fd, view)
                view = view[n:]
                self._pos += n
        except OSError as exc:
            self.abort()
            raise SinkError(f"write to {self.path} failed: {exc.strerror}") from exc

    def rewrite_head(self, data: bytes) -> None:
        if self._staged is not None:
            self._head = bytes(data)  # written at commit, once every staged byte is on the disk
        else:
            os.pwrite(self._fd, data, 0)

    def commit(self) -> None:
        try:
            if self._staged is not None:
                self._staged.finish()  # the tail, padded to the alignment; the padding is cut below
                self._staged = None
                os.ftruncate(self._fd, self._pos)  # also drops preallocated space past the end
                if self._head is not None:
                    _set_direct(self._fd, False)  # a few KiB at offset 0: buffered, then fsynced below
                    os.pwrite(self._fd, self._head, 0)
            os.fsync(self._fd)
            self._close_fd()
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
            if self._staged is not None:
                self._staged.close()
                self._staged = None
            self._close_fd()
        finally:
            try:
                os.unlink(self._tmp)
            except FileNotFoundError:
                pass

    def _close_fd(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)


class _StagedWriter:
    """Copies a sequential stream into page-aligned buffers and writes each full one at its offset from a
    background thread (O_DIRECT wants aligned addresses, offsets and lengths; Python's buffers are not aligned).

    A write the file system refuses with EINVAL turns O_DIRECT off for the descriptor and is made again through
    the page cache; every later buffer goes that way too.
    """

    def __init__(self, fd: int, path: str) -> None:
        self._fd = fd
        self._path = path
        self.direct = True
        self._maps = [mmap.mmap(-1, DIRECT_BUFFER_BYTES) for _ in range(DIRECT_BUFFERS)]  # anonymous: page-aligned
        self._free: queue.SimpleQueue[int] = queue.SimpleQueue()
        for i in range(DIRECT_BUFFERS):
            self._free.put(i)
        self._todo: queue.SimpleQueue[tuple[int, int, int] | None] = queue.SimpleQueue()
        self._error: BaseException | None = None
        self._cur = self._free.get()
        self._fill = 0  # bytes in the current buffer
        self._offset = 0  # file offset of the current buffer
        self._thread: threading.Thread | None = None

    def write(self, view: memoryview) -> None:
        while len(view):
            buf = self._maps[self._cur]
            take = min(DIRECT_BUFFER_BYTES - self._fill, len(view))
            buf[self._fill : self._fill + take] = view[:take]
            self._fill += take
            view = view[take:]
            if self._fill == DIRECT_BUFFER_BYTES:
                self._hand_off(DIRECT_BUFFER_BYTES)

    def finish(self) -> None:
        """Write the last, partial buffer (zero-padded to the alignment) and wait for every write.

        Raises:
            OSError: a write failed.
        """
        if self._fill:
            padded = -(-self._fill // _DIRECT_ALIGN) * _DIRECT_ALIGN
            self._maps[self._cur][self._fill : padded] = bytes(padded - self._fill)
            self._hand_off(padded)
        self.close()
        if self._error is not None:
            raise self._error

    def close(self) -> None:
        """Stop the thread after the writes handed to it (an abort: their errors no longer matter)."""
        if self._thread is not None:
            self._todo.put(None)
            self._thread.join()
            self._thread = None
        for m in self._maps:
            try:
                m.close()
            except BufferError:  # a view still exported: the memory goes with the last reference
                pass
        self._maps = []

    def _hand_off(self, length: int) -> None:
        if self._error is not None:
            raise self._error
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="hf-tensorizer-file-write", daemon=True)
            self._thread.start()
        self._todo.put((self._cur, self._offset, length))
        self._offset += length
        self._fill = 0
        self._cur = self._free.get()  # waits while every other buffer is on its way to the disk
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        while (job := self._todo.get()) is not None:
            i, offset, length = job
            if self._error is None:
                try:
                    self._pwrite_all(memoryview(self._maps[i])[:length], offset)
                except BaseException as exc:  # any error: raised on the writing thread, never a silent hang
                    self._error = exc.with_traceback(None)  # its frames would pin the buffer's memoryviews
            self._free.put(i)

    def _pwrite_all(self, view: memoryview, offset: int) -> None:
        while len(view):
            try:
                n = os.pwrite(self._fd, view, offset)
            except OSError as exc:
                if exc.errno != errno.EINVAL or not self.direct:
                    raise
                self.direct = False  # this file system takes no O_DIRECT writes: the page cache it is
                if not _set_direct(self._fd, False):
                    raise
                continue
            view, offset = view[n:], offset + n


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
