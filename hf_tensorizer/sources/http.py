"""HTTP(S) sources: ranged GETs over keep-alive pools, resumable retries, the object pinned for the whole load.

Design:

* Connections come from a per-origin pool of ``http.client`` connections (keep-alive, TCP_NODELAY) shared by every
  source of the process (:mod:`.http_pool`). We use
  ``http.client`` rather than urllib3 because its ``HTTPResponse.readinto`` writes straight into the caller's
  memoryview; urllib3's ``readinto`` reads into a new ``bytes`` and copies.
* Every read is one ranged GET (or several concurrent ones for a read larger than ``part_size``). Bodies are read
  one socket read at a time (:func:`readinto1`), so after a dropped connection or a timeout we know exactly how
  many bytes landed and the retry asks for the rest only.
* The object is pinned at open: the ETag (else Last-Modified) of the first response is sent as ``If-Match``
  (``If-Unmodified-Since``) on every range and compared with each response, and every ``Content-Range`` must
  carry the same total size. Any mismatch or a 412 raises :class:`ObjectChangedError`: a load never mixes two
  versions of an object.
* A 200 to a range request (the server ignored ``Range``) is never read as if it were the range.
* Messages name the URL without user info or query string (signed URLs carry credentials there).

:class:`RangedSource` holds the transport-independent part (bounds, part splitting, the retry loop) and is
shared with :mod:`.s3`.
"""

from __future__ import annotations

import base64
import http.client
import ssl
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TypeVar
from urllib.parse import quote, unquote, urljoin, urlsplit

from .. import constants
from ..errors import (
    InvalidURIError,
    ObjectChangedError,
    SourceError,
    TensorizerError,
)
from .http_pool import POOLS, ConnectionPool, Origin, PoolKey, origin_of, release, send
from .ranged import (
    Body,
    Budget,
    RangedSource,
    RetryPolicy,
    TransientError,
    describe_error,
    parse_retry_after,
    readinto1,
)
from .uri import redact

__all__ = ["HTTPSource"]

T = TypeVar("T")

_REDIRECTS = (301, 302, 303, 307, 308)
_SENSITIVE_HEADERS = ("authorization", "cookie", "proxy-authorization")


@dataclass
class _Response:
    resp: http.client.HTTPResponse
    conn: http.client.HTTPConnection
    pool: ConnectionPool
    url: str
    from_cache: bool  # the request went to a remembered redirect target (which may have expired)


