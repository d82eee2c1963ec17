"""The shared Source contract (tests/source_contract.py) run against every transport: a local file, HTTP (the range
server subprocess), S3 (moto over real HTTP), the Hub (the local Hub server, large objects through its CDN), fsspec
(``memory://`` in process, ``gs://`` on the GCS emulator through gcsfs) and open file objects (``BytesIO``, an open
file, a non-seekable stream)."""

from __future__ import annotations

import io
import itertools
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from source_contract import REMOTE_OPTIONS, SourceContract, Transport, payload

from hf_tensorizer import constants
from hf_tensorizer.errors import ObjectChangedError
from hf_tensorizer.sources import Source, open_source

pytestmark = pytest.mark.timeout(60)

_names = itertools.count()


def _fresh_name() -> str:
    return f"obj-{next(_names)}.bin"


def _atomic_write(path: Path, data: bytes) -> None:
    """Replace ``path`` the way FileSink does: a new file renamed over the old one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


# --- local file ----------------------------------------------------------------------------------------------


class FileTransport(Transport):
    def __init__(self, root: Path) -> None:
        self.root = root

    def put(self, data: bytes) -> str:
        path = self.root / _fresh_name()
        path.write_bytes(data)
        return str(path)

    def missing(self) -> str:
        return str(self.root / "missing.bin")

    def replace(self, uri: str, data: bytes) -> None:
        _atomic_write(Path(uri), data)

    def open(self, uri: str) -> Source:
        return open_source(uri)


class TestFileSourceContract(SourceContract):
    on_replace = "pinned"  # an atomic replace leaves the open descriptor on the old inode
    local = True

    @pytest.fixture
    def transport(self, tmp_path: Path) -> Transport:
        return FileTransport(tmp_path)


# --- HTTP ----------------------------------------------------------------------------------------------------


class HTTPTransport(Transport):
    """Objects in the range server's directory, opened through URLs that carry a password and a signed query."""

    secrets = ("contract-password", "contract-signature")

    def __init__(self, server: Any) -> None:
        self.server = server

    def _url(self, name: str) -> str:
        url = self.server.url(name)
        scheme, rest = url.split("://", 1)
        return f"{scheme}://reader:contract-password@{rest}?X-Signature=contract-signature"

    def put(self, data: bytes) -> str:
        name = _fresh_name()
        self.server.write(name, data)
        return self._url(name)

    def missing(self) -> str:
        return self._url("missing.bin")

    def replace(self, uri: str, data: bytes) -> None:
        name = uri.split("?", 1)[0].rsplit("/", 1)[-1]
        _atomic_write(self.server.dir / name, data)  # a new inode: a new ETag

    def open(self, uri: str) -> Source:
        return open_source(uri, **REMOTE_OPTIONS)


class TestHTTPSourceContract(SourceContract):
    on_replace = "changed"

    @pytest.fixture
    def transport(self, http_server: Any) -> Transport:
        return HTTPTransport(http_server)


def _streaming(source: Source) -> Source:
    """``source`` reading every range from one sequential GET (what ranged reads switch to on a server where ranges
    are slow, see sources/tuning.py), whatever it measured."""
    source._force("stream", "the contract tests the stream")  # type: ignore[attr-defined]
    return source


class StreamingContract(SourceContract):
    """The same contract with reads served from one open-ended GET: in order, behind it, ahead of it."""

    def test_replaced_object_is_detected_or_pinned(self, transport: Transport, data: bytes) -> None:
        # the open body keeps serving the version it started on, a new request fails the pin: never a mix
        uri = transport.put(data)
        with transport.open(uri) as src:
            assert src.read(0, 100) == data[:100]
            transport.replace(uri, payload(len(data), seed=1))
            for offset, length in ((100, 1000), (0, 50), (5000, len(data) - 5000)):
                try:
                    assert src.read(offset, length) == data[offset : offset + length]
                except ObjectChangedError:
                    pass


class StreamingHTTPTransport(HTTPTransport):
    def open(self, uri: str) -> Source:
        return _streaming(super().open(uri))


class TestHTTPStreamSourceContract(StreamingContract):
    on_replace = "changed"

    @pytest.fixture
    def transport(self, http_server: Any) -> Transport:
        return StreamingHTTPTransport(http_server)


