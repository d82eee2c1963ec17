"""Ranged GETs of an S3 object through presigned URLs, on the HTTP connection pools :mod:`.http` uses.

Why: a boto3 ``get_object`` costs ~0.9 ms of Python CPU per request (parameter validation, endpoint rules, event
hooks, response parsing) against ~0.2 ms for a plain ranged GET, and a load sends one per chunk from 16 threads:
on a few cores that was the whole gap between our S3 and HTTP paths. boto3 still does everything that needs it:
credentials and their refresh, endpoint, region and addressing style, the signature, the HEAD that pins the
object, and every error message. A presigned URL signs the host only, so ``Range`` and ``If-Match`` ride along
unsigned; it is signed again every :data:`RESIGN_AFTER_S` seconds, so refreshed credentials are picked up.

When it steps aside (:class:`Fallback`: the caller switches to ``get_object`` for the rest of the object's life):
a redirect, 400, 401, 403 or 405 (a region redirect, a header a botocore hook must add such as requester-pays, an
expired or revoked credential: boto3 then retries or names the error), and a TLS verification failure (botocore
trusts its own CA bundle, or was told not to verify). It is not used at all when a proxy is configured for the
endpoint (:func:`usable`).
"""

from __future__ import annotations

import http.client
import os
import re
import ssl
import threading
import time
import urllib.request
from typing import Any
from urllib.parse import urlsplit

from .. import constants
from ..errors import ObjectChangedError, SourceError, TensorizerError
from .http_pool import POOLS, PoolKey, origin_of, release, send
from .wire import Body, Budget, TransientError, describe_error, parse_retry_after, readinto1

__all__ = ["Fallback", "PresignedReader", "check_range_response", "usable"]

EXPIRES_S = 3600  # lifetime asked for each URL (credentials that expire sooner end it sooner: 403 → boto3)
RESIGN_AFTER_S = 300  # sign a fresh URL after this long: picks up refreshed credentials well before expiry
_FALLBACK_STATUSES = frozenset({301, 302, 303, 307, 308, 400, 401, 403, 405})


class Fallback(Exception):
    """This transport cannot serve the object; read it with ``get_object`` instead."""


def usable(client: Any, endpoint: str) -> bool:
    """Whether ranged GETs to ``endpoint`` may bypass ``client``: no proxy is configured for it, in the client's
    config or the environment (botocore would tunnel through it; we connect directly)."""
    if getattr(client.meta.config, "proxies", None):
        return False
    parts = urlsplit(endpoint)
    proxies = urllib.request.getproxies()
    return parts.scheme not in proxies or bool(urllib.request.proxy_bypass(parts.hostname or ""))


def check_range_response(
    uri: str, pinned_etag: str | None, size: int, etag: str | None, content_range: str | None, first: int, last: int
) -> int:
    """The body length of a ranged response to bytes ``first..last``, after checking it belongs to the pinned
    object (ETag, total size) and to the range asked for; shared by both ways S3 ranges are read.

    Raises:
        ObjectChangedError: another ETag or size than the pinned one.
        SourceError: a missing or malformed ``Content-Range``, or another range than asked.
    """
    if pinned_etag and etag and etag != pinned_etag:
        raise ObjectChangedError(f"{uri} changed while it was being read (ETag {pinned_etag} became {etag}); reload it")
    match = re.fullmatch(r"\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*", content_range or "")
    if not match:
        raise SourceError(f"{uri}: missing or malformed Content-Range {content_range!r} in a ranged GET")
    got_first, got_last = int(match.group(1)), int(match.group(2))
    if match.group(3) != "*" and int(match.group(3)) != size:
        raise ObjectChangedError(
            f"{uri} changed while it was being read (size {size} became {match.group(3)}); reload it"
        )
    if got_first != first or got_last > last:
        raise SourceError(f"{uri}: asked for bytes {first}-{last}, S3 sent {got_first}-{got_last}")
    return got_last - got_first + 1


