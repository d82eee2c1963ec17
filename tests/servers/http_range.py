"""A range-capable HTTP/1.1 file server with injectable faults, for tests. Binds 127.0.0.1 only.

Run as a separate process (so its threads do not compete with the client for the GIL)::

    python tests/servers/http_range.py --root DIR          # or: cd tests && python -m servers.http_range ...

It prints ``LISTENING <port>`` once ready. :class:`RangeServer` starts and drives it from tests.

Serving: ``GET``/``HEAD`` of files under ``--root`` with ``Range: bytes=a-b`` (206 + ``Content-Range``; 416 when
unsatisfiable; multi-ranges are answered with the whole body, as RFC 9110 allows), a strong ``ETag`` derived from
(inode, mtime, size), ``Last-Modified``, ``If-Match`` / ``If-Unmodified-Since`` (412), keep-alive.

Control (JSON over HTTP on the same port, paths under ``/__control__/``):

* ``POST fault`` — queue a one-shot (or ``count``-shot) fault; fields:
    * ``kind``: ``"drop"`` (close the connection after ``after`` body bytes), ``"status"`` (answer ``status`` with
      optional ``retry_after``), ``"stall"`` (send ``after`` body bytes then sleep ``seconds``; ``after=-1``
      stalls before the status line), ``"ignore_range"`` (answer 200 with the whole body), ``"change"`` (after
      ``skip`` matching requests, serve the file ``source`` at this path from then on: new bytes, new ETag),
      ``"trickle"`` (send ``after`` body bytes, then one byte every ``interval`` seconds (0.5) for at most
      ``seconds`` (60), then drop the connection), ``"gzip"`` (gzip the body, ``Content-Encoding: gzip``, as a
      misconfigured compressing proxy does; ``Content-Range`` still names the requested range), ``"hold"`` (wait
      until the file ``until`` exists, at most ``seconds`` (600), then answer normally: a gate the test opens).
    * ``count`` (default 1; -1 = forever), ``skip`` (matching requests let through first), ``path`` (only this
      URL path; default any), ``methods`` (default ``["GET"]``).
* ``POST config`` — persistent behaviour: ``token`` (require ``Authorization: Bearer <token>``), ``etag`` /
  ``last_modified`` (send validators, default true), ``honor_if_match`` (default true), ``redirect`` (an object:
  ``prefix`` such as ``"/moved"``, optional ``base`` such as ``"http://localhost:PORT"`` for another origin,
  ``status`` (302), ``signed`` (append ``?sig=N``; ``POST expire`` makes old signatures answer 403)).
  Paths under the redirect prefix are served with the prefix removed and need no token (like a CDN).
  ``latency`` (seconds every GET/HEAD waits before it is answered: a distant server, for benchmarks).
  ``serial_cost`` (seconds every ranged GET spends before its answer, one request at a time server-wide: a server
  that copies the whole object for each range, as moto does; parallel ranges then gain nothing while one long
  response streams at full speed). ``conn_rate`` (bytes/s each response body is paced to: a per-connection
  bandwidth, as on real S3, so more connections move more). ``total_rate`` (bytes/s all response bodies share:
  a server whose bandwidth is spent, so more connections only split it).
* ``POST reset`` — drop faults, config and the request log. ``POST expire`` — invalidate redirect signatures.
* ``GET log`` — the request log: ``[{method, path, query, range, if_match, auth, status, port}]``.
"""

from __future__ import annotations

import argparse
import email.utils
import gzip
import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

CONTROL = "/__control__/"


class _State:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        self.faults: list[dict[str, Any]] = []
        self.aliases: dict[str, str] = {}  # URL path -> file path (relative to root) after a "change" fault
        self.config: dict[str, Any] = {
            "token": None,
            "etag": True,
            "last_modified": True,
            "honor_if_match": True,
            "redirect": None,
            "latency": 0.0,
            "serial_cost": 0.0,
            "conn_rate": 0.0,
            "total_rate": 0.0,
        }
        self.pace_at = 0.0  # total_rate: when the server's shared bandwidth is next free
        self.log: list[dict[str, Any]] = []
        self.epoch = 0
        self.serial = threading.Lock()  # serial_cost: one ranged GET at a time pays it

    def take_fault(self, method: str, path: str) -> dict[str, Any] | None:
        """The fault that applies to this request, if any (also advances "change" faults)."""
        chosen = None
        with self.lock:
            for fault in list(self.faults):
                if fault.get("path") not in (None, path) or method not in fault.get("methods", ["GET"]):
                    continue
                if fault["kind"] == "change":
                    if fault.get("skip", 0) > 0:
                        fault["skip"] -= 1
                        continue
                    self.aliases[path] = fault["source"]
                    self.faults.remove(fault)
                    continue
                if chosen is not None:
                    continue
                if fault.get("skip", 0) > 0:
                    fault["skip"] -= 1
                    continue
                chosen = dict(fault)
                count = fault.get("count", 1)
                if count > 0:
                    fault["count"] = count - 1
                    if fault["count"] == 0:
                        self.faults.remove(fault)
        return chosen


