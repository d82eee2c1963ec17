"""Shared fixtures, including real loopback servers for the remote transports.

* ``moto_s3`` — moto's standalone S3 server (``ThreadedMotoServer``) on 127.0.0.1, shared by the session; the
  fixture yields its endpoint URL and sets fake AWS credentials in the environment. ``s3_client`` and
  ``s3_bucket`` build on it.
* ``http_server`` — :mod:`servers.http_range` in a subprocess (one per session), reset for each test and given
  a fresh directory to serve.
* ``hub_server`` — :mod:`servers.hub`, a local Hub with ``HF_ENDPOINT`` pointed at it.
* ``gcs_emulator`` — :mod:`servers.gcs`, ``gcp-storage-emulator`` in a subprocess (one per session); skipped when
  it or gcsfs is not installed. ``gcs_bucket`` is a fresh bucket on it and the ``storage_options`` that reach it.
* ``azurite`` — :mod:`servers.azurite`, Azurite's blob service from npm (one per session, installed by
  scripts/azurite.sh); skipped only without node/npm or adlfs. ``azure_container``: a fresh container and options.

Nothing here reaches beyond 127.0.0.1: the defaults below send stray Hub or instance-metadata calls nowhere.
"""

from __future__ import annotations

import atexit
import itertools
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # makes ``servers`` importable

# Before anything imports huggingface_hub (it reads these once): an isolated HF home, no telemetry, and a dead
# loopback endpoint so a test that forgets to point at a local server fails fast instead of going online.
# The process that makes these folders removes them when it exits (xdist workers inherit the controller's).
for _name, _prefix in (("HF_HOME", "hf-home"), ("HF_TENSORIZER_CACHE", "cache")):  # the latter: the integrations'
    if _name not in os.environ:  # cache of small artifact files, never the real ~/.cache/hf_tensorizer
        os.environ[_name] = tempfile.mkdtemp(prefix=f"hf-tensorizer-tests-{_prefix}-")
        atexit.register(shutil.rmtree, os.environ[_name], ignore_errors=True)
os.environ.setdefault("HF_ENDPOINT", "http://127.0.0.1:9")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")  # botocore must never probe 169.254.169.254
# gcsfs (read at its import) would probe each bucket's type over gRPC, which the GCS emulator does not serve
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

_AWS_ENV = (
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ROLE_ARN",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
)


