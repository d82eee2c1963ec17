"""Whole-file integrity check: every block of every tensor against its digest, all failures reported."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from ..errors import TensorizerError, UsageError
from ..sources import Source, open_source
from .header import read_index
from .pipeline import ChunkQueue, StageTimes, Verifier, run_threads
from .plan import plan_chunks


@dataclass
class VerifyReport:
    """Result of :func:`verify_file`: which tensors failed, out of how many."""

    uri: str
    tensors: int
    bytes: int
    failed: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failed


def verify_file(
    source: str | os.PathLike[str] | Source, *, num_readers: int = 4, encryption: Any = None, **source_options: Any
) -> VerifyReport:
    """Read every tensor block and compare it with the index digests, without stopping at the first failure.

    Encrypted files need their key: each block is authenticated (MAC) and decrypted, then its plaintext
    digest checked; a block failing either marks its tensor.

    Raises:
        FormatError: the header itself is invalid (then nothing else can be checked).
        MissingKeyError / DecryptionError: an encrypted file without its key, or with the wrong one.
    """
    src = open_source(source, **source_options)
    try:
        index = read_index(src)
        if index.digest == "none":
            raise UsageError(f"{src.uri} holds no digests: there is nothing to verify")
        verifier = Verifier(index)
        transform = None
        if index.encrypted or encryption is not None:
            from .decrypt import open_transform

            transform = open_transform(index, encryption, src.uri)
        chunks = plan_chunks(index.data_entries, index.block_size)
        failed: set[str] = set()
        work = ChunkQueue(chunks)

        def body(_: int, times: StageTimes) -> None:
            buf = bytearray(max((c.length for c in chunks), default=0))
            view = memoryview(buf)
            while (chunk := work.take()) is not None:
                src.read_into(chunk.offset, view[: chunk.length])
                for p in chunk.pieces:
                    data = view[p.chunk_offset : p.chunk_offset + p.length]
                    try:
                        if transform is not None:
                            transform(p, data)
                        verifier.check(p, data)
                    except TensorizerError:
                        failed.add(p.entry.name)

        run_threads(work, max(1, min(num_readers, len(chunks))), body)
        order = [n for n in index.tensors if n in failed]
        return VerifyReport(src.uri, len(index.tensors), index.data_bytes, order)
    finally:
        if not isinstance(source, Source):
            src.close()
