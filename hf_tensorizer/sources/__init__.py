"""Sources and sinks: bytes at offsets, wherever they live.

``open_source`` and ``open_sink`` are the one opener for every location: local paths and ``file://``,
``http://``/``https://``, ``s3://bucket/key``, ``hf://org/repo[@revision]/path``, any other protocol fsspec knows
(``gs://``, ``az://``, ``memory://``...) and open binary file objects.

- :mod:`.base` — the ``Source`` (random-access reads into the caller's buffers) and ``Sink`` (sequential,
  atomic writes) interfaces, with the capabilities a transport declares (``fileno``, ``direct_fileno``);
- :mod:`.uri` — URI syntax: scheme, join, redact, local paths;
- :mod:`.file`, :mod:`.http`, :mod:`.s3` / :mod:`.s3_sink`, :mod:`.hub` / :mod:`.hub_repo`, :mod:`.fsspec`,
  :mod:`.fileobj` — one module per transport (:mod:`.ranged` is what the remote ones share: parallel ranged
  reads, retries, resumption).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import IO, Any

from ..errors import InvalidURIError, SourceError, UsageError, source_error
from .base import Sink, Source
from .file import FileSink, FileSource
from .fileobj import FileObjectSink, FileObjectSource, is_readable_file, is_writable_file
from .uri import REMOTE_SCHEMES, is_remote, join, local_path, looks_like_uri, redact, scheme_of

__all__ = [
    "REMOTE_SCHEMES",
    "FileObjectSink",
    "FileObjectSource",
    "FileSink",
    "FileSource",
    "Sink",
    "Source",
    "hold_transfer",
    "is_remote",
    "join",
    "local_path",
    "looks_like_uri",
    "open_sink",
    "open_source",
    "redact",
    "scheme_of",
    "shared_transport",
]


@contextlib.contextmanager
def shared_transport(uri: str | os.PathLike[str], options: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Transport ``options`` for opening many objects under ``uri`` (an artifact's files, a checkpoint's shards):
    for ``s3://`` one boto3 client is built once, shared, and closed when the block ends (each client costs
    ~0.1 s of CPU); other schemes, or options that carry a client already, as they are. Close the sources
    opened with them inside the block.
    """
    if scheme_of(uri) != "s3" or options.get("client") is not None:
        yield options
        return
    from .s3 import shared_client

    client = shared_client(options)
    try:
        yield {**options, "client": client}
    finally:
        client.close()


def hold_transfer(source: Source, **given: int | None) -> None:
    """Stop ``source`` adapting its transfer (remote sources, see ``sources.tuning``) when the caller set any of
    ``given`` (e.g. ``num_readers=4``): explicit settings win. Other sources: nothing.

    Args:
        source: any source.
        **given: the caller's transfer settings, None where not set.
    """
    hold = getattr(source, "hold_transfer", None)
    why = ", ".join(f"{k}={v}" for k, v in given.items() if v)
    if hold is not None and why:
        hold(why)


def open_source(uri: str | os.PathLike[str] | Source | IO[bytes], **options: Any) -> Source:
    """Open ``uri`` for reading. A :class:`Source` passes through unchanged.

    Args:
        uri: a local path, a URI, or an open binary file object (read from its current position; left open).
        **options: transport options (``headers``, ``token``, ``endpoint_url``, ``concurrency``,
            ``storage_options``...), see the transport's class.

    Raises:
        InvalidURIError: malformed URI or unknown scheme.
        SourceError: the object cannot be opened.
    """
    if isinstance(uri, Source):
        return uri
    if is_readable_file(uri):
        if options:
            raise UsageError(f"unknown options for a file object: {sorted(options)}")
        return FileObjectSource(uri)  # type: ignore[arg-type]
    scheme = scheme_of(uri)
    if scheme == "file":
        if options:  # a typo'd engine argument lands here: say so rather than drop it
            raise UsageError(f"unknown options for a local file: {sorted(options)}")
        return _open_file(local_path(uri))
    if scheme in ("http", "https"):
        from .http import HTTPSource

        return HTTPSource(os.fspath(uri), **options)
    if scheme == "s3":
        from .s3 import S3Source

        return S3Source(os.fspath(uri), **options)
    if scheme == "hf":
        from .hub import HubSource

        return HubSource(os.fspath(uri), **options)
    from .fsspec import FsspecSource

    return FsspecSource(os.fspath(uri), **options)


def _open_file(path: str) -> FileSource:
    """A local file; a missing file, a refused one or a directory raise the ``OSError`` subclass ``open()`` would
    (``FileNotFoundError``, ...) that is also a :class:`SourceError` (see ``errors.source_error``)."""
    if os.path.isdir(path):  # opening a directory read-only succeeds on Linux; its first read would fail
        raise source_error(f"cannot open {path}: it is a directory", IsADirectoryError())
    try:
        return FileSource(path)
    except SourceError as exc:
        if isinstance(exc.__cause__, OSError) and type(exc) is SourceError:
            raise source_error(str(exc), exc.__cause__) from exc.__cause__
        raise


def open_sink(uri: str | os.PathLike[str] | Sink | IO[bytes], **options: Any) -> Sink:
    """Open ``uri`` for writing one object (atomically committed). A :class:`Sink` passes through.

    Args:
        uri: a local path, a URI (not ``http(s)://``), or an open binary file object (written from its current
            position, flushed on commit, left open).
        **options: transport options, see the transport's sink class.

    Raises:
        InvalidURIError: malformed URI, unknown scheme, or ``http(s)://``.
        SinkError: the object cannot be created.
    """
    if isinstance(uri, Sink):
        return uri
    if is_writable_file(uri):
        if options:
            raise UsageError(f"unknown options for a file object: {sorted(options)}")
        return FileObjectSink(uri)  # type: ignore[arg-type]
    scheme = scheme_of(uri)
    if scheme == "file":
        if options:
            raise UsageError(f"unknown options for a local file: {sorted(options)}")
        return FileSink(local_path(uri))
    if scheme == "s3":
        from .s3_sink import S3Sink

        return S3Sink(os.fspath(uri), **options)
    if scheme == "hf":
        from .hub import HubSink

        return HubSink(os.fspath(uri), **options)
    if scheme in ("http", "https"):
        raise InvalidURIError(f"writing to {scheme}:// is not supported; use a local path, s3://, hf:// or gs://...")
    from .fsspec import FsspecSink

    return FsspecSink(os.fspath(uri), **options)
