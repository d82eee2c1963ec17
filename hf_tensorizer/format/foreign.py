"""Format detection by the first bytes, so every reader entry point opens all supported files.

- ours: ``HFTZ\\x89\\r\\n\\x1a`` (see :mod:`.index`)
- CoreWeave's upstream tensorizer: ``|TZR|`` (see :mod:`.upstream`)
- safetensors: a u64 little-endian header length, then ``{`` (see :mod:`.safetensors`)
"""

from __future__ import annotations

from typing import Any

from .index import MAGIC, FileIndex
from .upstream import UPSTREAM_MAGIC

HF_TENSORIZER = "hf_tensorizer"
UPSTREAM = "tensorizer"
SAFETENSORS = "safetensors"


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


def read_foreign_index(source: Any, head: bytes) -> FileIndex | None:
    """The validated index of an upstream tensorizer or safetensors file; ``None`` for anything else.

    Raises:
        FormatError: and its typed subclasses, when the file is one of these formats but malformed.
    """
    kind = sniff(head)
    if kind == UPSTREAM:
        from .upstream import read_upstream_index

        return read_upstream_index(source, head)
    if kind == SAFETENSORS:
        from .safetensors import read_safetensors_index

        return read_safetensors_index(source, head)
    return None