def _etag(st: os.stat_result) -> str:
    return f'"{st.st_ino:x}-{st.st_mtime_ns:x}-{st.st_size:x}"'


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    # --- plumbing ----------------------------------------------------------------------------------------

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)

    def _record(self, status: int) -> None:
        split = urlsplit(self.path)
        with self.server.state.lock:
            self.server.state.log.append(
                {
                    "method": self.command,
                    "path": split.path,
                    "query": split.query,
                    "range": self.headers.get("Range"),
                    "if_match": self.headers.get("If-Match"),
                    "accept_encoding": self.headers.get("Accept-Encoding"),
                    "auth": self.headers.get("Authorization") is not None,
                    "status": status,
                    "port": self.client_address[1],
                }
            )

    # --- control -----------------------------------------------------------------------------------------

    def _control(self) -> None:
        state = self.server.state
        action = urlsplit(self.path).path[len(CONTROL) :]
        length = int(self.headers.get("Content-Length") or 0)
        payload = json.loads(self.rfile.read(length) or b"{}") if length else {}
        with state.lock:
            if action == "fault":
                state.faults.append(payload)
            elif action == "config":
                state.config.update(payload)
            elif action == "reset":
                state.reset()
            elif action == "expire":
                state.epoch += 1
            elif action == "log":
                body = json.dumps(state.log).encode()
                self._send(200, body, {"Content-Type": "application/json"})
                return
            else:
                self._send(404, b"unknown control action")
                return
        self._send(200, b"{}", {"Content-Type": "application/json"})

    # --- files -------------------------------------------------------------------------------------------

    def do_POST(self) -> None:
        if self.path.startswith(CONTROL):
            self._control()
        else:
            self._send(405)

    def do_GET(self) -> None:
        if self.path.startswith(CONTROL):
            self._control()
            return
        self._serve()

    def do_HEAD(self) -> None:
        self._serve()

    def _serve(self) -> None:
        state = self.server.state
        split = urlsplit(self.path)
        path = split.path
        config = state.config
        if config.get("latency"):
            time.sleep(config["latency"])  # a far-away server: every request waits this long before its answer
        if config.get("serial_cost") and self.command == "GET" and self.headers.get("Range"):
            with state.serial:  # the per-range cost of a server that copies the object first, one at a time
                time.sleep(config["serial_cost"])
        redirect = config.get("redirect")
        via_redirect = False
        if redirect:
            prefix = redirect["prefix"]
            if path.startswith(prefix + "/"):
                via_redirect = True
                if redirect.get("signed") and split.query != f"sig={state.epoch}":
                    self._record(403)
                    self._send(403, b"signature expired")
                    return
                path = path[len(prefix) :]
            else:
                if config.get("token") and self.headers.get("Authorization") != f"Bearer {config['token']}":
                    self._record(401)
                    self._send(401, b"token required")
                    return
                location = redirect.get("base", "") + prefix + path
                if redirect.get("signed"):
                    location += f"?sig={state.epoch}"
                self._record(redirect.get("status", 302))
                self._send(redirect.get("status", 302), b"moved", {"Location": location})
                return
        if (
            not via_redirect
            and config.get("token")
            and self.headers.get("Authorization") != f"Bearer {config['token']}"
        ):
            self._record(401)
            self._send(401, b"token required")
            return

        fault = state.take_fault(self.command, path)
        if fault and fault["kind"] == "status":
            headers = {"Retry-After": str(fault["retry_after"])} if fault.get("retry_after") is not None else {}
            self._record(fault["status"])
            self._send(fault["status"], b"injected fault", headers)
            return
        if fault and fault["kind"] == "hold":
            deadline = time.monotonic() + fault.get("seconds", 600)
            while not os.path.exists(fault["until"]) and time.monotonic() < deadline:
                time.sleep(0.02)
        if fault and fault["kind"] == "stall" and fault.get("after", 0) < 0:
            self._record(0)
            time.sleep(fault["seconds"])
            self.close_connection = True
            return

        with state.lock:
            rel = state.aliases.get(path, path)
        file_path = (state.root / rel.lstrip("/")).resolve()
        if state.root not in file_path.parents or not file_path.is_file():
            self._record(404)
            self._send(404, b"not found")
            return
        with open(file_path, "rb") as f:
            st = os.fstat(f.fileno())
            size = st.st_size
            headers: dict[str, str] = {"Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
            etag = _etag(st)
            last_modified = email.utils.formatdate(st.st_mtime, usegmt=True)
            if config.get("etag", True):
                headers["ETag"] = etag
            if config.get("last_modified", True):
                headers["Last-Modified"] = last_modified
            if config.get("honor_if_match", True):
                if_match = self.headers.get("If-Match")
                if (
                    if_match is not None
                    and if_match.strip() != "*"
                    and etag not in [t.strip() for t in if_match.split(",")]
                ):
                    self._record(412)
                    self._send(412, b"precondition failed", headers)
                    return
                if_unmodified = self.headers.get("If-Unmodified-Since")
                if if_unmodified is not None and if_match is None:
                    try:
                        limit = email.utils.parsedate_to_datetime(if_unmodified).timestamp()
                    except (TypeError, ValueError):
                        limit = None
                    if limit is not None and int(st.st_mtime) > limit:
                        self._record(412)
                        self._send(412, b"precondition failed", headers)
                        return

            start, end, status = 0, size - 1, 200
            range_header = self.headers.get("Range")
            if range_header and not (fault and fault["kind"] == "ignore_range"):
                parsed = _parse_range(range_header, size)
                if parsed == "unsatisfiable":
                    headers["Content-Range"] = f"bytes */{size}"
                    self._record(416)
                    self._send(416, b"", headers)
                    return
                if parsed is not None:
                    start, end = parsed
                    status = 206
                    headers["Content-Range"] = f"bytes {start}-{end}/{size}"
            length = max(0, end - start + 1)
            self._record(status)
            if fault and fault["kind"] == "gzip":
                f.seek(start)
                body = gzip.compress(f.read(length))
                self._send(status, body, {**headers, "Content-Encoding": "gzip"})
                return
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(length))
            self.end_headers()
            if self.command == "HEAD":
                return
            self._body(f, start, length, fault)

    def _body(self, f: Any, start: int, length: int, fault: dict[str, Any] | None) -> None:
        limit = length
        if fault and fault["kind"] in ("drop", "stall", "trickle"):
            limit = min(length, fault.get("after", 0))
        try:
            f.seek(start)
            sent = 0
            state = self.server.state
            rate = float(state.config.get("conn_rate") or 0)
            total_rate = float(state.config.get("total_rate") or 0)
            piece, t0 = (64 << 10 if rate or total_rate else 1 << 20), time.monotonic()
            while sent < limit:
                chunk = f.read(min(piece, limit - sent))
                if not chunk:
                    break
                if total_rate:  # the server's bandwidth, shared: each piece takes its turn on it
                    with state.lock:
                        now = time.monotonic()
                        at = max(now, state.pace_at)
                        state.pace_at = at + len(chunk) / total_rate
                    if at > now:
                        time.sleep(at - now)
                self.wfile.write(chunk)
                sent += len(chunk)
                if rate:  # paced: this response moves at most conn_rate bytes per second
                    ahead = t0 + sent / rate - time.monotonic()
                    if ahead > 0:
                        time.sleep(ahead)
            if fault and fault["kind"] == "drop" and limit < length:
                self.wfile.flush()
                self.connection.shutdown(socket.SHUT_RDWR)
                self.close_connection = True
                return
            if fault and fault["kind"] == "trickle" and limit < length:
                self.wfile.flush()
                until = time.monotonic() + fault.get("seconds", 60)
                while sent < length and time.monotonic() < until:
                    time.sleep(fault.get("interval", 0.5))
                    self.wfile.write(f.read(1))
                    self.wfile.flush()
                    sent += 1
                self.connection.shutdown(socket.SHUT_RDWR)
                self.close_connection = True
                return
            if fault and fault["kind"] == "stall" and limit < length:
                self.wfile.flush()
                time.sleep(fault["seconds"])
                while sent < length:
                    chunk = f.read(min(1 << 20, length - sent))
                    self.wfile.write(chunk)
                    sent += len(chunk)
        except (BrokenPipeError, ConnectionResetError, OSError):
            self.close_connection = True


