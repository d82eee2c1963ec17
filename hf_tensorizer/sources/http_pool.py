"""Keep-alive connections for :mod:`.http`: one pool per origin and TLS settings, shared by every
:class:`~.http.HTTPSource` of the process and reference-counted (:data:`POOLS`); :func:`connect` tells the
connection errors that cannot heal (refused, TLS handshake, unknown host) from those worth a retry."""

from __future__ import annotations

import http.client
import socket
import ssl
import threading
import time
from collections.abc import Mapping
from urllib.parse import urlsplit

from ..errors import SourceError, TensorizerError
from .wire import Budget, TransientError, describe_error

__all__ = ["POOLS", "ConnectionPool", "HTTPConnection", "HTTPSConnection", "Origin", "PoolKey", "PoolRegistry",
           "connect", "origin_of", "release", "send"]  # fmt: skip

_MAX_DISCARD = 64 << 10  # error bodies up to this size are drained so the connection can be reused
# errors meaning a pooled keep-alive connection was closed by the server while idle
_STALE_ERRORS = (ConnectionResetError, BrokenPipeError, ConnectionAbortedError, http.client.BadStatusLine)


class HTTPConnection(http.client.HTTPConnection):
    """``http.client`` connection with TCP_NODELAY (ranged GETs are small requests on a busy connection)."""

    def connect(self) -> None:
        super().connect()
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class HTTPSConnection(http.client.HTTPSConnection):
    """As :class:`HTTPConnection`, over TLS."""

    def connect(self) -> None:
        super().connect()
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


Origin = tuple[str, str, int]


def connect(conn: http.client.HTTPConnection, origin: Origin, *, uri: str, retries: int, budget: Budget) -> None:
    """Connect ``conn`` to ``origin``; errors that cannot heal by retrying fail at once.

    Args:
        conn: a new connection.
        origin: where it goes, for messages.
        uri: what messages name (redacted).
        retries: quick retries of a refused connection (0.25 s, 0.5 s...: a restarting server).
        budget: the operation's deadline.

    Raises:
        SourceError: refused (after the quick retries), a TLS handshake or certificate failure, an unknown host.
        OSError: a failure worth retrying (timeout, reset, a connection cut during the TLS handshake).
    """
    where = f"{origin[1]}:{origin[2]}"
    attempt = 0
    while True:
        try:
            conn.connect()
            return
        except ConnectionRefusedError as exc:
            conn.close()
            if attempt >= retries:
                raise SourceError(
                    f"{uri}: Connection refused by {where} ({attempt + 1} attempts): nothing listens there; check "
                    "the host and port, or that the server runs"
                ) from exc
            time.sleep(max(0.0, min(0.25 * 2**attempt, budget.remaining())))
            budget.check(exc)
            attempt += 1
        except ssl.SSLCertVerificationError as exc:
            raise SourceError(
                f"{uri}: TLS certificate verification failed ({exc.verify_message}); pass ca_bundle= with the CA "
                "that signed the server certificate, or verify=False"
            ) from exc
        except ssl.SSLError as exc:
            if isinstance(exc, (ssl.SSLEOFError, ssl.SSLZeroReturnError, ssl.SSLSyscallError)):
                raise  # the connection was cut during the handshake: worth a retry
            raise SourceError(
                f"{uri}: TLS handshake with {where} failed ({exc.reason or exc}); is it an https server? A plain "
                "http:// server contacted with https:// fails like this"
            ) from exc
        except socket.gaierror as exc:
            if exc.errno != socket.EAI_NONAME:
                raise  # EAI_AGAIN and friends: a resolver hiccup
            raise SourceError(f"{uri}: unknown host {origin[1]!r} ({exc.strerror})") from exc


def origin_of(url: str) -> Origin:
    """``(scheme, host, port)`` of ``url``, lower-cased, with the default port filled in."""
    p = urlsplit(url)
    scheme = p.scheme.lower()
    return scheme, (p.hostname or "").lower(), p.port or (443 if scheme == "https" else 80)


