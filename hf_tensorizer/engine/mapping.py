"""Zero-copy CPU loads: tensors are views of one private, copy-on-write mapping of the file.

Why it is safe:
- ``MAP_PRIVATE`` with ``PROT_READ | PROT_WRITE``: a write to a tensor copies that page for this process;
  it never reaches the file or other processes mapping it.
- Lifetime: every tensor is ``torch.frombuffer`` over its byte range of the ``mmap`` object, so each
  tensor owns a storage of exactly its bytes (``torch.save``, pickling, ``share_memory_()`` and storage-size
  accounting see that tensor only, as for safetensors' ``load_file``), its data pointer is inside the mapping
  (zero-copy), and the mapping lives as long as any tensor does, whatever happens to the deserializer or its source.
- A mapping holds the file's inode: a file replaced by an atomic rename (``os.replace``) or unlinked keeps
  serving the old bytes. Truncating or rewriting the file *in place* (``cp new old``, ``rsync --inplace``) is
  not supported after the load (the same holds for ``safetensors`` and ``torch.load(mmap=True)``): pages not yet
  copied show the new bytes, or fault with SIGBUS past a new end. A file found shorter than it was when opened,
  before or during a load, is an ``ObjectChangedError``. Long-lived processes whose files may be rewritten in
  place hold a read lease on the file from before the load (:mod:`.lease`: a writer then waits while every mapping
  this module made of the file moves into private memory; the registry below is how the lease finds them), or load
  with ``strategy="pread"`` (copies; docs/security.md).

Why it is fast: the page-cache pages *are* the tensors, so a load costs no copy and no fresh memory, only
page-table entries. A warm file's pages are mapped by their first access: a fault maps a whole large folio of the
page cache (about 1,300 faults for 0.6 GB on the dev VM, kernel 6.18), while ``MADV_POPULATE_READ`` walks page by
page and cost ~1.7x the CPU time (24 ms against 14 ms per 0.6 GB, load + first touch, fresh processes); spread over
threads it also lost 1.5-2x on a machine whose cores are busy, as servers' and notebooks' are (docs/benchmarks.md).
A cold file is first pulled through the page cache (:meth:`FileMapping.read_through`): threads claim fixed-size
pieces in file order and ``sendfile`` each to ``/dev/null`` — a sized read of exactly that piece with no copy to
user memory — then map it and read a byte of each page while the other threads still wait on the disk.
``MADV_POPULATE_READ`` maps page-cache pages read-only; unlike ``MAP_POPULATE`` on a writable private mapping it
makes no copies.
"""

from __future__ import annotations

import errno
import mmap
import os
import threading
import time
import weakref
from collections.abc import Callable, Sequence

import torch

from ..errors import ObjectChangedError, SourceError
from ..format.dtypes import element_size
from ..format.index import FileIndex, TensorEntry
from .memory import MADV_POPULATE_READ, PAGE, madvise
from .pagecache import read_into_cache

_POPULATE_SUPPORTED: list[bool] = []  # learnt on first use: [True] or [False]
_SENDFILE_SUPPORTED: list[bool] = [hasattr(os, "sendfile")]  # to /dev/null: Linux; set to [False] on refusal
_SENDFILE_REFUSALS = (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSOCK)
# Reading a cold file through the page cache: pieces large enough that the kernel reads each as a sequential
# stream in large folios, small enough that streams finishing at different times keep the disk busy while others
# touch their pages. 2-core VM, virtio disk, 0.92 GB, alternating fresh processes, load + touch of every page,
# 8 streams: 8 MiB pieces 1.4-1.8 GB/s, 16 MiB 1.9-2.1, 32 MiB 1.6-1.9; torch.load(mmap) 1.3-1.8
# (docs/benchmarks.md).
READ_THROUGH_PIECE_BYTES = 16 << 20
# Every live mapping this module made, by file (st_dev, st_ino): what a FileLease (engine/lease.py) moves off a file
# before a writer may change it. Weak: a mapping goes when its last tensor does.
_LIVE: dict[tuple[int, int], list[weakref.ref[mmap.mmap]]] = {}
_LIVE_LOCK = threading.Lock()


def _register(key: tuple[int, int], mm: mmap.mmap) -> None:
    with _LIVE_LOCK:
        refs = [r for r in _LIVE.get(key, ()) if r() is not None]
        refs.append(weakref.ref(mm))
        _LIVE[key] = refs