class HTTPSource(RangedSource):
    """An object behind an ``http://`` or ``https://`` URL, read with ranged GETs.

    Args:
        uri: the URL. User info (``https://user:pass@host/...``) becomes a Basic ``Authorization`` header.
        headers: extra request headers (sent to the first origin and to redirect targets; ``Authorization`` and
            ``Cookie`` are dropped when a redirect leaves the original origin).
        token: a bearer token (``Authorization: Bearer ...``), same redirect rule.
        verify: verify TLS certificates (default). ``False`` disables verification.
        ca_bundle: a PEM file of CA certificates to trust instead of the system store.
        timeout: seconds for connecting and for each socket read before the attempt is retried.
        retries: consecutive failed attempts tolerated per range.
        backoff: first retry delay in seconds (doubles per consecutive failure, jittered).
        max_backoff: cap of one retry delay.
        max_retry_after: cap applied to a server's ``Retry-After``.
        deadline: seconds opening, and each read call, may take in all (retries and waits included); 0: none.
        min_rate: bytes per second a response body must keep up over ``rate_window`` seconds; 0: no minimum.
        rate_window: seconds over which ``min_rate`` is measured.
        connect_retries: quick retries of a refused connection (a restarting server) before failing.
        concurrency: connections kept alive, and the most ranged GETs in flight (default 16; the load adapts
            within it, see docs/remote.md "Adaptive transfers"); given, it holds the transfer as set.
        part_size: reads larger than 1.5 × this are split into concurrent ranged GETs (default 16 MiB).
        max_redirects: redirects followed per request.
        name: what messages call the object (defaults to the URL without user info and query).

    Raises:
        InvalidURIError: the URL is malformed.
        SourceError: the object cannot be opened (not found, access denied, TLS failure, no range support,
            connection refused, compressed responses, unreachable after retries, past the deadline).
    """

    def __init__(
        self,
        uri: str,
        *,
        headers: Mapping[str, str] | None = None,
        token: str | None = None,
        verify: bool = True,
        ca_bundle: str | None = None,
        timeout: float = constants.REMOTE_TIMEOUT_S,
        retries: int = constants.REMOTE_RETRIES,
        backoff: float = 0.25,
        max_backoff: float = 10.0,
        max_retry_after: float = constants.REMOTE_MAX_RETRY_AFTER_S,
        deadline: float = constants.REMOTE_DEADLINE_S,
        min_rate: float = constants.REMOTE_MIN_RATE,
        rate_window: float = constants.REMOTE_RATE_WINDOW_S,
        connect_retries: int = constants.REMOTE_CONNECT_RETRIES,
        concurrency: int | None = None,
        part_size: int | None = None,
        max_redirects: int = 10,
        name: str | None = None,
    ) -> None:
        super().__init__(
            concurrency=concurrency,
            part_size=part_size,
            policy=RetryPolicy(
                retries=retries,
                backoff=backoff,
                max_backoff=max_backoff,
                max_retry_after=max_retry_after,
                deadline=deadline,
                min_rate=min_rate,
                rate_window=rate_window,
                connect_retries=connect_retries,
            ),
        )
        try:
            parts = urlsplit(uri)
            parts.port  # noqa: B018 - raises ValueError for a malformed port
        except ValueError as exc:
            shown = uri.split("?", 1)[0].rsplit("@", 1)[-1]  # no user info or query even when unparsable
            raise InvalidURIError(f"malformed URL {shown!r}: {exc}") from exc
        self.uri = name or redact(uri)
        if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
            raise InvalidURIError(f"not an http(s) URL with a host: {self.uri!r}")

        self._headers: dict[str, str] = {"User-Agent": "hf_tensorizer", "Accept-Encoding": "identity"}
        for key, value in (headers or {}).items():
            self._headers[str(key)] = str(value)
        if parts.username is not None:
            creds = f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()
            self._headers["Authorization"] = "Basic " + base64.b64encode(creds).decode("ascii")
        if token:
            self._headers["Authorization"] = f"Bearer {token}"

        netloc = parts.hostname if ":" not in parts.hostname else f"[{parts.hostname}]"
        if parts.port:
            netloc += f":{parts.port}"
        self._url = f"{parts.scheme.lower()}://{netloc}{parts.path or '/'}" + (f"?{parts.query}" if parts.query else "")
        self._home = origin_of(self._url)
        self._target: str | None = None  # where the last redirect chain ended, to skip it on later requests
        self._max_redirects = max_redirects
        self._timeout = float(timeout)
        self._verify = verify
        self._ca_bundle = ca_bundle
        self._ssl_context: ssl.SSLContext | None = None
        if parts.scheme.lower() == "https" or ca_bundle is not None:
            self._ssl_context = self._make_ssl_context(verify, ca_bundle)
        self._pools: dict[Origin, tuple[PoolKey, ConnectionPool]] = {}  # the shared pools this source holds
        self._pools_lock = threading.Lock()

        # pinned validators
        self.etag: str | None = None
        self.last_modified: str | None = None
        self._pin_lock = threading.Lock()
        try:
            t0 = time.monotonic()
            self.size = self._retrying("opening", self._probe)
            self.open_s = time.monotonic() - t0
        except BaseException:
            self.close()  # hand back the shared pool
            raise

    # --- setup -------------------------------------------------------------------------------------------

    def _make_ssl_context(self, verify: bool, ca_bundle: str | None) -> ssl.SSLContext:
        if not verify:
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            return ctx
        try:
            return ssl.create_default_context(cafile=ca_bundle)
        except (OSError, ssl.SSLError) as exc:
            raise SourceError(f"cannot load the CA bundle {ca_bundle!r}: {exc}") from exc

    def _probe(self, budget: Budget) -> int:
        """Size and validators: a HEAD, or a 1-byte ranged GET when HEAD is refused or lacks a length."""
        r = self._request("HEAD", {}, budget)
        try:
            status = r.resp.status
            if 200 <= status < 300 and status != 206:
                length = r.resp.getheader("Content-Length")
                encoding = (r.resp.getheader("Content-Encoding") or "identity").lower()
                if (r.resp.getheader("Accept-Ranges") or "").lower() == "none":
                    raise SourceError(f"{self.uri}: the server does not support range requests (Accept-Ranges: none)")
                if length is not None and length.strip().isdigit() and encoding == "identity":
                    self._pin(r.resp)
                    return int(length)
            elif status == 404 or status == 410:
                raise SourceError(f"{self.uri}: not found (HTTP {status})")
            elif status in (408, 429) or (500 <= status < 600 and status not in (501, 505)):
                raise TransientError(f"HTTP {status} to HEAD", parse_retry_after(r.resp.getheader("Retry-After")))
        finally:
            self._finish(r, reuse=True)
        # HEAD not usable (405, a presigned URL that only signs GET, no Content-Length): ask for one byte.
        return self._probe_range(budget)

    def _probe_range(self, budget: Budget) -> int:
        r = self._request("GET", {"Range": "bytes=0-0"}, budget)
        ok = False
        try:
            status = r.resp.status
            if status == 206:
                self._check_encoding(r.resp)
                first, _last, total = self._content_range(r.resp)
                if first != 0 or total is None:
                    raise SourceError(f"{self.uri}: unusable Content-Range {r.resp.getheader('Content-Range')!r}")
                self._pin(r.resp)
                ok = True
                return total
            if status == 416:
                _, _, total = self._content_range(r.resp, unsatisfied=True)
                if total == 0:
                    self._pin(r.resp)
                    return 0
            if status == 200:
                raise SourceError(
                    f"{self.uri}: the server ignored the Range header (HTTP 200); range requests are required"
                )
            self._raise_for_status(r, "GET")
            raise SourceError(f"{self.uri}: unexpected HTTP {status} to a range request")
        finally:
            self._finish(r, reuse=ok)

    def _pin(self, resp: http.client.HTTPResponse) -> None:
        with self._pin_lock:
            if self.etag is None and self.last_modified is None:
                self.etag = resp.getheader("ETag")
                if self.etag is None:
                    self.last_modified = resp.getheader("Last-Modified")

    # --- requests ----------------------------------------------------------------------------------------

    def _pool_for(self, origin: Origin) -> ConnectionPool:
        with self._pools_lock:
            held = self._pools.get(origin)
            if held is not None:
                return held[1]
            if self._closed:
                raise SourceError(f"{self.uri}: source is closed")
            if origin[0] == "https" and self._ssl_context is None:  # redirected from http to https
                self._ssl_context = self._make_ssl_context(self._verify, self._ca_bundle)
            key: PoolKey = (*origin, self._verify, self._ca_bundle, self._timeout)
            pool = POOLS.acquire(key, self._ssl_context if origin[0] == "https" else None, self.concurrency)
            self._pools[origin] = (key, pool)
            return pool

    def _headers_for(self, url: str, extra: Mapping[str, str]) -> dict[str, str]:
        headers = dict(self._headers)
        if origin_of(url) != self._home:  # never hand credentials to another host (CDN, storage bucket)
            for key in list(headers):
                if key.lower() in _SENSITIVE_HEADERS:
                    del headers[key]
        headers.update(extra)
        return headers

    def _request(self, method: str, extra: Mapping[str, str], budget: Budget) -> _Response:
        """Send one request, following redirects; returns the final response with its connection."""
        cached = self._target
        url = cached or self._url
        for _ in range(self._max_redirects + 1):
            parts = urlsplit(url)
            target = quote(parts.path or "/", safe="/%:@!$&'()*+,;=-._~") + (f"?{parts.query}" if parts.query else "")
            pool = self._pool_for(origin_of(url))
            headers = self._headers_for(url, extra)
            resp, conn = self._send(pool, method, target, headers, budget)
            status = resp.status
            location = resp.getheader("Location")
            if status in _REDIRECTS and location:
                self._finish(_Response(resp, conn, pool, url, False), reuse=True)
                url = urljoin(url, location)
                if urlsplit(url).scheme.lower() not in ("http", "https"):
                    raise SourceError(f"{self.uri}: redirected to an unsupported URL {redact(url)!r}")
                cached = None
                continue
            if url != self._url and cached is None:
                self._target = url
            return _Response(resp, conn, pool, url, from_cache=cached is not None)
        raise SourceError(f"{self.uri}: more than {self._max_redirects} redirects")

    def _send(
        self, pool: ConnectionPool, method: str, target: str, headers: Mapping[str, str], budget: Budget
    ) -> tuple[http.client.HTTPResponse, http.client.HTTPConnection]:
        return send(pool, method, target, headers, budget, uri=self.uri, timeout=self._timeout,
                    connect_retries=self.policy.connect_retries)  # fmt: skip

    def _finish(self, r: _Response, *, reuse: bool) -> None:
        """Return the connection to the pool when the response was fully consumed, else close it."""
        release(r.pool, r.resp, r.conn, reuse=reuse)

    # --- response checks ---------------------------------------------------------------------------------

    def _content_range(
        self, resp: http.client.HTTPResponse, *, unsatisfied: bool = False
    ) -> tuple[int, int, int | None]:
        value = (resp.getheader("Content-Range") or "").strip()
        try:
            unit, spec = value.split(None, 1)
            rng, total_text = spec.strip().split("/", 1)
            total = None if total_text.strip() == "*" else int(total_text)
            if unsatisfied and rng.strip() == "*":
                return -1, -1, total
            first_text, last_text = rng.split("-", 1)
            first, last = int(first_text), int(last_text)
            if unit.lower() != "bytes" or first < 0 or last < first:
                raise ValueError(value)
        except ValueError:
            raise SourceError(f"{self.uri}: malformed Content-Range {value!r}") from None
        return first, last, total

    def _check_encoding(self, resp: http.client.HTTPResponse) -> None:
        encoding = (resp.getheader("Content-Encoding") or "identity").strip().lower()
        if encoding != "identity":  # the bytes would be the compressed stream, not the object's
            raise SourceError(
                f"{self.uri}: the server compressed a ranged response (Content-Encoding: {encoding}) although the "
                "request asked for identity; ranged reads need the stored bytes: turn compression off for this "
                "file on the server or proxy"
            )

    def _check_validators(self, resp: http.client.HTTPResponse) -> None:
        etag = resp.getheader("ETag")
        if self.etag is not None and etag is not None and etag.removeprefix("W/") != self.etag.removeprefix("W/"):
            raise ObjectChangedError(
                f"{self.uri} changed while it was being read (ETag {self.etag} became {etag}); reload it"
            )
        if self.etag is None and self.last_modified is not None:
            modified = resp.getheader("Last-Modified")
            if modified is not None and modified != self.last_modified:
                raise ObjectChangedError(
                    f"{self.uri} changed while it was being read (Last-Modified {self.last_modified} became "
                    f"{modified}); reload it"
                )

    def _raise_for_status(self, r: _Response, method: str) -> None:
        """Map an unusable status to the right exception (always raises)."""
        status = r.resp.status
        if status == 412:
            raise ObjectChangedError(f"{self.uri} changed while it was being read (HTTP 412 to If-Match); reload it")
        if status == 416:
            raise ObjectChangedError(f"{self.uri} is now shorter than when it was opened (HTTP 416); reload it")
        if status in (401, 403, 404, 410) and r.from_cache:
            # A remembered redirect target (e.g. a signed CDN URL) expired: resolve again from the original URL.
            self._target = None
            raise TransientError(f"redirect target answered HTTP {status}", retry_after=0.0)
        if status in (401, 403):
            raise SourceError(f"{self.uri}: access denied (HTTP {status}); check the token or headers")
        if status in (404, 410):
            raise SourceError(f"{self.uri}: not found (HTTP {status})")
        if status in (408, 429) or (500 <= status < 600 and status not in (501, 505)):
            raise TransientError(f"HTTP {status} to {method}", parse_retry_after(r.resp.getheader("Retry-After")))
        raise SourceError(f"{self.uri}: unexpected HTTP {status} to {method}")

    # --- data --------------------------------------------------------------------------------------------

    def _open_body(self, first: int, last: int, budget: Budget) -> Body:
        extra = {"Range": f"bytes={first}-{last}"}
        if self.etag is not None:
            if not self.etag.startswith("W/"):  # If-Match uses strong comparison: a weak tag would never match
                extra["If-Match"] = self.etag
        elif self.last_modified is not None:
            extra["If-Unmodified-Since"] = self.last_modified
        r = self._request("GET", extra, budget)
        try:
            resp = r.resp
            if resp.status in (200, 206):
                self._check_encoding(resp)
            if resp.status == 206:
                self._check_validators(resp)
                got_first, got_last, total = self._content_range(resp)
                if total is not None and total != self.size:
                    raise ObjectChangedError(
                        f"{self.uri} changed while it was being read (size {self.size} became {total}); reload it"
                    )
                if got_first != first or got_last > last:
                    raise SourceError(
                        f"{self.uri}: asked for bytes {first}-{last}, the server sent {got_first}-{got_last}"
                    )
                expected = got_last - got_first + 1
            elif resp.status == 200:
                self._check_validators(resp)
                length = (resp.getheader("Content-Length") or "").strip()
                # A 200 is the whole object: usable only when the whole object was asked for.
                if not (first == 0 and last == self.size - 1 and length.isdigit() and int(length) == self.size):
                    raise SourceError(
                        f"{self.uri}: the server ignored the Range header (HTTP 200 to bytes={first}-{last}); "
                        "range requests are required"
                    )
                expected = self.size
            else:
                self._raise_for_status(r, "GET")
                raise AssertionError("unreachable")
        except BaseException as exc:
            self._finish(r, reuse=False)
            if isinstance(exc, (OSError, http.client.HTTPException)) and not isinstance(exc, TensorizerError):
                raise TransientError(f"GET bytes={first}-{last}: {describe_error(exc)}") from exc
            raise

        def read(view: memoryview, first_read: bool) -> int:
            try:
                return readinto1(resp, view, first_read)
            except (OSError, http.client.HTTPException) as exc:
                raise TransientError(f"GET bytes={first}-{last}: {describe_error(exc)}") from exc

        return Body(expected, read, lambda ok: self._finish(r, reuse=ok))

    def close(self) -> None:
        super().close()
        with self._pools_lock:
            held, self._pools = list(self._pools.values()), {}
        for key, _pool in held:
            POOLS.release(key, self.concurrency)

    def __repr__(self) -> str:
        return f"HTTPSource({self.uri!r}, size={self.size})"