def _parse_range(value: str, size: int) -> tuple[int, int] | str | None:
    """``(start, end)``, ``"unsatisfiable"``, or None to ignore the header (malformed or multi-range)."""
    unit, _, spec = value.partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    first, _, last = spec.strip().partition("-")
    try:
        if first == "":
            n = int(last)
            if n == 0:
                return "unsatisfiable"
            return max(0, size - n), size - 1
        start = int(first)
        end = int(last) if last else size - 1
    except ValueError:
        return None
    if start >= size:
        return "unsatisfiable"
    if end < start:
        return None
    return start, min(end, size - 1)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    state: _State


def serve(root: str, port: int = 0, cert: str | None = None, key: str | None = None) -> None:
    """Serve ``root`` on 127.0.0.1:``port`` forever (prints ``LISTENING <port>`` once bound); HTTPS with ``cert``."""
    server = _Server(("127.0.0.1", port), _Handler)
    server.state = _State(Path(root).resolve())
    if cert:
        import ssl

        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert, key)
        server.socket = ctx.wrap_socket(server.socket, server_side=True)
    print(f"LISTENING {server.server_address[1]}", flush=True)
    server.serve_forever(poll_interval=0.1)


# --- driver used by the tests --------------------------------------------------------------------------------


class RangeServer:
    """Starts :func:`serve` in a subprocess and drives its control API.

    Args:
        root: the directory to serve.
        tls: ``(certificate PEM, key PEM)`` to serve HTTPS.
    """

    def __init__(self, root: str | os.PathLike[str], *, tls: tuple[str, str] | None = None) -> None:
        self.root = Path(root)
        env = {k: v for k, v in os.environ.items() if not k.upper().endswith("_PROXY")}
        argv = [sys.executable, str(Path(__file__).resolve()), "--root", str(self.root)]
        if tls:
            argv += ["--cert", tls[0], "--key", tls[1]]
        self._proc = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=env,
            text=True,
        )
        assert self._proc.stdout is not None
        line = self._proc.stdout.readline()
        if not line.startswith("LISTENING "):
            self._proc.kill()
            raise RuntimeError(f"range server did not start: {line!r}")
        self.port = int(line.split()[1])
        self.base = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
        self._tls = tls is not None

    def url(self, name: str) -> str:
        """URL of ``name`` (a path relative to the served root)."""
        return f"{self.base}/{name.lstrip('/')}"

    def _call(self, method: str, action: str, payload: dict[str, Any] | None = None) -> Any:
        if self._tls:
            import ssl

            ctx = ssl._create_unverified_context()  # the control channel of a test server
            conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                "127.0.0.1", self.port, timeout=10, context=ctx
            )
        else:
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            body = json.dumps(payload or {}).encode()
            conn.request(method, CONTROL + action, body=body, headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            data = resp.read()
            if resp.status != 200:
                raise RuntimeError(f"control {action} failed: {resp.status} {data!r}")
            return json.loads(data or b"null")
        finally:
            conn.close()

    def fault(self, kind: str, **fields: Any) -> None:
        """Queue a fault (see the module docstring)."""
        self._call("POST", "fault", {"kind": kind, **fields})

    def config(self, **fields: Any) -> None:
        """Change persistent behaviour (see the module docstring)."""
        self._call("POST", "config", fields)

    def expire(self) -> None:
        """Invalidate redirect signatures handed out so far."""
        self._call("POST", "expire")

    def reset(self) -> None:
        """Forget faults, config and the log."""
        self._call("POST", "reset")

    def log(self) -> list[dict[str, Any]]:
        """Requests served so far (control calls excluded)."""
        return self._call("GET", "log")

    def stop(self) -> None:
        """Terminate the server process."""
        self._proc.terminate()
        try:
            self._proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        if self._proc.stdout is not None:
            self._proc.stdout.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", required=True)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--cert")
    parser.add_argument("--key")
    args = parser.parse_args()
    serve(args.root, args.port, args.cert, args.key)
