"""hf_tensorizer.compat.tensorizer: upstream tensorizer's API on our engine (the suite itself:
scripts/upstream_suite.sh; this file is what CI runs without the network)."""

from __future__ import annotations

import inspect
import io
import os
import pickle
import threading
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as hst

import hf_tensorizer.compat.tensorizer as tz
from hf_tensorizer import read_index
from hf_tensorizer.compat.tensorizer import (
    CryptographyError,
    DecryptionParams,
    EncryptionParams,
    TensorDeserializer,
    TensorSerializer,
    TensorType,
    stream_io,
    utils,
)
from hf_tensorizer.compat.tensorizer.torch_compat import tensorizer_loading, tensorizer_saving
from hf_tensorizer.errors import DecryptionError, HashMismatchError, SourceError

FAST = {"opslimit": EncryptionParams.OpsLimit.MIN, "memlimit": EncryptionParams.MemLimit.MIN}


def _module() -> torch.nn.Module:
    torch.manual_seed(0)
    inner = torch.nn.Linear(4, 3)
    inner.register_buffer("persistent", torch.arange(3.0))
    inner.register_buffer("scratch", torch.ones(2), persistent=False)
    outer = torch.nn.Module()
    outer.inner = inner
    outer.register_parameter("ghost", torch.nn.Parameter(torch.empty(2, 5, device="meta")))
    return outer


def test_nested_state_dicts_round_trip_as_upstream_shows_them(tmp_path: Path) -> None:
    path = tmp_path / "nested.tensors"
    t = [torch.tensor([i], dtype=torch.uint8) for i in range(4)]
    structure = [{"0": t[0], "3": t[3]}, {"1": t[1]}, {"x": [t[2], t[1]]}]
    s = TensorSerializer(str(path))
    s.write_state_dict(structure)
    s.close()
    assert read_index(path).tensors  # an hf_tensorizer file of ours
    for lazy in (False, True):
        with TensorDeserializer(path, device="cpu", lazy_load=lazy) as d:
            assert list(d.keys()) == [0, 1, 2] and 1 in d and "1" not in d and 3 not in d
            assert list(d[0].keys()) == ["0", "3"] and torch.equal(d[0]["3"], t[3])
            assert list(d[2]["x"].keys()) == [0, 1]  # lists read as mappings with int keys
            tree = d.tree()
            assert isinstance(tree, list) and isinstance(tree[2]["x"], list)
            assert torch.equal(tree[2]["x"][0], t[2]) and torch.equal(d.tree((0, "3")), t[3])
            assert d.tree(("missing",), default="none") == "none"
    seen = []
    with TensorDeserializer(path, device="cpu", filter_func=lambda p: seen.append(p) or p == (1, "1")) as d:
        assert list(d.keys()) == [1] and (0, "0") in seen  # structured names reach filter_func as paths
    flat = tmp_path / "flat.tensors"
    s = TensorSerializer(flat)
    s.write_state_dict({"a": t[0], "b": t[1]})
    s.close()
    with TensorDeserializer(flat, device="cpu", filter_func=lambda name: name == "b") as d:
        assert d.tree() == {"b": t[1]} and [r[2] for r in d.read_tensors()] == ["b"]


