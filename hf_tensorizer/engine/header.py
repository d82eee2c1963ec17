"""Reading the header of any supported file from a :class:`~hf_tensorizer.sources.Source`.

The format modules decode bytes; this module decides which bytes to fetch: one small first read that
usually holds the whole header, the format sniffed from its first bytes, then whatever more the format
needs (the rest of a large index; upstream tensorizer's per-tensor headers).
"""

from __future__ import annotations

import os
from typing import Any

from ..errors import TruncatedFileError
from ..format.foreign import read_foreign_index
from ..format.index import PREAMBLE_SIZE, FileIndex, decode_index, decode_preamble
from ..sources import Source, open_source

_FIRST_READ = 64 << 10  # one small request usually returns the preamble and the whole index


def read_index(source: str | os.PathLike[str] | Source, **source_options: Any) -> FileIndex:
    """Read and validate the preamble and index of ``source`` (one or two small reads).

    Args:
        source: a local path, URI or open :class:`Source` (left open).

    Raises:
        FormatError: and its subclasses, for anything malformed (see :mod:`hf_tensorizer.errors`).
        SourceError: the bytes could not be read.
    """
    if not isinstance(source, Source):
        with open_source(source, **source_options) as src:
            return read_index(src)
    size = source.size
    head = source.read(0, min(size, _FIRST_READ)) if size else b""
    foreign = read_foreign_index(source, head)  # upstream tensorizer or safetensors, sniffed by first bytes
    if foreign is not None:
        return foreign
    pre = decode_preamble(head, file_size=size)  # a short file raises the precise error here
    end = PREAMBLE_SIZE + pre.index_length
    raw = head[PREAMBLE_SIZE:end]
    if end > len(head):  # a large index: one more request for the rest
        raw += source.read(len(head), end - len(head))
    if len(raw) < pre.index_length:
        raise TruncatedFileError("file ends inside its index")
    return decode_index(pre, raw)
