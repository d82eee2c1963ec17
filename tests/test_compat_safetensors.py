"""safetensors files and sharded checkpoints through our engine, bit-identical to ``safetensors.torch.load_file``."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hf_tensorizer import TensorDeserializer, read_index
from hf_tensorizer.errors import (
    ClosedError,
    FormatError,
    HeaderTooLargeError,
    SourceError,
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
    with pytest.raises(UnknownDtypeError):  # torch has no 6-bit float
        read_index(MemSource(raw_file({"a": {"dtype": "F6_E2M3", "shape": [4], "data_offsets": [0, 3]}}, bytes(3))))
    with pytest.raises(FormatError, match="even last dimension"):  # F4 counts 4-bit values: pairs make bytes
        read_index(MemSource(raw_file({"a": {"dtype": "F4", "shape": [3], "data_offsets": [0, 1]}}, bytes(1))))
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


# ---- reader parity with safetensors 0.8 (issue 23 item 3; safetensors' own suite: scripts/safetensors_suite.sh) ----


def test_every_safetensors_dtype_torch_reads(tmp_path: Path) -> None:
    """Every torch dtype safetensors writes (its own ``_SIZE`` table, so a dtype it adds shows up here) reads
    bit-identical to ``safe_open``, on the mapped and the streamed path, scalars and empty tensors included."""
    from safetensors import safe_open

    g = torch.Generator().manual_seed(1)
    dtypes = [dt for dt in st_torch._SIZE if dt is not None]
    assert len(dtypes) >= 20 and torch.float4_e2m1fn_x2 in dtypes and torch.float8_e8m0fnu in dtypes
    sd = {}
    for dt in dtypes:
        name = str(dt).removeprefix("torch.")
        if dt is torch.bool:
            sd[name] = torch.randint(0, 2, (3, 4), generator=g).bool()
        else:  # any bit pattern: NaNs and all, compared bitwise
            size = torch.empty((), dtype=dt).element_size()
            sd[name] = torch.randint(0, 256, (3, 4 * size), dtype=torch.uint8, generator=g).view(dt)
        if dt is not torch.float4_e2m1fn_x2:  # safetensors refuses a 0-d or empty F4 (its shape counts halves)
            sd[name + ".scalar"], sd[name + ".empty"] = sd[name][0, 0].clone(), sd[name][:0]
    path = tmp_path / "every.safetensors"
    st_torch.save_file(sd, str(path))
    with safe_open(str(path), "pt") as f:
        ref = {n: f.get_tensor(n) for n in f.keys()}  # noqa: SIM118 - a safe_open handle is not iterable
    assert ref.keys() == sd.keys()
    for strategy in ("mmap", "pread"):
        with TensorDeserializer(path, strategy=strategy) as d:
            for name in sd:
                assert same(d[name], ref[name]) and same(d[name], sd[name]), (name, strategy)
    assert read_index(path).tensors["float4_e2m1fn_x2"].shape == (3, 4)  # stored as [3, 8] values, as safe_open


def _slice_file(tmp_path: Path) -> Path:
    g = torch.Generator().manual_seed(2)
    path = tmp_path / "slices.safetensors"
    st_torch.save_file({"w": torch.randn(64, 48, generator=g), "b": torch.randn(5, generator=g).bfloat16(),
                        "cube": torch.randn(4, 6, 8, generator=g)}, str(path))  # fmt: skip
    return path


KEYS = [slice(3, 17), (slice(None), slice(5, 9)), (Ellipsis, 2), 7, (slice(None, None, 3),), (slice(-4, None),),
        (1, slice(2, 5), slice(None)), Ellipsis]  # fmt: skip


def test_get_slice_matches_safetensors_and_reads_only_the_box(tmp_path: Path) -> None:
    from safetensors import safe_open

    path = _slice_file(tmp_path)
    with safe_open(str(path), "pt") as ref, TensorDeserializer(path, lazy=True) as d:
        for name in ("w", "b", "cube"):
            ours, theirs = d.get_slice(name), ref.get_slice(name)
            assert ours.get_shape() == theirs.get_shape() and ours.get_dtype() == theirs.get_dtype()
            for key in KEYS:
                try:
                    want = theirs[key]
                except Exception:  # a key safetensors refuses for this rank
                    continue
                assert same(ours[key].contiguous(), want.contiguous()), (name, key)
        d.slice_metrics.bytes = d.slice_metrics.wanted = 0
        rows = d.get_slice("w")[10:12]
        assert rows.shape == (2, 48) and d.slice_metrics.bytes == 2 * 48 * 4  # two rows, not the tensor
        assert not d._tensors  # nothing was loaded whole
        with pytest.raises(KeyError):
            d.get_slice("missing")


def test_get_slice_follows_device_dtype_and_filter(tmp_path: Path) -> None:
    path = _slice_file(tmp_path)
    with TensorDeserializer(path, lazy=True, dtype=torch.float16, filter=["w"]) as d:
        part = d.get_slice("w")[:, :4]
        assert part.dtype == torch.float16 and part.device.type == "cpu"
        assert torch.equal(part, st_torch.load_file(str(path))["w"][:, :4].half())
        with pytest.raises(KeyError):
            d.get_slice("b")  # filtered out


def test_os_errors_are_the_os_subclasses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from hf_tensorizer.compat.safetensors import safe_open
    from hf_tensorizer.errors import source_error

    for opener in (TensorDeserializer, safe_open):
        with pytest.raises(FileNotFoundError) as missing:
            opener(tmp_path / "nope.safetensors")
        assert isinstance(missing.value, SourceError)
        with pytest.raises(IsADirectoryError) as folder:
            opener(tmp_path)
        assert isinstance(folder.value, SourceError)
    path = _slice_file(tmp_path)
    real_open = os.open
    monkeypatch.setattr(os, "open", lambda p, *a, **k: (_ for _ in ()).throw(PermissionError(13, "denied", p))
                        if os.fspath(p) == str(path) else real_open(p, *a, **k))  # fmt: skip
    with pytest.raises(PermissionError) as denied:
        TensorDeserializer(path)
    assert isinstance(denied.value, SourceError)
    plain = source_error("boom", OSError(5, "EIO"))
    assert type(plain) is SourceError and not isinstance(plain, FileNotFoundError)


def test_closed_handle_refuses_everything(tmp_path: Path) -> None:
    from hf_tensorizer.compat.safetensors import safe_open

    path = _slice_file(tmp_path)
    d = TensorDeserializer(path, lazy=True)
    kept, part = d["w"], d.get_slice("b")
    d.close()
    calls = [d.keys, lambda: len(d), lambda: list(d), lambda: "w" in d, lambda: d["w"], lambda: d["b"],
             lambda: d.metadata, lambda: d.get_slice("w"), lambda: part[:2]]  # fmt: skip
    for call in calls:
        with pytest.raises(ClosedError, match="closed"):
            call()
    assert kept.sum().isfinite()  # tensors taken before close stay valid
    with safe_open(path, "pt") as f:
        assert f.keys() == ["b", "cube", "w"]
    for call in (f.keys, lambda: f.get_tensor("w"), lambda: f.get_slice("w"), f.metadata):
        with pytest.raises(ClosedError):
            call()


def test_safe_open_surface(tmp_path: Path) -> None:
    from hf_tensorizer.compat import safetensors as ours

    path = _slice_file(tmp_path)
    ref = st_torch.load_file(str(path))
    from safetensors import safe_open

    with safe_open(str(path), "pt") as theirs:
        order = theirs.offset_keys()
    with ours.safe_open(path, framework="pt", device="cpu", backend="pread") as f:
        assert f.offset_keys() == order and f.metadata() is None
        assert all(same(f.get_tensor(n), ref[n]) for n in f.keys())  # noqa: SIM118 - a safe_open handle is not iterable
        assert list(f.get_tensors()) == f.offset_keys()
        with pytest.raises(KeyError):
            f.get_tensor("missing")
    loaded = ours.load(path.read_bytes())
    assert list(loaded) == order and all(same(loaded[n], ref[n]) for n in ref)
    assert all(same(t, ref[n]) for n, t in ours.load_file(path, backend="mmap").items())
    with pytest.raises(TensorizerError, match="framework"):
        ours.safe_open(path, framework="np")
    with pytest.raises(TensorizerError, match="backend"):
        ours.load_file(path, backend="io_uring")


@pytest.mark.parametrize("fmt", ["safetensors", "upstream"])
def test_other_formats_load_into_per_tensor_storages(tmp_path: Path, fmt: str) -> None:
    """Issue 23: safetensors and upstream tensorizer files too, on every CPU path (mapped, lazy, streamed) and through
    the safetensors-style readers: a small tensor's storage is its own bytes, so ``torch.save`` of it stays small."""
    import io

    from hf_tensorizer.compat import safetensors as ours

    sd = {"four": torch.arange(4.0), "big": torch.randn(512, 512)}
    path = tmp_path / ("m.safetensors" if fmt == "safetensors" else "m.tensors")
    if fmt == "safetensors":
        st_torch.save_file(sd, str(path))
    else:
        upstream = pytest.importorskip("tensorizer")
        s = upstream.TensorSerializer(str(path))
        s.write_state_dict(sd)
        s.close()
    got = []
    for kw in ({}, {"lazy": True}, {"strategy": "pread"}):
        with TensorDeserializer(path, **kw) as d:
            got.append(d["four"])
    got.append(ours.load_file(path)["four"])
    with ours.safe_open(path, "pt") as f:
        got += [f.get_tensor("four"), f.get_slice("big")[:1, :4]]
    for t in got:
        assert t.untyped_storage().nbytes() == t.numel() * 4
        buf = io.BytesIO()
        torch.save(t, buf)
        assert len(buf.getvalue()) < 2000