class ConnectionPool:
    """Idle keep-alive connections to one origin; a LIFO so the warmest connection is reused first.

    Shared by every :class:`HTTPSource` of the process with the same origin and TLS settings (see
    :class:`PoolRegistry`): the shards of one checkpoint, and the small files of an artifact, reuse each other's
    warm connections instead of each opening its own.
    """

    def __init__(self, origin: Origin, *, ssl_context: ssl.SSLContext | None, timeout: float) -> None:
        self.origin = origin
        self._ssl_context = ssl_context
        self._timeout = timeout
        self.maxsize = 0  # idle connections kept: the sum of the users' concurrency (set by the registry)
        self.opened = 0  # connections made so far (for tests and benchmarks)
        self._idle: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()
        self._closed = False

    def get(self) -> tuple[http.client.HTTPConnection, bool]:
        """A connection and whether it was reused (a reused one may have been closed by the server)."""
        with self._lock:
            if self._idle:
                return self._idle.pop(), True
            self.opened += 1
        scheme, host, port = self.origin
        if scheme == "https":
            return HTTPSConnection(host, port, timeout=self._timeout, context=self._ssl_context), False
        return HTTPConnection(host, port, timeout=self._timeout), False

    def put(self, conn: http.client.HTTPConnection) -> None:
        with self._lock:
            if not self._closed and len(self._idle) < self.maxsize:
                self._idle.append(conn)
                return
        conn.close()

    def trim(self) -> None:
        """Close idle connections beyond ``maxsize`` (after a user left)."""
        with self._lock:
            extra = self._idle[: max(0, len(self._idle) - self.maxsize)]
            del self._idle[: len(extra)]
        for conn in extra:
            conn.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


# origin + everything that changes how a connection is made: sources that agree on these can share connections
PoolKey = tuple[str, str, int, bool, "str | None", float]


class PoolRegistry:
    """The process-wide connection pools, one per :data:`PoolKey`, reference-counted: a pool lives while a source
    uses it and its idle connections are closed when the last user closes. Bounded: a pool keeps at most the sum of
    its current users' ``concurrency`` idle connections."""

    def __init__(self) -> None:
        self._pools: dict[PoolKey, tuple[ConnectionPool, int]] = {}
        self._lock = threading.Lock()

    def acquire(self, key: PoolKey, ssl_context: ssl.SSLContext | None, concurrency: int) -> ConnectionPool:
        with self._lock:
            pool, users = self._pools.get(key, (None, 0))
            if pool is None:
                pool = ConnectionPool(key[:3], ssl_context=ssl_context, timeout=key[5])  # type: ignore[arg-type]
            pool.maxsize += max(2, concurrency)
            self._pools[key] = (pool, users + 1)
            return pool

    def release(self, key: PoolKey, concurrency: int) -> None:
        with self._lock:
            pool, users = self._pools[key]
            pool.maxsize -= max(2, concurrency)
            if users > 1:
                self._pools[key] = (pool, users - 1)
            else:
                del self._pools[key]
        if users > 1:
            pool.trim()
        else:
            pool.close()

    def pool(self, origin: Origin, timeout: float | None = None) -> ConnectionPool | None:
        """A live pool to ``origin`` (any TLS settings; with ``timeout``, only that timeout's), for tests and
        benchmarks."""
        with self._lock:
            return next((p for k, (p, _) in self._pools.items() if k[:3] == origin and timeout in (None, k[5])), None)


POOLS = PoolRegistry()


def send(
    pool: ConnectionPool,
    method: str,
    target: str,
    headers: Mapping[str, str],
    budget: Budget,
    *,
    uri: str,
    timeout: float,
    connect_retries: int,
) -> tuple[http.client.HTTPResponse, http.client.HTTPConnection]:
    """Send one request on a pooled connection and return the response (headers read, body not) and connection.

    A keep-alive connection the server closed while idle is replaced silently; no socket wait runs past
    ``budget``'s deadline.

    Raises:
        SourceError: as :func:`connect`.
        TransientError: the request failed in a way worth retrying.
    """
    while True:
        conn, reused = pool.get()
        conn.timeout = budget.timeout(timeout)
        try:
            if conn.sock is None:
                connect(conn, pool.origin, uri=uri, retries=connect_retries, budget=budget)
            else:
                conn.sock.settimeout(conn.timeout)
            conn.request(method, target, headers=dict(headers))
            return conn.getresponse(), conn
        except TensorizerError:
            conn.close()
            raise
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            if reused and isinstance(exc, _STALE_ERRORS):
                continue  # the server closed an idle keep-alive connection: not a real failure
            scheme, host, port = pool.origin
            raise TransientError(f"{method} to {scheme}://{host}:{port} failed: {describe_error(exc)}") from exc


def release(
    pool: ConnectionPool, resp: http.client.HTTPResponse, conn: http.client.HTTPConnection, *, reuse: bool
) -> None:
    """Return ``conn`` to ``pool`` when ``resp`` was fully consumed (a small leftover such as an error page is
    drained first), else close it."""
    if reuse and not resp.isclosed():
        try:
            length = resp.length
            if length is not None and length <= _MAX_DISCARD:
                resp.read()
            elif resp.chunked:
                resp.read(_MAX_DISCARD)
        except (OSError, http.client.HTTPException):
            reuse = False
    if reuse and resp.isclosed() and not resp.will_close:
        pool.put(conn)
    else:
        resp.close()
        conn.close()
