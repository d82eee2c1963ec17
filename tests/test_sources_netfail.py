"""Bounded time on a hostile or broken network (issue 13): every case ends in a clear SourceError naming the URI,
within a bound on elapsed time, through real servers on 127.0.0.1.

* a 429 with ``Retry-After: 3600`` fails at once (beyond the deadline); a server that keeps asking for retries
  stops at the deadline;
* a body trickling one byte every 0.5 s fails on the minimum-rate rule (HTTP, and S3 through a TCP proxy), and on
  the deadline when the rate rule is off;
* a gzip-encoded ranged response is named as such, not read as data;
* ``https://`` to a plain-HTTP port and a refused connection fail at once (quick retries for a refusal only), with
  the default retry settings.
"""

from __future__ import annotations

import random
import socket
import time

import pytest

from hf_tensorizer.errors import NetworkLimitError, SourceError
from hf_tensorizer.sources.http import HTTPSource
from hf_tensorizer.sources.hub import HubSource
from hf_tensorizer.sources.s3 import S3Source

pytestmark = pytest.mark.timeout(30)

FAST = {"backoff": 0.01, "max_backoff": 0.05, "timeout": 5, "retries": 4}


def _data(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Clock:
    def __enter__(self) -> _Clock:
        self.start = time.monotonic()
        return self

    def __exit__(self, *exc: object) -> None:
        self.elapsed = time.monotonic() - self.start


def test_retry_after_beyond_the_deadline_fails_at_once(http_server):
    src = HTTPSource(http_server.write("m.bin", _data(10_000)), deadline=20, **FAST)
    http_server.fault("status", "m.bin", status=429, retry_after=3600, count=-1)
    with _Clock() as clock, pytest.raises(NetworkLimitError, match=r"m\.bin.*Retry-After.*3600.*deadline") as err:
        src.read(0, 100)
    assert clock.elapsed < 3
    assert "HTTP 429" in str(err.value)


def test_retry_after_while_opening_fails_at_once(http_server):
    url = http_server.write("m.bin", _data(10_000))
    http_server.fault("status", "m.bin", status=503, retry_after=3600, count=-1, methods=["HEAD", "GET"])
    with _Clock() as clock, pytest.raises(NetworkLimitError, match=r"m\.bin.*opening.*Retry-After.*3600"):
        HTTPSource(url, deadline=20, **FAST)
    assert clock.elapsed < 3


def test_repeated_retry_after_stops_before_the_deadline(http_server):
    src = HTTPSource(http_server.write("m.bin", _data(10_000)), deadline=2.5, **{**FAST, "retries": 100})
    http_server.fault("status", "m.bin", status=503, retry_after=1, count=-1)
    with _Clock() as clock, pytest.raises(NetworkLimitError, match=r"m\.bin.*Retry-After: 1 s.*deadline of 2\.5"):
        src.read(0, 100)
    assert 1.5 < clock.elapsed < 6  # waited twice, then the third wait would end past the deadline


def test_endless_retries_stop_at_the_deadline(http_server):
    opts = {**FAST, "retries": 1000, "backoff": 0.2, "max_backoff": 0.2}
    src = HTTPSource(http_server.write("m.bin", _data(10_000)), deadline=2, **opts)
    http_server.fault("status", "m.bin", status=503, count=-1)
    with _Clock() as clock, pytest.raises(NetworkLimitError, match=r"m\.bin.*within the deadline of 2 s.*HTTP 503"):
        src.read(0, 100)
    assert 1.9 < clock.elapsed < 6


def test_trickle_fails_on_the_minimum_rate(http_server):
    data = _data(200_000, seed=1)
    src = HTTPSource(http_server.write("m.bin", data), min_rate=10_000, rate_window=1, deadline=60, **FAST)
    http_server.fault("trickle", "m.bin", after=1000, interval=0.5, count=-1)
    with _Clock() as clock, pytest.raises(NetworkLimitError, match=r"m\.bin.*too slow.*bytes in") as err:
        src.read(0, len(data))
    assert clock.elapsed < 10
    assert "min_rate" in str(err.value)


def test_trickle_with_the_rate_rule_off_stops_at_the_deadline(http_server):
    data = _data(200_000, seed=2)
    src = HTTPSource(http_server.write("m.bin", data), min_rate=0, deadline=2, **FAST)
    http_server.fault("trickle", "m.bin", after=1000, interval=0.5, count=-1)
    with _Clock() as clock, pytest.raises(NetworkLimitError, match=r"m\.bin.*deadline of 2"):
        src.read(0, len(data))
    assert clock.elapsed < 8


def test_a_fast_read_passes_the_rate_rule(http_server):
    data = _data(3 << 20, seed=3)
    src = HTTPSource(http_server.write("m.bin", data), min_rate=10_000, rate_window=0.05, deadline=30, **FAST)
    assert src.read(0, len(data)) == data


def test_gzip_encoded_range_is_named_not_misread(http_server):
    data = _data(100_000, seed=4)
    src = HTTPSource(http_server.write("m.bin", data), **FAST)
    http_server.fault("gzip", "m.bin", count=-1)
    with _Clock() as clock, pytest.raises(SourceError, match=r"m\.bin.*Content-Encoding: gzip.*identity"):
        src.read(0, 50_000)
    assert clock.elapsed < 5
    assert {e["accept_encoding"] for e in http_server.log()} == {"identity"}


def test_gzip_encoded_probe_is_named(http_server):
    url = http_server.write("m.bin", _data(1000, seed=5))
    http_server.fault("status", "m.bin", status=405, methods=["HEAD"])
    http_server.fault("gzip", "m.bin", count=-1)
    with pytest.raises(SourceError, match=r"m\.bin.*Content-Encoding: gzip"):
        HTTPSource(url, **FAST)


def test_https_to_a_plain_http_port_fails_at_once(http_server):
    url = http_server.write("m.bin", _data(1000)).replace("http://", "https://", 1)
    with _Clock() as clock, pytest.raises(SourceError, match=r"m\.bin.*TLS handshake.*plain http") as err:
        HTTPSource(url, verify=False, timeout=5)  # default retries and backoff
    assert clock.elapsed < 2
    assert "attempts" not in str(err.value)


def test_connection_refused_fails_within_two_seconds():
    port = _closed_port()
    with _Clock() as clock, pytest.raises(SourceError, match=r"127\.0\.0\.1:\d+.*Connection refused by"):
        HTTPSource(f"http://user:secret@127.0.0.1:{port}/x.bin?sig=hidden", timeout=5)  # default retries
    assert clock.elapsed < 2.5


def test_connection_refused_error_hides_credentials():
    port = _closed_port()
    with pytest.raises(SourceError) as err:
        HTTPSource(f"http://user:secret@127.0.0.1:{port}/x.bin?sig=hidden", connect_retries=0)
    assert "secret" not in str(err.value) and "hidden" not in str(err.value)


def test_unknown_host_fails_at_once():
    host = "no-such-host.invalid"  # a reserved name: never resolves
    try:
        socket.getaddrinfo(host, 80)
    except socket.gaierror as exc:
        if exc.errno != socket.EAI_NONAME:
            pytest.skip(f"this resolver answers {exc} (not 'no such name')")
    with _Clock() as clock, pytest.raises(SourceError, match=r"no-such-host\.invalid.*unknown host"):
        HTTPSource(f"http://{host}/x.bin", timeout=5)
    assert clock.elapsed < 2


def test_hub_unreachable_fails_within_two_seconds(monkeypatch):
    port = _closed_port()
    with _Clock() as clock, pytest.raises(SourceError, match="cannot reach the Hub"):
        HubSource("hf://org/model/config.bin", endpoint=f"http://127.0.0.1:{port}", offline=False)
    assert clock.elapsed < 2.5


def test_hub_passes_the_limits_to_its_reads(hub_server):
    hub_server.create_repo("org/model")
    hub_server.commit("org/model", {"config.bin": _data(1000)})
    src = HubSource("hf://org/model/config.bin", deadline=7, min_rate=123, rate_window=4, **FAST)
    policy = src._inner.policy
    assert (policy.deadline, policy.min_rate, policy.rate_window) == (7, 123, 4)


def test_s3_trickle_fails_on_the_minimum_rate(moto_s3, s3_client, s3_bucket):
    from servers.fault_proxy import FaultProxy

    data = _data(300_000, seed=6)
    s3_client.put_object(Bucket=s3_bucket, Key="m", Body=data)
    host, port = moto_s3.removeprefix("http://").split(":")
    proxy = FaultProxy(host, int(port))
    try:
        src = S3Source(
            f"s3://{s3_bucket}/m", endpoint_url=proxy.url, addressing_style="path", min_rate=10_000, rate_window=1,
            deadline=60, **{**FAST, "retries": 3},
        )  # fmt: skip
        proxy.arm("trickle", after=2000, seconds=0.05)
        with _Clock() as clock, pytest.raises(NetworkLimitError, match=rf"s3://{s3_bucket}/m.*too slow"):
            src.read(0, len(data))
        assert clock.elapsed < 10
    finally:
        proxy.close()
