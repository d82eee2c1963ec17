"""S3Source and S3Sink against moto's standalone server on 127.0.0.1, reached by real boto3 over HTTP.

Faults moto cannot inject (a body cut mid-stream, a stalled body) come from a TCP proxy in front of it.
"""

from __future__ import annotations

import http.client
import random
import threading
import time
from typing import Any

import pytest

from hf_tensorizer import constants
from hf_tensorizer.errors import InvalidURIError, ObjectChangedError, SinkError, SourceError, UsageError
from hf_tensorizer.sources import open_sink, open_source
from hf_tensorizer.sources.s3 import S3Source, _body_reader, translate_error
from hf_tensorizer.sources.s3_sink import S3Sink

pytestmark = pytest.mark.timeout(60)

MiB = 1 << 20
FAST = {"backoff": 0.01, "max_backoff": 0.05, "retries": 3, "timeout": 5}


def _data(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


def _source(moto_s3: str, uri: str, **kw) -> S3Source:
    return S3Source(uri, endpoint_url=moto_s3, addressing_style="path", **{**FAST, **kw})


@pytest.fixture(params=["presigned", "boto3"])
def read_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both ways ranges are read: presigned URLs on our HTTP pools (the default) and boto3 ``get_object``."""
    monkeypatch.setattr(constants, "S3_PRESIGNED", request.param == "presigned")
    return request.param


def _no_leftovers(s3_client, bucket: str, key: str) -> None:
    assert s3_client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    with pytest.raises(s3_client.exceptions.ClientError) as err:
        s3_client.head_object(Bucket=bucket, Key=key)
    assert err.value.response["Error"]["Code"] in ("404", "NoSuchKey")


# --- reading -------------------------------------------------------------------------------------------------


def test_read_whole_ranges_and_scatter(moto_s3, s3_client, s3_bucket, read_path):
    data = _data(6 * MiB + 3)
    s3_client.put_object(Bucket=s3_bucket, Key="dir/model.tensors", Body=data)
    src = _source(moto_s3, f"s3://{s3_bucket}/dir/model.tensors", part_size=MiB, concurrency=4)
    assert src.transport == read_path
    assert src.size == len(data)
    assert src.etag
    buf = bytearray(len(data))
    src.read_into(0, memoryview(buf))  # split into 6+ concurrent ranged GETs
    assert buf == data
    assert src.read(4321, 100) == data[4321:4421]
    bufs = [bytearray(10), bytearray(0), bytearray(MiB), bytearray(7)]
    src.read_into_many(99, [memoryview(b) for b in bufs])
    assert b"".join(bufs) == data[99 : 99 + 10 + MiB + 7]
    src.close()


def test_concurrent_reads_from_many_threads(moto_s3, s3_client, s3_bucket, read_path):
    data = _data(2 * MiB, seed=1)
    s3_client.put_object(Bucket=s3_bucket, Key="m", Body=data)
    src = _source(moto_s3, f"s3://{s3_bucket}/m", concurrency=8)
    assert src.transport == read_path
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(15):
                off, n = rng.randrange(len(data) - 100_000), rng.randrange(1, 100_000)
                assert src.read(off, n) == data[off : off + n]
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def test_body_is_read_without_intermediate_copies(moto_s3, s3_client, s3_bucket):
    """The fast path reads from the http.client response under botocore/urllib3 into our buffer."""
    s3_client.put_object(Bucket=s3_bucket, Key="m", Body=b"x" * 1000)
    src = _source(moto_s3, f"s3://{s3_bucket}/m")
    body = src._client.get_object(Bucket=s3_bucket, Key="m", Range="bytes=0-99")["Body"]
    readinto, finish = _body_reader(body)
    assert isinstance(body._raw_stream._fp, http.client.HTTPResponse)
    buf = bytearray(100)
    got = 0
    while got < 100:
        got += readinto(memoryview(buf)[got:], got == 0)
    finish(True)
    assert buf == b"x" * 100


def test_endpoint_from_environment(moto_s3, s3_client, s3_bucket, monkeypatch):
    s3_client.put_object(Bucket=s3_bucket, Key="m", Body=b"hello")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", moto_s3)
    src = S3Source(f"s3://{s3_bucket}/m", addressing_style="path", **FAST)
    assert src.read(0, 5) == b"hello"
    with open_source(f"s3://{s3_bucket}/m", addressing_style="path") as src2:
        assert isinstance(src2, S3Source) and src2.size == 5


def test_missing_credentials_is_clear(moto_s3, s3_client, s3_bucket, monkeypatch):
    s3_client.put_object(Bucket=s3_bucket, Key="m", Body=b"public bytes", ACL="public-read")
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(SourceError, match=r"no AWS credentials found.*anonymous=True") as err:
        _source(moto_s3, f"s3://{s3_bucket}/m")
    assert "testing-secret-key" not in str(err.value)
    # anonymous (unsigned) access needs none
    assert _source(moto_s3, f"s3://{s3_bucket}/m", anonymous=True).read(0, 6) == b"public"
    with pytest.raises(SinkError, match="no AWS credentials found"):
        sink = S3Sink(f"s3://{s3_bucket}/out", endpoint_url=moto_s3, addressing_style="path", part_size=5 * MiB)
        sink.write(b"abc")
        sink.commit()


def test_missing_key_and_bucket_are_clear(moto_s3, s3_bucket):
    with pytest.raises(SourceError, match=rf"s3://{s3_bucket}/nope: no such object"):
        _source(moto_s3, f"s3://{s3_bucket}/nope")
    with pytest.raises(SourceError, match="bucket 'no-such-bucket-xyz' does not exist"):
        _source(moto_s3, "s3://no-such-bucket-xyz/key")


def test_access_denied_and_rejected_credentials_messages():
    from botocore.exceptions import ClientError

    def err(code: str, status: int) -> ClientError:
        return ClientError({"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status}},
                           "GetObject")  # fmt: skip

    assert "access denied" in str(translate_error(err("AccessDenied", 403), "s3://b/k", SourceError))
    assert "credentials were rejected" in str(translate_error(err("InvalidAccessKeyId", 403), "s3://b/k", SourceError))
    assert isinstance(translate_error(err("PreconditionFailed", 412), "s3://b/k", SourceError), ObjectChangedError)
    assert isinstance(translate_error(err("AccessDenied", 403), "s3://b/k", SinkError), SinkError)


def test_object_overwritten_mid_load_raises(moto_s3, s3_client, s3_bucket, read_path):
    s3_client.put_object(Bucket=s3_bucket, Key="m", Body=_data(MiB, seed=2))
    src = _source(moto_s3, f"s3://{s3_bucket}/m")
    assert src.transport == read_path
    src.read(0, 100)
    s3_client.put_object(Bucket=s3_bucket, Key="m", Body=_data(MiB, seed=3))
    with pytest.raises(ObjectChangedError, match="changed while it was being read"):
        src.read(100, 100)


def test_object_deleted_mid_load_raises(moto_s3, s3_client, s3_bucket, read_path):
    s3_client.put_object(Bucket=s3_bucket, Key="m", Body=_data(1000))
    src = _source(moto_s3, f"s3://{s3_bucket}/m")
    assert src.transport == read_path
    s3_client.delete_object(Bucket=s3_bucket, Key="m")
    with pytest.raises(ObjectChangedError):
        src.read(0, 10)


def test_versioned_bucket_keeps_reading_the_pinned_version(moto_s3, s3_client, s3_bucket, read_path):
    s3_client.put_bucket_versioning(Bucket=s3_bucket, VersioningConfiguration={"Status": "Enabled"})
    old, new = _data(MiB, seed=4), _data(MiB, seed=5)
    s3_client.put_object(Bucket=s3_bucket, Key="m", Body=old)
    src = _source(moto_s3, f"s3://{s3_bucket}/m")
    assert src.transport == read_path
    assert src.version_id
    s3_client.put_object(Bucket=s3_bucket, Key="m", Body=new)
    assert src.read(0, len(old)) == old  # the version opened, never a mix
    assert _source(moto_s3, f"s3://{s3_bucket}/m").read(0, 10) == new[:10]
    first = src.version_id
    assert _source(moto_s3, f"s3://{s3_bucket}/m", version_id=first).read(5, 5) == old[5:10]


def test_body_dropped_mid_stream_resumes(moto_s3, s3_client, s3_bucket, read_path):
    from servers.fault_proxy import FaultProxy

    data = _data(4 * MiB, seed=6)
    s3_client.put_object(Bucket=s3_bucket, Key="m", Body=data)
    host, port = moto_s3.removeprefix("http://").split(":")
    proxy = FaultProxy(host, int(port))
    try:
        src = _source(proxy.url, f"s3://{s3_bucket}/m")
        assert src.transport == read_path
        proxy.arm("drop", after=1_500_000, count=2)
        assert src.read(0, len(data)) == data
        assert proxy.cut == 2
        assert src.transport == read_path  # a broken body is retried, not a reason to leave presigned URLs
    finally:
        proxy.close()


def test_body_stalled_mid_stream_times_out_and_resumes(moto_s3, s3_client, s3_bucket, read_path):
    from servers.fault_proxy import FaultProxy

    data = _data(2 * MiB, seed=7)
    s3_client.put_object(Bucket=s3_bucket, Key="m", Body=data)
    host, port = moto_s3.removeprefix("http://").split(":")
    proxy = FaultProxy(host, int(port))
    try:
        src = _source(proxy.url, f"s3://{s3_bucket}/m", timeout=1)
        assert src.transport == read_path
        proxy.arm("stall", after=500_000, seconds=5)
        start = time.monotonic()
        assert src.read(0, len(data)) == data
        assert time.monotonic() - start < 4.5
        assert proxy.stalled == 1
    finally:
        proxy.close()


def test_persistent_drops_fail_clearly(moto_s3, s3_client, s3_bucket, read_path):
    from servers.fault_proxy import FaultProxy

    s3_client.put_object(Bucket=s3_bucket, Key="m", Body=_data(MiB))
    host, port = moto_s3.removeprefix("http://").split(":")
    proxy = FaultProxy(host, int(port))
    try:
        src = _source(proxy.url, f"s3://{s3_bucket}/m")
        assert src.transport == read_path
        proxy.arm("drop", after=0, count=1000)
        with pytest.raises(SourceError, match="failed after") as err:
            src.read(0, MiB)
        text = f"{err.value} {err.value.__cause__}"
        assert "Signature" not in text and "X-Amz-" not in text  # a presigned URL's query never reaches a message
    finally:
        proxy.close()


def _count_calls(client: Any, event: str) -> list[int]:
    """A counter of botocore ``event`` on ``client`` (a real hook, as user code would register)."""
    calls = [0]

    def hook(**_: Any) -> None:
        calls[0] += 1

    client.meta.events.register(event, hook)
    return calls


def test_presigned_reads_send_no_get_object(moto_s3, s3_client, s3_bucket, monkeypatch):
    """The default: boto3 HEADs and signs; the ranges are plain GETs on the shared HTTP pool."""

    data = _data(3 * MiB, seed=11)
    s3_client.put_object(Bucket=s3_bucket, Key="m", Body=data)
    for presigned in (True, False):
        monkeypatch.setattr(constants, "S3_PRESIGNED", presigned)
        src = _source(moto_s3, f"s3://{s3_bucket}/m", part_size=MiB // 2, concurrency=4)
        calls = _count_calls(src._client, "before-call.s3.GetObject")
        # the source's own pool: others for the same origin (other timeouts, sources a test left open) may exist
        pool = src._presigned._pool if presigned else None
        opened = pool.opened if pool is not None else 0
        assert src.read(0, len(data)) == data
        assert src.read(0, len(data)) == data
        if presigned:
            assert src.transport == "presigned" and calls == [0]
            assert pool is not None and pool.opened > opened  # the GETs went through our pool (moto closes each)
        else:
            assert src.transport == "boto3" and calls[0] >= 12
        src.close()


def test_presigned_urls_are_signed_again_after_a_while(moto_s3, s3_client, s3_bucket, monkeypatch):
    """Refreshed credentials reach the URL: it is signed again once it is RESIGN_AFTER_S old."""
    from hf_tensorizer.sources import s3_presigned

    data = _data(100_000, seed=12)
    s3_client.put_object(Bucket=s3_bucket, Key="m", Body=data)
    src = _source(moto_s3, f"s3://{s3_bucket}/m")
    signed = _count_calls(src._client, "before-sign.s3.GetObject")
    assert src.read(0, 10) == data[:10] and signed == [0]  # fresh: the URL made at open is used
    monkeypatch.setattr(s3_presigned, "RESIGN_AFTER_S", 0)
    for i in range(3):
        assert src.read(i, 10) == data[i : i + 10]
    assert signed == [3] and src.transport == "presigned"


def test_refused_presigned_urls_fall_back_to_boto3(moto_s3, s3_client, s3_bucket):
    """A bucket policy denying query-string auth (403 to presigned URLs): the read goes through get_object, and
    every later one too; no byte is lost or fetched twice."""
    from servers.fault_proxy import FaultProxy

    data = _data(3 * MiB, seed=13)
    s3_client.put_object(Bucket=s3_bucket, Key="m", Body=data)
    host, port = moto_s3.removeprefix("http://").split(":")
    proxy = FaultProxy(host, int(port))
    try:
        proxy.refuse_query_auth = True
        src = _source(proxy.url, f"s3://{s3_bucket}/m", part_size=MiB, concurrency=3)
        assert src.transport == "presigned"  # nothing tells before the first GET
        calls = _count_calls(src._client, "before-call.s3.GetObject")
        assert src.read(0, len(data)) == data
        assert src.transport == "boto3"
        assert 1 <= proxy.refused <= 3 and calls[0] >= 3  # each part in flight learnt it once
        refused = proxy.refused
        assert src.read(5, 5) == data[5:10]
        assert proxy.refused == refused  # later reads go straight to get_object
        src.close()
    finally:
        proxy.close()


def test_tls_endpoint_presigned_with_the_ca_bundle_else_boto3(moto_s3, s3_client, s3_bucket, tmp_path, monkeypatch):
    """An https endpoint: presigned GETs verify with AWS_CA_BUNDLE like botocore; when only the client was told
    the CA (``verify=``), our TLS check fails and the ranges go through boto3 — never unverified."""
    import boto3
    from helpers import make_ca_and_cert
    from servers.fault_proxy import FaultProxy

    pytest.importorskip("cryptography")
    ca, cert, key = make_ca_and_cert(tmp_path)
    data = _data(2 * MiB, seed=14)
    s3_client.put_object(Bucket=s3_bucket, Key="m", Body=data)
    host, port = moto_s3.removeprefix("http://").split(":")
    proxy = FaultProxy(host, int(port), tls=(cert, key))
    try:
        assert proxy.url.startswith("https://")
        monkeypatch.setenv("AWS_CA_BUNDLE", ca)  # botocore and our presigned GETs both trust it
        src = _source(proxy.url, f"s3://{s3_bucket}/m", part_size=MiB // 2)
        assert src.read(0, len(data)) == data and src.transport == "presigned"
        src.close()
        monkeypatch.delenv("AWS_CA_BUNDLE")
        client = boto3.client("s3", endpoint_url=proxy.url, verify=ca)  # the CA known to the client only
        src = S3Source(f"s3://{s3_bucket}/m", client=client, **FAST)
        calls = _count_calls(client, "before-call.s3.GetObject")
        assert src.read(0, len(data)) == data and src.transport == "boto3" and calls[0] >= 1
        src.close()
        client.close()
    finally:
        proxy.close()


def test_presigned_urls_stay_off_when_a_proxy_is_configured(moto_s3, monkeypatch):
    """botocore would tunnel through a configured proxy; direct GETs would bypass it, so they are not used."""
    import boto3
    from botocore.config import Config

    from hf_tensorizer.sources.s3 import make_s3_client
    from hf_tensorizer.sources.s3_presigned import usable

    for var in ("HTTP_PROXY", "http_proxy", "NO_PROXY", "no_proxy"):
        monkeypatch.delenv(var, raising=False)
    client = make_s3_client(endpoint_url=moto_s3)
    assert usable(client, moto_s3)
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    assert not usable(client, moto_s3)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    assert usable(client, moto_s3)  # the endpoint is exempt from the proxy
    client.close()
    proxied = boto3.client("s3", endpoint_url=moto_s3, config=Config(proxies={"http": "http://127.0.0.1:9"}))
    assert not usable(proxied, moto_s3)  # a proxy in the client's own config
    proxied.close()


def test_malformed_s3_uris(moto_s3):
    for bad in ("s3://", "s3:///key", "s3://bucket", "s3://bucket/", "s3://bad bucket/key"):
        with pytest.raises(InvalidURIError):
            S3Source(bad, endpoint_url=moto_s3)


# --- writing -------------------------------------------------------------------------------------------------


def _sink(moto_s3: str, uri: str, **kw) -> S3Sink:
    return S3Sink(uri, endpoint_url=moto_s3, addressing_style="path", **{"part_size": 5 * MiB, **kw})


def test_multipart_roundtrip_with_rewrite_head(moto_s3, s3_client, s3_bucket):
    data = bytearray(_data(12 * MiB + 12345, seed=8))
    sink = _sink(moto_s3, f"s3://{s3_bucket}/out/model.tensors", concurrency=2)
    rng = random.Random(9)
    pos = 0
    while pos < len(data):  # odd-sized writes straddle part boundaries
        n = rng.randrange(1, 3 * MiB)
        sink.write(memoryview(data)[pos : pos + n])
        pos += n
    head = _data(4096, seed=10)
    sink.rewrite_head(head)
    sink.commit()
    data[:4096] = head
    obj = s3_client.get_object(Bucket=s3_bucket, Key="out/model.tensors")
    assert obj["Body"].read() == bytes(data)
    assert obj["ETag"].endswith('-3"')  # three parts: 5 + 5 + 2 MiB
    assert s3_client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", []) == []
    with pytest.raises(SinkError):
        sink.write(b"after commit")


def test_parts_are_part_size_and_a_large_first_write_stays_whole_in_part_one(moto_s3, s3_client, s3_bucket):
    """Every uploaded part but the last is exactly ``part_size``, except part 1, held back until the commit: a first
    write larger than a part (a serializer's index) lands in it whole, so the head can be rewritten."""
    data = bytearray(_data(23 * MiB + 777, seed=11))
    sink = _sink(moto_s3, f"s3://{s3_bucket}/parts", concurrency=3)
    first = 6 * MiB + 5  # a "header" over one part
    sink.write(memoryview(data)[:first])
    pos = first
    while pos < len(data):
        sink.write(memoryview(data)[pos : pos + 3 * MiB])
        pos += 3 * MiB
    sink._wait_all()
    uploaded = s3_client.list_parts(Bucket=s3_bucket, Key="parts", UploadId=sink.upload_id)["Parts"]
    assert [p["PartNumber"] for p in uploaded] == [2, 3, 4]  # part 1 held, the last still filling
    assert [p["Size"] for p in uploaded] == [5 * MiB] * 3
    head = _data(first, seed=12)
    sink.rewrite_head(head)
    sink.commit()
    data[:first] = head
    obj = s3_client.get_object(Bucket=s3_bucket, Key="parts")
    assert obj["Body"].read() == bytes(data)
    assert obj["ETag"].endswith('-5"')  # 6 MiB, 3 x 5 MiB, the last 2 MiB


def test_default_parts_bound_the_memory_of_an_upload():
    from hf_tensorizer import constants

    held = (constants.S3_UPLOAD_CONCURRENCY + 2) * constants.S3_UPLOAD_PART_BYTES
    assert 5 * MiB <= constants.S3_UPLOAD_PART_BYTES and held <= 80 * MiB  # the bound docs/loading.md states


def test_small_object_is_one_put(moto_s3, s3_client, s3_bucket):
    sink = open_sink(f"s3://{s3_bucket}/small.bin", endpoint_url=moto_s3, addressing_style="path")
    assert isinstance(sink, S3Sink)
    sink.write(b"hello ")
    sink.write(memoryview(b"world"))
    sink.rewrite_head(b"HELLO")
    sink.commit()
    obj = s3_client.get_object(Bucket=s3_bucket, Key="small.bin")
    assert obj["Body"].read() == b"HELLO world"
    assert "-" not in obj["ETag"]


def test_exactly_one_part_is_one_put(moto_s3, s3_client, s3_bucket):
    data = _data(5 * MiB, seed=11)
    sink = _sink(moto_s3, f"s3://{s3_bucket}/one")
    sink.write(data)
    sink.commit()
    assert s3_client.get_object(Bucket=s3_bucket, Key="one")["Body"].read() == data


@pytest.mark.parametrize("size", [5 * MiB + 1, 7 * MiB + 12345, 10 * MiB - 1])
def test_between_one_and_two_parts_keeps_every_byte(moto_s3, s3_client, s3_bucket, size):
    """The held first part and the tail go up together (a regression: the tail was once dropped)."""
    data = _data(size, seed=13)
    sink = _sink(moto_s3, f"s3://{s3_bucket}/between")
    sink.write(data)
    sink.rewrite_head(b"HEAD")
    sink.commit()
    assert s3_client.get_object(Bucket=s3_bucket, Key="between")["Body"].read() == b"HEAD" + data[4:]


def test_caller_failure_mid_write_aborts_and_leaves_nothing(moto_s3, s3_client, s3_bucket):
    sink = _sink(moto_s3, f"s3://{s3_bucket}/partial")
    sink.write(_data(MiB, seed=12))
    sink.write(_data(10 * MiB, seed=13))  # part 2 sealed: the multipart upload exists
    assert sink.upload_id is not None
    assert len(s3_client.list_multipart_uploads(Bucket=s3_bucket)["Uploads"]) == 1
    sink.abort()  # what the serializer does when it fails
    sink.abort()  # idempotent
    _no_leftovers(s3_client, s3_bucket, "partial")
    with pytest.raises(SinkError):
        sink.commit()


def test_upload_failure_aborts_and_leaves_nothing(moto_s3, s3_client, s3_bucket):
    from botocore.exceptions import ClientError

    sink = _sink(moto_s3, f"s3://{s3_bucket}/failing", concurrency=2)
    real = sink._client.upload_part
    calls = []

    def flaky(**kwargs):
        calls.append(kwargs["PartNumber"])
        if len(calls) == 2:
            raise ClientError({"Error": {"Code": "InternalError", "Message": "boom"}}, "UploadPart")
        return real(**kwargs)

    sink._client.upload_part = flaky
    with pytest.raises(SinkError, match="InternalError"):
        for _ in range(8):
            sink.write(_data(3 * MiB, seed=13))
        sink.commit()
    _no_leftovers(s3_client, s3_bucket, "failing")


def test_in_flight_parts_are_bounded(moto_s3, s3_client, s3_bucket):
    sink = _sink(moto_s3, f"s3://{s3_bucket}/bounded", concurrency=2)
    real = sink._client.upload_part
    lock = threading.Lock()
    state = {"now": 0, "max": 0}

    def slow(**kwargs):
        with lock:
            state["now"] += 1
            state["max"] = max(state["max"], state["now"])
        time.sleep(0.05)
        try:
            return real(**kwargs)
        finally:
            with lock:
                state["now"] -= 1

    sink._client.upload_part = slow
    data = _data(31 * MiB, seed=14)
    sink.write(data)
    sink.commit()
    assert state["max"] <= 2
    assert s3_client.get_object(Bucket=s3_bucket, Key="bounded")["Body"].read() == data


def test_rewrite_head_beyond_the_first_part_fails_and_aborts(moto_s3, s3_client, s3_bucket):
    sink = _sink(moto_s3, f"s3://{s3_bucket}/h")
    sink.write(_data(MiB))  # a small first write: part 1 is part_size (a larger one would have been kept whole)
    sink.write(_data(10 * MiB))
    with pytest.raises(SinkError, match="first part"):
        sink.rewrite_head(b"x" * (6 * MiB))
    _no_leftovers(s3_client, s3_bucket, "h")


def test_sink_argument_errors(moto_s3, s3_bucket):
    with pytest.raises(UsageError, match="5 MiB"):
        _sink(moto_s3, f"s3://{s3_bucket}/k", part_size=MiB)
    with pytest.raises(InvalidURIError):
        _sink(moto_s3, f"s3://{s3_bucket}/")
    with pytest.raises(SinkError, match="does not exist"):
        sink = _sink(moto_s3, "s3://no-such-bucket-abc/k")
        sink.write(b"x")
        sink.commit()


def test_sources_close_their_own_client_never_a_shared_one(
    moto_s3: str, s3_client: Any, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from hf_tensorizer.sources import s3 as s3_module
    from hf_tensorizer.sources import shared_transport

    s3_client.put_object(Bucket=s3_bucket, Key="x", Body=b"abc")
    closed: list[Any] = []
    real = s3_module.make_s3_client

    def tracking(**kw: Any) -> Any:
        client = real(**kw)
        close = client.close
        client.close = lambda: (closed.append(client), close())[1]
        return client

    monkeypatch.setattr(s3_module, "make_s3_client", tracking)
    uri = f"s3://{s3_bucket}/x"
    with S3Source(uri, endpoint_url=moto_s3) as src:
        assert src.read(0, 3) == b"abc"
    assert len(closed) == 1  # its own client, closed with it
    with pytest.raises(SourceError):
        S3Source(f"s3://{s3_bucket}/missing", endpoint_url=moto_s3)
    assert len(closed) == 2  # a failed open closes what it made
    with shared_transport(uri, {"endpoint_url": moto_s3}) as options:
        for _ in range(3):
            with S3Source(uri, **options) as src:
                assert src.read(1, 2) == b"bc"
        assert len(closed) == 2  # the shared client outlives its sources
    assert len(closed) == 3  # and is closed once, when the block ends


def test_clients_carry_exactly_botocores_own_event_handlers(moto_s3):
    """Our clients copy botocore's built-in handlers from a template instead of registering them per session: the
    handlers every S3 operation emits to, in order, must be those of a client from a stock boto3 session; and a
    handler registered on one client must not leak into the template (the next client)."""
    import boto3

    from hf_tensorizer.sources.s3 import make_s3_client

    ours, stock = make_s3_client(endpoint_url=moto_s3), boto3.session.Session().client("s3", endpoint_url=moto_s3)
    ops = [stock.meta.service_model.operation_model(n).name for n in stock.meta.service_model.operation_names]
    stages = ("provide-client-params", "before-parameter-build", "before-call", "request-created", "before-sign",
              "before-send", "before-parse", "needs-retry", "after-call", "after-call-error")  # fmt: skip
    for op in ops:
        for stage in stages:
            event = f"{stage}.s3.{op}"
            mine = list(ours.meta.events._emitter._handlers.prefix_search(event))
            theirs = list(stock.meta.events._emitter._handlers.prefix_search(event))
            assert [getattr(h, "__qualname__", repr(h)) for h in mine] == [
                getattr(h, "__qualname__", repr(h)) for h in theirs
            ], event
    marker = []
    ours.meta.events.register("before-call.s3.HeadObject", lambda **kw: marker.append(1))
    again = make_s3_client(endpoint_url=moto_s3)
    assert len(list(again.meta.events._emitter._handlers.prefix_search("before-call.s3.HeadObject"))) == len(
        list(stock.meta.events._emitter._handlers.prefix_search("before-call.s3.HeadObject"))
    )
    for client in (ours, stock, again):
        client.close()
