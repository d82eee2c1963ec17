"""Starting and stopping an emulator process that listens on a loopback port (GCS, Azurite)."""

from __future__ import annotations

import os
import socket
import subprocess
import time


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_listening(argv: list[str], port: int, name: str, timeout: float) -> subprocess.Popen[bytes]:
    """Start ``argv`` (no proxy variables, output discarded) and wait until it accepts connections on ``port``.

    Raises:
        RuntimeError: it exited, or did not listen within ``timeout`` seconds (it is stopped first).
    """
    env = {k: v for k, v in os.environ.items() if not k.upper().endswith("_PROXY")}
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                terminate(proc)
                raise RuntimeError(f"{name} did not start") from None
            time.sleep(0.1)


def terminate(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL after 10 s; reaped either way."""
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
