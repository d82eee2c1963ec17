"""Zero-copy CPU loads: tensors are views of one private, copy-on-write mapping of the file.

Why it is safe:
- ``MAP_PRIVATE`` with ``PROT_READ | PROT_WRITE``: a write to a tensor copies that page for this process;
  it never reaches the file or other processes mapping it.
- Lifetime: every tensor is a slice of one ``torch.frombuffer`` view of the ``mmap`` object, so the mapping
  lives as long as any tensor does, whatever happens to the deserializer or its source.
- A mapping holds the file's inode: a file replaced by an atomic rename (``os.replace``) or unlinked keeps
  serving the old bytes. Truncating or rewriting the file *in place* is not supported (the same holds for
  ``safetensors`` and ``torch.load(mmap=True)``): pages not yet copied would show the new bytes or fault.

Why it is fast: a warm file costs no copy and no fresh memory, only page-table entries. The pages are
faulted in at load time (``MADV_POPULATE_READ``, Linux >= 5.14) by several threads over disjoint ranges, so
the first access does not stall later and a cold file is read at load time, with the kernel's readahead
(the mapping is marked ``MADV_SEQUENTIAL`` for cold files). ``MADV_POPULATE_READ`` maps page-cache pages
read-only; unlike ``MAP_POPULATE`` on a writable private mapping it makes no copies.
"""

from __future__ import annotations

import mmap
import threading
from collections.abc import Callable, Sequence

import torch

from ..format.dtypes import element_size
from ..format.index import TensorEntry
from .memory import MADV_POPULATE_READ, PAGE, madvise

_POPULATE_SUPPORTED: list[bool] = []  # learnt on first use: [True] or [False]


def is_zero_copy(entry: TensorEntry) -> bool:
    """Whether ``entry`` can be a view of the mapping: its file offset is a multiple of its element size
    (the mapping starts on a page boundary, so file and memory alignment agree)."""
    return entry.offset % max(1, element_size(entry.dtype)) == 0


class FileMapping:
    """A private copy-on-write mapping of a whole local file, and the tensors viewing it.

    Args:
        fd: an open descriptor of the file (duplicated by ``mmap``; the caller may close its own).
        size: the file size in bytes.

    Raises:
        OSError: the file cannot be mapped.
    """

    def __init__(self, fd: int, size: int) -> None:
        self.size = size
        self._mm = mmap.mmap(fd, size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        # one view owns the reference to the mmap object; every tensor is a slice of it
        self.base = torch.frombuffer(self._mm, dtype=torch.uint8)
        self.address = self.base.data_ptr()

    def advise_sequential(self) -> None:
        """Tell the kernel reads go front to back (larger readahead on faults, for cold files)."""
        madvise(self.address, self.size, mmap.MADV_SEQUENTIAL)

    def tensor(self, entry: TensorEntry) -> torch.Tensor:
        """``entry`` as a view of the mapping (``is_zero_copy(entry)``) or, when unaligned, a copy of its bytes."""
        raw = self.base[entry.offset : entry.offset + entry.length]
        if not is_zero_copy(entry):
            raw = raw.clone()  # a fresh allocation is aligned for every dtype
        return raw.view(entry.dtype).reshape(entry.shape)

    def populate(self, entries: Sequence[TensorEntry], threads: int) -> None:
        """Fault in the pages of ``entries`` now, ``threads`` threads over disjoint contiguous ranges."""
        ranges = _page_ranges(entries)
        total = sum(n for _, n in ranges)
        if not total:
            return
        slices = _split(ranges, max(1, min(threads, total // (4 << 20) or 1)))
        run_parallel([lambda s=s: self._populate(s) for s in slices])

    def _populate(self, ranges: list[tuple[int, int]]) -> None:
        for start, length in ranges:
            if _POPULATE_SUPPORTED != [False]:
                err = madvise(self.address + start, length, MADV_POPULATE_READ)
                if err == 0:
                    if not _POPULATE_SUPPORTED:
                        _POPULATE_SUPPORTED.append(True)
                    continue
                if err != 22 or _POPULATE_SUPPORTED == [True]:  # EINVAL: an older kernel
                    raise OSError(err, f"madvise(MADV_POPULATE_READ) at {start} failed")
                _POPULATE_SUPPORTED[:] = [False]
            self.base[start : start + length : PAGE].sum()  # one read per page (torch releases the GIL)


def _page_ranges(entries: Sequence[TensorEntry]) -> list[tuple[int, int]]:
    """The page-aligned, merged (start, length) ranges covering the entries' bytes."""
    spans = sorted((e.offset // PAGE * PAGE, e.offset + e.length) for e in entries if e.length)
    out: list[list[int]] = []
    for start, end in spans:
        if out and start <= out[-1][1]:
            out[-1][1] = max(out[-1][1], end)
        else:
            out.append([start, end])
    return [(s, e - s) for s, e in out]


def _split(ranges: list[tuple[int, int]], parts: int) -> list[list[tuple[int, int]]]:
    """Cut the ranges into ``parts`` groups of about equal bytes, each contiguous in file order."""
    total = sum(n for _, n in ranges)
    share = -(-total // parts)
    share = -(-share // PAGE) * PAGE
    groups: list[list[tuple[int, int]]] = [[]]
    room = share
    for start, length in ranges:
        while length:
            n = min(length, room)
            if n < length:  # a cut inside a range: the next part must start on a page (madvise needs it)
                n = max(PAGE, n // PAGE * PAGE)
            groups[-1].append((start, n))
            start, length, room = start + n, length - n, room - n
            if room <= 0:
                groups.append([])
                room = share
    return [g for g in groups if g]


def run_parallel(jobs: Sequence[Callable[[], object]]) -> None:
    """Run each job on its own thread (the first on this one); re-raise the first failure."""
    errors: list[BaseException] = []

    def wrap(job: Callable[[], object]) -> None:
        try:
            job()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=wrap, args=(j,), name="hf-tensorizer-map") for j in jobs[1:]]
    for t in threads:
        t.start()
    if jobs:
        wrap(jobs[0])
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
