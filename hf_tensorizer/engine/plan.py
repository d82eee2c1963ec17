"""Read planning: from the index to a list of chunks, each one contiguous read.

Pure functions over the index, so every rule here is tested on CPU whatever device the bytes go to.

Rules:
- A tensor larger than ``unit`` is split at multiples of ``unit`` counted from its own start, so one
  huge tensor is read by many threads at once (concurrency is not limited by the largest tensor).
- Consecutive small tensors are coalesced into one chunk while the chunk spans at most ``unit`` bytes
  and the gap between them is small (skipped tensors leave gaps; large gaps are not read).
- When digests are verified, ``unit`` equals the file's digest block size, so each piece is exactly a
  whole digest block and is verified where it was read.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from ..format.index import TensorEntry, whole_block

MAX_GAP = 64 << 10  # reading a small gap beats a second request; larger gaps are skipped


@dataclass(frozen=True)
class Piece:
    """Bytes of one tensor inside a chunk."""

    entry: TensorEntry
    tensor_offset: int  # byte offset inside the tensor
    chunk_offset: int  # byte offset inside the chunk
    length: int

    @property
    def is_whole(self) -> bool:
        return self.tensor_offset == 0 and self.length == self.entry.length


@dataclass
class Chunk:
    """One contiguous range of the file and where its bytes go."""

    offset: int
    length: int
    pieces: list[Piece] = field(default_factory=list)

    @property
    def end(self) -> int:
        return self.offset + self.length


def plan_chunks(entries: Iterable[TensorEntry], unit: int, *, max_gap: int = MAX_GAP) -> list[Chunk]:
    """Split the data of ``entries`` into chunks of at most ``unit`` bytes (see module docstring).

    Args:
        entries: entries that own data (no aliases); any order, they are sorted by offset.
        unit: the largest chunk; also the split size of large tensors.
        max_gap: the largest run of unwanted bytes read to coalesce two tensors.

    Returns:
        Chunks in file order; their pieces cover every byte of every entry exactly once.
    """
    if unit <= 0:
        raise ValueError("unit must be positive")
    chunks: list[Chunk] = []
    current: Chunk | None = None
    for e in sorted((e for e in entries if e.alias is None), key=lambda e: e.offset):
        if e.length == 0:
            # empty tensors need no bytes; attach them to a zero-length chunk so they are still "loaded"
            chunks.append(Chunk(e.offset, 0, [Piece(e, 0, 0, 0)]))
            continue
        if e.length > unit:
            current = None
            for start in range(0, e.length, unit):
                n = min(unit, e.length - start)
                chunks.append(Chunk(e.offset + start, n, [Piece(e, start, 0, n)]))
            continue
        if current is not None and e.offset - current.end <= max_gap and e.offset + e.length - current.offset <= unit:
            current.pieces.append(Piece(e, 0, e.offset - current.offset, e.length))
            current.length = e.offset + e.length - current.offset
            continue
        current = Chunk(e.offset, e.length, [Piece(e, 0, 0, e.length)])
        chunks.append(current)
    return chunks


def block_of(piece: Piece, block_size: int) -> int | None:
    """The index of the digest block that ``piece`` covers exactly, or None if it covers a partial one."""
    return whole_block(piece.tensor_offset, piece.length, piece.entry.length, block_size)


def aligned_span(chunk: Chunk, alignment: int, file_size: int) -> tuple[int, int]:
    """The chunk widened to ``alignment`` boundaries (for O_DIRECT), clipped to the file's aligned end.

    Returns:
        (start, length) with ``start`` aligned; the read may come back short at the end of the file.
    """
    start = chunk.offset - chunk.offset % alignment
    end = -(-chunk.end // alignment) * alignment
    return start, end - start


def plan_windows(entries: Iterable[TensorEntry], unit: int, *, page: int = 4096) -> list[Chunk]:
    """Split the file into disjoint page-aligned windows of ``unit`` bytes (file coordinates) and map
    the wanted tensors' bytes into them.

    Used when page-cache pages are pinned in place: two windows never share a page (pinning a page
    twice fails), which tensor-relative chunks of packed small tensors cannot promise. Windows holding
    no wanted byte are dropped.
    """
    if unit <= 0 or unit % page:
        raise ValueError("unit must be a positive multiple of the page size")
    wanted = sorted((e for e in entries if e.alias is None and e.length), key=lambda e: e.offset)
    windows: dict[int, Chunk] = {}
    for e in wanted:
        pos, end = e.offset, e.offset + e.length
        while pos < end:
            start = pos - pos % unit
            stop = min(end, start + unit)
            w = windows.setdefault(start, Chunk(start, 0))
            w.pieces.append(Piece(e, pos - e.offset, pos - start, stop - pos))
            w.length = max(w.length, stop - start)
            pos = stop
    out = [windows[k] for k in sorted(windows)]
    for w in out:  # trim the leading bytes no piece needs, keeping the start page-aligned
        first = min(p.chunk_offset for p in w.pieces) // page * page
        if first:
            w.offset += first
            w.length -= first
            w.pieces = [Piece(p.entry, p.tensor_offset, p.chunk_offset - first, p.length) for p in w.pieces]
    return out
