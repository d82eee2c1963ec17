"""Read a box of one tensor (a range per dimension) from a Source, fetching only the bytes of that box.

A row-major tensor's box is one contiguous byte range when only dimension 0 is cut; otherwise it is one segment per
row of the leading dimensions. Adjacent segments merge for free; segments separated by a gap of at most
``max_gap`` bytes merge into one request that reads the gap too (fewer requests, some over-read; the metrics say
how much). Encrypted files and ``verify_hash`` need whole blocks: the digest/encryption blocks that overlap the box
are read, checked or decrypted, and the box is copied out of them.

:class:`TensorSlice` wraps this in safetensors' slice protocol (``get_shape()``, ``get_dtype()``,
``slice[...]``), the object transformers' tensor-parallel loader indexes to take each rank's shard.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import TensorizerError, UsageError
from ..format.dtypes import dtype_name, element_size
from ..format.index import FileIndex, TensorEntry
from ..format.safetensors import DTYPES as SAFETENSORS_DTYPES
from ..sources import Source
from .memory import host_view
from .pipeline import ChunkQueue, StageTimes, Transform, Verifier, run_threads
from .plan import plan_chunks

Ranges = list[tuple[int, int]]  # per dimension: [start, stop)
_SAFETENSORS_NAMES = {dtype_name(v): k for k, v in SAFETENSORS_DTYPES.items()}


@dataclass
class SliceMetrics:
    """What the slice reads of one load did: ``bytes`` read from the source, ``wanted`` bytes of the boxes
    handed out (``bytes - wanted`` is the over-read), ``requests`` to the source, ``tensors`` boxes read, and
    ``whole``: the full size of the tensors these slices belong to (what reading them whole would cost)."""

    bytes: int = 0
    whole: int = 0
    exchange_seconds: float = 0.0  # rows read cooperatively: all-gathering them between the ranks
    wanted: int = 0
    requests: int = 0
    tensors: int = 0
    seconds: float = 0.0
    strategy: str = "slices"
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, read: int, wanted: int, requests: int, seconds: float) -> None:
        with self._lock:
            self.bytes += read
            self.wanted += wanted
            self.requests += requests
            self.tensors += 1
            self.seconds += seconds

    @property
    def overread(self) -> float:
        """Bytes read beyond the boxes, as a fraction of the boxes."""
        return self.bytes / self.wanted - 1.0 if self.wanted else 0.0

    def as_dict(self) -> dict[str, float | int | str]:
        return {"strategy": self.strategy, "bytes": self.bytes, "wanted": self.wanted, "whole": self.whole,
                "requests": self.requests, "tensors": self.tensors, "seconds": round(self.seconds, 6),
                "exchange_seconds": round(self.exchange_seconds, 6),
                "overread": round(self.overread, 6)}  # fmt: skip


def normalize_box(shape: Sequence[int], key: Any) -> tuple[Ranges, list[int]] | None:
    """``key`` (``...``, a slice, an int, or a tuple of them) as one ``[start, stop)`` per dimension, and the
    dimensions indexed by an int (dropped from the result); None for keys a box cannot express (steps, ``None``,
    tensors), which the caller serves by reading the whole tensor."""
    parts = list(key) if isinstance(key, tuple) else [key]
    if sum(p is Ellipsis for p in parts) > 1:
        return None
    if Ellipsis in parts:
        i = parts.index(Ellipsis)
        parts[i : i + 1] = [slice(None)] * (len(shape) - len(parts) + 1)
    if len(parts) > len(shape):
        return None
    parts += [slice(None)] * (len(shape) - len(parts))
    ranges: Ranges = []
    dropped: list[int] = []
    for dim, (p, n) in enumerate(zip(parts, shape, strict=True)):
        if isinstance(p, slice):
            start, stop, step = p.indices(n)
            if step != 1:
                return None
            ranges.append((start, max(start, stop)))
        elif isinstance(p, int) and not isinstance(p, bool):
            i = p + n if p < 0 else p
            if not 0 <= i < n:
                raise IndexError(f"index {p} is out of bounds for dimension {dim} with size {n}")
            ranges.append((i, i + 1))
            dropped.append(dim)
        else:
            return None
    return ranges, dropped


def box_segments(shape: Sequence[int], itemsize: int, ranges: Ranges) -> list[tuple[int, int]]:
    """The byte segments ``(offset in the tensor, length)`` of a box of a row-major tensor, ascending, touching
    segments merged. Empty when the box is empty."""
    if any(b <= a for a, b in ranges) or not ranges:
        return [] if ranges else [(0, itemsize)]
    strides = [itemsize] * len(shape)
    for d in range(len(shape) - 2, -1, -1):
        strides[d] = strides[d + 1] * shape[d + 1]
    # the innermost dimension that is cut: everything inside it is whole, so one segment per outer index
    k = 0
    for d in range(len(shape) - 1, -1, -1):
        if ranges[d] != (0, shape[d]):
            k = d
            break
    run = (ranges[k][1] - ranges[k][0]) * strides[k]
    starts = [ranges[k][0] * strides[k]]
    for d in range(k - 1, -1, -1):
        a, b = ranges[d]
        starts = [i * strides[d] + s for i in range(a, b) for s in starts]
    out: list[tuple[int, int]] = []
    for s in starts:
        if out and out[-1][0] + out[-1][1] == s:
            out[-1] = (out[-1][0], out[-1][1] + run)
        else:
            out.append((s, run))
    return out


@dataclass
class Request:
    """One read from the source: ``[start, end)`` of the tensor, and the ``(tensor offset, length, box offset)``
    parts of it that land in the box (the rest is gap, read and dropped)."""

    start: int
    end: int
    parts: list[tuple[int, int, int]]


MAX_REQUEST = 4 << 20  # large boxes are cut into requests of this size, read in parallel by the reader threads


def coalesce(segments: Sequence[tuple[int, int]], max_gap: int, max_request: int = MAX_REQUEST) -> list[Request]:
    """Merge segments into requests: a gap of at most ``max_gap`` bytes is read rather than cut, while a request
    stays under ``max_request`` bytes; longer segments are cut (so large boxes spread over the reader threads)."""
    out: list[Request] = []
    pos = 0
    cut = ((off + a, min(max_request, length - a)) for off, length in segments for a in range(0, length, max_request))
    for off, length in cut:
        last = out[-1] if out else None
        if last is not None and off - last.end <= max_gap and off + length - last.start <= max_request:
            last.parts.append((off, length, pos))
            last.end = off + length
        else:
            out.append(Request(off, off + length, [(off, length, pos)]))
        pos += length
    return out


def read_box(source: Source, entry: TensorEntry, ranges: Ranges, *, threads: int = 4, max_gap: int = 0,
             transform: Transform | None = None, verifier: Verifier | None = None,
             block_size: int = 0) -> tuple[torch.Tensor, int, int]:  # fmt: skip
    """Read the box ``ranges`` of tensor ``entry`` into a new CPU tensor.

    Args:
        source: the open file.
        entry: the tensor (not an alias).
        ranges: ``[start, stop)`` per dimension (:func:`normalize_box`).
        threads: parallel requests.
        max_gap: largest gap read to merge two segments (bytes).
        transform: the decrypting transform, when the file is encrypted.
        verifier: checks blocks against their digests (``verify_hash``).
        block_size: the file's digest/encryption block size (needed with ``transform`` or ``verifier``).

    Returns:
        ``(tensor, bytes read from the source, requests made)``.
    """
    itemsize = element_size(entry.dtype)
    shape = tuple(b - a for a, b in ranges)
    out = torch.empty(shape, dtype=entry.dtype)
    segments = box_segments(entry.shape, itemsize, ranges)
    if not segments or entry.length == 0:
        return out, 0, 0
    dest = host_view(out)
    if transform is not None or verifier is not None:
        return out, *_read_blocks(source, entry, segments, dest, threads, transform, verifier, block_size)
    requests = coalesce(segments, max_gap)
    work = ChunkQueue(requests)  # type: ignore[arg-type]  # any sequence of work items

    def body(_: int, times: StageTimes) -> None:
        scratch = memoryview(bytearray(min(max_gap, 64 << 10) or 1))
        while (r := work.take()) is not None:
            iov: list[memoryview] = []
            pos = r.start
            for off, length, at in r.parts:  # type: ignore[attr-defined]
                gap = off - pos
                while gap > 0:
                    k = min(gap, len(scratch))
                    iov.append(scratch[:k])
                    gap -= k
                iov.append(dest[at : at + length])
                pos = off + length
            source.read_into_many(entry.offset + r.start, iov)  # type: ignore[attr-defined]

    run_threads(work, min(threads, len(requests)), body)
    return out, sum(r.end - r.start for r in requests), len(requests)


def _read_blocks(source: Source, entry: TensorEntry, segments: list[tuple[int, int]], dest: memoryview,
                 threads: int, transform: Transform | None, verifier: Verifier | None,
                 block_size: int) -> tuple[int, int]:  # fmt: skip
    """Read the whole blocks that overlap ``segments`` (as a full load plans them), decrypt/verify each, and copy
    the box's bytes out. Returns (bytes read, requests)."""
    if block_size <= 0:
        raise TensorizerError("internal: block reads need the file's block size")
    wanted = []
    j = 0
    boxed = [(off, length, at) for (off, length), at in zip(segments, _cumulative(segments), strict=True)]
    for chunk in plan_chunks([entry], block_size):
        start, end = chunk.offset - entry.offset, chunk.end - entry.offset
        while j < len(boxed) and boxed[j][0] + boxed[j][1] <= start:
            j += 1
        parts = []
        k = j
        while k < len(boxed) and boxed[k][0] < end:
            off, length, at = boxed[k]
            a, b = max(off, start), min(off + length, end)
            parts.append((a - start, b - a, at + a - off))
            k += 1
        if parts:
            wanted.append((chunk, parts))
    work = ChunkQueue(wanted)  # type: ignore[arg-type]

    def body(_: int, times: StageTimes) -> None:
        while (item := work.take()) is not None:
            chunk, parts = item  # type: ignore[misc]
            buf = memoryview(bytearray(chunk.length))
            source.read_into(chunk.offset, buf)
            for p in chunk.pieces:
                data = buf[p.chunk_offset : p.chunk_offset + p.length]
                if transform is not None:
                    transform(p, data)
                if verifier is not None:
                    verifier.check(p, data)
            for rel, length, at in parts:
                dest[at : at + length] = buf[rel : rel + length]

    run_threads(work, min(threads, max(1, len(wanted))), body)
    return sum(c.length for c, _ in wanted), len(wanted)


