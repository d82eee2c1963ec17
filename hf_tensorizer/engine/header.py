"""Reading the index of any supported file from a :class:`~hf_tensorizer.sources.Source`.

The format decoders (:mod:`hf_tensorizer.format.sniff`) are pure: they say which byte ranges they need. This
module fetches them: one small first read that usually holds the whole header, then whatever more the format
asks for (the rest of a large index; upstream tensorizer's per-tensor headers, in parallel on remote sources).
"""

from __future__ import annotations

import os
from typing import Any

from ..format.index import FileIndex
from ..format.sniff import Reads, decode_any
from ..sources import Source, open_source

_FIRST_READ = 64 << 10  # one small request usually returns the preamble and the whole index


def read_index(source: str | os.PathLike[str] | Source, **source_options: Any) -> FileIndex:
    """Read and validate the header and index of ``source`` (one or a few small reads).

    Args:
        source: a local path, URI or open :class:`Source` (left open).
        **source_options: transport options when ``source`` is a URI.

    Returns:
        The validated index (an ``UpstreamIndex`` for upstream tensorizer files).

    Raises:
        FormatError: and its subclasses, for anything malformed (see :mod:`hf_tensorizer.errors`).
        SourceError: the bytes could not be read.
    """
    if not isinstance(source, Source):
        with open_source(source, **source_options) as src:
            return read_index(src)
    size = source.size
    head = source.read(0, min(size, _FIRST_READ)) if size else b""
    decoder = decode_any(size, head)
    try:
        reads = next(decoder)
        while True:
            reads = decoder.send(_read_ranges(source, reads))
    except StopIteration as done:
        return done.value


def _read_ranges(source: Source, reads: Reads) -> list[bytes]:
    """The bytes of each range; remote sources fetch many ranges concurrently (a round trip each)."""
    if source.fileno() is not None or len(reads) < 4:
        return [source.read(off, n) for off, n in reads]
    from concurrent.futures import ThreadPoolExecutor  # remote sources only

    with ThreadPoolExecutor(min(len(reads), max(1, source.preferred_concurrency))) as pool:
        return list(pool.map(lambda r: source.read(*r), reads))
