"""Which format a file is, from its first bytes, and the decoder of its index.

- ours: ``HFTZ\\x89\\r\\n\\x1a`` (see :mod:`.index`)
- CoreWeave's upstream tensorizer: ``|TZR|`` (see :mod:`hf_tensorizer.upstream.format`)
- safetensors: a u64 little-endian header length, then ``{`` (see :mod:`.safetensors`)

Decoders are generators in the sans-I/O style: they yield the ``(offset, length)`` ranges they need beyond the
first bytes and are sent those bytes; their return value is the validated :class:`~.index.FileIndex`.
``hf_tensorizer.engine.header.read_index`` drives them over a Source.
"""

from __future__ import annotations

from collections.abc import Generator

from ..errors import TruncatedFileError
from .index import MAGIC, PREAMBLE_SIZE, FileIndex, decode_index, decode_preamble

HF_TENSORIZER = "hf_tensorizer"
UPSTREAM = "tensorizer"
SAFETENSORS = "safetensors"
# upstream.format.UPSTREAM_MAGIC, repeated so that opening our own files does not import the upstream decoder
# (tests/test_import_cost.py checks they agree)
UPSTREAM_MAGIC = b"|TZR|"

#: ranges to read, as ``(offset, length)``; the decoder is sent their bytes in the same order
Reads = list[tuple[int, int]]
IndexDecoder = Generator[Reads, list[bytes], FileIndex]


def sniff(head: bytes | memoryview) -> str | None:
    """The format of a file from its first bytes (9 are enough), or ``None`` when unrecognised."""
    head = bytes(head[:9])
    if head.startswith(MAGIC):
        return HF_TENSORIZER
    if head.startswith(UPSTREAM_MAGIC):
        return UPSTREAM
    if len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") >= 2:
        return SAFETENSORS
    return None


def decode_any(size: int, head: bytes) -> IndexDecoder:
    """The index of a file of any supported format, ``size`` bytes long, whose first bytes are ``head``.

    Raises:
        FormatError: and its typed subclasses, for anything malformed (an unknown format is reported as a bad
            hf_tensorizer preamble).
    """
    kind = sniff(head)
    if kind == UPSTREAM:
        from ..upstream.format import decode_upstream

        return (yield from decode_upstream(size, head))
    if kind == SAFETENSORS:
        from .safetensors import decode_safetensors  # imported for safetensors files only, like the upstream one

        return (yield from decode_safetensors(size, head))
    return (yield from decode_ours(size, head))


def decode_ours(size: int, head: bytes) -> IndexDecoder:
    """An hf_tensorizer file's index: the preamble, then the rest of the index when ``head`` ends inside it."""
    pre = decode_preamble(head, file_size=size)  # a short file raises the precise error here
    end = PREAMBLE_SIZE + pre.index_length
    raw = bytes(head[PREAMBLE_SIZE:end])
    if end > len(head):  # a large index: one more request for the rest
        raw += (yield [(len(head), end - len(head))])[0]
    if len(raw) < pre.index_length:
        raise TruncatedFileError("file ends inside its index")
    return decode_index(pre, raw)
