"""A TCP proxy on 127.0.0.1 that can cut or stall connections mid-response, for servers without fault modes (moto).

The proxy forwards bytes both ways. Faults count the bytes flowing from the upstream server to the client *after*
they were armed, across all connections, so arming one right before a read hits that read's response body::

    proxy = FaultProxy("127.0.0.1", moto_port)
    proxy.arm("drop", after=1_000_000)      # the connection carrying the 1,000,001st byte is closed there
    proxy.arm("stall", after=0, seconds=3)  # the next response stalls for 3 s before its first byte
    proxy.arm("trickle", after=0, seconds=0.5)  # from the next byte on, that connection sends 1 byte per 0.5 s

With ``tls=(cert.pem, key.pem)`` the proxy speaks TLS to its clients (the upstream stays plain), which puts a
TLS endpoint in front of a server that has none (moto).

``refuse_query_auth = True`` answers every request signed in its query string (a presigned S3 URL) with S3's 403,
as a bucket policy denying ``s3:authType`` ``REST-QUERY-STRING`` does; header-signed requests pass.
"""

from __future__ import annotations

import socket
import ssl
import threading
import time
from dataclasses import dataclass


@dataclass
class _Fault:
    kind: str  # "drop", "stall" or "trickle"
    after: int
    seconds: float
    count: int
    seen: int = 0


class FaultProxy:
    """Forwards 127.0.0.1:``port`` to ``upstream_host``:``upstream_port``.

    Args:
        upstream_host: the real server's host.
        upstream_port: the real server's port.
    """

    def __init__(self, upstream_host: str, upstream_port: int, *, tls: tuple[str, str] | None = None) -> None:
        self._upstream = (upstream_host, upstream_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
        self._tls: ssl.SSLContext | None = None
        if tls is not None:
            self._tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self._tls.load_cert_chain(*tls)
        self._lock = threading.Lock()
        self._faults: list[_Fault] = []
        self.cut = 0  # connections cut so far
        self.stalled = 0
        self.refuse_query_auth = False
        self.refused = 0  # requests answered 403 by refuse_query_auth
        self._closed = False
        self._sockets: set[socket.socket] = set()
        threading.Thread(target=self._accept, daemon=True).start()

    def arm(self, kind: str, *, after: int = 0, seconds: float = 0.0, count: int = 1) -> None:
        """Queue a fault: ``"drop"`` closes the connection, ``"stall"`` pauses it ``seconds``, ``"trickle"`` sends
        everything it carries from then on one byte per ``seconds``, once ``after`` more upstream bytes have been
        forwarded; ``count`` times."""
        if kind not in ("drop", "stall", "trickle"):
            raise ValueError(kind)
        with self._lock:
            self._faults.append(_Fault(kind, after, seconds, count))

    def clear(self) -> None:
        """Forget armed faults."""
        with self._lock:
            self._faults.clear()

    def close(self) -> None:
        """Stop accepting and close every connection."""
        self._closed = True
        self._listener.close()
        with self._lock:
            sockets = list(self._sockets)
        for s in sockets:
            _close(s)

    # --- internals ---------------------------------------------------------------------------------------

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                if self._tls is not None:
                    client.settimeout(10)
                    client = self._tls.wrap_socket(client, server_side=True)  # a client refusing us fails here
                    client.settimeout(None)
                upstream = socket.create_connection(self._upstream, timeout=10)
                upstream.settimeout(None)
            except OSError:
                _close(client)
                continue
            with self._lock:
                self._sockets.update((client, upstream))
            threading.Thread(target=self._pump, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, True), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, downstream: bool) -> None:
        trickle = 0.0  # seconds per byte once this connection was armed to trickle
        try:
            while True:
                data = src.recv(1 << 16)
                if not data:
                    break
                if trickle:
                    for i in range(len(data)):
                        time.sleep(trickle)
                        dst.sendall(data[i : i + 1])
                    continue
                if downstream:
                    action, data, rest = self._apply(data)
                    if data:
                        dst.sendall(data)
                    if action == "drop":
                        break
                    if isinstance(action, tuple):  # trickle
                        trickle = action[1]
                        for i in range(len(rest)):
                            time.sleep(trickle)
                            dst.sendall(rest[i : i + 1])
                        continue
                    if action is not None:  # stall
                        time.sleep(action)
                        if rest:
                            dst.sendall(rest)
                    continue
                if self.refuse_query_auth and b"Signature=" in data.split(b"\r\n", 1)[0]:
                    with self._lock:
                        self.refused += 1
                    src.sendall(_DENIED)  # answered here; the request never reaches the server
                    continue
                dst.sendall(data)
        except OSError:
            pass
        finally:
            _close(src)
            _close(dst)

    def _apply(self, data: bytes) -> tuple[str | float | tuple[str, float] | None, bytes, bytes]:
        """``(action, bytes to send now, bytes to send after a stall)``."""
        with self._lock:
            if not self._faults:
                return None, data, b""
            fault = self._faults[0]
            room = fault.after - fault.seen
            if len(data) <= room:
                fault.seen += len(data)
                return None, data, b""
            fault.count -= 1
            fault.seen = 0
            if fault.count <= 0:
                self._faults.pop(0)
            if fault.kind == "drop":
                self.cut += 1
                return "drop", data[: max(room, 0)], b""
            if fault.kind == "trickle":
                self.stalled += 1
                return ("trickle", fault.seconds), data[: max(room, 0)], data[max(room, 0) :]
            self.stalled += 1
            return fault.seconds, data[: max(room, 0)], data[max(room, 0) :]


_DENIED_BODY = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>AccessDenied</Code>'
                b"<Message>Query-string authentication is denied by the bucket policy</Message></Error>")  # fmt: skip
_DENIED = (b"HTTP/1.1 403 Forbidden\r\nContent-Type: application/xml\r\nContent-Length: %d\r\n\r\n"
           % len(_DENIED_BODY) + _DENIED_BODY)  # fmt: skip


def _close(s: socket.socket) -> None:
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    try:
        s.close()
    except OSError:
        pass
