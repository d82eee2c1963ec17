"""The format's pure functions: preamble, index, dtypes and layout, encoded and decoded without the engine."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import RecordingSource, index_doc, preamble_field, write_file

from hf_tensorizer import read_index
from hf_tensorizer.constants import DEFAULT_ALIGNMENT, SMALL_ALIGNMENT
from hf_tensorizer.engine.layout import LayoutItem, compute_layout
from hf_tensorizer.errors import FormatError, HeaderTooLargeError, UnknownDtypeError
from hf_tensorizer.format import (
    DTYPES,
    MAGIC,
    PREAMBLE_SIZE,
    VERSION,
    FileIndex,
    TensorEntry,
    TensorKind,
    decode_index,
    decode_preamble,
    dtype_from_name,
    dtype_name,
    element_size,
    encode_header,
)
from hf_tensorizer.format.dtypes import is_floating

pytestmark = pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental")
GiB = 1 << 30


def decode(header: bytes, file_size: int) -> FileIndex:
    pre = decode_preamble(header[:PREAMBLE_SIZE], file_size=file_size)
    return decode_index(pre, header[PREAMBLE_SIZE:])


def sample_items() -> list[LayoutItem]:
    return [
        LayoutItem("embed.weight", torch.bfloat16, (100, 64), TensorKind.PARAMETER),  # 12800 B: page-aligned
        LayoutItem("norm.running_mean", torch.float32, (64,), TensorKind.BUFFER),  # small: 64-aligned
        LayoutItem("scalar", torch.int64, ()),
        LayoutItem("empty", torch.float16, (0, 5)),
        LayoutItem("head.weight", torch.bfloat16, (100, 64), TensorKind.PARAMETER, alias="embed.weight"),
        LayoutItem("fp8", torch.float8_e4m3fn, (3, 3)),
        LayoutItem("odd", torch.uint8, (4097,)),
    ]


@pytest.mark.parametrize("digest", ["crc32", "sha256", "none"])
def test_header_round_trip(digest: str) -> None:
    idx = compute_layout(sample_items(), metadata={"k": "v", "ü": "✓"}, digest=digest, block_size=4096)
    header = encode_header(idx)
    assert len(header) == idx.data_offset
    assert header[:8] == MAGIC
    back = decode(header, idx.file_size)
    assert back.tensors == idx.tensors  # every field of every entry, order included
    assert list(back.tensors) == [it.name for it in sample_items()]
    assert back.metadata == {"k": "v", "ü": "✓"}
    assert (back.alignment, back.block_size, back.digest) == (DEFAULT_ALIGNMENT, 4096, digest)
    assert back.data_offset == idx.data_offset and back.file_size == idx.file_size
    assert back.preamble is not None and back.preamble.version == VERSION
    assert back.raw_index == header[PREAMBLE_SIZE : PREAMBLE_SIZE + back.preamble.index_length]
    if digest != "none":
        assert len(back.tensors["odd"].digests) == 2  # 4097 bytes in 4096-byte blocks
    assert back.tensors["head.weight"].alias == "embed.weight"


@pytest.mark.parametrize("alignment", [64, 4096, 1 << 16])
def test_layout_alignment_and_order(alignment: int) -> None:
    idx = compute_layout(sample_items(), alignment=alignment, block_size=max(4096, alignment))
    assert idx.data_offset % alignment == 0
    end = idx.data_offset
    for e in idx.data_entries:
        assert e.offset >= end  # file order, no overlap
        want = alignment if e.length >= alignment else min(SMALL_ALIGNMENT, alignment)
        assert e.offset % want == 0, (e.name, e.offset)
        end = e.offset + e.length
    assert idx.file_size == end
    assert idx.data_bytes == sum(e.length for e in idx.data_entries)


def test_layout_rejects_bad_parameters() -> None:
    with pytest.raises(ValueError):
        compute_layout(sample_items(), alignment=3000)
    with pytest.raises(ValueError):
        compute_layout(sample_items(), block_size=1000)


def test_layout_grows_data_offset_for_large_indexes() -> None:
    items = [LayoutItem(f"layer.{i}." + "x" * 80, torch.float32, (2,)) for i in range(2000)]
    idx = compute_layout(items)
    header = encode_header(idx)
    assert len(header) == idx.data_offset > 2000 * 80
    assert len(decode(header, idx.file_size).tensors) == 2000


def test_encode_header_refuses_index_past_data_offset() -> None:
    idx = compute_layout(sample_items())
    idx.data_offset = PREAMBLE_SIZE + 10
    with pytest.raises(FormatError, match="does not fit"):
        encode_header(idx)


def test_dtype_names_round_trip() -> None:
    for name, dt in DTYPES.items():
        assert dtype_name(dt) == name
        assert dtype_from_name(name) is dt
        assert element_size(dt) == torch.empty(0, dtype=dt).element_size()
    assert element_size(torch.float4_e2m1fn_x2) == 1  # two packed values per stored byte element
    for bad in ("float128", "torch.float32", "", None, 3, ["float32"]):
        with pytest.raises(UnknownDtypeError):
            dtype_from_name(bad)  # type: ignore[arg-type]
    with pytest.raises(UnknownDtypeError, match="cannot be stored"):
        dtype_name(torch.qint8)


def test_is_floating() -> None:
    floats = {n for n, dt in DTYPES.items() if is_floating(dt)}
    assert floats == {
        "float64", "float32", "float16", "bfloat16",
        "float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz",
    }  # fmt: skip


def test_over_4gib_synthetic_header() -> None:
    """Sizes and offsets past 2**32 survive encoding; no tensor memory is ever allocated."""
    items = [
        LayoutItem("small", torch.float32, (4,)),
        LayoutItem("huge", torch.uint8, (5 * GiB,)),
        LayoutItem("huge2d", torch.bfloat16, (3 * (1 << 15), 1 << 15)),  # 6 GiB, rows x cols
        LayoutItem("after", torch.int8, (3,)),
    ]
    idx = compute_layout(items, digest="crc32")
    back = decode(encode_header(idx), idx.file_size)
    huge = back.tensors["huge"]
    assert huge.length == 5 * GiB and huge.shape == (5 * GiB,)
    assert len(huge.digests) == 5 * GiB // idx.block_size
    assert back.tensors["huge2d"].length == 6 * GiB
    assert back.tensors["after"].offset > 11 * GiB
    assert back.file_size > 11 * GiB

    # an entry at a very large offset, written by hand
    big_off = 1 << 40
    manual = FileIndex(
        tensors={"far": TensorEntry("far", torch.uint8, (5 * GiB,), offset=big_off, length=5 * GiB)},
        digest="none", data_offset=4096, file_size=big_off + 5 * GiB,
    )  # fmt: skip
    back = decode(encode_header(manual), manual.file_size)
    assert back.tensors["far"].offset == big_off and back.tensors["far"].length == 5 * GiB
    manual.file_size -= 1  # one byte short: the entry now runs past the recorded end
    with pytest.raises(FormatError, match="past the file end"):
        decode(encode_header(manual), manual.file_size)


def test_header_too_large_cap() -> None:
    idx = compute_layout(sample_items())
    header = encode_header(idx)
    ilen = preamble_field(header, "index_length")
    with pytest.raises(HeaderTooLargeError, match="exceeds the cap"):
        decode_preamble(header, max_index_bytes=ilen - 1)
    decode_preamble(header, max_index_bytes=ilen)


def test_index_read_with_one_small_request(tmp_path: Path) -> None:
    write_file(tmp_path / "s", {f"t{i}": torch.zeros(3) for i in range(20)})
    with RecordingSource(tmp_path / "s") as src:
        idx = read_index(src)
        assert len(idx.tensors) == 20
        assert len(src.ranges) == 1 and src.ranges[0][0] == 0 and src.ranges[0][1] <= 64 << 10


def test_large_index_read_with_two_requests(tmp_path: Path) -> None:
    tensors = {f"model.layers.{i}.some_long_module_name.weight": torch.zeros(1) for i in range(2000)}
    write_file(tmp_path / "l", tensors)
    with RecordingSource(tmp_path / "l") as src:
        idx = read_index(src)
        assert list(idx.tensors) == list(tensors)
        assert len(src.ranges) == 2
        assert preamble_field((tmp_path / "l").read_bytes()[:PREAMBLE_SIZE], "index_length") > 64 << 10


def test_index_json_is_compact_utf8(tmp_path: Path) -> None:
    write_file(tmp_path / "j", {"ünï": torch.zeros(1)}, metadata={"a": "b"})
    data = (tmp_path / "j").read_bytes()
    doc = index_doc(data)
    assert set(doc) >= {"alignment", "block_size", "digest", "metadata", "tensors"}
    entry = doc["tensors"][0]
    assert entry["name"] == "ünï" and entry["dtype"] == "float32" and entry["shape"] == [1]
    assert entry["kind"] == "plain" and entry["length"] == 4 and len(entry["digests"]) == 1
    raw = data[PREAMBLE_SIZE : PREAMBLE_SIZE + preamble_field(data, "index_length")]
    assert raw == json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()