def test_modules_meta_tensors_and_buffers(tmp_path: Path) -> None:
    model = _module()
    path = tmp_path / "m.tensors"
    s = TensorSerializer(path)
    s.write_module(model)  # upstream default: non-persistent buffers too
    s.close()
    with TensorDeserializer(path, device="cpu") as d:
        assert set(d) == {"inner.weight", "inner.bias", "inner.persistent", "inner.scratch", "ghost"}
        assert torch.equal(d["ghost"], torch.zeros(2, 5)) and d._file_header.version_number >= 4
        types = {name: t for _, t, name, _ in d.read_tensors()}
        assert types["inner.weight"] == TensorType.PARAM and types["inner.scratch"] == TensorType.BUFFER
        with utils.no_init_or_tensor():
            fresh = torch.nn.Module()
            fresh.inner = torch.nn.Linear(4, 3)
            fresh.inner.register_buffer("persistent", torch.empty(3))
            fresh.inner.register_buffer("scratch", torch.empty(2), persistent=False)
            fresh.register_parameter("ghost", torch.nn.Parameter(torch.empty(2, 5)))
        assert fresh.inner.weight.is_meta
        assert d.load_into_module(fresh) == 5
        assert torch.equal(fresh.inner.weight, model.inner.weight) and not fresh.inner.scratch.is_meta
        assert isinstance(fresh.inner.weight, torch.nn.Parameter) and fresh.inner.weight.requires_grad
        ok, per_tensor = d.verify_module(model)
        assert ok and len(per_tensor) == 5
        with torch.no_grad():
            model.inner.bias += 1
        ok, per_tensor = d.verify_module(model)
        assert not ok and [n for n, good in per_tensor if not good] == ["inner.bias"]
    s = TensorSerializer(tmp_path / "p.tensors")
    s.write_module(_module(), include_non_persistent_buffers=False)
    s.close()
    with TensorDeserializer(tmp_path / "p.tensors", device="cpu") as d:
        assert "inner.scratch" not in d


def test_encryption_params(tmp_path: Path) -> None:
    sd = {"w": torch.randn(64, 8)}
    with pytest.raises(TypeError):
        EncryptionParams.from_string("pw", opslimit=EncryptionParams.MemLimit.MIN)
    with pytest.raises(ValueError):
        EncryptionParams.from_string("")
    with pytest.raises(ValueError):
        EncryptionParams(b"short")
    salted = [EncryptionParams.from_string("pw", salt=b"s" * 16, **FAST) for _ in range(2)]
    assert salted[0].key == salted[1].key and salted[0].salt == b"s" * 16
    with pytest.raises(ValueError):
        _ = EncryptionParams.random().salt
    for params, good, wrong in (
        (salted[0], DecryptionParams.from_string("pw"), DecryptionParams.from_string("other")),
        (salted[0], DecryptionParams.from_key(salted[0].key), DecryptionParams.from_key(bytes(32))),
        (EncryptionParams.random(), None, DecryptionParams.from_key(bytes(32))),
    ):
        path = tmp_path / "enc.tensors"
        s = TensorSerializer(path, encryption=params)
        s.write_state_dict(sd)
        s.close()
        good = good or DecryptionParams.from_key(params.key)
        with TensorDeserializer(path, device="cpu", encryption=good) as d:
            assert torch.equal(d["w"], sd["w"]) and tz.serialization._FileFeatureFlags.encrypted in d._file_flags
        for bad in (wrong, None):
            with pytest.raises(CryptographyError) as err:
                TensorDeserializer(path, device="cpu", encryption=bad)
            assert isinstance(err.value, DecryptionError)


def test_upstream_written_files_read_bit_exact(tmp_path: Path) -> None:
    upstream = pytest.importorskip("tensorizer")
    sd = {"a": torch.randn(5, 3), "b": torch.arange(7)}
    params = upstream.EncryptionParams.random()
    path = tmp_path / "up.tensors"
    s = upstream.TensorSerializer(str(path), encryption=params)
    s.write_state_dict(sd)
    s.close()
    with TensorDeserializer(str(path), device="cpu", verify_hash=True,
                            encryption=DecryptionParams.from_key(params.key)) as d:  # fmt: skip
        assert all(torch.equal(d[k], v) for k, v in sd.items())
        assert d._file_header.version_number == 3 and tz.serialization._FileFeatureFlags.encrypted in d._file_flags


def test_upstream_nested_structures_keep_their_nesting(tmp_path: Path) -> None:
    upstream = pytest.importorskip("tensorizer")
    path = tmp_path / "nested-up.tensors"
    s = upstream.TensorSerializer(str(path))
    s.write_state_dict({"a": [torch.ones(2), torch.zeros(1)], "b": torch.arange(3)})
    s.close()
    with TensorDeserializer(str(path), device="cpu", filter_func=lambda key: key != ("a", 1)) as d:
        assert list(d) == ["a", "b"] and list(d["a"]) == [0]
        tree = d.tree()
        assert isinstance(tree["a"], list) and torch.equal(tree["a"][0], torch.ones(2))


