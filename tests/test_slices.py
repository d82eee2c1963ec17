"""Box reads of one tensor (engine/slices.py): only the box's bytes, exact values, encrypted and verified files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import assert_same, random_tensor, write_file

from hf_tensorizer import read_index
from hf_tensorizer.crypto import EncryptionKey
from hf_tensorizer.engine.decrypt import choose_transform
from hf_tensorizer.engine.pipeline import Verifier
from hf_tensorizer.engine.slices import SliceMetrics, TensorSlice, box_segments, coalesce, normalize_box
from hf_tensorizer.errors import HashMismatchError
from hf_tensorizer.sources import open_source

TENSORS = {
    "w": random_tensor(torch.bfloat16, (40, 24), seed=1),
    "e": random_tensor(torch.float32, (4, 12, 10), seed=2),
    "b": random_tensor(torch.float16, (33,), seed=3),
    "s": torch.tensor(3.5),
    "i": torch.arange(60, dtype=torch.int64).reshape(6, 10),
}
KEYS = [
    ...,
    (slice(0, 20), slice(0, 24)),
    (slice(20, 40), slice(None)),
    (slice(None), slice(0, 12)),
    (slice(None), slice(12, 24)),
    (slice(5, 9), slice(3, 7)),
    (slice(0, 0), slice(None)),
    (1, slice(2, 5)),
    (slice(None), slice(None, None, 2)),  # a step: whole tensor read, indexed in memory
    (slice(-5, None),),
]


def test_box_segments_are_rows_or_one_range() -> None:
    assert box_segments((8, 4), 2, [(2, 6), (0, 4)]) == [(16, 32)]  # dim 0 only: one range
    assert box_segments((8, 4), 2, [(0, 8), (0, 2)]) == [(i * 8, 4) for i in range(8)]  # one segment per row
    assert box_segments((2, 3, 4), 1, [(0, 2), (1, 3), (0, 4)]) == [(4, 8), (16, 8)]
    assert box_segments((3,), 4, [(1, 1)]) == []
    assert box_segments((), 4, []) == [(0, 4)]


def test_coalesce_reads_small_gaps_only() -> None:
    segs = [(0, 4), (8, 4), (100, 4)]
    assert [(r.start, r.end) for r in coalesce(segs, 0)] == [(0, 4), (8, 12), (100, 104)]
    assert [(r.start, r.end) for r in coalesce(segs, 4)] == [(0, 12), (100, 104)]
    assert [r.parts for r in coalesce(segs, 4)] == [[(0, 4, 0), (8, 4, 4)], [(100, 4, 8)]]


def test_normalize_box() -> None:
    assert normalize_box((4, 5), ...) == ([(0, 4), (0, 5)], [])
    assert normalize_box((4, 5), (1, ...)) == ([(1, 2), (0, 5)], [0])
    assert normalize_box((4, 5), (slice(None), slice(0, 5, 2))) is None
    with pytest.raises(IndexError):
        normalize_box((4, 5), (7,))


def _slices(path: Path, **kw: object) -> tuple[dict[str, TensorSlice], SliceMetrics]:
    src = open_source(path)
    index = read_index(src)
    metrics = SliceMetrics()
    transform = choose_transform(index, kw.pop("encryption", None), None, str(path))
    verifier = Verifier(index) if kw.pop("verify", False) else None
    out = {n: TensorSlice(src, index, n, metrics, transform=transform, verifier=verifier) for n in index.tensors}
    return out, metrics


@pytest.mark.parametrize("mode", ["plain", "verify", "encrypted"])
def test_slices_match_indexing_and_read_only_the_box(tmp_path: Path, mode: str) -> None:
    key = EncryptionKey.generate()
    kw = {"encryption": key} if mode == "encrypted" else {}
    write_file(tmp_path / "f.tensors", TENSORS, block_size=4096, **kw)
    slices, metrics = _slices(tmp_path / "f.tensors", verify=mode == "verify", **kw)
    assert slices["w"].get_shape() == [40, 24] and slices["w"].get_dtype() == "BF16"
    for name in ("w", "i"):
        for k in KEYS:
            assert_same(slices[name][k], TENSORS[name][k], f"{name}[{k}]")
    assert_same(slices["e"][:, 3:9, 2:5], TENSORS["e"][:, 3:9, 2:5])
    assert_same(slices["s"][...], TENSORS["s"])
    assert_same(slices["b"][10:20], TENSORS["b"][10:20])
    if mode == "plain":
        metrics.bytes = metrics.wanted = 0
        slices["w"][:, 0:12]
        assert metrics.bytes == metrics.wanted == 40 * 12 * 2  # exact: no over-read without a gap allowance
    else:  # whole blocks: bounded over-read
        assert metrics.bytes >= metrics.wanted


def test_slice_detects_corruption(tmp_path: Path) -> None:
    index = write_file(tmp_path / "f.tensors", TENSORS, block_size=4096)
    data = bytearray((tmp_path / "f.tensors").read_bytes())
    data[index.tensors["w"].offset + 5] ^= 0xFF
    (tmp_path / "f.tensors").write_bytes(bytes(data))
    slices, _ = _slices(tmp_path / "f.tensors", verify=True)
    with pytest.raises(HashMismatchError):
        slices["w"][0:2]


def test_coalesce_cuts_long_segments() -> None:
    reqs = coalesce([(0, 10), (10, 25)], 0, max_request=8)
    assert all(r.end - r.start <= 8 for r in reqs)
    assert (reqs[0].start, reqs[0].end, reqs[-1].end) == (0, 8, 35)
    assert sum(length for r in reqs for _, length, _ in r.parts) == 35