def take_mappings(dev: int, ino: int) -> list[mmap.mmap]:
    """The live mappings this process made of the file ``(dev, ino)``, forgotten here: the caller moves them off
    the file (strong references: they stay while held)."""
    with _LIVE_LOCK:
        refs = _LIVE.pop((dev, ino), ())
    return [m for r in refs if (m := r()) is not None]


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
        self.check(fd)
        try:
            self._mm = mmap.mmap(fd, size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        except ValueError as exc:  # "mmap length is greater than file size": it shrank since check()
            raise _shrank(size, os.fstat(fd).st_size) from exc
        st = os.fstat(fd)
        self._key = (st.st_dev, st.st_ino)  # the file, for a lease (engine/lease.py) to find its mappings
        _register(self._key, self._mm)
        # one view owns the reference to the mmap object; every tensor is a slice of it
        self.base = torch.frombuffer(self._mm, dtype=torch.uint8)
        self.address = self.base.data_ptr()

    def check(self, fd: int) -> None:
        """Raise :class:`ObjectChangedError` when the file is now shorter than when it was opened (touching its
        mapping past the new end would be SIGBUS). Called before each load from the mapping."""
        now = os.fstat(fd).st_size
        if now < self.size:
            raise _shrank(self.size, now)

    def tensor(self, entry: TensorEntry) -> torch.Tensor:
        """``entry`` zero-copy over the mapping (``is_zero_copy(entry)``), in a storage of exactly its bytes that
        keeps the mapping alive, or, when unaligned, a copy of its bytes. ``entry.length`` must be positive."""
        dtype, shape = entry.dtype, entry.shape
        if not is_zero_copy(entry):  # a fresh allocation is aligned for every dtype
            raw = self.base[entry.offset : entry.offset + entry.length].clone()
            return raw.view(dtype).reshape(shape)
        # one frombuffer in the tensor's own dtype, then at most one view: a warm load is this per tensor, and each
        # extra torch call costs ~1-3 us (a 144-tensor load spent a third of its fixed cost in view/reshape chains)
        try:
            t = torch.frombuffer(self._mm, dtype=dtype, offset=entry.offset, count=entry.length // dtype.itemsize)
        except (TypeError, ValueError, RuntimeError):  # a dtype this torch's frombuffer refuses: bytes, then a view
            t = torch.frombuffer(self._mm, dtype=torch.uint8, offset=entry.offset, count=entry.length).view(dtype)
        if len(shape) == 1:
            return t
        return t.view(*shape) if shape else t.view(())  # view(*dims): torch parses it faster than a tuple

    def own_pages(self, fd: int, tensor: torch.Tensor) -> torch.Tensor | None:
        """``tensor``, a view of this mapping, again on a private mapping of only its own pages.

        The new mapping lives exactly as long as the returned tensor and its views: a caller that keeps a few
        tensors of a file for long (vLLM's parameters, :mod:`hf_tensorizer.integrations.adapters.vllm.adopt`) lets
        the mapping of the whole file, and every page it touched, go once the file's other views are dropped.
        Both map the same page-cache pages: nothing is copied.

        Args:
            fd: an open descriptor of the mapped file.
            tensor: a contiguous tensor whose bytes lie inside this mapping.

        Returns:
            The same bytes as a tensor of the same dtype and shape, or ``None`` when ``tensor`` is not a
            contiguous, non-empty view of this mapping.

        Raises:
            ObjectChangedError: the file is now shorter than when it was mapped.
        """
        start = tensor.data_ptr() - self.address
        if tensor.device.type != "cpu" or not tensor.is_contiguous() or not tensor.nbytes:
            return None
        if start < 0 or start + tensor.nbytes > self.size:
            return None
        self.check(fd)
        first = start // mmap.ALLOCATIONGRANULARITY * mmap.ALLOCATIONGRANULARITY
        end = start + tensor.nbytes
        try:
            mm = mmap.mmap(fd, end - first, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE,
                           offset=first)  # fmt: skip
        except ValueError as exc:  # it shrank since check()
            raise _shrank(self.size, os.fstat(fd).st_size) from exc
        _register(self._key, mm)
        raw = torch.frombuffer(memoryview(mm)[start - first : end - first], dtype=torch.uint8)
        return raw.view(tensor.dtype).reshape(tensor.shape)

    def populate(self, entries: Sequence[TensorEntry], threads: int) -> None:
        """Fault in the pages of ``entries`` now, ``threads`` threads over disjoint contiguous ranges."""
        ranges = _page_ranges(entries)
        total = sum(n for _, n in ranges)
        if not total:
            return
        slices = _split(ranges, max(1, min(threads, total // (4 << 20) or 1)))
        run_parallel([lambda s=s: self._populate(s) for s in slices])

    def check_digests(self, index: FileIndex, entries: Sequence[TensorEntry], threads: int) -> None:
        """Check every block of ``entries`` against the index's digests, reading it from the mapping (which also
        faults its pages in), ``threads`` threads over interleaved blocks.

        Raises:
            HashMismatchError: a block does not match its digest (the tensor is named).
        """
        from .memory import host_view
        from .pipeline import Verifier
        from .plan import plan_chunks

        verifier = Verifier(index)
        pieces = [p for c in plan_chunks(entries, index.block_size) for p in c.pieces if p.length]
        view = host_view(self.base)

        def check(part: list) -> None:
            for p in part:
                start = p.entry.offset + p.tensor_offset
                verifier.check(p, view[start : start + p.length])

        n = max(1, min(threads, len(pieces)))
        run_parallel([lambda k=k: check(pieces[k::n]) for k in range(n)])

    def read_through(self, fd: int, entries: Sequence[TensorEntry], threads: int, piece_bytes: int) -> float:
        """Read the pages of ``entries`` of a cold file into the page cache and map them now.

        ``threads`` threads claim ``piece_bytes`` pieces in file order, so the requests in flight stay close
        together (the 2-core VM's virtio disk loses up to half its rate to far-apart streams), and each piece is
        read as one sized request rather than by faults and readahead guesses. ``sendfile`` to ``/dev/null``
        fills the page cache without copying a byte to user memory; where it is refused (not Linux), faulting
        the piece in reads it instead. Each piece is then mapped and touched (see ``_touch``) by its thread.

        Args:
            fd: a descriptor of the mapped file.
            entries: the tensors whose pages to read.
            threads: reader threads (more than cores keeps more requests in flight).
            piece_bytes: bytes per claimed piece (rounded up to whole pages).

        Returns:
            Busy seconds spent reading, summed over threads.

        Raises:
            ObjectChangedError: the file ended before the mapping did (it was truncated while loading).
            SourceError: reading failed.
        """
        ranges = _page_ranges(entries)
        step = max(PAGE, -(-piece_bytes // PAGE) * PAGE)
        pieces = [(s + k, min(step, n - k)) for s, n in ranges for k in range(0, n, step)]
        if not pieces:
            return 0.0
        claim = iter(pieces)
        lock = threading.Lock()
        busy: list[float] = []
        devnull = os.open(os.devnull, os.O_WRONLY)

        def work() -> None:
            spent = 0.0
            while True:
                with lock:
                    piece = next(claim, None)
                if piece is None:
                    break
                t0 = time.perf_counter()
                self._read_into_cache(fd, devnull, *piece)
                spent += time.perf_counter() - t0
                self._populate([piece])
                # a page's first access can cost far more than its mapping (a VM whose host lends memory lazily:
                # 2-5 us per page it just filled, 0.2-0.5 s per GB); here it overlaps the other streams' reads,
                # later the caller's first touch would pay it with nothing to overlap
                if _POPULATE_SUPPORTED != [False]:  # else the populate touched every page already
                    self._touch(*piece)
            busy.append(spent)

        try:
            run_parallel([work] * max(1, min(threads, len(pieces))))
        finally:
            os.close(devnull)
        return sum(busy)

    def _read_into_cache(self, fd: int, devnull: int, start: int, length: int) -> None:
        end = min(start + length, self.size)
        if start >= end or _SENDFILE_SUPPORTED != [True]:
            return
        try:
            reached = read_into_cache(fd, devnull, start, end)
        except OSError as exc:
            if exc.errno in _SENDFILE_REFUSALS:
                _SENDFILE_SUPPORTED[:] = [False]  # the populate after this reads what is left
                return
            raise SourceError(exc.errno, f"reading bytes {start}-{end} of the mapped file failed: {exc}") from exc
        if reached < end:
            raise ObjectChangedError(
                f"the file ended at byte {reached}, before the {self.size} bytes it had when it was mapped: "
                "it was truncated or rewritten in place while loading"
            )

    def _touch(self, start: int, length: int) -> None:
        """Read one byte of every page in the range (faulting in any page not mapped yet)."""
        self.base[start : start + length : PAGE].sum()  # torch releases the GIL

    def _populate(self, ranges: list[tuple[int, int]]) -> None:
        for start, length in ranges:
            if _POPULATE_SUPPORTED != [False]:
                err = madvise(self.address + start, length, MADV_POPULATE_READ)
                if err == 0:
                    if not _POPULATE_SUPPORTED:
                        _POPULATE_SUPPORTED.append(True)
                    continue
                if err == errno.EFAULT:  # a page past the end of the file (it would be SIGBUS on access)
                    raise ObjectChangedError(
                        f"bytes {start}-{start + length} of the mapped file are gone: it was truncated or rewritten "
                        "in place while loading"
                    )
                if err != errno.EINVAL or _POPULATE_SUPPORTED == [True]:  # EINVAL: an older kernel
                    raise SourceError(err, f"madvise(MADV_POPULATE_READ) at {start} failed: {os.strerror(err)}")
                _POPULATE_SUPPORTED[:] = [False]
            self._touch(start, length)  # no MADV_POPULATE_READ: a read per page faults it in


def _shrank(size: int, now: int) -> ObjectChangedError:
    return ObjectChangedError(
        f"the file is {now} bytes, shorter than the {size} bytes it had when it was opened: it was truncated or "
        "rewritten in place; reload it (long-lived processes: strategy='pread', docs/security.md)"
    )


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
