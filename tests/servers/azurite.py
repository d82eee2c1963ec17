"""A local Azure Blob Storage: Azurite's blob service (npm package ``azurite``, installed once by
``scripts/azurite.sh``) in a subprocess on 127.0.0.1, storing into a temporary folder.

adlfs reaches it with the emulator's well-known development account (public, documented by Microsoft; not a secret)
through a connection string: ``storage_options={"connection_string": emulator.connection_string}``.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

from .emulator import free_port, spawn_listening, terminate

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


class Azurite:
    """``azurite-blob`` on a free loopback port with its data in a temporary folder; :meth:`stop` ends both.

    Args:
        command: the ``azurite-blob`` executable (default: :func:`install`).
        timeout: seconds to wait for it to listen.
    """

    def __init__(self, command: str | None = None, timeout: float = 60.0) -> None:
        command = command or install()
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}/{ACCOUNT}"
        self.connection_string = (
            f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={KEY};BlobEndpoint={self.endpoint};"
        )
        self._dir = tempfile.mkdtemp(prefix="hft-azurite-")
        argv = [command, "--blobHost", "127.0.0.1", "--blobPort", str(self.port), "--location", self._dir,
                "--silent", "--skipApiVersionCheck", "--loose"]  # fmt: skip
        self._proc = spawn_listening(argv, self.port, "azurite-blob", timeout)

    def stop(self) -> None:
        terminate(self._proc)
        shutil.rmtree(self._dir, ignore_errors=True)
