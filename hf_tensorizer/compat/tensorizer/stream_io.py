"""Upstream tensorizer's ``stream_io.open_stream`` on our sources and sinks.

A local path opens as a plain binary file. ``http(s)://``, ``s3://`` (and every other scheme of ours) give a
:class:`RemoteStream`: pass it to ``TensorDeserializer`` / ``TensorSerializer`` (it carries the URI and options to
our transports), or ``read()`` from it. Credentials are not taken as arguments: boto3's chain (environment,
``profile``, instance role) provides them (docs/compat.md says why).
"""

from __future__ import annotations

import io
import os
from typing import Any

from ...errors import UsageError
from ...sources import open_source
from ...sources.uri import is_remote


class RemoteStream(io.RawIOBase):
    """A remote object opened by :func:`open_stream`: readable (``"rb"``), or a destination for a serializer."""

    def __init__(self, uri: str, mode: str, options: dict[str, Any], begin: int | None, end: int | None) -> None:
        super().__init__()
        self.uri, self.mode, self.options, self.name = uri, mode, options, uri
        self._source: Any = None
        self._pos, self._end = begin or 0, end

    def readable(self) -> bool:
        return "r" in self.mode

    def _open(self) -> Any:
        if self._source is None:
            self._source = open_source(self.uri, **self.options)
        return self._source

    def readinto(self, buf: Any) -> int:
        if not self.readable():
            raise io.UnsupportedOperation("opened for writing: pass it to TensorSerializer")
        src = self._open()
        end = src.size if self._end is None else min(self._end, src.size)
        n = max(0, min(len(buf), end - self._pos))
        if n:
            src.read_into(self._pos, memoryview(buf)[:n])
            self._pos += n
        return n

    def close(self) -> None:
        if self._source is not None:
            self._source.close()
            self._source = None
        super().close()


class CURLStreamFile(RemoteStream):
    """Upstream's HTTP(S) download stream, on our HTTP source (no ``curl`` process): ``[begin, end)`` of ``uri``.

    Raises:
        ValueError: a negative ``begin``, or an ``end`` not after ``begin``.
    """

    def __init__(self, uri: str, begin: int | None = None, end: int | None = None,
                 headers: dict[str, Any] | None = None, *, buffer_size: int | None = None,
                 certificate_handling: Any = None) -> None:  # fmt: skip
        begin = 0 if begin is None else begin
        if begin < 0:
            raise ValueError("Invalid begin, must be non-negative")
        if end is not None and end <= begin:
            raise ValueError(f"End marker must come strictly after begin marker (requested range: {begin} to {end})")
        super().__init__(uri, "rb", {"headers": dict(headers)} if headers else {}, begin, end)


def open_stream(path_uri: str | os.PathLike[str], mode: str = "rb", s3_access_key_id: str | None = None,
                s3_secret_access_key: str | None = None, s3_endpoint: str | None = None,
                s3_config_path: Any = None, buffer_size: int | None = None, force_http: bool | None = None, *,
                begin: int | None = None, end: int | None = None, s3_region_name: str | None = None,
                s3_signature_version: str | None = None, certificate_handling: Any = None) -> Any:  # fmt: skip
    """Open a local path, or a remote URI of ours, for reading (``"rb"``) or writing (``"wb"``).

    Args:
        path_uri: a path or URI.
        mode: ``"rb"``, ``"wb"`` (local files: any binary mode ``open()`` takes).
        s3_endpoint: the S3 endpoint (our ``endpoint_url``; a bare host means https).
        s3_region_name: the S3 region.
        begin, end: the byte range to read (remote reads; ``begin`` also seeks a local file).
        s3_access_key_id, s3_secret_access_key, s3_config_path: not taken (credentials come from boto3's chain).
        buffer_size, force_http, s3_signature_version, certificate_handling: accepted and ignored.

    Returns:
        A binary file object (local) or a :class:`RemoteStream`.

    Raises:
        UsageError: credentials passed as arguments, or a text mode.
    """
    if s3_access_key_id or s3_secret_access_key or s3_config_path:
        raise UsageError("pass S3 credentials through AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, a profile or the "
                         "instance role, not as arguments (docs/compat.md)")  # fmt: skip
    if "b" not in mode and mode not in ("r", "w"):
        raise UsageError(f"open_stream opens binary streams, got mode {mode!r}")
    path = os.fspath(path_uri)
    if not is_remote(path):
        f = open(path, mode if "b" in mode else mode + "b")  # noqa: SIM115 - the caller owns it
        if begin:
            f.seek(begin)
        return f
    options: dict[str, Any] = {}
    if s3_endpoint:
        options["endpoint_url"] = s3_endpoint if "://" in s3_endpoint else f"https://{s3_endpoint}"
    if s3_region_name:
        options["region"] = s3_region_name
    return RemoteStream(path, mode, options, begin, end)


__all__ = ["CURLStreamFile", "RemoteStream", "open_stream"]