class PresignedReader:
    """Ranged GETs of one pinned S3 object through presigned URLs.

    Args:
        client: the boto3 S3 client that signs (and that the caller falls back to).
        params: ``get_object`` parameters of the object (``Bucket``, ``Key``, optional ``VersionId``).
        uri: what messages name (``s3://bucket/key``).
        size: the object's size, from the HEAD.
        etag: the pinned ETag (sent as ``If-Match`` and compared with each response), or None.
        concurrency: keep-alive connections this reader adds to the shared pool.
        timeout: connect and per-socket-read timeout in seconds.
        connect_retries: quick retries of a refused connection.

    Raises:
        Fallback: the client cannot presign (e.g. a custom signer), or the URL is not http(s).
    """

    def __init__(
        self,
        client: Any,
        params: dict[str, str],
        *,
        uri: str,
        size: int,
        etag: str | None,
        concurrency: int,
        timeout: float,
        connect_retries: int = constants.REMOTE_CONNECT_RETRIES,
    ) -> None:
        self.uri, self.size, self.etag = uri, size, etag
        self._client, self._params = client, params
        self._timeout, self._connect_retries, self._concurrency = float(timeout), connect_retries, concurrency
        self._lock = threading.Lock()
        url = self._sign()
        self._target, self._signed_at = _path_and_query(url), time.monotonic()
        origin = origin_of(url)
        if origin[0] not in ("http", "https"):
            raise Fallback(f"presigned URL scheme {origin[0]!r}")
        ca_bundle = os.environ.get("AWS_CA_BUNDLE") or None  # what botocore itself trusts besides its default
        context = ssl.create_default_context(cafile=ca_bundle) if origin[0] == "https" else None
        self._key: PoolKey | None = (*origin, True, ca_bundle, self._timeout)
        self._pool = POOLS.acquire(self._key, context, concurrency)

    def _sign(self) -> str:
        try:
            return str(self._client.generate_presigned_url("get_object", Params=self._params, ExpiresIn=EXPIRES_S))
        except Exception as exc:  # any botocore failure to sign: get_object will report it properly
            raise Fallback(f"cannot presign: {type(exc).__name__}") from exc

    def _current_target(self) -> str:
        with self._lock:
            if time.monotonic() - self._signed_at > RESIGN_AFTER_S:
                self._target, self._signed_at = _path_and_query(self._sign()), time.monotonic()
            return self._target

    def open(self, first: int, last: int, budget: Budget) -> Body:
        """One ranged GET of bytes ``first..last``; returns its checked, unread body (the contract of
        ``RangedSource._open_body``).

        Raises:
            Fallback: the URL was refused (see the module docstring); nothing was written.
            TransientError: worth a retry (5xx, 408, 429, a broken connection).
            ObjectChangedError: the object changed, was deleted or shrank since it was pinned.
            SourceError: a malformed response.
        """
        if self._key is None:
            raise Fallback("closed")
        headers = {"Range": f"bytes={first}-{last}", "User-Agent": "hf_tensorizer", "Accept-Encoding": "identity"}
        if self.etag:
            headers["If-Match"] = self.etag
        try:
            resp, conn = send(self._pool, "GET", self._current_target(), headers, budget, uri=self.uri,
                              timeout=self._timeout, connect_retries=self._connect_retries)  # fmt: skip
        except SourceError as exc:
            if isinstance(exc.__cause__, ssl.SSLCertVerificationError):
                raise Fallback("TLS verification failed with the default CA store") from exc
            raise
        reuse = False
        try:
            status = resp.status
            if status == 206:
                expected = check_range_response(self.uri, self.etag, self.size, resp.getheader("ETag"),
                                                resp.getheader("Content-Range"), first, last)  # fmt: skip

                def read(view: memoryview, first_read: bool) -> int:
                    try:
                        return readinto1(resp, view, first_read)
                    except (OSError, http.client.HTTPException) as exc:
                        raise TransientError(f"GET bytes={first}-{last}: {describe_error(exc)}") from exc

                return Body(expected, read, lambda ok: release(self._pool, resp, conn, reuse=ok))
            reuse = True  # an error page is small: drained, the connection kept
            if status in _FALLBACK_STATUSES:
                raise Fallback(f"HTTP {status}")
            if status == 412:
                raise ObjectChangedError(
                    f"{self.uri} changed while it was being read (ETag no longer matches); reload it"
                )
            if status == 416:
                raise ObjectChangedError(f"{self.uri} is now shorter than when it was opened; reload it")
            if status == 404:
                raise ObjectChangedError(f"{self.uri} was deleted while it was being read")
            if status in (408, 429) or status >= 500:
                raise TransientError(f"GET bytes={first}-{last}: HTTP {status}",
                                     parse_retry_after(resp.getheader("Retry-After")))  # fmt: skip
            if status == 200:
                raise SourceError(f"{self.uri}: asked for bytes {first}-{last}, the endpoint sent the whole object")
            raise Fallback(f"HTTP {status}")
        except BaseException as exc:
            release(self._pool, resp, conn, reuse=reuse and not isinstance(exc, (OSError, http.client.HTTPException)))
            if isinstance(exc, (OSError, http.client.HTTPException)) and not isinstance(exc, TensorizerError):
                raise TransientError(f"GET bytes={first}-{last}: {describe_error(exc)}") from exc
            raise

    def close(self) -> None:
        """Hand the pool back (idempotent; requests in flight finish on their own connections)."""
        with self._lock:
            key, self._key = self._key, None
        if key is not None:
            POOLS.release(key, self._concurrency)


def _path_and_query(url: str) -> str:
    parts = urlsplit(url)
    return (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
