"""Connection sharing: every HTTPSource of a process to one origin shares one keep-alive pool; S3 sources and sinks
opened through one ``shared_transport`` block share one boto3 client (and its pool)."""

from __future__ import annotations

import itertools
import random
import threading

import pytest

from hf_tensorizer.sources import open_sink, open_source, shared_transport
from hf_tensorizer.sources.http import HTTPSource
from hf_tensorizer.sources.http_pool import POOLS, origin_of

pytestmark = pytest.mark.timeout(60)

KiB = 1 << 10
FAST = {"backoff": 0.01, "max_backoff": 0.05, "timeout": 5, "retries": 4}


def _data(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


def _connections(http_server) -> set[int]:
    """Client ports of the test's requests: one per TCP connection the server accepted."""
    return {e["port"] for e in http_server.log() if e["path"].startswith(http_server.url_path(""))}


def _private(timeout: float = 9.0) -> dict[str, float]:
    """Options that give a test pools of its own: the pool key holds the timeout, and other tests of the session
    may keep sources to the same server open (a shared pool would then outlive this test's sources)."""
    return {**FAST, "timeout": timeout + (next(_UNIQUE) * 1e-3)}


_UNIQUE = itertools.count(1)


def test_sources_to_one_host_share_a_pool(http_server):
    opts = _private()
    files = {f"shard-{i}.bin": _data(512 * KiB + i, seed=i) for i in range(6)}
    urls = {name: http_server.write(name, data) for name, data in files.items()}
    concurrency = 4
    sources = [HTTPSource(url, concurrency=concurrency, part_size=32 * KiB, **opts) for url in urls.values()]
    try:
        assert len({id(s._pool_for(s._home)) for s in sources}) == 1
        for src, data in zip(sources, files.values()):  # one after the other, as a load reads its shards
            buf = bytearray(src.size)
            src.read_into(0, memoryview(buf))
            assert bytes(buf) == data
        # Without sharing each object opens its own connections: len(files) x concurrency at least.
        assert len(_connections(http_server)) <= concurrency + 1
        errors: list[BaseException] = []  # all at once: as many connections as parts in flight, still correct

        def read_all(src: HTTPSource, data: bytes) -> None:
            try:
                buf = bytearray(src.size)
                src.read_into(0, memoryview(buf))
                assert bytes(buf) == data
            except BaseException as exc:  # surfaced below
                errors.append(exc)

        threads = [threading.Thread(target=read_all, args=(s, d)) for s, d in zip(sources, files.values())]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
    finally:
        for src in sources:
            src.close()
    assert POOLS.pool(sources[0]._home, opts["timeout"]) is None  # the last user closed it


def test_pool_outlives_a_closed_user_and_differs_by_timeout(http_server):
    url = http_server.write("m.bin", _data(64 * KiB))
    opts = _private()
    a = HTTPSource(url, **opts)
    b = HTTPSource(url, **opts)
    other = HTTPSource(url, **_private(7))
    try:
        assert a._pool_for(a._home) is b._pool_for(b._home)
        assert other._pool_for(other._home) is not a._pool_for(a._home)  # connections made with another timeout
        a.close()
        buf = bytearray(b.size)
        b.read_into(0, memoryview(buf))  # still served by the shared pool
        assert b._pool_for(b._home) is POOLS.pool(b._home, opts["timeout"])
    finally:
        for s in (a, b, other):
            s.close()
    assert POOLS.pool(a._home, opts["timeout"]) is None


def test_failed_open_releases_the_pool(http_server):
    from hf_tensorizer.errors import SourceError

    opts = _private()
    with pytest.raises(SourceError, match="not found"):
        HTTPSource(http_server.url("missing.bin"), **opts)
    assert POOLS.pool(origin_of(http_server.url("missing.bin")), opts["timeout"]) is None
    src = HTTPSource(http_server.write("m.bin", b"x"), **opts)
    src.close()
    assert POOLS.pool(src._home, opts["timeout"]) is None


def test_s3_shards_and_sinks_share_the_roots_client(moto_s3, s3_client, s3_bucket):
    for i in range(3):
        s3_client.put_object(Bucket=s3_bucket, Key=f"m/shard-{i}", Body=_data(1000, seed=i))
    root = f"s3://{s3_bucket}/m"
    opts = {"endpoint_url": moto_s3, "addressing_style": "path"}
    with shared_transport(root, opts) as shared:
        client = shared["client"]
        sources = [open_source(f"{root}/shard-{i}", **shared) for i in range(3)]
        try:
            assert all(s._client is client for s in sources)
            for i, src in enumerate(sources):
                buf = bytearray(src.size)
                src.read_into(0, memoryview(buf))
                assert bytes(buf) == _data(1000, seed=i)
        finally:
            for src in sources:
                src.close()  # does not close the shared client
        sink = open_sink(f"{root}/out", **shared)
        assert sink._client is client
        sink.write(b"written with the root's client")
        sink.commit()  # leaves the shared client open for the rest of the block
        assert client.get_object(Bucket=s3_bucket, Key="m/out")["Body"].read() == b"written with the root's client"


def test_s3_sink_closes_only_its_own_client(moto_s3, s3_bucket, monkeypatch):
    from hf_tensorizer.sources.s3 import make_s3_client
    from hf_tensorizer.sources.s3_sink import S3Sink

    closed: list[str] = []
    mine = make_s3_client(endpoint_url=moto_s3, addressing_style="path")
    monkeypatch.setattr(mine, "close", lambda: closed.append("passed"))
    sink = S3Sink(f"s3://{s3_bucket}/a", client=mine)
    sink.write(b"a")
    sink.commit()
    assert closed == []
    own = S3Sink(f"s3://{s3_bucket}/b", endpoint_url=moto_s3, addressing_style="path")
    monkeypatch.setattr(own._client, "close", lambda: closed.append("own"))
    own.write(b"b")
    own.abort()
    assert closed == ["own"]