def test_verify_hash_catches_tampering(tmp_path: Path) -> None:
    path = tmp_path / "h.tensors"
    s = TensorSerializer(path)
    s.write_state_dict({"w": torch.ones(4096)})
    s.close()
    raw = bytearray(path.read_bytes())
    raw[read_index(path).tensors["w"].offset + 10] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(tz.serialization.HashMismatchError) as err:
        TensorDeserializer(path, device="cpu", verify_hash=True)
    assert isinstance(err.value, HashMismatchError)


_TensorHash = tz.serialization.TensorHash


def _zeroed_hash(*args: object, **kwargs: object) -> tz.serialization.TensorHash:
    """Upstream's own tests' ``mock_invalid_tensor_hash``: every hash record decoded from a file reads as zeros."""
    record = _TensorHash(*args, **kwargs)
    record.hash = bytes(len(record.hash))
    return record


@pytest.mark.parametrize("writer", ["ours", "upstream"])
def test_verify_hash_decodes_stored_hashes_through_tensor_hash(tmp_path: Path, writer: str,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """A patched ``serialization.TensorHash`` is what verification compares with (upstream's test_verification_fail),
    for our block digests and for an upstream file's CRC32/SHA-256; unpatched, both verify."""
    path = tmp_path / f"{writer}.tensors"
    cls = pytest.importorskip("tensorizer").TensorSerializer if writer == "upstream" else TensorSerializer
    s = cls(str(path))
    s.write_state_dict({"w": torch.arange(4096.0), "b": torch.ones(3)})
    s.close()
    with TensorDeserializer(str(path), device="cpu", verify_hash=True, num_readers=2) as d:
        assert torch.equal(d["w"], torch.arange(4096.0))
    monkeypatch.setattr(tz.serialization, "TensorHash", _zeroed_hash)
    with pytest.raises(tz.serialization.HashMismatchError) as err:
        TensorDeserializer(str(path), device="cpu", verify_hash=True).close()
    assert isinstance(err.value, HashMismatchError) and err.value.tensors
    with TensorDeserializer(str(path), device="cpu") as d:  # no verify_hash: the records are not consulted
        assert torch.equal(d["b"], torch.ones(3))


def test_cpu_loads_give_each_tensor_its_own_storage(tmp_path: Path) -> None:
    """Upstream code hashes and pickles ``tensor.untyped_storage()``: on the default (mapped) CPU load it holds that
    tensor's bytes alone, and ``torch.save`` of one tensor writes about its own size, not the file's."""
    path = tmp_path / "big.tensors"
    s = TensorSerializer(str(path))
    s.write_state_dict({"small": torch.arange(4.0), "big": torch.zeros(1 << 20)})
    s.close()
    with TensorDeserializer(str(path), device="cpu") as d:
        small = d["small"]
        assert d._reader.metrics.strategy == "mmap"
    assert small.untyped_storage().nbytes() == 16
    buf = io.BytesIO()
    torch.save(small, buf)
    assert len(buf.getvalue()) < 4096 < path.stat().st_size // 100


#: upstream's public callables that migrating code calls: the shim must take exactly their parameters
_UPSTREAM_API = [
    ("serialization", "TensorSerializer", ("__init__", "write_tensor", "write_state_dict", "write_module", "close")),
    ("serialization", "TensorDeserializer", ("__init__", "read_tensors", "read_numpy_arrays", "load_into_module",
                                             "verify_module", "tree", "to_redis", "close")),
    ("serialization", "EncryptionParams", ("__init__", "random", "from_string")),
    ("serialization", "DecryptionParams", ("from_key", "from_string")),
    ("stream_io", None, ("open_stream",)),
    ("utils", None, ("no_init_or_tensor", "convert_bytes", "get_mem_usage", "get_device", "get_gpu_name")),
    ("torch_compat", None, ("tensorizer_saving", "tensorizer_loading")),
]  # fmt: skip


def _params(fn: object) -> list[tuple[str, object, object]]:
    return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]  # type: ignore[arg-type]


