"""Azure Blob Storage (``az://`` and ``abfs://`` through adlfs) against Azurite from npm, on 127.0.0.1: bit-identical
round trips through the serializer and deserializer, atomic writes, the ETag pin (Azurite keeps no blob versions, so
a replaced blob must fail the load, never mix), typed errors. The source contract runs on it too
(tests/test_source_contract.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import fsspec
import pytest
import torch
from helpers import mixed_state_dict

from hf_tensorizer import TensorDeserializer, TensorSerializer
from hf_tensorizer.errors import ObjectChangedError, SourceError
from hf_tensorizer.sources import open_sink, open_source
from hf_tensorizer.sources.fsspec import FsspecSource

pytestmark = pytest.mark.timeout(300)  # the first test may install Azurite (scripts/azurite.sh, ~1 min once)


@pytest.mark.parametrize("scheme", ["az", "abfs"])
def test_round_trip_is_bit_identical(tmp_path: Path, azure_container: tuple[str, dict[str, Any]], scheme: str) -> None:
    container, options = azure_container
    sd = mixed_state_dict()
    uri = f"{scheme}://{container}/models/model.tensors"
    with TensorSerializer(uri, storage_options=options) as s:
        s.write_state_dict(sd)
    local = tmp_path / "ref.tensors"
    with TensorSerializer(local) as s:
        s.write_state_dict(sd)
    fs = fsspec.filesystem("az", **options)
    assert fs.cat_file(f"{container}/models/model.tensors") == local.read_bytes()
    assert fs.ls(f"{container}/models", detail=False) == [f"{container}/models/model.tensors"]  # no temporary left
    with TensorDeserializer(uri, storage_options=options, verify_hash=True, concurrency=4, part_size=64 << 10) as d:
        assert set(d) == set(sd)
        for k, v in sd.items():
            assert d[k].dtype == v.dtype and torch.equal(d[k], v), k


def test_ranged_reads_scatter_and_adapt(azure_container: tuple[str, dict[str, Any]]) -> None:
    container, options = azure_container
    data = bytes(range(256)) * 40_000  # 10 MB
    fsspec.filesystem("az", **options).pipe_file(f"{container}/blob.bin", data)
    with open_source(f"az://{container}/blob.bin", storage_options=options) as src:
        assert isinstance(src, FsspecSource) and src.size == len(data)
        assert src.version is not None and src.version[0] == "etag"  # what the load is pinned to
        a, b = bytearray(3 << 20), bytearray(2 << 20)
        src.read_into_many(12345, [memoryview(a), memoryview(b)])
        assert a + b == data[12345 : 12345 + (5 << 20)]
        assert src.read(len(data) - 7, 7) == data[-7:]
        assert src.tuning["mode"] in ("ranged", "held")  # fsspec reads return whole ranges: never one stream


def test_replaced_blob_fails_the_load_never_mixes(azure_container: tuple[str, dict[str, Any]]) -> None:
    container, options = azure_container
    fs = fsspec.filesystem("az", **options)
    old, new = b"a" * 300_000, b"b" * 300_000
    fs.pipe_file(f"{container}/m.bin", old)
    with open_source(f"az://{container}/m.bin", storage_options=options) as src:
        assert src.read(0, 10) == old[:10]
        fs.pipe_file(f"{container}/m.bin", new)  # same size, new ETag
        with pytest.raises(ObjectChangedError):
            src.read(10, 1000)
    with open_source(f"az://{container}/m.bin", storage_options=options) as fresh:
        assert fresh.read(0, 300_000) == new


def test_aborted_write_leaves_nothing_and_errors_are_typed(azure_container: tuple[str, dict[str, Any]]) -> None:
    container, options = azure_container
    fs = fsspec.filesystem("az", **options)
    sink = open_sink(f"az://{container}/out/x.tensors", storage_options=options)
    sink.write(b"partial bytes")
    sink.abort()
    assert not fs.exists(f"{container}/out/x.tensors") and fs.ls(f"{container}", detail=False) in (
        [],
        [f"{container}/out"],
    )
    with pytest.raises(SourceError, match="no such object"):
        open_source(f"az://{container}/missing.bin", storage_options=options)
    with pytest.raises(SourceError):
        open_source("az://no-such-container-xyz/m.bin", storage_options=options)


def test_reads_are_pinned_to_the_etag_without_a_lookup_each(azure_container: tuple[str, dict[str, Any]],
                                                           monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """Each range carries the ETag as a condition (sources/azure_pinned.py), so no read needs a metadata request
    of its own; a blob replaced meanwhile is still refused by the service itself."""
    container, options = azure_container
    fs = fsspec.filesystem("az", **options)
    data = bytes(range(256)) * 4000
    fs.pipe_file(f"{container}/p.bin", data)
    with open_source(f"az://{container}/p.bin", storage_options=options) as src:
        lookups: list[str] = []
        real = src.fs.info  # type: ignore[attr-defined]
        monkeypatch.setattr(src.fs, "info", lambda *a, **k: lookups.append("info") or real(*a, **k))
        for off in range(0, len(data), 100_000):
            assert src.read(off, min(100_000, len(data) - off)) == data[off : off + 100_000]
        assert lookups == []
        fs.pipe_file(f"{container}/p.bin", data[::-1])
        with pytest.raises(ObjectChangedError, match="changed"):
            src.read(0, 10)
