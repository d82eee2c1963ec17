"""A local Google Cloud Storage: ``gcp-storage-emulator`` (PyPI) in a subprocess on 127.0.0.1, in memory.

gcsfs reaches it through ``endpoint_url`` (or ``STORAGE_EMULATOR_HOST``) with ``token="anon"``. The emulator has no
gRPC storage-control API, so gcsfs's bucket-type probe must be off (``GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false``,
read when gcsfs is imported; tests/conftest.py sets it).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class GCSEmulator:
    """``python -m gcp_storage_emulator start`` on a free loopback port; ``endpoint`` is its URL."""

    def __init__(self, timeout: float = 30.0) -> None:
        self.port = _free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        env = {k: v for k, v in os.environ.items() if not k.upper().endswith("_PROXY")}
        argv = [sys.executable, "-m", "gcp_storage_emulator", "start", "-H", "127.0.0.1", "--port", str(self.port)]
        self._proc = subprocess.Popen(
            [*argv, "--in-memory", "-q"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env
        )
        deadline = time.monotonic() + timeout
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                if self._proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError("gcp-storage-emulator did not start") from None
                time.sleep(0.1)

    def stop(self) -> None:
        self._proc.terminate()
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