def isolate_aws(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No AWS credentials or config from the machine: only what the test sets."""
    for name in (*_AWS_ENV, "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")


# --- S3 (moto) ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def _moto_server() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def moto_s3(_moto_server: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> str:
    """The moto S3 endpoint URL; fake credentials are set in the environment for this test."""
    isolate_aws(monkeypatch, tmp_path)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing-key-id")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing-secret-key")
    return _moto_server


@pytest.fixture
def s3_client(moto_s3: str) -> Any:
    """A boto3 client for the moto server (for setting up and checking buckets)."""
    import boto3

    return boto3.client("s3", endpoint_url=moto_s3, region_name="us-east-1")


_bucket_numbers = itertools.count()


@pytest.fixture
def s3_bucket(s3_client: Any) -> str:
    """A new, empty bucket on the moto server."""
    name = f"test-bucket-{os.getpid()}-{next(_bucket_numbers)}"
    s3_client.create_bucket(Bucket=name)
    return name


# --- HTTP range server -------------------------------------------------------------------------------------


@dataclass
class HTTPServerHandle:
    """The range server as one test sees it: its own directory, names relative to it."""

    server: Any  # servers.http_range.RangeServer
    dir: Path
    prefix: str

    @property
    def base(self) -> str:
        return self.server.base

    def url(self, name: str) -> str:
        """URL of the file ``name`` in :attr:`dir`."""
        return self.server.url(f"{self.prefix}/{name}")

    def url_path(self, name: str) -> str:
        return f"/{self.prefix}/{name}"

    def write(self, name: str, data: bytes) -> str:
        """Create ``name`` with ``data``; returns its URL."""
        (self.dir / name).write_bytes(data)
        return self.url(name)

    def fault(self, kind: str, name: str | None = None, **fields: Any) -> None:
        """Queue a fault, limited to the file ``name`` when given (``source`` is a file name too)."""
        if name is not None:
            fields["path"] = self.url_path(name)
        if "source" in fields:
            fields["source"] = self.url_path(fields["source"])
        self.server.fault(kind, **fields)

    def config(self, **fields: Any) -> None:
        self.server.config(**fields)

    def expire(self) -> None:
        self.server.expire()

    def log(self) -> list[dict[str, Any]]:
        return self.server.log()


@pytest.fixture(scope="session")
def _range_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from servers.http_range import RangeServer

    server = RangeServer(tmp_path_factory.mktemp("http-root"))
    yield server
    server.stop()


_http_dirs = itertools.count()


@pytest.fixture
def http_server(_range_server: Any) -> HTTPServerHandle:
    """The range server (subprocess), reset, with a fresh directory for this test."""
    _range_server.reset()
    prefix = f"t{next(_http_dirs)}"
    directory = _range_server.root / prefix
    directory.mkdir()
    return HTTPServerHandle(_range_server, directory, prefix)


# --- Hub -----------------------------------------------------------------------------------------------------


@pytest.fixture
def hub_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """A local Hub (servers.hub.HubServer) with ``HF_ENDPOINT`` and huggingface_hub's defaults pointed at it.

    Its token is ``hub_server.token``; ``HF_TOKEN`` is unset (tests set it when they want it).
    """
    from huggingface_hub import constants
    from servers.hub import HubServer

    hub = HubServer(tmp_path / "hub")
    monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
    monkeypatch.setattr(constants, "ENDPOINT", hub.endpoint)
    monkeypatch.setattr(
        constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.endpoint + "/{repo_id}/resolve/{revision}/{filename}"
    )
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    yield hub
    hub.stop()


@pytest.fixture
def hf_enabled(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """hf_tensorizer's transformers/diffusers hooks on for one test, with a private artifact cache."""
    import hf_tensorizer

    monkeypatch.setenv("HF_TENSORIZER_CACHE", str(tmp_path / "cache"))
    hf_tensorizer.enable()
    yield
    hf_tensorizer.disable()


# --- Google Cloud Storage (gcp-storage-emulator, through gcsfs) ----------------------------------------------


@pytest.fixture(scope="session")
def gcs_emulator() -> Iterator[str]:
    """The endpoint URL of a GCS emulator shared by the session."""
    pytest.importorskip("gcsfs")
    pytest.importorskip("gcp_storage_emulator")
    from servers.gcs import GCSEmulator

    emulator = GCSEmulator()
    yield emulator.endpoint
    emulator.stop()


# --- Azure Blob Storage (Azurite from npm, through adlfs) -----------------------------------------------------


@pytest.fixture(scope="session")
def azurite() -> Iterator[Any]:
    """Azurite's blob service shared by the session (installed once by scripts/azurite.sh); skipped only when
    node/npm or adlfs is missing."""
    pytest.importorskip("adlfs")
    from servers.azurite import Azurite, install

    try:
        command = install()
    except FileNotFoundError as exc:
        pytest.skip(f"Azurite: {exc}")
    emulator = Azurite(command)
    yield emulator
    emulator.stop()


@pytest.fixture
def azure_container(azurite: Any) -> tuple[str, dict[str, Any]]:
    """``(container, storage_options)``: a fresh container on Azurite, and the adlfs options that reach it."""
    import fsspec

    options = {"connection_string": azurite.connection_string}
    container = f"container-{os.getpid()}-{next(_gcs_buckets)}"
    fsspec.filesystem("az", **options).mkdir(container)
    return container, options


_gcs_buckets = itertools.count()


@pytest.fixture
def gcs_bucket(gcs_emulator: str) -> tuple[str, dict[str, Any]]:
    """``(bucket, storage_options)``: a fresh bucket on the emulator, and the gcsfs options that reach it."""
    import fsspec

    options = {"endpoint_url": gcs_emulator, "token": "anon", "project": "test"}
    bucket = f"bucket-{os.getpid()}-{next(_gcs_buckets)}"
    fsspec.filesystem("gs", **options).mkdir(bucket)
    return bucket, options
