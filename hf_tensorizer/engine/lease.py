"""A read lease that keeps a mapped artifact's bytes fixed for as long as this process maps them, at no copy.

Why: a mapped load (:mod:`.mapping`) makes the page cache's pages the tensors — no copy, no fresh memory — but a
long-running server that maps its weights file would see an in-place rewrite (``cp new model.tensors``,
``rsync --inplace``) as changed weights, or die of ``SIGBUS`` after a truncation. Copying every byte up front
(``pread``, the predictor's sealed snapshot) closes that hole and costs ~0.3 s of CPU per GB; on a busy machine at
start-up that is the difference to a loader that just maps the file.

How: Linux *leases* (``fcntl(F_SETLEASE, F_RDLCK)``). While this process holds a read lease, any other
``open()`` of the file for writing, and any ``truncate()``, blocks in the kernel and this process is told. The
lease's watcher thread then moves every mapping of the file in this process (the registry in :mod:`.mapping`) onto
a private in-memory copy at the same addresses (``mmap(MAP_FIXED)`` over a ``memfd`` holding the mapped bytes:
the tensors neither move nor change), and only then releases the lease: the writer's ``open`` returns and writes to
a file nothing here maps any more. The writer waits for the copy (about 0.3 s per GB); nobody pays anything when
nobody writes.

The kernel gives a lease holder ``/proc/sys/fs/lease-break-time`` seconds (45 by default) before it lets the
writer through anyway; :meth:`FileLease.take` refuses when that is shorter than ``min_break_s``. A move that fails
(no memory for the copy) is not survivable without risking changed weights: the process exits (status 70) before
the writer can proceed, unless the caller passes its own ``on_failure``.

Notification without signal handlers: the lease's signal is ``SIGURG`` (ignored by default, unlike ``SIGIO``),
directed with ``F_SETOWN_EX`` to the watcher thread, which blocks it and waits for it with ``sigtimedwait``, and
also polls ``F_GETLEASE`` every :data:`POLL_S` (a notification sent in the instant between taking the lease and
redirecting it reaches the process and is ignored). Nothing is installed process-wide.

Scope: mappings made by this library (:class:`~.mapping.FileMapping`, ``own_pages``) of one local file. Writes a
thread makes to a mapped tensor *while* it is being moved can be lost (inference never writes its weights; a
training process should load with ``strategy="pread"``). Writers on another machine (NFS clients) do not break
a local lease; the lease is taken only on filesystems that grant it. A child forked after the lease closes its copy
of the lease's descriptor (the lease stays the parent's) and its copies of the mappings are not moved.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import mmap
import os
import signal
import struct
import sys
import threading
import time
import weakref
from collections.abc import Callable

from ..errors import LeaseUnavailableError

log = logging.getLogger("hf_tensorizer")

POLL_S = 0.5  # the watcher's fallback check of the lease's state, between signals
LEASE_SIGNAL = signal.SIGURG  # ignored by default: a stray delivery to another thread does nothing
F_SETOWN_EX = 15  # <asm-generic/fcntl.h>; not in Python's fcntl module
F_OWNER_TID = 0
EXIT_STATUS = 70  # EX_SOFTWARE: the mapped weights could not be moved before a writer proceeds
_COPY_BYTES = 256 << 20
_MAP_FIXED = getattr(mmap, "MAP_FIXED", 0x10)  # <asm-generic/mman-common.h>; older Pythons do not export it
_BREAK_TIME = "/proc/sys/fs/lease-break-time"
_LEASES_ENABLE = "/proc/sys/fs/leases-enable"


def supported() -> bool:
    """Whether this platform has file leases and the calls the watcher needs (Linux)."""
    return (sys.platform.startswith("linux") and hasattr(fcntl, "F_SETLEASE") and hasattr(fcntl, "F_SETSIG")
            and hasattr(signal, "sigtimedwait") and hasattr(os, "memfd_create"))  # fmt: skip


def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


class FileLease:
    """A read lease on a local file and the thread that honours it (see the module docstring).

    Use :meth:`take`; :meth:`close` gives the lease back (mappings stay on the file from then on).

    Attributes:
        path: the leased file.
        broken: set once a writer asked for the file and the mappings were moved off it.
        moved_bytes: bytes of mappings moved into private memory when the lease broke.
    """

    def __init__(self, path: str, fd: int, on_failure: Callable[[BaseException], None] | None) -> None:
        self.path = path
        self._fd = fd
        st = os.fstat(fd)
        self._key = (st.st_dev, st.st_ino)
        self._on_failure = on_failure
        self.broken = threading.Event()
        self.moved_bytes = 0
        self.move_seconds: float | None = None
        self._closed = False
        self._lock = threading.Lock()  # the descriptor is closed once, by whoever releases first
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._watch, name="hf_tensorizer-lease", daemon=True)

    @classmethod
    def take(cls, path: str | os.PathLike[str], *, min_break_s: float = 10.0,
             on_failure: Callable[[BaseException], None] | None = None) -> FileLease:  # fmt: skip
        """Take a read lease on ``path`` and start its watcher.

        Args:
            path: a local regular file (an artifact's ``model.tensors``).
            min_break_s: the least ``lease-break-time`` accepted: the time a blocked writer waits for the move.
            on_failure: called (from the watcher thread, with the lease still held) when the mappings could not be
                moved; default: log and exit the process with status 70 before the writer proceeds.

        Returns:
            The lease, held.

        Raises:
            LeaseUnavailableError: no leases here (platform, ``leases-enable``, the filesystem), the file is open
                for writing somewhere, the break time is too short, or the file is not ours to lease.
            OSError: the file cannot be opened.
        """
        path = os.fspath(path)
        if not supported():
            raise LeaseUnavailableError(f"{path}: file leases need Linux")
        if _read_int(_LEASES_ENABLE) == 0:
            raise LeaseUnavailableError(f"{path}: leases are disabled ({_LEASES_ENABLE} is 0)")
        break_s = _read_int(_BREAK_TIME)
        if break_s is not None and break_s < min_break_s:
            raise LeaseUnavailableError(f"{path}: {_BREAK_TIME} is {break_s} s, shorter than the {min_break_s:g} s "
                                        "a writer must wait while the mapped tensors are moved")  # fmt: skip
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        lease = cls(path, fd, on_failure)
        lease._thread.start()
        lease._ready.wait()
        if lease._error is None:
            _HELD.add(lease)
        else:
            lease._fd = -1
            os.close(fd)
            err = lease._error
            reason = {errno.EAGAIN: "it is open for writing", errno.EACCES: "the file is not this user's",
                      errno.EPERM: "the file is not this user's"}.get(getattr(err, "errno", 0), str(err))  # fmt: skip
            raise LeaseUnavailableError(f"{path}: no read lease ({reason})") from err
        return lease

    # ---- the watcher thread -----------------------------------------------------------------------------

    def _watch(self) -> None:
        try:
            signal.pthread_sigmask(signal.SIG_BLOCK, [LEASE_SIGNAL])  # this thread only: it waits for it below
            fcntl.fcntl(self._fd, fcntl.F_SETSIG, int(LEASE_SIGNAL))  # before the lease: never SIGIO (fatal)
            fcntl.fcntl(self._fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
            try:  # taking the lease made the process its owner; the signal is for this thread
                fcntl.fcntl(self._fd, F_SETOWN_EX, struct.pack("ii", F_OWNER_TID, threading.get_native_id()))
            except OSError:
                pass  # process-directed: ignored by default; the polling below still sees the break
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        while not self._closed:
            try:
                signal.sigtimedwait([LEASE_SIGNAL], POLL_S)
            except OSError:
                pass
            if self._closed:
                return
            try:
                state = fcntl.fcntl(self._fd, fcntl.F_GETLEASE)
            except OSError:
                return
            if state != fcntl.F_RDLCK:  # breaking: a writer waits in open() or truncate()
                self._break()
                return

    def _break(self) -> None:
        started = time.perf_counter()
        try:
            self.moved_bytes = move_mappings(self._key)
        except BaseException as exc:
            log.critical("%s is being opened for writing and its mapped tensors could not be moved off it: %s",
                         self.path, exc)  # fmt: skip
            (self._on_failure or _exit)(exc)
            return
        self.move_seconds = time.perf_counter() - started
        self.broken.set()
        self._release()
        log.warning("%s was opened for writing: its mapped tensors (%.2f GB) moved into private memory in %.2f s "
                    "before the writer went on", self.path, self.moved_bytes / 1e9, self.move_seconds)  # fmt: skip

    def _release(self) -> None:
        with self._lock:
            fd, self._fd = self._fd, -1
        if fd < 0:
            return
        try:
            fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
        except OSError:
            pass
        os.close(fd)

    def _forget_in_child(self) -> None:
        # a forked child shares the lease's open file but has no watcher: its copy of the descriptor goes (the
        # lease stays the parent's), and so do its copies of the mappings' promise (docs/security.md)
        with self._lock:
            fd, self._fd = self._fd, -1
        self._closed = True
        if fd >= 0:
            os.close(fd)

    def close(self) -> None:
        """Give the lease back and stop the watcher (idempotent). Mappings of the file stay on it."""
        if self._closed:
            return
        self._closed = True
        if self._thread.is_alive() and self._thread.ident is not None:
            try:
                signal.pthread_kill(self._thread.ident, LEASE_SIGNAL)  # wakes its sigtimedwait
            except (OSError, ProcessLookupError):
                pass
            self._thread.join(timeout=5)
        self._release()

    def __enter__(self) -> FileLease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_HELD: weakref.WeakSet[FileLease] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for lease in list(_HELD):
        lease._forget_in_child()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _exit(exc: BaseException) -> None:
    logging.shutdown()
    os._exit(EXIT_STATUS)


_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]


def move_mappings(key: tuple[int, int]) -> int:
    """Move every live mapping of the file ``key`` (``(st_dev, st_ino)``) onto private memory, in place.

    Returns:
        The bytes moved.

    Raises:
        OSError: no memory for a copy, or the kernel refused the new mapping.
    """
    from .mapping import take_mappings  # torch: imported when a lease breaks, not when one is taken

    moved = 0
    for mm in take_mappings(*key):
        moved += _move(mm)
    return moved


def _move(mm: mmap.mmap) -> int:
    """Replace ``mm``'s pages by a ``memfd`` holding the same bytes, at the same address (``MAP_FIXED``)."""
    if mm.closed:
        return 0
    length = len(mm)
    # an exported buffer for the whole move: close() now raises BufferError, so the range stays this mapping's
    pin = ctypes.c_char.from_buffer(mm)
    address = ctypes.addressof(pin)
    fd = os.memfd_create("hf_tensorizer-moved", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, length)
        with memoryview((ctypes.c_char * length).from_address(address)).cast("B") as view:
            done = 0
            while done < length:  # what this process sees: the file's pages and any it has written itself
                done += os.pwrite(fd, view[done : done + _COPY_BYTES], done)
        got = _libc.mmap(address, length, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE | _MAP_FIXED, fd, 0)
        if got != address:
            err = ctypes.get_errno()
            raise OSError(err, f"mmap(MAP_FIXED) over the mapped tensors failed: {os.strerror(err)}")
    finally:
        os.close(fd)
        del pin
    return length