def _cumulative(segments: Sequence[tuple[int, int]]) -> list[int]:
    out, pos = [], 0
    for _, length in segments:
        out.append(pos)
        pos += length
    return out


class TensorSlice:
    """One tensor of an open file, read lazily and in part: safetensors' slice protocol.

    ``get_shape()``, ``get_dtype()``, ``shape``, ``dtype``, and ``slice[key]`` with ``...``, slices (step 1) and
    ints per dimension, which reads only the bytes of that box (other keys read the whole tensor, then index it).
    Thread-safe: transformers indexes slices from a thread pool.

    Args:
        source: the open source of the file (kept open by the caller while slices are read).
        index: its index.
        name: the tensor (an alias reads the tensor it names).
        metrics: where reads are counted (shared by the slices of one load).
        threads / max_gap / transform / verifier: see :func:`read_box`.
    """

    def __init__(self, source: Source, index: FileIndex, name: str, metrics: SliceMetrics, *, threads: int = 4,
                 max_gap: int = 0, transform: Transform | None = None,
                 verifier: Verifier | None = None) -> None:  # fmt: skip
        entry = index.tensors[name]
        self.entry = index.tensors[entry.alias] if entry.alias is not None else entry
        self.name, self._source, self._block_size = name, source, index.block_size
        self._metrics, self._threads, self._max_gap = metrics, threads, max_gap
        self._transform, self._verifier = transform, verifier

    @property
    def shape(self) -> torch.Size:
        return torch.Size(self.entry.shape)

    @property
    def dtype(self) -> torch.dtype:
        return self.entry.dtype

    def get_shape(self) -> list[int]:
        return list(self.entry.shape)

    def get_dtype(self) -> str:
        """The dtype as safetensors names it (``"BF16"``, ``"F32"``, ...)."""
        name = dtype_name(self.entry.dtype)
        return _SAFETENSORS_NAMES.get(name, name.upper())

    def __getitem__(self, key: Any) -> torch.Tensor:
        box = normalize_box(self.entry.shape, key)
        packed = self.entry.length != self.entry.numel * element_size(self.entry.dtype)
        if box is None or packed:  # sub-byte packed dtypes and exotic keys: whole tensor, indexed in memory
            whole = self.read([(0, n) for n in self.entry.shape])
            return whole[key]
        ranges, dropped = box
        t = self.read(ranges)
        return t.squeeze(dropped) if dropped else t

    def read(self, ranges: Ranges) -> torch.Tensor:
        """The box ``ranges`` (``[start, stop)`` per dimension) as a new CPU tensor, read from the source."""
        if len(ranges) != len(self.entry.shape):
            raise UsageError(f"{self.name}: box of {len(ranges)} dimensions for shape {self.entry.shape}")
        t0 = time.perf_counter()
        t, nbytes, requests = read_box(self._source, self.entry, ranges, threads=self._threads,
                                       max_gap=self._max_gap, transform=self._transform, verifier=self._verifier,
                                       block_size=self._block_size)  # fmt: skip
        self._metrics.add(nbytes, t.numel() * t.element_size(), requests, time.perf_counter() - t0)
        return t

    def __repr__(self) -> str:
        return f"TensorSlice({self.name!r}, shape={tuple(self.entry.shape)}, dtype={self.entry.dtype})"


class HandleSlice(TensorSlice):
    """A :class:`TensorSlice` of an open deserializer (``TensorDeserializer.get_slice``): boxes land on its
    device, cast to its ``dtype=``, and reading one after ``close()`` raises
    :class:`~hf_tensorizer.errors.ClosedError`."""

    def __init__(self, owner: Any, name: str) -> None:  # the reader's TensorDeserializer (it imports this module)
        verifier = Verifier(owner.index) if owner.verify_hash else None
        super().__init__(owner._source, owner.index, name, owner.slice_metrics, threads=owner.num_readers,
                         transform=owner.transform, verifier=verifier)  # fmt: skip
        self._owner = owner

    def read(self, ranges: list[tuple[int, int]]) -> torch.Tensor:
        """The box ``ranges`` (``[start, stop)`` per dimension), read from the source now.

        Raises:
            ClosedError: the deserializer was closed.
        """
        self._owner._check_open()
        t = super().read(ranges)
        return self._owner._finish(self.entry, t).to(self._owner.device)
