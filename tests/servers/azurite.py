"""A local Azure Blob Storage: Azurite's blob service (npm package ``azurite``, installed once by
``scripts/azurite.sh``) in a subprocess on 127.0.0.1, storing into a temporary folder.

adlfs reaches it with the emulator's well-known development account (public, documented by Microsoft; not a secret)
through a connection string: ``storage_options={"connection_string": emulator.connection_string}``.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ACCOUNT = "devstoreaccount1"
# Azurite's fixed development key (https://learn.microsoft.com/azure/storage/common/storage-use-azurite)
KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


def install() -> str:
    """The ``azurite-blob`` command, installed by ``scripts/azurite.sh`` when missing.

    Raises:
        FileNotFoundError: node or npm is not installed.
        RuntimeError: the install failed.
    """
    if shutil.which("node") is None or shutil.which("npm") is None:
        raise FileNotFoundError("node and npm are needed for Azurite (apt-get install -y nodejs npm)")
    run = subprocess.run(["bash", str(ROOT / "scripts" / "azurite.sh")], capture_output=True, text=True, timeout=600)
    if run.returncode != 0:
        raise RuntimeError(f"scripts/azurite.sh failed: {run.stderr.strip()[-500:]}")
    return run.stdout.strip().splitlines()[-1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Azurite:
    """``azurite-blob`` on a free loopback port with its data in a temporary folder; :meth:`stop` ends both.

    Args:
        command: the ``azurite-blob`` executable (default: :func:`install`).
        timeout: seconds to wait for it to listen.
    """

    def __init__(self, command: str | None = None, timeout: float = 60.0) -> None:
        command = command or install()
        self.port = _free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}/{ACCOUNT}"
        self.connection_string = (
            f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={KEY};BlobEndpoint={self.endpoint};"
        )
        self._dir = tempfile.mkdtemp(prefix="hft-azurite-")
        env = {k: v for k, v in os.environ.items() if not k.upper().endswith("_PROXY")}
        argv = [command, "--blobHost", "127.0.0.1", "--blobPort", str(self.port), "--location", self._dir,
                "--silent", "--skipApiVersionCheck", "--loose"]  # fmt: skip
        self._proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        deadline = time.monotonic() + timeout
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                if self._proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError("azurite-blob did not start") from None
                time.sleep(0.1)

    def stop(self) -> None:
        self._proc.terminate()
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        shutil.rmtree(self._dir, ignore_errors=True)
