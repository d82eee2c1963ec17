"""safetensors files and sharded checkpoints through our engine, bit-identical to ``safetensors.torch.load_file``."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hf_tensorizer import TensorDeserializer, read_index
from hf_tensorizer.errors import (
    FormatError,
    HeaderTooLargeError,
    TensorizerError,
    TruncatedFileError,
    UnknownDtypeError,
)
from hf_tensorizer.integrations.loading.weights import (
    iter_safetensors_indexes,
    load_safetensors_state_dict,
    safetensors_shards,
)
from hf_tensorizer.sources import Source

st_torch = pytest.importorskip("safetensors.torch")


class MemSource(Source):
    def __init__(self, data: bytes) -> None:
        self.data, self.size, self.uri = bytes(data), len(data), "memory://safetensors"

    def read_into(self, offset: int, buf: memoryview) -> None:
        if offset < 0 or offset + len(buf) > self.size:
            raise TruncatedFileError(f"read [{offset}, {offset + len(buf)}) past {self.size}")
        buf[:] = self.data[offset : offset + len(buf)]


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return a.numel() == 0 or torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def sample() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "f32": torch.randn(3, 5, generator=g),
        "f16": torch.randn(7, generator=g).half(),
        "bf16": torch.randn(4, 9, generator=g).bfloat16(),
        "f64": torch.randn(2, generator=g).double(),
        "e4m3": torch.randn(6, generator=g).to(torch.float8_e4m3fn),
        "e5m2": torch.randn(6, generator=g).to(torch.float8_e5m2),
        "i8": torch.randint(-9, 9, (5,), dtype=torch.int8, generator=g),
        "i16": torch.randint(-9, 9, (5,), dtype=torch.int16, generator=g),
        "i64": torch.arange(11),
        "u8": torch.randint(0, 255, (13,), dtype=torch.uint8, generator=g),
        "bool": torch.rand(9, generator=g) > 0.5,
        "c64": torch.randn(3, dtype=torch.complex64, generator=g),
        "scalar": torch.tensor(2.5),
        "empty": torch.empty(0, 3),
        "big": torch.randn(300_001, generator=g),
    }


def test_single_file_bit_identical(tmp_path: Path) -> None:
    sd = sample()
    path = tmp_path / "model.safetensors"
    st_torch.save_file(sd, str(path), metadata={"format": "pt", "note": "x"})
    ref = st_torch.load_file(str(path))
    for kw in ({}, {"chunk_bytes": 4096, "num_readers": 3}, {"strategy": "odirect"}, {"mmap": True}):
        with TensorDeserializer(path, **kw) as d:
            assert d.metadata == {"format": "pt", "note": "x"}
            assert set(d) == set(sd)
            for name in sd:
                assert same(d[name], ref[name]) and same(d[name], sd[name]), (name, kw)
    d = TensorDeserializer(MemSource(path.read_bytes()), filter=lambda n: n.startswith("f"), dtype=torch.float16)
    assert sorted(d) == ["f16", "f32", "f64"] and d["f32"].dtype == torch.float16


def test_sharded_directory(tmp_path: Path) -> None:
    hub = pytest.importorskip("huggingface_hub")
    sd = {f"layer.{i}.w": torch.randn(64, 64) for i in range(4)}
    hub.save_torch_state_dict(sd, tmp_path, max_shard_size=40_000)
    files, weight_map = safetensors_shards(tmp_path)
    assert len(files) >= 2 and set(weight_map) == set(sd)
    ref: dict[str, torch.Tensor] = {}
    for f in files:
        ref.update(st_torch.load_file(f))
    got = load_safetensors_state_dict(tmp_path, num_readers=2)
    assert list(got) == list(ref) and all(same(got[k], ref[k]) for k in ref)
    by_uri = load_safetensors_state_dict(tmp_path.as_uri())  # the folder as a file:// URI
    assert list(by_uri) == list(ref) and all(same(by_uri[k], ref[k]) for k in ref)
    assert [len(i.tensors) for _, i in iter_safetensors_indexes(tmp_path)] == [
        len(st_torch.load_file(f)) for f in files
    ]
    assert set(load_safetensors_state_dict(tmp_path / "model.safetensors.index.json", filter=lambda n: "1" in n)) == {
        "layer.1.w"
    }
    # a shard index that promises a tensor its shard does not hold, or points outside the checkpoint
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    index["weight_map"]["ghost"] = Path(files[0]).name
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(FormatError, match="ghost"):
        load_safetensors_state_dict(tmp_path)
    index["weight_map"]["ghost"] = "../elsewhere.safetensors"
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(FormatError, match="invalid shard"):
        safetensors_shards(tmp_path)


def test_tiny_gpt2_logits_identical(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(vocab_size=80, n_positions=32, n_embd=32, n_layer=2, n_head=4)
    torch.manual_seed(0)
    ref = transformers.GPT2LMHeadModel(cfg).eval()
    ref.save_pretrained(tmp_path, max_shard_size="40KB")  # sharded safetensors, tied lm_head not stored
    torch.manual_seed(9)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    sd = load_safetensors_state_dict(tmp_path)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    model.tie_weights()
    ids = torch.randint(0, 80, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)


def raw_file(header: object, data: bytes = b"", *, length: int | None = None) -> bytes:
    h = json.dumps(header).encode() if not isinstance(header, bytes) else header
    return struct.pack("<Q", len(h) if length is None else length) + h + data


def test_rejects_bad_headers() -> None:
    ok = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}
    assert list(read_index(MemSource(raw_file(ok, bytes(8)))).tensors) == ["a"]
    with pytest.raises(TruncatedFileError):
        read_index(MemSource(raw_file(ok, bytes(4))))
    with pytest.raises(HeaderTooLargeError):
        read_index(MemSource(raw_file(ok, bytes(8), length=1 << 40)))
    with pytest.raises(UnknownDtypeError):
        read_index(MemSource(raw_file({"a": {"dtype": "F4", "shape": [2], "data_offsets": [0, 1]}}, bytes(8))))
    with pytest.raises(FormatError, match="bytes for shape"):
        read_index(MemSource(raw_file({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, bytes(12))))
    two = {**ok, "b": {"dtype": "U8", "shape": [4], "data_offsets": [4, 8]}}
    with pytest.raises(FormatError, match="overlaps"):
        read_index(MemSource(raw_file(two, bytes(8))))
    with pytest.raises(FormatError, match="duplicate"):
        read_index(MemSource(raw_file(b'{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"a":{}}', b"x")))
    with pytest.raises(FormatError):
        read_index(MemSource(raw_file({"__metadata__": {"k": 1}})))


def _load_or_typed_error(raw: bytes) -> None:
    try:
        with TensorDeserializer(MemSource(raw)) as d:
            for n in d:
                d[n]
    except TensorizerError:
        pass


@pytest.fixture(scope="module")
def seed_file() -> bytes:
    sd = {"a": torch.randn(3, 2), "b": torch.arange(4, dtype=torch.int16), "c": torch.randn(2).bfloat16()}
    return st_torch.save(sd, metadata={"m": "v"})


@settings(max_examples=250, deadline=None)
@given(data=st.data())
def test_fuzz_mutations(seed_file: bytes, data: st.DataObject) -> None:
    raw = bytearray(seed_file)
    for _ in range(data.draw(st.integers(1, 4))):
        raw[data.draw(st.integers(0, len(raw) - 1))] ^= 1 << data.draw(st.integers(0, 7))
    if data.draw(st.booleans()):
        raw = raw[: data.draw(st.integers(0, len(raw)))]
    _load_or_typed_error(bytes(raw))


json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.text(max_size=6))
entry = st.fixed_dictionaries(
    {"dtype": st.sampled_from(["F32", "U8", "BF16", "BOOL", "X"]),
     "shape": st.lists(st.integers(-1, 2**64), max_size=4),
     "data_offsets": st.lists(st.integers(-1, 64), min_size=0, max_size=3)}
)  # fmt: skip


@settings(max_examples=200, deadline=None)
@given(header=st.dictionaries(st.text(max_size=5), st.one_of(entry, json_scalars), max_size=4),
       data=st.binary(max_size=64))  # fmt: skip
def test_fuzz_random_headers(header: dict, data: bytes) -> None:
    _load_or_typed_error(raw_file(header, data))