# --- S3 ------------------------------------------------------------------------------------------------------


class S3Transport(Transport):
    secrets = ("testing-secret-key",)  # the moto_s3 fixture's AWS_SECRET_ACCESS_KEY

    def __init__(self, endpoint: str, client: Any, bucket: str, read_path: str = "presigned") -> None:
        self.endpoint, self.client, self.bucket, self.read_path = endpoint, client, bucket, read_path

    def put(self, data: bytes) -> str:
        key = f"dir/{_fresh_name()}"
        self.client.put_object(Bucket=self.bucket, Key=key, Body=data)
        return f"s3://{self.bucket}/{key}"

    def missing(self) -> str:
        return f"s3://{self.bucket}/dir/missing.bin"

    def replace(self, uri: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=uri.split("/", 3)[3], Body=data)

    def open(self, uri: str) -> Source:
        # one client for the test (a boto3 client per source costs ~1 s of CPU on this machine); a client handed
        # in stays the caller's, so the sources' close() must leave it usable
        source = open_source(uri, client=self.client, **REMOTE_OPTIONS)
        assert source.transport == self.read_path  # type: ignore[attr-defined]
        return source


class TestS3SourceContract(SourceContract):
    """Ranges through presigned URLs on our HTTP pools (the default)."""

    on_replace = "changed"  # an unversioned bucket: the ETag pin fails

    @pytest.fixture
    def transport(self, moto_s3: str, s3_client: Any, s3_bucket: str) -> Transport:
        return S3Transport(moto_s3, s3_client, s3_bucket)


class TestS3Boto3SourceContract(TestS3SourceContract):
    """Every range a boto3 ``get_object`` (``HF_TENSORIZER_S3_PRESIGNED=0``, and where presigned URLs are refused)."""

    @pytest.fixture
    def transport(self, moto_s3: str, s3_client: Any, s3_bucket: str, monkeypatch: pytest.MonkeyPatch) -> Transport:
        monkeypatch.setattr(constants, "S3_PRESIGNED", False)
        return S3Transport(moto_s3, s3_client, s3_bucket, "boto3")


class StreamingS3Transport(S3Transport):
    def open(self, uri: str) -> Source:
        return _streaming(super().open(uri))


class TestS3StreamSourceContract(StreamingContract):
    on_replace = "changed"

    @pytest.fixture
    def transport(self, moto_s3: str, s3_client: Any, s3_bucket: str) -> Transport:
        return StreamingS3Transport(moto_s3, s3_client, s3_bucket)


# --- Hub -----------------------------------------------------------------------------------------------------


class HubTransport(Transport):
    """Files of a private repository, read with the token; objects of 100 kB or more come from the Hub's CDN."""

    repo = "org/contract"

    def __init__(self, hub: Any) -> None:
        self.hub = hub
        self.secrets = (hub.token,)
        hub.lfs_threshold = 100_000  # the contract's main object goes through the CDN redirect, as LFS files do
        hub.create_repo(self.repo, private=True)

    def put(self, data: bytes) -> str:
        name = _fresh_name()
        self.hub.commit(self.repo, {name: data})
        return f"hf://{self.repo}/{name}"

    def missing(self) -> str:
        return f"hf://{self.repo}/missing.bin"

    def replace(self, uri: str, data: bytes) -> None:
        self.hub.commit(self.repo, {uri.rsplit("/", 1)[-1]: data})  # a new commit on main

    def open(self, uri: str) -> Source:
        return open_source(uri, token=self.hub.token, **REMOTE_OPTIONS)


class TestHubSourceContract(SourceContract):
    on_replace = "pinned"  # the source reads the commit its revision resolved to at open

    @pytest.fixture
    def transport(self, hub_server: Any) -> Transport:
        return HubTransport(hub_server)


# --- fsspec: memory:// and gs:// (GCS emulator) -----------------------------------------------------------------

FSSPEC_OPTIONS = {k: v for k, v in REMOTE_OPTIONS.items() if k != "timeout"}  # fsspec protocols time out on their own


