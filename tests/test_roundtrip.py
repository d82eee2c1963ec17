"""Round trips through real files: every dtype, odd shapes and layouts, every deserializer mode."""

from __future__ import annotations

import gc
import math
from pathlib import Path

import pytest
import torch
from helpers import (
    BytesSource,
    RecordingSource,
    assert_same,
    assert_same_dict,
    flip_byte,
    random_tensor,
    tensor_bytes,
    write_file,
)

from hf_tensorizer import TensorDeserializer, TensorKind, TensorSerializer, load_state_dict, read_index
from hf_tensorizer.engine.plan import MAX_GAP
from hf_tensorizer.errors import HashMismatchError, TensorizerError, UsageError
from hf_tensorizer.format.dtypes import DTYPES, is_floating
from hf_tensorizer.sources import FileSource

pytestmark = pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental")
BLOCK = 4096  # small digest blocks: large tensors get several digests each

MODES: dict[str, dict] = {
    "default": {},
    "verify_hash": {"verify_hash": True},
    "lazy": {"lazy": True},
    "lazy_verify": {"lazy": True, "verify_hash": True},
    "mmap": {"mmap": True},
    "mmap_verify": {"mmap": True, "verify_hash": True},
    "pread": {"strategy": "pread", "num_readers": 2},
    "lazy_pread": {"lazy": True, "strategy": "pread"},
    "pread_verify": {"strategy": "pread", "verify_hash": True, "num_readers": 3},
    "odirect": {"strategy": "odirect"},
    "odirect_verify": {"strategy": "odirect", "verify_hash": True, "num_readers": 3},
    "odirect_small_chunks": {"strategy": "odirect", "chunk_bytes": 3 * 4096, "num_readers": 4},
    "small_chunks": {"chunk_bytes": 1000, "num_readers": 3},
    **{f"readers{n}": {"num_readers": n, "chunk_bytes": 8192} for n in (1, 2, 3, 4)},
}


def all_dtype_tensors() -> dict[str, torch.Tensor]:
    """Every stored dtype in many shapes, with random bytes (NaN payloads included) and odd layouts."""
    out: dict[str, torch.Tensor] = {}
    for i, (name, dt) in enumerate(DTYPES.items()):
        seed = 100 * i
        out[f"{name}.scalar"] = random_tensor(dt, (), seed)
        if name != "float4_e2m1fn_x2":  # see test_empty_fp4_round_trip
            out[f"{name}.empty"] = random_tensor(dt, (0,), seed + 1)
            out[f"{name}.zeros_in_shape"] = random_tensor(dt, (3, 0, 2), seed + 2)
        out[f"{name}.vec"] = random_tensor(dt, (7,), seed + 3)
        out[f"{name}.mat"] = random_tensor(dt, (5, 33), seed + 4)
        out[f"{name}.big"] = random_tensor(dt, (5000,), seed + 5)  # > 4 KiB: page-aligned, several blocks
        out[f"{name}.transposed"] = random_tensor(dt, (6, 4), seed + 6).t()
        out[f"{name}.strided"] = random_tensor(dt, (4, 10), seed + 7)[1:, ::3]
        out[f"{name}.expanded"] = random_tensor(dt, (1, 5), seed + 8).expand(4, 5)  # stride 0
    return out


@pytest.fixture(scope="module")
def dtype_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    tensors = all_dtype_tensors()
    path = tmp_path_factory.mktemp("rt") / "dtypes.tensors"
    write_file(path, tensors, block_size=BLOCK, metadata={"note": "every dtype"})
    return path, tensors


@pytest.mark.parametrize("mode", list(MODES))
def test_every_dtype_every_mode(dtype_file: tuple[Path, dict[str, torch.Tensor]], mode: str) -> None:
    path, tensors = dtype_file
    with TensorDeserializer(path, **MODES[mode]) as d:
        assert list(d) == list(tensors)
        assert len(d) == len(tensors)
        for name, expected in tensors.items():
            assert_same(d[name], expected, name)
            assert d[name].device.type == "cpu"
            assert d.kind(name) == TensorKind.PLAIN
        assert d.metadata == {"note": "every dtype"}
        if "odirect" in mode and d.metrics.strategy == "odirect":
            assert d.metrics.staging_peak_bytes > 0  # on CPU, odirect reads go through the staging pool


