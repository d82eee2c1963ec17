"""Where every byte goes, decided before any data is written.

Knowing the whole layout up front lets the serializer write strictly sequentially (S3 multipart, pipes).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..constants import DEFAULT_ALIGNMENT, DEFAULT_BLOCK_SIZE, SMALL_ALIGNMENT
from ..format.dtypes import element_size
from ..format.index import PREAMBLE_SIZE, FileIndex, TensorEntry, TensorKind, encode_index
from .digest import placeholder


@dataclass(frozen=True)
class LayoutItem:
    """What the layout needs to know of a tensor to be written (not the tensor itself)."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    kind: TensorKind = TensorKind.PLAIN
    alias: str | None = None

    @property
    def nbytes(self) -> int:
        n = element_size(self.dtype)
        for d in self.shape:
            n *= d
        return n


def align_up(n: int, a: int) -> int:
    return -(-n // a) * a


def tensor_alignment(nbytes: int, alignment: int) -> int:
    """Large tensors start on ``alignment`` (page) boundaries; small ones pack at 64 bytes."""
    return alignment if nbytes >= alignment else min(SMALL_ALIGNMENT, alignment)


def compute_layout(
    items: list[LayoutItem],
    *,
    metadata: dict[str, str] | None = None,
    alignment: int = DEFAULT_ALIGNMENT,
    block_size: int = DEFAULT_BLOCK_SIZE,
    digest: str = "crc32",
    required_features: int = 0,
    encryption: dict | None = None,
    crypt: dict[str, dict] | None = None,
) -> FileIndex:
    """The complete index with final offsets and placeholder digests of the final width.

    The index length depends on the offsets written into it and vice versa, so the data offset is
    grown until the encoded index fits in front of it (two rounds in practice).
    """
    if alignment < SMALL_ALIGNMENT or alignment & (alignment - 1):
        raise ValueError(f"alignment must be a power of two >= {SMALL_ALIGNMENT}, got {alignment}")
    if block_size < 4096 or (block_size % alignment and alignment % block_size):
        raise ValueError(f"block_size {block_size} must be >= 4096 and compatible with alignment {alignment}")
    data_offset = align_up(PREAMBLE_SIZE + 1024, alignment)
    while True:
        index = _place(items, metadata or {}, alignment, block_size, digest, data_offset, required_features,
                       encryption, crypt)  # fmt: skip
        need = align_up(PREAMBLE_SIZE + len(encode_index(index)), alignment)
        if need <= data_offset:
            return index
        data_offset = need


def _place(items, metadata, alignment, block_size, digest, data_offset, req, encryption, crypt) -> FileIndex:  # type: ignore[no-untyped-def]
    tensors: dict[str, TensorEntry] = {}
    pos = data_offset
    for it in items:
        if it.alias is not None:
            tensors[it.name] = TensorEntry(it.name, it.dtype, it.shape, it.kind, alias=it.alias)
            continue
        n = it.nbytes
        pos = align_up(pos, tensor_alignment(n, alignment))
        blocks = -(-n // block_size) if digest != "none" else 0
        tensors[it.name] = TensorEntry(
            it.name, it.dtype, it.shape, it.kind, pos, n, (placeholder(digest),) * blocks,
            crypt=(crypt or {}).get(it.name),
        )  # fmt: skip
        pos += n
    return FileIndex(
        tensors=tensors, metadata=dict(metadata), alignment=alignment, block_size=block_size, digest=digest,
        data_offset=data_offset, file_size=pos, required_features=req, encryption=encryption,
    )  # fmt: skip