@pytest.mark.parametrize(("module", "owner", "names"), _UPSTREAM_API)
def test_public_api_takes_upstreams_parameters(module: str, owner: str | None, names: tuple[str, ...]) -> None:
    upstream = pytest.importorskip(f"tensorizer.{module}")
    ours = getattr(tz, module)
    theirs_owner, ours_owner = (getattr(upstream, owner), getattr(ours, owner)) if owner else (upstream, ours)
    for name in names:
        assert _params(getattr(ours_owner, name)) == _params(getattr(theirs_owner, name)), f"{owner}.{name}"


def test_read_numpy_arrays_as_upstream(tmp_path: Path) -> None:
    """Same arrays, flags and opaque dtype names as upstream's ``read_numpy_arrays`` on the same upstream file."""
    upstream = pytest.importorskip("tensorizer")
    path = tmp_path / "np.tensors"
    s = upstream.TensorSerializer(str(path))
    s.write_state_dict({"f": torch.randn(3, 2), "i": torch.arange(5), "bf": torch.randn(4, dtype=torch.bfloat16)})
    s.close()

    def rows(cls: type) -> list[tuple]:
        with cls(str(path), device="cpu", lazy_load=True) as d:  # upstream's eager load consumes its stream
            return [(i, t, n, a.dtype.str, a.tobytes(), o, dt) for i, t, n, a, o, dt in
                    d.read_numpy_arrays(allow_raw_data=True)]  # fmt: skip

    ours = rows(TensorDeserializer)
    assert ours == rows(upstream.TensorDeserializer)
    assert [r[5:] for r in ours] == [(False, None), (False, None), (True, "torch.bfloat16")]
    with TensorDeserializer(str(path), device="cpu") as d, pytest.raises(ValueError, match="allow_raw_data"):
        list(d.read_numpy_arrays())


def test_verify_hash_per_call(tmp_path: Path) -> None:
    """``read_tensors`` / ``load_into_module(verify_hash=True)`` on a deserializer opened without it still verify."""
    path = tmp_path / "late.tensors"
    s = TensorSerializer(path)
    s.write_state_dict({"w": torch.ones(4096), "ok": torch.zeros(2)})
    s.close()
    raw = bytearray(path.read_bytes())
    raw[read_index(path).tensors["w"].offset + 10] ^= 0xFF
    path.write_bytes(bytes(raw))
    with TensorDeserializer(path, device="cpu", lazy_load=True) as d:
        assert [n for *_, n, _ in d.read_tensors(filter_func=lambda n: n == "ok", verify_hash=True)] == ["ok"]
        with pytest.raises(tz.serialization.HashMismatchError):
            list(d.read_tensors(verify_hash=True))
        module = torch.nn.Module()
        module.register_buffer("w", torch.empty(4096))
        with pytest.raises(tz.serialization.HashMismatchError):
            d.load_into_module(module, filter_func=lambda n: n == "w", verify_hash=True)
        assert d.load_into_module(module, filter_func=lambda n: n == "w") == 1  # not asked: not checked


def test_open_stream_and_file_objects(tmp_path: Path) -> None:
    path = tmp_path / "s.tensors"
    with stream_io.open_stream(str(path), "wb") as f:
        s = TensorSerializer(f)
        s.write_state_dict({"x": torch.arange(3)})
        s.close()
    with stream_io.open_stream(str(path), "rb") as f, TensorDeserializer(f, device="cpu") as d:
        assert torch.equal(d["x"], torch.arange(3))
    with pytest.raises(FileNotFoundError) as missing:
        TensorDeserializer(str(tmp_path / "nope.tensors"), device="cpu")
    assert isinstance(missing.value, SourceError)
    with pytest.raises(Exception, match="credentials"):
        stream_io.open_stream("s3://b/k", s3_access_key_id="AK", s3_secret_access_key="SK")
    remote = stream_io.open_stream("s3://bucket/key", s3_endpoint="object.example")
    assert remote.uri == "s3://bucket/key" and remote.options == {"endpoint_url": "https://object.example"}