def test_all_torch_dtypes_with_storage_are_listed() -> None:
    wanted = ["float64", "float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2",
              "float8_e5m2fnuz", "float8_e8m0fnu", "float4_e2m1fn_x2", "int8", "int16", "int32", "int64",
              "uint8", "uint16", "uint32", "uint64", "bool", "complex64", "complex128"]  # fmt: skip
    for name in wanted:
        if hasattr(torch, name):
            assert DTYPES[name] is getattr(torch, name)


@pytest.mark.parametrize("mode", ["default", "mmap", "pread", "odirect", "lazy", "lazy_pread"])
def test_returned_tensors_own_their_memory(dtype_file: tuple[Path, dict[str, torch.Tensor]], mode: str) -> None:
    path, tensors = dtype_file
    with TensorDeserializer(path, **MODES[mode]) as d:
        loaded = {n: d[n] for n in d}
    # on CPU a plain local file is mapped by default; the copying strategies must return tensors of their own
    mapped = d.metrics.strategy == "mmap"
    assert mapped == (mode in ("default", "mmap", "lazy"))
    seen: dict[int, str] = {}
    for name, t in loaded.items():
        if t.numel() == 0:
            continue
        if not mapped:  # a mapped tensor is a view of the private file mapping, by design
            storage = t.untyped_storage()
            assert storage.nbytes() == t.numel() * t.element_size(), f"{name} is a view of a larger buffer"
        ptr = t.data_ptr()
        assert ptr not in seen, f"{name} shares memory with {seen.get(ptr)}"
        seen[ptr] = name
    # writing into one tensor changes no other (and never the file)
    victim = loaded["uint8.big"]
    victim.fill_(0)
    for name, t in loaded.items():
        if name != "uint8.big":
            assert_same(t, tensors[name], name)
    gc.collect()
    assert_same(load_state_dict(path)["uint8.big"], tensors["uint8.big"])


def test_mmap_tensors_survive_close(dtype_file: tuple[Path, dict[str, torch.Tensor]]) -> None:
    path, tensors = dtype_file
    d = TensorDeserializer(path, mmap=True)
    loaded = dict(d)
    d.close()
    del d
    gc.collect()
    for name in ("float32.big", "complex128.mat", "bool.vec"):
        assert_same(loaded[name], tensors[name], name)


