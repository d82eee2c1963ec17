"""S3Sink's parts against moto's standalone server over real HTTP. Their buffers are reused, never shared between
two parts in flight. Their checksums (CRC32, as boto3's ``upload_file`` sends them by default): every part and
single PUT carries the CRC32 of exactly the bytes it sends, the object keeps the composite checksum S3 defines, and
``checksum="none"`` (or ``AWS_REQUEST_CHECKSUM_CALCULATION=when_required``) sends none."""

from __future__ import annotations

import base64
import json
import os
import random
import subprocess
import sys
import zlib
from typing import Any

import pytest

from hf_tensorizer.errors import UsageError
from hf_tensorizer.sources.s3_sink import S3Sink

pytest.importorskip("moto")
pytest.importorskip("boto3")

MiB = 1 << 20


def _crc(data: bytes) -> bytes:
    return zlib.crc32(data).to_bytes(4, "big")  # zlib, not the sink's ISA-L: an independent computation


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def _recording_sink(moto_s3: str, uri: str, **kw: Any) -> tuple[S3Sink, list[tuple[str, str, dict[str, str], bytes]]]:
    """A sink whose requests are recorded as sent: (method, query, headers, body)."""
    sink = S3Sink(uri, endpoint_url=moto_s3, addressing_style="path", **{"part_size": 5 * MiB, **kw})
    sent: list[tuple[str, str, dict[str, str], bytes]] = []

    def record(request: Any, **_: Any) -> None:
        body = request.body
        raw = bytes(body) if isinstance(body, (bytes, bytearray)) else b"" if body is None else body.getvalue()
        headers = {k.lower(): v.decode() if isinstance(v, bytes) else v for k, v in request.headers.items()}
        sent.append((request.method, request.url.partition("?")[2], headers, raw))

    sink._client.meta.events.register("before-send", record)
    return sink, sent


def test_every_part_carries_the_crc32_of_its_bytes(moto_s3: str, s3_client: Any, s3_bucket: str) -> None:
    data = bytearray(random.Random(1).randbytes(17 * MiB + 321))
    sink, sent = _recording_sink(moto_s3, f"s3://{s3_bucket}/crc", checksum="crc32", concurrency=3)
    for pos in range(0, len(data), 3 * MiB + 7):  # writes straddle the part boundaries
        sink.write(memoryview(data)[pos : pos + 3 * MiB + 7])
    sink.rewrite_head(b"HEAD")
    sink.commit()
    data[:4] = b"HEAD"
    creates = [h for m, q, h, _ in sent if m == "POST" and q == "uploads"]
    assert [h.get("x-amz-checksum-algorithm") for h in creates] == ["CRC32"]
    parts = {int(q.split("partNumber=")[1].split("&")[0]): (h, body) for m, q, h, body in sent if m == "PUT"}
    assert sorted(parts) == [1, 2, 3, 4]  # 5 + 5 + 5 + 2 MiB
    for headers, body in parts.values():
        assert headers["x-amz-checksum-crc32"] == _b64(_crc(body))
    assert b"".join(parts[n][1] for n in sorted(parts)) == bytes(data)  # part 1 sent after its rewrite
    (complete,) = [body for m, q, _, body in sent if m == "POST" and q.startswith("uploadId=")]
    assert complete.count(b"<ChecksumCRC32>") == 4
    head = s3_client.head_object(Bucket=s3_bucket, Key="crc", ChecksumMode="ENABLED")
    composite = _b64(_crc(b"".join(_crc(parts[n][1]) for n in sorted(parts))))
    # S3's composite: the CRC32 of the parts' CRC32s (AWS appends "-4", the part count; moto's HEAD does not)
    assert head["ChecksumCRC32"] in (composite, f"{composite}-4")
    assert s3_client.get_object(Bucket=s3_bucket, Key="crc")["Body"].read() == bytes(data)


