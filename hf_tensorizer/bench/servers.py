"""Loopback servers for the remote benchmarks: nginx (or the stdlib range server), moto S3, and the
parallel ``curl --range`` reference."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .proc import ROOT, popen

# fake credentials for the moto server (never real ones: the benchmark talks to 127.0.0.1 only)
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "bench-key-id",
    "AWS_SECRET_ACCESS_KEY": "bench-secret-key",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    "AWS_EC2_METADATA_DISABLED": "true",
}

NGINX_BUCKET = "bucket"  # nginx also serves its folder as this anonymous path-style S3 bucket

# Servers -----------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, proc: subprocess.Popen[Any], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with status {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on 127.0.0.1:{port} within {timeout:.0f} s")


def _stop(proc: subprocess.Popen[Any], sig: int = signal.SIGTERM) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


NGINX_CONF = """\
worker_processes {workers};
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
{user}
events {{ worker_connections 1024; }}
http {{
    log_format sent '$body_bytes_sent $uri';
    {access_log}
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    keepalive_timeout 65;
    keepalive_requests 100000;
    default_type application/octet-stream;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    server {{
        listen 127.0.0.1:{port}{sndbuf};
        root {root};
        {limit_rate}
        location / {{ }}
        # the same folder as an anonymous, path-style S3 bucket: GET/HEAD /BUCKET/key with Range and If-Match
        # (nginx answers both for static files) is all an unsigned boto3 read of an object needs
        location /{bucket}/ {{ alias {root}/; }}
    }}
}}
"""


@contextmanager
def http_server(root: Path, kind: str = "nginx", workers: int | str = "auto", *, limit_rate: str | None = None,
                access_log: Path | None = None) -> Iterator[tuple[str, str]]:  # fmt: skip
    """Serve ``root`` on 127.0.0.1; yields ``(base_url, description)``. Stops the server on exit.

    nginx also serves ``root`` as the anonymous, path-style S3 bucket :data:`NGINX_BUCKET` at ``base_url``:
    ``S3Source("s3://bucket/<path>", endpoint_url=base_url, addressing_style="path", anonymous=True)``.

    Args:
        root: the directory served.
        kind: ``"nginx"`` (a generated config in a temporary directory) or ``"stdlib"`` (tests/servers/http_range.py).
        workers: nginx ``worker_processes``.
        limit_rate: nginx ``limit_rate`` (bytes/s per connection, e.g. ``"10m"``): a bandwidth cap per client
            connection (nginx only).
        access_log: a file nginx appends ``<body bytes sent> <uri>`` to for every request (nginx only).
    """
    if kind == "stdlib":
        script = ROOT / "tests" / "servers" / "http_range.py"
        proc = subprocess.Popen([sys.executable, str(script), "--root", str(root)], stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline().split()
            if len(line) < 2 or line[0] != "LISTENING":
                raise RuntimeError(f"range server did not start: {line}")
            yield f"http://127.0.0.1:{line[1]}", "stdlib range server (tests/servers/http_range.py), not nginx"
        finally:
            _stop(proc)
        return
    nginx = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if os.path.exists(p)), None)
    if nginx is None:
        raise FileNotFoundError("nginx is not installed (apt-get install nginx-light), or use --server stdlib")
    version = subprocess.run([nginx, "-v"], capture_output=True, text=True).stderr.strip()
    with tempfile.TemporaryDirectory(prefix="hft-nginx-") as tmp:
        port = _free_port()
        user = "user root root;" if os.geteuid() == 0 else ""  # workers must read root-owned checkpoints
        conf = Path(tmp) / "nginx.conf"
        conf.write_text(NGINX_CONF.format(
            workers=workers, tmp=tmp, user=user, port=port, root=root.resolve(), bucket=NGINX_BUCKET,
            sndbuf=" sndbuf=64k" if limit_rate else "",
            access_log=f"access_log {access_log} sent;" if access_log else "access_log off;",
            # small send buffers and sendfile steps: otherwise a whole socket buffer leaves before the cap applies
            limit_rate=f"limit_rate {limit_rate}; sendfile_max_chunk 64k;" if limit_rate else "",
        ))  # fmt: skip
        proc = subprocess.Popen([nginx, "-c", str(conf), "-p", tmp], stderr=subprocess.DEVNULL)
        try:
            _wait_port(port, proc, "nginx")
            yield f"http://127.0.0.1:{port}", f"{version} (sendfile on, keep-alive, {workers} workers)"
        finally:
            _stop(proc, signal.SIGQUIT)  # graceful: the master stops its workers


@contextmanager
def moto_server() -> Iterator[str]:
    """moto's ThreadedMotoServer in a child process (its own GIL); yields the endpoint URL."""
    proc = popen(["moto"], module="hf_tensorizer.bench.remote", env=AWS_ENV)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().split()
        if len(line) < 2 or line[0] != "PORT":
            raise RuntimeError(f"moto server did not start: {line}")
        # keep reading what it prints after: an undrained pipe fills at 64 KiB and blocks the server mid-request
        threading.Thread(target=proc.stdout.read, name="moto-output", daemon=True).start()
        yield f"http://127.0.0.1:{line[1]}"
    finally:
        _stop(proc)


