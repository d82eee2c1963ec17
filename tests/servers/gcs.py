"""A local Google Cloud Storage: ``gcp-storage-emulator`` (PyPI) in a subprocess on 127.0.0.1, in memory.

gcsfs reaches it through ``endpoint_url`` (or ``STORAGE_EMULATOR_HOST``) with ``token="anon"``. The emulator has no
gRPC storage-control API, so gcsfs's bucket-type probe must be off (``GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false``,
read when gcsfs is imported; tests/conftest.py sets it).
"""

from __future__ import annotations

import sys

from .emulator import free_port, spawn_listening, terminate


class GCSEmulator:
    """``python -m gcp_storage_emulator start`` on a free loopback port; ``endpoint`` is its URL."""

    def __init__(self, timeout: float = 30.0) -> None:
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        argv = [sys.executable, "-m", "gcp_storage_emulator", "start", "-H", "127.0.0.1", "--port", str(self.port)]
        self._proc = spawn_listening([*argv, "--in-memory", "-q"], self.port, "gcp-storage-emulator", timeout)

    def stop(self) -> None:
        terminate(self._proc)