def test_part_buffers_are_reused_and_every_byte_arrives(moto_s3: str, s3_client: Any, s3_bucket: str) -> None:
    """Sixteen parts through two uploading at once: a handful of buffers serve them all (fresh memory costs a page
    fault per 4 KiB), and no part is overwritten while it is still being sent."""
    data = random.Random(3).randbytes(76 * MiB + 99)
    sink, sent = _recording_sink(moto_s3, f"s3://{s3_bucket}/reuse", checksum="crc32", concurrency=2)
    bodies: set[int] = set()
    sink._client.meta.events.register(
        "before-send", lambda request, **_: bodies.add(id(request.body)) if request.method == "PUT" else None
    )
    for pos in range(0, len(data), MiB + 3):
        sink.write(data[pos : pos + MiB + 3])
    sink.commit()
    parts = {int(q.split("partNumber=")[1].split("&")[0]): body for m, q, _, body in sent if m == "PUT"}
    assert len(parts) == 16
    assert b"".join(parts[n] for n in sorted(parts)) == data
    assert len(bodies) <= 1 + 2 + 1  # part 1 (held), the two in flight, the one filling
    assert s3_client.get_object(Bucket=s3_bucket, Key="reuse")["Body"].read() == data


def test_a_single_put_carries_the_crc32_of_the_object(moto_s3: str, s3_client: Any, s3_bucket: str) -> None:
    sink, sent = _recording_sink(moto_s3, f"s3://{s3_bucket}/small", checksum="crc32")
    sink.write(b"hello world")
    sink.rewrite_head(b"HELLO")
    sink.commit()
    ((method, _, headers, body),) = sent
    assert (method, body) == ("PUT", b"HELLO world")
    assert headers["x-amz-checksum-crc32"] == _b64(_crc(b"HELLO world"))
    head = s3_client.head_object(Bucket=s3_bucket, Key="small", ChecksumMode="ENABLED")
    assert head["ChecksumCRC32"] == _b64(_crc(b"HELLO world"))


def test_no_checksums_when_turned_off(moto_s3: str, s3_client: Any, s3_bucket: str) -> None:
    data = random.Random(2).randbytes(11 * MiB)
    sink, sent = _recording_sink(moto_s3, f"s3://{s3_bucket}/plain", checksum="none")
    for pos in range(0, len(data), MiB):
        sink.write(data[pos : pos + MiB])
    sink.commit()
    assert [m for m, *_ in sent].count("PUT") == 3
    assert not [k for _, _, h, _ in sent for k in h if k.startswith("x-amz-checksum")]
    assert s3_client.get_object(Bucket=s3_bucket, Key="plain")["Body"].read() == data


def test_an_unknown_checksum_is_a_usage_error(moto_s3: str, s3_bucket: str) -> None:
    with pytest.raises(UsageError, match="crc32"):
        S3Sink(f"s3://{s3_bucket}/k", endpoint_url=moto_s3, checksum="md5")
    with pytest.raises(UsageError, match="checksum="):  # one per part is ours to send, not a fixed parameter's
        S3Sink(f"s3://{s3_bucket}/k", endpoint_url=moto_s3, extra_args={"ChecksumAlgorithm": "SHA256"})


_DEFAULT = "from hf_tensorizer import constants; import json; print(json.dumps(constants.S3_UPLOAD_CHECKSUM))"


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, "crc32"),
        ({"AWS_REQUEST_CHECKSUM_CALCULATION": "WHEN_REQUIRED"}, "none"),
        ({"AWS_REQUEST_CHECKSUM_CALCULATION": "when_supported"}, "crc32"),
        ({"AWS_REQUEST_CHECKSUM_CALCULATION": "when_required", "HF_TENSORIZER_S3_UPLOAD_CHECKSUM": "crc32"}, "crc32"),
        ({"HF_TENSORIZER_S3_UPLOAD_CHECKSUM": "None"}, "none"),
    ],
)
def test_the_default_follows_the_environment(env: dict[str, str], expected: str) -> None:
    base = {k: v for k, v in os.environ.items() if k not in ("AWS_REQUEST_CHECKSUM_CALCULATION",
                                                             "HF_TENSORIZER_S3_UPLOAD_CHECKSUM")}  # fmt: skip
    out = subprocess.run([sys.executable, "-c", _DEFAULT], env={**base, **env}, capture_output=True, text=True,
                         check=True)  # fmt: skip
    assert json.loads(out.stdout) == expected