def test_torch_compat_sidecar_shared_storages_and_meta(tmp_path: Path) -> None:
    a = torch.arange(6)
    c = torch.empty(0, dtype=torch.long).set_(a)
    d = c.view(torch.float64)
    meta = torch.empty(3, device="meta")
    pt = tmp_path / "obj.pt"
    with tensorizer_saving():
        torch.save([a, c, d, meta, {"m": torch.nn.Linear(2, 2)}], pt)
    assert (tmp_path / "obj.pt.tensors").is_file() and pt.stat().st_size < 4096
    with tensorizer_loading(device="cpu"):
        la, lc, ld, lmeta, rest = torch.load(pt, weights_only=False)
    assert torch.equal(la, a) and lc.is_set_to(la) and ld.is_set_to(la) and lmeta.is_meta
    assert la.untyped_storage().nbytes() == a.numel() * a.element_size()  # its own storage, not a file mapping
    assert isinstance(rest["m"], torch.nn.Linear)
    key = EncryptionParams.random()
    with tensorizer_saving(tmp_path / "enc.tensors", encryption=key):
        torch.save({"w": torch.ones(3)}, pt)
    with pytest.raises(CryptographyError), tensorizer_loading(tmp_path / "enc.tensors"):
        torch.load(pt, weights_only=False)
    with tensorizer_loading(tmp_path / "enc.tensors", device="cpu", encryption=DecryptionParams.from_key(key.key)):
        assert torch.equal(torch.load(pt, weights_only=False)["w"], torch.ones(3))


def test_torch_compat_leaves_torch_stock_outside_its_contexts(tmp_path: Path) -> None:
    stock_save, stock_load = torch.save, torch.load
    with tensorizer_saving(), tensorizer_loading():
        assert torch.save is not stock_save and torch.load is not stock_load
        empty = inspect.Parameter.empty
        expected = {torch.save: [("obj", empty), ("f", empty), ("pickle_module", pickle)],
                    torch.load: [("f", empty), ("map_location", None), ("pickle_module", None)]}  # fmt: skip
        for func, first in expected.items():
            params = list(inspect.signature(func, follow_wrapped=False).parameters.values())[:3]
            assert [(p.name, p.default) for p in params] == first
        other: list[bool] = []
        t = threading.Thread(target=lambda: (torch.save([torch.ones(2)], tmp_path / "t.pt"),
                                             other.append(os.path.exists(tmp_path / "t.pt.tensors"))))  # fmt: skip
        t.start()
        t.join()
        assert other == [False]  # another thread, outside the context: stock torch.save
        with pytest.raises(ValueError, match="pickle_module"):
            torch.save([torch.ones(1)], tmp_path / "x.pt", pickle_module=object())
    assert torch.save is stock_save and torch.load is stock_load


@settings(max_examples=300, deadline=None)
@given(path=hst.lists(hst.one_of(hst.text(max_size=8), hst.integers(-(2**40), 2**40)), min_size=1, max_size=5))
def test_structured_names_round_trip(path: list) -> None:
    from hf_tensorizer.compat.tensorizer import _names

    assert _names.decode(_names.encode(path)) == tuple(path)


@settings(max_examples=300, deadline=None)
@given(name=hst.text(max_size=40))
def test_any_stored_name_decodes(name: str) -> None:
    from hf_tensorizer.compat.tensorizer import _names

    path = _names.decode(name)  # never raises: names that are not structured are one str component
    assert path and all(type(p) in (str, int) for p in path)
    assert path == (name,) or name.startswith("\x1e")
