"""HTTPSource against a real range server (subprocess on 127.0.0.1) with injected faults.

Every case ends in bytes identical to the file or a clear typed error: never silently wrong data, never a hang.
"""

from __future__ import annotations

import os
import random
import threading
import time
from pathlib import Path

import pytest
from helpers import make_ca_and_cert
from hypothesis import given, settings
from hypothesis import strategies as st

from hf_tensorizer.errors import InvalidURIError, ObjectChangedError, SourceError, TruncatedFileError
from hf_tensorizer.sources import open_source
from hf_tensorizer.sources.http import HTTPSource
from hf_tensorizer.sources.ranged import RetryPolicy, parse_retry_after

pytestmark = pytest.mark.timeout(60)

MiB = 1 << 20
FAST = {"backoff": 0.01, "max_backoff": 0.05, "timeout": 5, "retries": 4}


def _data(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


def _ranges(log: list[dict], method: str = "GET") -> list[str]:
    return [e["range"] for e in log if e["method"] == method and e["range"]]


def test_size_full_read_and_small_reads(http_server):
    data = _data(3 * MiB + 17)
    src = HTTPSource(http_server.write("m.bin", data), **FAST)
    assert src.size == len(data)
    assert src.etag and src.etag.startswith('"')
    buf = bytearray(len(data))
    src.read_into(0, memoryview(buf))
    assert buf == data
    assert src.read(12345, 100) == data[12345:12445]
    assert src.read(len(data) - 1, 1) == data[-1:]
    assert src.read(5, 0) == b""
    src.close()


def test_read_into_many_scatters_one_ranged_get(http_server):
    data = _data(2 * MiB)
    src = HTTPSource(http_server.write("m.bin", data), **FAST)
    sizes = [1000, 0, MiB, 3, 200_000]
    bufs = [bytearray(n) for n in sizes]
    src.read_into_many(777, [memoryview(b) for b in bufs])
    assert b"".join(bufs) == data[777 : 777 + sum(sizes)]
    assert _ranges(http_server.log()) == [f"bytes=777-{777 + sum(sizes) - 1}"]


def test_large_read_is_split_into_concurrent_parts(http_server):
    data = _data(8 * MiB)
    src = HTTPSource(http_server.write("m.bin", data), part_size=MiB, concurrency=4, **FAST)
    buf = bytearray(len(data))
    src.read_into(0, memoryview(buf))
    assert buf == data
    assert len(_ranges(http_server.log())) == 8
    # scatter + split together
    bufs = [bytearray(3 * MiB + 5), bytearray(MiB), bytearray(2 * MiB)]
    src.read_into_many(11, [memoryview(b) for b in bufs])
    assert b"".join(bufs) == data[11 : 11 + 6 * MiB + 5]


def test_many_threads_share_keepalive_connections(http_server):
    data = _data(4 * MiB, seed=1)
    src = HTTPSource(http_server.write("m.bin", data), concurrency=4, **FAST)
    rng = random.Random(2)
    jobs = [(rng.randrange(0, len(data) - 65536), rng.randrange(1, 65536)) for _ in range(200)]
    errors: list[BaseException] = []

    def worker(chunk: list[tuple[int, int]]) -> None:
        try:
            for off, n in chunk:
                buf = bytearray(n)
                src.read_into(off, memoryview(buf))
                assert buf == data[off : off + n]
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(jobs[i::8],)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    log = http_server.log()
    assert len(log) == 201  # HEAD + one GET per read: no retries
    assert len({e["port"] for e in log}) <= 16  # connections were reused, not one per request


def test_probe_falls_back_to_range_get_when_head_is_refused(http_server):
    data = _data(100_000)
    url = http_server.write("m.bin", data)
    http_server.fault("status", "m.bin", status=405, methods=["HEAD"])
    src = HTTPSource(url, **FAST)
    assert src.size == len(data)
    assert src.read(99_990, 10) == data[-10:]
    assert _ranges(http_server.log())[0] == "bytes=0-0"


def test_dropped_connection_resumes_at_the_exact_byte(http_server):
    data = _data(4 * MiB, seed=3)
    src = HTTPSource(http_server.write("m.bin", data), **FAST)
    http_server.fault("drop", "m.bin", after=300_000, count=2)
    buf = bytearray(3 * MiB)
    src.read_into(1000, memoryview(buf))
    assert buf == data[1000 : 1000 + 3 * MiB]
    end = 1000 + 3 * MiB - 1
    assert _ranges(http_server.log()) == [
        f"bytes=1000-{end}",
        f"bytes={1000 + 300_000}-{end}",
        f"bytes={1000 + 600_000}-{end}",
    ]


def test_drops_under_concurrency_never_corrupt(http_server):
    data = _data(6 * MiB, seed=4)
    src = HTTPSource(http_server.write("m.bin", data), part_size=MiB, concurrency=6, **FAST)
    http_server.fault("drop", "m.bin", after=100_000, count=10)
    buf = bytearray(len(data))
    src.read_into(0, memoryview(buf))
    assert buf == data


@pytest.mark.parametrize("status", [500, 502, 503, 504])
def test_5xx_is_retried(http_server, status):
    data = _data(500_000)
    src = HTTPSource(http_server.write("m.bin", data), **FAST)
    http_server.fault("status", "m.bin", status=status, count=3)
    assert src.read(10, 400_000) == data[10:400_010]


def test_429_honours_retry_after(http_server):
    data = _data(100_000)
    src = HTTPSource(http_server.write("m.bin", data), **FAST)
    http_server.fault("status", "m.bin", status=429, retry_after=1)
    start = time.monotonic()
    assert src.read(0, 1000) == data[:1000]
    assert time.monotonic() - start >= 0.9


def test_persistent_5xx_fails_clearly_and_quickly(http_server):
    src = HTTPSource(http_server.write("m.bin", _data(1000)), **FAST)
    http_server.fault("status", "m.bin", status=503, count=-1)
    start = time.monotonic()
    with pytest.raises(SourceError, match=r"failed after 5 attempts.*HTTP 503"):
        src.read(0, 10)
    assert time.monotonic() - start < 5


def test_stall_mid_body_times_out_and_resumes(http_server):
    data = _data(2 * MiB, seed=5)
    src = HTTPSource(http_server.write("m.bin", data), **{**FAST, "timeout": 0.5})
    http_server.fault("stall", "m.bin", after=200_000, seconds=4)
    start = time.monotonic()
    assert src.read(0, len(data)) == data
    assert time.monotonic() - start < 3.5
    assert _ranges(http_server.log())[1] == f"bytes=200000-{len(data) - 1}"


def test_stall_before_headers_times_out_and_retries(http_server):
    data = _data(100_000)
    src = HTTPSource(http_server.write("m.bin", data), **{**FAST, "timeout": 0.5})
    http_server.fault("stall", "m.bin", after=-1, seconds=4)
    start = time.monotonic()
    assert src.read(5, 50_000) == data[5:50_005]
    assert time.monotonic() - start < 3.5


def test_object_changed_between_ranges_if_match(http_server):
    data = _data(MiB, seed=6)
    url = http_server.write("m.bin", data)
    http_server.write("v2.bin", _data(MiB, seed=7))
    src = HTTPSource(url, **FAST)
    assert src.read(0, 1000) == data[:1000]
    http_server.fault("change", "m.bin", source="v2.bin")
    with pytest.raises(ObjectChangedError, match="changed while it was being read"):
        src.read(1000, 1000)
    assert any(e["status"] == 412 for e in http_server.log())


def test_object_changed_mid_split_read_is_not_mixed(http_server):
    data = _data(8 * MiB, seed=8)
    url = http_server.write("m.bin", data)
    http_server.write("v2.bin", _data(8 * MiB, seed=9))
    src = HTTPSource(url, part_size=MiB, concurrency=4, **FAST)
    http_server.fault("change", "m.bin", source="v2.bin", skip=3)  # after three parts were served
    buf = bytearray(len(data))
    with pytest.raises(ObjectChangedError):
        src.read_into(0, memoryview(buf))


def test_object_changed_detected_when_server_ignores_if_match(http_server):
    data = _data(MiB, seed=10)
    url = http_server.write("m.bin", data)
    http_server.write("v2.bin", _data(MiB, seed=11))
    http_server.config(honor_if_match=False)
    src = HTTPSource(url, **FAST)
    http_server.fault("change", "m.bin", source="v2.bin")
    with pytest.raises(ObjectChangedError, match="ETag"):
        src.read(0, 10)


def test_object_changed_detected_by_last_modified_without_etag(http_server):
    data = _data(MiB, seed=12)
    url = http_server.write("m.bin", data)
    v2 = http_server.dir / "v2.bin"
    v2.write_bytes(_data(MiB, seed=13))
    later = Path(http_server.dir / "m.bin").stat().st_mtime + 100
    os.utime(v2, (later, later))
    http_server.config(etag=False)
    src = HTTPSource(url, **FAST)
    assert src.etag is None and src.last_modified
    http_server.fault("change", "m.bin", source="v2.bin")
    with pytest.raises(ObjectChangedError):  # 412 to If-Unmodified-Since
        src.read(0, 10)
    http_server.config(honor_if_match=False)  # and a server without conditional requests: Last-Modified compared
    with pytest.raises(ObjectChangedError, match="Last-Modified"):
        src.read(0, 10)


def test_object_size_change_detected_without_any_validator(http_server):
    url = http_server.write("m.bin", _data(MiB, seed=14))
    http_server.write("v2.bin", _data(MiB + 1, seed=15))
    http_server.config(etag=False, last_modified=False)
    src = HTTPSource(url, **FAST)
    http_server.fault("change", "m.bin", source="v2.bin")
    with pytest.raises(ObjectChangedError, match="size"):
        src.read(0, 10)


def test_range_ignored_200_is_never_misread(http_server):
    data = _data(MiB, seed=16)
    src = HTTPSource(http_server.write("m.bin", data), **FAST)
    http_server.fault("ignore_range", "m.bin")
    with pytest.raises(SourceError, match="ignored the Range header"):
        src.read(1000, 10)
    # a 200 is acceptable exactly when the whole object was asked for
    http_server.fault("ignore_range", "m.bin")
    assert src.read(0, len(data)) == data


def test_redirects_are_followed_and_remembered(http_server):
    data = _data(2 * MiB, seed=17)
    url = http_server.write("m.bin", data)
    http_server.config(redirect={"prefix": "/moved"})
    src = HTTPSource(url, **FAST)
    assert src.read(0, len(data)) == data
    assert src.read(5, 5) == data[5:10]
    log = http_server.log()
    assert [e["status"] for e in log] == [302, 200, 206, 206]  # HEAD redirect, HEAD, then straight to the target
    assert all(e["path"].startswith("/moved/") for e in log[1:])


def test_cross_origin_redirect_does_not_forward_the_token(http_server):
    data = _data(500_000, seed=18)
    url = http_server.write("m.bin", data)
    other_origin = f"http://localhost:{http_server.server.port}"
    http_server.config(token="s3cret", redirect={"prefix": "/cdn", "base": other_origin})
    src = HTTPSource(url, token="s3cret", **FAST)
    assert src.read(0, len(data)) == data
    log = http_server.log()
    assert [e["auth"] for e in log if not e["path"].startswith("/cdn/")] == [True]
    assert not any(e["auth"] for e in log if e["path"].startswith("/cdn/"))


def test_expired_signed_redirect_target_is_resolved_again(http_server):
    data = _data(MiB, seed=19)
    url = http_server.write("m.bin", data)
    http_server.config(redirect={"prefix": "/signed", "signed": True})
    src = HTTPSource(url, **FAST)
    assert src.read(0, 1000) == data[:1000]
    http_server.expire()
    assert src.read(1000, 1000) == data[1000:2000]
    statuses = [e["status"] for e in http_server.log()]
    assert statuses[-3:] == [403, 302, 206]


def test_bearer_token_and_custom_headers(http_server):
    data = _data(1000)
    url = http_server.write("m.bin", data)
    http_server.config(token="s3cret")
    with pytest.raises(SourceError, match="access denied"):
        HTTPSource(url, **FAST)
    assert HTTPSource(url, token="s3cret", **FAST).read(0, 10) == data[:10]
    assert HTTPSource(url, headers={"Authorization": "Bearer s3cret"}, **FAST).read(0, 10) == data[:10]


def test_errors_never_contain_credentials_or_query(http_server):
    url = http_server.url("missing.bin").replace("http://", "http://user:hunter2@") + "?X-Amz-Signature=topsecret"
    with pytest.raises(SourceError) as err:
        HTTPSource(url, token="tok-abcdef", **FAST)
    text = str(err.value) + repr(err.value)
    assert "not found" in text
    for secret in ("hunter2", "topsecret", "tok-abcdef", "user:"):
        assert secret not in text


def test_user_info_becomes_basic_auth(http_server):
    data = _data(1000)
    url = http_server.write("m.bin", data).replace("http://", "http://user:pw@")
    src = HTTPSource(url, **FAST)
    assert src.uri == http_server.url("m.bin")
    assert src.read(0, 10) == data[:10]
    assert all(e["auth"] for e in http_server.log())


def test_read_past_the_end_is_a_truncation_error(http_server):
    src = HTTPSource(http_server.write("m.bin", _data(1000)), **FAST)
    with pytest.raises(TruncatedFileError):
        src.read(990, 20)


def test_unreachable_server_fails_clearly(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.monotonic()
    with pytest.raises(SourceError, match=r"Connection refused|ConnectionRefused"):
        HTTPSource(f"http://127.0.0.1:{port}/x.bin", **FAST)
    assert time.monotonic() - start < 5


def test_malformed_urls():
    with pytest.raises(InvalidURIError):
        HTTPSource("http:///no-host")
    with pytest.raises(InvalidURIError):
        HTTPSource("http://127.0.0.1:notaport/x")
    with pytest.raises(InvalidURIError):
        open_source("nope://example.invalid/x")  # ftp:// is fsspec's now


def test_open_source_dispatches_http(http_server):
    data = _data(1000)
    with open_source(http_server.write("m.bin", data), **FAST) as src:
        assert isinstance(src, HTTPSource)
        assert src.read(1, 3) == data[1:4]


def test_retry_policy_and_retry_after_parsing():
    policy = RetryPolicy(retries=3, backoff=0.1, max_backoff=0.5, max_retry_after=2)
    assert 0.05 <= policy.delay(1) <= 0.1
    assert policy.delay(10) <= 0.5
    assert policy.delay(1, retry_after=7) == 2
    assert parse_retry_after("3") == 3
    assert parse_retry_after(None) is None
    assert parse_retry_after("garbage") is None
    assert 0 <= parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0


# --- TLS -----------------------------------------------------------------------------------------------------


def test_https_with_custom_ca_bundle(tmp_path):
    pytest.importorskip("cryptography")
    from servers.http_range import RangeServer

    ca, cert, key = make_ca_and_cert(tmp_path)
    root = tmp_path / "root"
    root.mkdir()
    data = _data(MiB, seed=20)
    (root / "m.bin").write_bytes(data)
    server = RangeServer(root, tls=(cert, key))
    try:
        url = server.url("m.bin")
        assert url.startswith("https://")
        assert HTTPSource(url, ca_bundle=ca, **FAST).read(0, len(data)) == data
        with pytest.raises(SourceError, match="certificate verification failed"):
            HTTPSource(url, **FAST)
        assert HTTPSource(url, verify=False, **FAST).read(10, 10) == data[10:20]
        with pytest.raises(SourceError, match="CA bundle"):
            HTTPSource(url, ca_bundle=str(tmp_path / "missing.pem"), **FAST)
    finally:
        server.stop()


# --- internals: scatter bookkeeping ----------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(sizes=st.lists(st.integers(0, 50), min_size=1, max_size=6), data=st.data())
def test_views_of_and_cursor_cover_exactly_the_range(sizes, data):
    from hf_tensorizer.sources.wire import Cursor, views_of

    total = sum(sizes)
    start = data.draw(st.integers(0, total))
    length = data.draw(st.integers(0, total - start))
    bufs = [bytearray(n) for n in sizes]
    views = views_of([memoryview(b) for b in bufs], start, length)
    assert sum(len(v) for v in views) == length
    # write a pattern through a cursor in random steps, as a transport would
    cursor = Cursor(views)
    pattern = bytes(range(256)) * 2
    while cursor.done < length:
        view = cursor.next_view(data.draw(st.integers(1, 64)))
        view[:] = pattern[cursor.done : cursor.done + len(view)]
        cursor.advance(len(view))
    assert b"".join(bufs)[start : start + length] == pattern[:length]
    assert b"".join(bufs)[:start] == bytes(start)
