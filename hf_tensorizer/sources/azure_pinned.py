"""Ranged reads of an Azure blob pinned to its ETag, through adlfs's own Azure SDK client and credentials.

adlfs's ``cat_file`` sends no condition, so an ``az://`` read could only be checked for a replaced blob by a
metadata request after it (one per read call: on a store that answers one request at a time, such as Azurite, a
large share of the load's time). Here each range is ``download_blob(offset, length, etag=…,
match_condition=IfNotModified)``: the service itself refuses a blob whose ETag moved (412, raised as
:class:`ObjectChangedError`), so no read needs a lookup of its own.
"""

from __future__ import annotations

from typing import Any

from ..errors import ObjectChangedError, SourceError
from .wire import TransientError

__all__ = ["pinned_reader"]


def pinned_reader(fs: Any, path: str, protocol: str, etag: str | None, uri: str) -> Any:
    """A ``read(first, last) -> bytes`` of ``path`` pinned to ``etag``, or None when ``fs`` is not adlfs (or no
    ETag is known).

    The reader raises :class:`ObjectChangedError` (the blob was replaced or deleted), :class:`TransientError`
    (connection failures, 429, 5xx) or :class:`SourceError` (any other refusal).
    """
    if protocol not in ("az", "abfs", "abfss") or not etag or not hasattr(fs, "service_client"):
        return None
    try:
        from azure.core import MatchConditions
        from azure.core.exceptions import (
            HttpResponseError,
            ResourceModifiedError,
            ResourceNotFoundError,
            ServiceRequestError,
            ServiceResponseError,
        )
        from fsspec.asyn import sync
    except ImportError:  # pragma: no cover - adlfs depends on azure-core
        return None
    container, blob, version_id = fs.split_path(path)

    async def get(first: int, last: int) -> bytes:
        async with fs.service_client.get_blob_client(container=container, blob=blob) as client:
            stream = await client.download_blob(offset=first, length=last + 1 - first, version_id=version_id,
                                                etag=etag, match_condition=MatchConditions.IfNotModified,
                                                max_concurrency=1)  # fmt: skip
            return await stream.readall()

    def read(first: int, last: int) -> bytes:
        what = f"reading bytes {first}-{last}"
        try:
            return sync(fs.loop, get, first, last)
        except ResourceModifiedError as exc:
            raise ObjectChangedError(f"{uri} changed while it was being read (new ETag); reload it") from exc
        except ResourceNotFoundError as exc:
            raise ObjectChangedError(f"{uri} was deleted while it was being read; reload it") from exc
        except (ServiceRequestError, ServiceResponseError, OSError, TimeoutError) as exc:
            raise TransientError(f"{what}: {type(exc).__name__}: {exc}") from exc
        except HttpResponseError as exc:
            status = getattr(exc, "status_code", None) or 0
            if status == 429 or status >= 500:
                raise TransientError(f"{what}: HTTP {status}") from exc
            raise SourceError(f"{uri}: {what} failed: HTTP {status} {exc.reason or ''}".rstrip()) from exc

    return read
