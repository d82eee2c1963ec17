"""Encrypting, decrypting and re-keying existing files (CLI `encrypt` / `decrypt`): the reader feeding the writer."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from ..crypto.keys import KeySpec
from ..errors import UsageError
from ..format.index import FileIndex


def convert(
    src: str | os.PathLike[str],
    dest: str | os.PathLike[str],
    *,
    read_key: KeySpec | None = None,
    write_key: KeySpec | None = None,
    block_size: int | None = None,
    sink_options: Mapping[str, Any] | None = None,
    **source_options: Any,
) -> FileIndex:
    """Rewrite ``src`` to ``dest``: encrypt (``write_key``), decrypt (``read_key``) or re-key (both).

    Names, kinds, tied weights, metadata, alignment and digest algorithm are kept; every block of the
    source is authenticated (encrypted sources) and checked against its digest while it is read. The
    whole state dict is held in host memory while the destination is written.

    Args:
        src: a local path or URI.
        dest: a local path or URI (``s3://``, ``hf://``); must differ from ``src``.
        read_key: key or passphrase of an encrypted ``src`` (``None``: ``src`` must be plain, or
            ``HF_TENSORIZER_KEY`` opens it).
        write_key: key or passphrase for ``dest``; ``None`` writes a plain file.
        block_size: block size of ``dest`` (default: the source's when both are encrypted or both plain,
            else the writer's default for ``dest``: 4 MiB encrypted, 16 MiB plain).
        sink_options: passed to the destination's transport (e.g. ``endpoint_url`` for ``s3://``).
        **source_options: passed to the source's transport.

    Returns:
        The index written to ``dest``.

    Raises:
        DecryptionError: ``read_key`` does not open ``src`` or ``src`` was tampered with.
        HashMismatchError: a block of ``src`` does not match its digest.
        UsageError: ``src`` and ``dest`` are the same path.
    """
    from ..sources import open_source
    from .header import read_index
    from .reader import TensorDeserializer
    from .writer import TensorSerializer

    if "://" not in os.fspath(src) and os.path.exists(dest) and os.path.samefile(src, dest):
        raise UsageError("source and destination are the same file; write to a new path")
    with open_source(src, **source_options) as source:
        index = read_index(source)
        # no read key and a plain source: copying it is what was asked, HF_TENSORIZER_KEY or not
        key = read_key if read_key is not None or index.encrypted else False
        with TensorDeserializer(source, encryption=key, verify_hash=True, index=index) as d:
            if block_size is None and (write_key is not None) == index.encrypted:
                block_size = index.block_size  # re-keying or copying: keep the layout
            s = TensorSerializer(
                dest, metadata=index.metadata, alignment=index.alignment, block_size=block_size,
                digest=index.digest, encryption=write_key, **(sink_options or {}),
            )  # fmt: skip
            for name in index.tensors:  # index order puts an alias's target first, so ties are rebuilt
                s.write_tensor(name, d[name], d.kind(name))
            return s.close()
