"""Scale: 50,000 tensors in one file, and a > 4 GiB file (sparse on disk, never in RAM)."""

from __future__ import annotations

import os
import time
import zlib
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from helpers import RecordingSource, assert_same, preamble_field, random_tensor, write_file

from hf_tensorizer import TensorDeserializer, read_index
from hf_tensorizer.engine.layout import LayoutItem, compute_layout
from hf_tensorizer.format import PREAMBLE_SIZE, encode_header
from hf_tensorizer.sources import FileSource

GiB = 1 << 30
N = 50_000


def test_fifty_thousand_tensors(tmp_path: Path, record_property) -> None:  # type: ignore[no-untyped-def]
    dtypes = (torch.float32, torch.int64, torch.bfloat16, torch.uint8)
    tensors = {f"model.layers.{i // 10}.block{i % 10}.weight": random_tensor(dtypes[i % 4], (i % 3 + 1,), i)
               for i in range(N)}  # fmt: skip
    path = tmp_path / "many.tensors"
    t0 = time.perf_counter()
    write_file(path, tensors)
    t_write = time.perf_counter() - t0

    data_head = path.read_bytes()[:PREAMBLE_SIZE]
    index_bytes = preamble_field(data_head, "index_length")
    assert index_bytes < 200 * N  # about 130 bytes of JSON per tiny tensor: no per-tensor bloat
    assert path.stat().st_size < index_bytes + 200 * N  # small tensors pack at 64 bytes, not a page each

    with RecordingSource(path) as src:
        t0 = time.perf_counter()
        idx = read_index(src)
        t_index = time.perf_counter() - t0
        assert len(idx.tensors) == N and list(idx.tensors) == list(tensors)
        assert len(src.ranges) == 2  # the preamble request, then the rest of the large index

    t0 = time.perf_counter()
    with TensorDeserializer(path, verify_hash=True) as d:
        t_load = time.perf_counter() - t0
        assert len(d) == N
        assert d.metrics.tensors == N
        t0 = time.perf_counter()
        for name, t in d.items():
            assert_same(t, tensors[name], name)
        t_access = time.perf_counter() - t0
    last = list(tensors)[-1]
    with TensorDeserializer(path, filter=[last], lazy=True) as d:
        assert_same(d[last], tensors[last])
    for key, value in {"write_s": t_write, "index_s": t_index, "load_s": t_load, "access_s": t_access,
                       "index_bytes": index_bytes, "file_bytes": path.stat().st_size}.items():  # fmt: skip
        record_property(key, value)  # reported in junit XML, never asserted


@pytest.fixture(scope="module")
def sparse_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A valid 11+ GiB file whose two huge tensors are holes; only the small tensors are written."""
    small = {"small": random_tensor(torch.float32, (4,), 1), "tail": random_tensor(torch.int16, (3,), 2)}
    items = [
        LayoutItem("small", torch.float32, (4,)),
        LayoutItem("big", torch.uint8, (5 * GiB,)),
        LayoutItem("big2d", torch.bfloat16, (3 << 15, 1 << 15)),  # 6 GiB
        LayoutItem("tail", torch.int16, (3,)),
    ]
    idx = compute_layout(items, digest="crc32")
    for name, t in small.items():  # real digests for the tensors that are really there
        raw = t.numpy().tobytes()
        idx.tensors[name] = replace(idx.tensors[name], digests=(f"{zlib.crc32(raw) & 0xFFFFFFFF:08x}",))
    path = tmp_path_factory.mktemp("sparse") / "big.tensors"
    with open(path, "wb") as f:
        f.write(encode_header(idx))
        for name, t in small.items():
            f.seek(idx.tensors[name].offset)
            f.write(t.numpy().tobytes())
        f.truncate(idx.file_size)
    if os.stat(path).st_blocks * 512 > 64 << 20:
        path.unlink()
        pytest.skip("this filesystem does not keep sparse files sparse")
    return path, small


def test_sparse_file_index(sparse_file: tuple[Path, dict[str, torch.Tensor]]) -> None:
    path, _ = sparse_file
    assert path.stat().st_size > 11 * GiB
    with FileSource(path) as src:
        idx = read_index(src)
    assert idx.tensors["big"].length == 5 * GiB and idx.tensors["big"].shape == (5 * GiB,)
    assert idx.tensors["big2d"].length == 6 * GiB
    assert idx.tensors["tail"].offset > 11 * GiB > 2**32
    assert idx.file_size == path.stat().st_size


@pytest.mark.parametrize(
    "mode",
    [{"lazy": True}, {}, {"strategy": "odirect"}, {"num_readers": 4, "chunk_bytes": 4096}],
    ids=["lazy", "default", "odirect", "readers4"],
)
def test_sparse_file_filtered_load(sparse_file: tuple[Path, dict[str, torch.Tensor]], mode: dict) -> None:
    path, small = sparse_file
    with RecordingSource(path) as src, TensorDeserializer(src, filter=list(small), verify_hash=True, **mode) as d:
        for name, t in small.items():
            assert_same(d[name], t, name)
        assert "big" not in d
        assert d.metrics.bytes == sum(t.numel() * t.element_size() for t in small.values())
        assert sum(n for _, n in src.ranges) < 1 << 20  # the holes are never read