class FsspecTransport(Transport):
    """Objects put with the protocol's own filesystem, opened through ``open_source(uri, storage_options=...)``."""

    def __init__(self, root: str, storage_options: dict[str, Any] | None = None) -> None:
        import fsspec

        self.root, self.options = root, storage_options or {}
        self.fs = fsspec.filesystem(root.split("://", 1)[0], **self.options)

    def put(self, data: bytes) -> str:
        uri = f"{self.root}/{_fresh_name()}"
        self.fs.pipe_file(uri, data)
        return uri

    def missing(self) -> str:
        return f"{self.root}/missing.bin"

    def replace(self, uri: str, data: bytes) -> None:
        self.fs.pipe_file(uri, data)

    def open(self, uri: str) -> Source:
        return open_source(uri, storage_options=self.options, **FSSPEC_OPTIONS)


class TestMemoryFsspecSourceContract(SourceContract):
    on_replace = "changed"  # a new MemoryFile, a new creation time

    @pytest.fixture
    def transport(self) -> Iterator[Transport]:
        root = f"memory://contract-{next(_names)}"
        transport = FsspecTransport(root)
        yield transport
        if transport.fs.exists(root):
            transport.fs.rm(root, recursive=True)


class TestAzureSourceContract(SourceContract):
    on_replace = "changed"  # Azurite keeps no versions: the ETag pin fails

    @pytest.fixture
    def transport(self, azure_container: tuple[str, dict[str, Any]]) -> Transport:
        container, options = azure_container
        return FsspecTransport(f"az://{container}/dir", options)


class TestGCSSourceContract(SourceContract):
    on_replace = "changed"  # a new generation

    @pytest.fixture
    def transport(self, gcs_bucket: tuple[str, dict[str, Any]]) -> Transport:
        bucket, options = gcs_bucket
        return FsspecTransport(f"gs://{bucket}/dir", options)


# --- open file objects -----------------------------------------------------------------------------------------


class Stream(io.RawIOBase):
    """A non-seekable stream over bytes (like a pipe or an HTTP response), handing out at most 1000 bytes a read."""

    def __init__(self, data: bytes) -> None:
        self._data = memoryview(data)

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        if self.closed:
            raise ValueError("I/O operation on closed file")
        n = min(len(b), len(self._data), 1000)
        b[:n] = self._data[:n]
        self._data = self._data[n:]
        return n


class FileObjectTransport(Transport):
    """Each put makes a file object (``kind``: bytesio, file or stream); URIs are keys into that table."""

    def __init__(self, kind: str, root: Path) -> None:
        self.kind, self.root = kind, root
        self.objects: dict[str, Any] = {}
        self.replaced: list[Any] = []

    def _make(self, name: str, data: bytes) -> Any:
        if self.kind == "bytesio":
            return io.BytesIO(data)
        if self.kind == "stream":
            return Stream(data)
        path = self.root / name
        path.write_bytes(data)
        return open(path, "rb")

    def put(self, data: bytes) -> str:
        name = _fresh_name()
        self.objects[name] = self._make(name, data)
        return name

    def missing(self) -> str:
        name = _fresh_name()
        self.objects[name] = f = self._make(name, b"gone")
        f.close()  # a file object that can no longer be read
        return name

    def replace(self, uri: str, data: bytes) -> None:
        _atomic_write(self.root / uri, data)  # the open file stays on the old inode; later opens get the new one
        self.replaced.append(self.objects[uri])
        self.objects[uri] = open(self.root / uri, "rb")  # noqa: SIM115 - closed by close_all

    def open(self, uri: str) -> Source:
        return open_source(self.objects[uri])

    def close_all(self) -> None:
        for f in [*self.objects.values(), *self.replaced]:
            f.close()


class FileObjectContract(SourceContract):
    kind = ""

    @pytest.fixture
    def transport(self, tmp_path: Path) -> Iterator[Transport]:
        transport = FileObjectTransport(self.kind, tmp_path)
        yield transport
        transport.close_all()


class TestBytesIOSourceContract(FileObjectContract):
    kind = "bytesio"  # seek + readinto under a lock


class TestOpenFileSourceContract(FileObjectContract):
    kind = "file"  # pread on its descriptor
    local = True
    on_replace = "pinned"


class TestStreamSourceContract(FileObjectContract):
    kind = "stream"  # spooled to a temporary file, then pread
    local = True