@pytest.mark.parametrize("target", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("mode", ["default", "mmap", "lazy"])
def test_dtype_casts_floats_only(dtype_file: tuple[Path, dict[str, torch.Tensor]], target: torch.dtype, mode: str):
    path, tensors = dtype_file
    untouched = {"int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "bool",
                 "complex32", "complex64", "complex128", "float4_e2m1fn_x2", "float8_e8m0fnu"}  # fmt: skip
    with TensorDeserializer(path, dtype=target, **MODES[mode]) as d:
        for name, orig in tensors.items():
            dname = name.split(".")[0]
            got = d[name]
            if dname in untouched:
                assert not is_floating(orig.dtype)
                assert_same(got, orig, name)
            else:
                assert is_floating(orig.dtype)
                assert_same(got, orig.to(target), name)


@pytest.mark.parametrize("mode", ["default", "lazy", "mmap", "odirect", "verify_hash"])
def test_tied_weights_stored_once_loaded_as_one(tmp_path: Path, mode: str) -> None:
    w = random_tensor(torch.float32, (64, 64), 1)  # 16 KiB
    other = random_tensor(torch.float32, (64, 64), 2)
    tied = write_file(tmp_path / "tied", {"embed": w, "head": w, "other": other})
    untied = write_file(tmp_path / "untied", {"embed": w, "head": w.clone(), "other": other})
    size_tied = (tmp_path / "tied").stat().st_size
    size_untied = (tmp_path / "untied").stat().st_size
    assert size_untied - size_tied >= w.numel() * 4
    assert tied.tensors["head"].alias == "embed" and untied.tensors["head"].alias is None
    with TensorDeserializer(tmp_path / "tied", **MODES[mode]) as d:
        head = d["head"]  # lazy: the alias first, it must bring its target
        assert head is d["embed"]
        assert_same(head, w)
        assert_same(d["other"], other)
    with TensorDeserializer(tmp_path / "untied", **MODES[mode]) as d:
        assert d["head"] is not d["embed"]


def test_metadata_round_trip(tmp_path: Path) -> None:
    meta = {"format": "pt", "ünïcode ✓": 'välue\n"quoted"', "empty": "", "json": '{"a": [1, 2]}'}
    write_file(tmp_path / "m", {"x": torch.ones(2)}, metadata=meta)
    with TensorDeserializer(tmp_path / "m") as d:
        assert d.metadata == meta
    with FileSource(tmp_path / "m") as src:
        assert read_index(src).metadata == meta


def test_lazy_loads_on_first_access_only(tmp_path: Path) -> None:
    tensors = {f"t{i}": random_tensor(torch.float32, (2048,), i) for i in range(4)}  # 8 KiB each, 2 blocks
    idx = write_file(tmp_path / "lazy", tensors, block_size=BLOCK)
    d = TensorDeserializer(tmp_path / "lazy", lazy=True, verify_hash=True)
    assert d.metrics.tensors == 0 and d.metrics.bytes == 0
    # corrupt t2 and t3 after opening: a lazy load has not read them yet, so t0 and t1 still load fine
    for name in ("t2", "t3"):
        flip_byte(tmp_path / "lazy", idx.tensors[name].offset + 5000)
    assert_same(d["t0"], tensors["t0"])
    assert d.metrics.tensors == 1 and d.metrics.bytes == 8192
    assert_same(d["t1"], tensors["t1"])
    assert_same(d["t0"], tensors["t0"])  # a second access does not reload
    assert d.metrics.tensors == 2
    with pytest.raises(HashMismatchError) as err:
        d["t2"]
    assert err.value.tensors == ["t2"] and "t2" in str(err.value)
    d.close()


@pytest.mark.parametrize("as_callable", [True, False])
def test_filter_never_reads_unselected(tmp_path: Path, as_callable: bool) -> None:
    big = 4 * MAX_GAP  # unselected tensors larger than a coalescing gap must never be read
    tensors = {
        "keep.a": random_tensor(torch.float32, (1000,), 1),
        "skip.big1": random_tensor(torch.uint8, (big,), 2),
        "keep.b": random_tensor(torch.bfloat16, (3000,), 3),
        "skip.big2": random_tensor(torch.uint8, (big,), 4),
        "keep.c": random_tensor(torch.int64, (10,), 5),
        "skip.small": random_tensor(torch.uint8, (100,), 6),
    }
    idx = write_file(tmp_path / "f", tensors, block_size=BLOCK)
    for name, e in idx.tensors.items():  # corrupt every unselected tensor's data region
        if name.startswith("skip"):
            for off in range(e.offset, e.offset + e.length, 997):
                flip_byte(tmp_path / "f", off)
    keep = [n for n in tensors if n.startswith("keep")]
    filt = (lambda n: n.startswith("keep.")) if as_callable else iter(keep)
    src = RecordingSource(tmp_path / "f")
    with TensorDeserializer(src, filter=filt, verify_hash=True, chunk_bytes=8192) as d:
        assert list(d) == keep and len(d) == 3
        assert "skip.big1" not in d
        with pytest.raises(KeyError):
            d["skip.big1"]
        for n in keep:
            assert_same(d[n], tensors[n], n)
    for name in ("skip.big1", "skip.big2"):
        e = idx.tensors[name]
        assert src.bytes_read_in(e.offset, e.offset + e.length, data_offset=idx.data_offset) == 0, name
    e = idx.tensors["skip.small"]  # a small unselected tensor may only be read as part of a short gap
    assert src.bytes_read_in(e.offset, e.offset + e.length, data_offset=idx.data_offset) <= MAX_GAP
    src.close()


def test_filter_selecting_an_alias_loads_its_target(tmp_path: Path) -> None:
    w = random_tensor(torch.float16, (10, 10), 1)
    write_file(tmp_path / "a", {"wte": w, "lm_head": w, "x": torch.ones(3)})
    with TensorDeserializer(tmp_path / "a", filter=["lm_head"]) as d:
        assert list(d) == ["lm_head"]
        assert_same(d["lm_head"], w)
        assert "wte" not in d


def test_small_chunks_split_large_tensors(tmp_path: Path) -> None:
    t = random_tensor(torch.float32, (50_000,), 9)  # 200 KB
    write_file(tmp_path / "c", {"big": t, "s": torch.arange(5)})
    for readers in (1, 2, 3, 4):
        with TensorDeserializer(tmp_path / "c", chunk_bytes=4096, num_readers=readers, strategy="pread") as d:
            assert_same(d["big"], t)
            assert d.metrics.chunks >= math.ceil(t.numel() * 4 / 4096)
            assert d.metrics.threads == readers


@pytest.mark.parametrize("digest", ["crc32", "sha256", "none"])
def test_digest_algorithms(tmp_path: Path, digest: str) -> None:
    tensors = {"a": random_tensor(torch.float64, (3000,), 1), "b": random_tensor(torch.int8, (5,), 2)}
    idx = write_file(tmp_path / "d", tensors, digest=digest, block_size=BLOCK)
    assert idx.digest == digest
    with TensorDeserializer(tmp_path / "d", verify_hash=digest != "none") as d:
        assert_same_dict(dict(d), tensors)
    flip_byte(tmp_path / "d", idx.tensors["a"].offset + 10_000)
    if digest == "none":  # nothing to check against: asking to verify is an error, not a silent no-op
        with pytest.raises(UsageError, match="no digests"):
            TensorDeserializer(tmp_path / "d", verify_hash=True)
    else:
        with pytest.raises(HashMismatchError) as err:
            TensorDeserializer(tmp_path / "d", verify_hash=True)
        assert err.value.tensors == ["a"]


def test_in_memory_source_and_kinds(tmp_path: Path) -> None:
    p = torch.nn.Parameter(torch.randn(3, 3))
    s = TensorSerializer(tmp_path / "k")
    s.write_tensor("w", p, TensorKind.PARAMETER)
    s.write_tensor("running_mean", torch.zeros(3), "buffer")
    s.write_tensor("plain", torch.arange(4))
    s.close()
    data = (tmp_path / "k").read_bytes()
    with TensorDeserializer(BytesSource(data), verify_hash=True) as d:
        assert d.kind("w") == TensorKind.PARAMETER and d.kind("running_mean") == TensorKind.BUFFER
        assert d.kind("plain") == TensorKind.PLAIN
        assert_same(d["w"], p.detach())
        assert not isinstance(d["w"], torch.nn.Parameter) and not d["w"].requires_grad
    with pytest.raises(UsageError):
        TensorDeserializer(BytesSource(data), mmap=True)  # mmap needs a local file


def test_save_and_load_state_dict_helpers(tmp_path: Path) -> None:
    from hf_tensorizer import save_state_dict

    sd = {"a.weight": random_tensor(torch.bfloat16, (4, 8), 1), "a.bias": torch.zeros(4)}
    idx = save_state_dict(sd, tmp_path / "s.tensors")
    assert list(idx.tensors) == list(sd)
    assert_same_dict(load_state_dict(tmp_path / "s.tensors", verify_hash=True), sd)


def test_empty_file_of_tensors(tmp_path: Path) -> None:
    write_file(tmp_path / "none", {})
    with TensorDeserializer(tmp_path / "none", verify_hash=True) as d:
        assert len(d) == 0 and dict(d) == {}


def test_conjugate_and_negative_views_are_resolved(tmp_path: Path) -> None:
    x = random_tensor(torch.float32, (8,), 3).nan_to_num()
    c = torch.complex(x, x.flip(0))
    tensors = {"conj": c.conj(), "neg": torch._neg_view(x)}
    write_file(tmp_path / "v", tensors)
    loaded = load_state_dict(tmp_path / "v")
    for name, t in tensors.items():
        assert tensor_bytes(loaded[name]) == tensor_bytes(t), name


def test_distinct_empty_tensors_stay_distinct(tmp_path: Path) -> None:
    idx = write_file(tmp_path / "e", {"a": torch.zeros(0, 3), "b": torch.zeros(0, 3)})
    assert idx.tensors["b"].alias is None
    with TensorDeserializer(tmp_path / "e") as d:
        assert d["a"] is not d["b"]


@pytest.mark.parametrize("mode", ["default", "mmap"])
def test_empty_fp4_round_trip(tmp_path: Path, mode: str) -> None:
    dt = torch.float4_e2m1fn_x2
    tensors = {"empty": random_tensor(dt, (0,)), "zeros_in_shape": random_tensor(dt, (3, 0, 2))}
    write_file(tmp_path / "fp4", tensors)
    with TensorDeserializer(tmp_path / "fp4", **MODES[mode]) as d:
        assert_same_dict(dict(d), tensors)


@pytest.mark.parametrize(
    "mode",
    [
        "lazy",
        "mmap",
    ],
)
def test_lazy_access_after_close_is_an_error(tmp_path: Path, mode: str) -> None:
    write_file(tmp_path / "c", {"a": torch.randn(10), "b": torch.randn(3)})
    d = TensorDeserializer(tmp_path / "c", lazy=True, mmap=mode == "mmap")
    d.close()
    with pytest.raises(TensorizerError):
        d["a"]
