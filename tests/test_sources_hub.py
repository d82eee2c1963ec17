"""HubSource / HubSink against a local Hub server (tests/servers/hub.py) reached through huggingface_hub."""

from __future__ import annotations

import random

import pytest

from hf_tensorizer.errors import InvalidURIError, SinkError, SourceError
from hf_tensorizer.sources import FileSource, open_sink, open_source
from hf_tensorizer.sources.http import HTTPSource
from hf_tensorizer.sources.hub import HubSink, HubSource

pytestmark = pytest.mark.timeout(60)

MiB = 1 << 20
FAST = {"backoff": 0.01, "max_backoff": 0.05, "retries": 3, "timeout": 5}


def _data(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


@pytest.fixture
def repo(hub_server):
    """``org/model`` with a small (regular) and a large (CDN-redirected) file."""
    hub_server.create_repo("org/model")
    small, large = _data(200_000, seed=1), _data(3 * MiB, seed=2)
    hub_server.commit("org/model", {"config.bin": small, "weights/model.tensors": large})
    return {"config.bin": small, "weights/model.tensors": large}


def test_read_regular_file_pinned_to_commit(hub_server, repo):
    src = HubSource("hf://org/model/config.bin", **FAST)
    assert src.size == len(repo["config.bin"])
    assert src.commit_hash == hub_server.head("org/model")
    assert src.read(0, src.size) == repo["config.bin"]
    assert f"@{src.commit_hash}" in repr(src._inner.uri)


def test_read_large_file_through_the_cdn_redirect(hub_server, repo, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", hub_server.token)
    data = repo["weights/model.tensors"]
    src = open_source("hf://org/model/weights/model.tensors", part_size=MiB, concurrency=3, **FAST)
    assert isinstance(src, HubSource)
    buf = bytearray(src.size)
    src.read_into(0, memoryview(buf))
    assert buf == data
    assert src.read(123, 456) == data[123:579]
    assert hub_server.cdn_log, "the large file must come from the CDN"
    assert not any(e["auth"] for e in hub_server.cdn_log), "the token must never reach the CDN"
    assert all(e["auth"] for e in hub_server.log), "every Hub request carries HF_TOKEN"


def test_private_repo_needs_the_token(hub_server, monkeypatch):
    hub_server.create_repo("org/private", private=True)
    hub_server.commit("org/private", {"a.bin": b"secret weights"})
    with pytest.raises(SourceError, match="not found, or private") as err:
        HubSource("hf://org/private/a.bin", **FAST)
    assert hub_server.token not in str(err.value)
    monkeypatch.setenv("HF_TOKEN", hub_server.token)
    assert HubSource("hf://org/private/a.bin", **FAST).read(0, 6) == b"secret"
    with pytest.raises(SourceError):
        HubSource("hf://org/private/a.bin", token=False, **FAST)


def test_branch_moving_mid_load_does_not_mix_versions(hub_server, repo):
    old = repo["weights/model.tensors"]
    src = HubSource("hf://org/model/weights/model.tensors", **FAST)
    assert src.read(0, 1000) == old[:1000]
    hub_server.commit("org/model", {"weights/model.tensors": _data(3 * MiB, seed=3)})
    assert src.read(1000, len(old) - 1000) == old[1000:]  # still the commit it opened
    fresh = HubSource("hf://org/model/weights/model.tensors", **FAST)
    assert fresh.commit_hash != src.commit_hash
    assert fresh.read(0, 10) != old[:10]


def test_revisions_branch_and_commit(hub_server, repo):
    first = hub_server.head("org/model")
    hub_server.commit("org/model", {"config.bin": b"v2"})
    assert HubSource(f"hf://org/model@{first}/config.bin", **FAST).read(0, 5) == repo["config.bin"][:5]
    assert HubSource("hf://org/model@main/config.bin", **FAST).read(0, 2) == b"v2"
    assert HubSource("hf://org/model/config.bin", revision=first, **FAST).read(0, 5) == repo["config.bin"][:5]


def test_expired_cdn_signature_is_resolved_again(hub_server, repo):
    data = repo["weights/model.tensors"]
    src = HubSource("hf://org/model/weights/model.tensors", **FAST)
    assert src.read(0, 100) == data[:100]
    hub_server.expire_signatures()
    assert src.read(100, 100) == data[100:200]


def test_not_found_errors_are_clear(hub_server, repo):
    with pytest.raises(SourceError, match="repository not found"):
        HubSource("hf://org/nothing/config.bin", **FAST)
    with pytest.raises(SourceError, match="no such file"):
        HubSource("hf://org/model/missing.bin", **FAST)
    with pytest.raises(SourceError, match="revision not found"):
        HubSource("hf://org/model@nobranch/config.bin", **FAST)
    with pytest.raises(InvalidURIError):
        HubSource("hf://org/model", **FAST)


def test_hub_unreachable_is_clear(monkeypatch):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(SourceError, match="cannot reach the Hub"):
        HubSource("hf://org/model/config.bin", endpoint=f"http://127.0.0.1:{port}", offline=False, **FAST)


def test_explicit_endpoint_option(hub_server, repo, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    src = HubSource("hf://org/model/config.bin", endpoint=hub_server.endpoint, **FAST)
    assert src.read(0, 4) == repo["config.bin"][:4]


def test_offline_reads_the_cached_copy(hub_server, repo, tmp_path, monkeypatch):
    from huggingface_hub import hf_hub_download

    cache = tmp_path / "hf-cache"
    hf_hub_download("org/model", "config.bin", cache_dir=cache, endpoint=hub_server.endpoint)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    before = len(hub_server.log)
    src = HubSource("hf://org/model/config.bin", cache_dir=cache)
    assert isinstance(src._inner, FileSource) and src.fileno() is not None
    assert src.commit_hash == hub_server.head("org/model")
    assert src.read(0, src.size) == repo["config.bin"]
    with pytest.raises(SourceError, match="offline mode"):
        HubSource("hf://org/model/weights/model.tensors", cache_dir=cache)
    assert len(hub_server.log) == before, "offline mode must not touch the network"
    with pytest.raises(SinkError, match="HF_HUB_OFFLINE"):
        HubSink("hf://org/model/out.bin")


# --- writing -------------------------------------------------------------------------------------------------


def test_sink_uploads_on_commit(hub_server, monkeypatch, tmp_path):
    hub_server.create_repo("org/out")
    monkeypatch.setenv("HF_TOKEN", hub_server.token)
    staging = tmp_path / "staging"
    staging.mkdir()
    sink = open_sink("hf://org/out/sub/model.tensors", tmp_dir=staging)
    assert isinstance(sink, HubSink) and sink.can_rewrite_head
    # staged through the page cache, not O_DIRECT: upload_file reads the file again right after the commit
    assert sink._staging.direct is False
    data = bytearray(_data(2 * MiB + 5, seed=4))
    sink.write(memoryview(data)[:MiB])
    sink.write(bytes(data[MiB:]))
    sink.rewrite_head(b"HEAD")
    data[:4] = b"HEAD"
    before = hub_server.head("org/out")
    assert hub_server.head("org/out") == before  # nothing visible before commit
    sink.commit()
    assert hub_server.head("org/out") != before
    assert hub_server.read("org/out", "sub/model.tensors") == bytes(data)
    assert sink.commit_info.oid == hub_server.head("org/out")
    assert list(staging.iterdir()) == []
    # and it reads back through the source
    assert HubSource("hf://org/out/sub/model.tensors", **FAST).read(0, len(data)) == bytes(data)


def test_sink_to_a_branch(hub_server, monkeypatch):
    hub_server.create_repo("org/out")
    monkeypatch.setenv("HF_TOKEN", hub_server.token)
    with hub_server.lock:
        repo = hub_server.repos[("model", "org/out")]
        repo.branches["dev"] = repo.branches["main"]
    sink = HubSink("hf://org/out@dev/w.bin")
    sink.write(b"dev bytes")
    sink.commit()
    assert hub_server.read("org/out", "w.bin", revision="dev") == b"dev bytes"
    with pytest.raises(FileNotFoundError):
        hub_server.read("org/out", "w.bin", revision="main")


def test_sink_never_creates_a_repo(hub_server, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", hub_server.token)
    with pytest.raises(SinkError, match="create it first"):
        HubSink("hf://org/absent/w.bin")
    assert ("model", "org/absent") not in hub_server.repos
    hub_server.create_repo("org/out")
    with pytest.raises(SinkError, match="branch 'nobranch' does not exist"):
        HubSink("hf://org/out@nobranch/w.bin")


def test_sink_abort_leaves_nothing(hub_server, monkeypatch, tmp_path):
    hub_server.create_repo("org/out")
    monkeypatch.setenv("HF_TOKEN", hub_server.token)
    before = hub_server.head("org/out")
    (tmp_path / "staging").mkdir()
    sink = HubSink("hf://org/out/w.bin", tmp_dir=tmp_path / "staging")
    sink.write(b"partial")
    sink.abort()
    sink.abort()
    assert list((tmp_path / "staging").iterdir()) == []
    assert hub_server.head("org/out") == before
    with pytest.raises(SinkError):
        sink.commit()


def test_sink_upload_rejected_is_clear_and_cleans_up(hub_server, tmp_path):
    hub_server.create_repo("org/out")  # no HF_TOKEN: the upload is refused
    (tmp_path / "staging").mkdir()
    sink = HubSink("hf://org/out/w.bin", tmp_dir=tmp_path / "staging")
    sink.write(b"bytes")
    with pytest.raises(SinkError, match=r"HTTP 401|access denied"):
        sink.commit()
    assert list((tmp_path / "staging").iterdir()) == []


def test_inner_http_source_gets_http_options(hub_server, repo):
    src = HubSource("hf://org/model/config.bin", concurrency=2, part_size=MiB, **FAST)
    assert isinstance(src._inner, HTTPSource)
    assert src.preferred_concurrency == 2