def curl_parallel(url: str, size: int, n: int, dest: str | None = None) -> float:
    """Seconds for ``n`` parallel ``curl --range`` downloads covering ``url`` (``size`` bytes), to /dev/null or,
    with ``dest`` (a directory, e.g. a tmpfs), into fresh files there (deleted afterwards)."""
    step = -(-size // n)
    ranges = [(a, min(size, a + step) - 1) for a in range(0, size, step)]
    outs = [os.devnull if dest is None else os.path.join(dest, f"hft-curl-{os.getpid()}-{i}") for i in range(n)]
    t0 = time.perf_counter()
    procs = [
        subprocess.Popen(["curl", "-sf", "-o", o, "--range", f"{a}-{b}", url], stdin=subprocess.DEVNULL)
        for (a, b), o in zip(ranges, outs)
    ]
    codes = [p.wait() for p in procs]
    seconds = time.perf_counter() - t0
    if dest is not None:
        for o in outs:
            Path(o).unlink(missing_ok=True)
    if any(codes):
        raise RuntimeError(f"curl failed with exit codes {codes}")
    return seconds


@contextmanager
def gcs_server() -> Iterator[str]:
    """``gcp-storage-emulator`` (PyPI) in memory on 127.0.0.1; yields its endpoint URL (gcsfs ``endpoint_url``)."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.upper().endswith("_PROXY")}
    argv = [sys.executable, "-m", "gcp_storage_emulator", "start", "-H", "127.0.0.1", "--port", str(port),
            "--in-memory", "-q"]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        _wait_port(port, proc, "gcp-storage-emulator", timeout=60)
        yield f"http://127.0.0.1:{port}"
    finally:
        _stop(proc)


AZURITE_ACCOUNT = "devstoreaccount1"
# Azurite's fixed, documented development key (not a secret: it only opens the local emulator)
AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


@contextmanager
def azurite_server() -> Iterator[str]:
    """Azurite's blob service (npm, installed once by scripts/azurite.sh) on 127.0.0.1 with its data in a temporary
    folder; yields the adlfs/azure-storage-blob connection string."""
    run = subprocess.run(["bash", str(ROOT / "scripts" / "azurite.sh")], capture_output=True, text=True, timeout=900)
    if run.returncode != 0:
        raise RuntimeError(f"scripts/azurite.sh failed: {run.stderr.strip()[-300:]}")
    command = run.stdout.strip().splitlines()[-1]
    port = _free_port()
    with tempfile.TemporaryDirectory(prefix="hft-azurite-") as tmp:
        argv = [command, "--blobHost", "127.0.0.1", "--blobPort", str(port), "--location", tmp, "--silent",
                "--skipApiVersionCheck", "--loose"]  # fmt: skip
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            _wait_port(port, proc, "azurite-blob", timeout=60)
            yield (f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};AccountKey={AZURITE_KEY};"
                   f"BlobEndpoint=http://127.0.0.1:{port}/{AZURITE_ACCOUNT};")  # fmt: skip
        finally:
            _stop(proc)
