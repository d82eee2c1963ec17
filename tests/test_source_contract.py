"""The shared Source contract (tests/source_contract.py) run against every transport: a local file, HTTP (the range
server subprocess), S3 (moto over real HTTP) and the Hub (the local Hub server, large objects through its CDN)."""

from __future__ import annotations

import itertools
import os
from pathlib import Path
from typing import Any

import pytest
from source_contract import REMOTE_OPTIONS, SourceContract, Transport

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


# --- S3 ------------------------------------------------------------------------------------------------------


class S3Transport(Transport):
    secrets = ("testing-secret-key",)  # the moto_s3 fixture's AWS_SECRET_ACCESS_KEY

    def __init__(self, endpoint: str, client: Any, bucket: str) -> None:
        self.endpoint, self.client, self.bucket = endpoint, client, bucket

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
        return open_source(uri, client=self.client, **REMOTE_OPTIONS)


class TestS3SourceContract(SourceContract):
    on_replace = "changed"  # an unversioned bucket: the ETag pin fails

    @pytest.fixture
    def transport(self, moto_s3: str, s3_client: Any, s3_bucket: str) -> Transport:
        return S3Transport(moto_s3, s3_client, s3_bucket)


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
