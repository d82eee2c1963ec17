"""How much of a local file sits in the page cache (picks warm vs cold reads), and evicting it."""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os

# the process's own symbols include libc on POSIX; find_library("c") would run ldconfig (~5 ms per import)
_libc = ctypes.CDLL(None if os.name == "posix" else ctypes.util.find_library("c"), use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
_MAP_FAILED = ctypes.c_void_p(-1).value


def resident_fraction(fd: int, size: int, *, samples: int = 64, window: int = 64 << 10) -> float | None:
    """Estimated fraction of the file's pages in the page cache (0..1), or None where it cannot be told.

    Looks at ``samples`` evenly spaced windows instead of every page: the answer only picks warm versus
    cold reads, and a full scan of a large file would cost more than the choice saves.
    """
    if size <= 0:
        return 1.0
    addr = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
    if addr in (None, _MAP_FAILED):
        return None
    try:
        page = mmap.PAGESIZE
        step = max(window, (size // samples) // page * page)
        resident = total = 0
        vec = (ctypes.c_ubyte * (window // page))()
        for start in range(0, size, step):
            length = min(window, size - start)
            if _libc.mincore(addr + start, length, vec) != 0:
                return None
            n = -(-length // page)
            resident += n - bytes(vec)[:n].count(0)  # bit 0 is the only one Linux sets
            total += n
        return resident / total
    finally:
        _libc.munmap(addr, size)


def evict(path: str | os.PathLike[str]) -> None:
    """Drop a file's pages from the page cache (flushes dirty pages first), for cold-read measurements."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
