"""Upstream CoreWeave tensorizer files through our engine, checked against files written by tensorizer 2.12.1.

Fixtures are real upstream files (``tensorizer.TensorSerializer``); results are compared bit for bit with
the original tensors and with ``tensorizer.TensorDeserializer``. Version-5 files (u64 dims), which
tensorizer only writes for dims >= 2**32, are built by a small spec-following writer below whose output
tensorizer itself reads and hash-checks.
"""

from __future__ import annotations

import hashlib
import struct
import zlib
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hf_tensorizer import TensorDeserializer, TensorKind, read_index
from hf_tensorizer.crypto import EncryptionKey, Passphrase
from hf_tensorizer.errors import (
    DecryptionError,
    FormatError,
    HashMismatchError,
    MissingKeyError,
    TensorizerError,
    TruncatedFileError,
    UnsupportedVersionError,
)
from hf_tensorizer.sources import Source
from hf_tensorizer.upstream import format as upstream
from hf_tensorizer.upstream import is_upstream, open_upstream, verify_upstream

tensorizer = pytest.importorskip("tensorizer")
from tensorizer.serialization import DecryptionParams, EncryptionParams  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


class MemSource(Source):
    """A file held in memory (no descriptor): exercises the engine's generic read path."""

    def __init__(self, data: bytes) -> None:
        self.data, self.size, self.uri = bytes(data), len(data), "memory://upstream"

    def read_into(self, offset: int, buf: memoryview) -> None:
        if offset < 0 or offset + len(buf) > self.size:
            raise TruncatedFileError(f"read [{offset}, {offset + len(buf)}) past {self.size}")
        buf[:] = self.data[offset : offset + len(buf)]


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-identical: dtype, shape and bytes (NaNs included)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return a.numel() == 0 or torch.equal(
        a.contiguous().view(-1).view(torch.uint8), b.contiguous().view(-1).view(torch.uint8)
    )


def write_upstream(path: Path, sd: dict, encryption: EncryptionParams | None = None) -> Path:
    s = tensorizer.TensorSerializer(str(path), encryption=encryption)
    s.write_state_dict(sd)
    s.close()
    return path


def sample_state_dict() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "f32": torch.randn(3, 5, generator=g),
        "f16": torch.randn(7, generator=g).half(),
        "f64": torch.randn(2, 2, generator=g).double(),
        "bf16": torch.randn(4, 9, generator=g).bfloat16(),  # opaque dtype: <V2\0torch.bfloat16
        "fp8": torch.randn(6, generator=g).to(torch.float8_e4m3fn),
        "i8": torch.randint(-100, 100, (5,), dtype=torch.int8, generator=g),
        "i32": torch.randint(-(2**30), 2**30, (3, 1), dtype=torch.int32, generator=g),
        "i64": torch.arange(11, dtype=torch.int64),
        "u8": torch.randint(0, 255, (13,), dtype=torch.uint8, generator=g),
        "bool": torch.rand(9, generator=g) > 0.5,
        "c64": torch.randn(4, dtype=torch.complex64, generator=g),
        "scalar": torch.tensor(3.5),
        "empty": torch.empty(0, 4),
        "layers.0.w": torch.randn(33, 17, generator=g),  # odd sizes: no alignment anywhere
    }


def test_plain_dtypes_bit_identical(tmp_path: Path) -> None:
    sd = sample_state_dict()
    path = write_upstream(tmp_path / "m.tensors", sd)
    ref = tensorizer.TensorDeserializer(str(path), device="cpu", verify_hash=True)
    with TensorDeserializer(path) as d:
        assert is_upstream(d.index) and d.index.version == 2  # opaque dtypes raise the version to 2
        assert list(d) == list(sd)
        for name, t in sd.items():
            assert same(d[name], t), name
            assert same(d[name], ref[name]), name
            assert d.kind(name) is TensorKind.PLAIN
    # generic source (no fd), staged path, odd offsets with O_DIRECT widening, tiny chunks
    d2 = TensorDeserializer(MemSource(path.read_bytes()), chunk_bytes=4096, num_readers=3)
    d3 = TensorDeserializer(path, strategy="odirect", chunk_bytes=4096)
    d4 = TensorDeserializer(path, mmap=True)
    for name, t in sd.items():
        assert same(d2[name], t) and same(d3[name], t) and same(d4[name], t), name
    with open_upstream(path, verify_hash=True) as d5:
        assert same(d5["bf16"], sd["bf16"])


def test_filter_and_dtype(tmp_path: Path) -> None:
    sd = sample_state_dict()
    path = write_upstream(tmp_path / "m.tensors", sd)
    d = TensorDeserializer(path, filter=["bf16", "i64"], dtype=torch.float32)
    assert list(d) == ["bf16", "i64"]
    assert torch.equal(d["bf16"], sd["bf16"].float()) and d["i64"].dtype == torch.int64


def test_meta_tensors_load_as_zeros(tmp_path: Path) -> None:
    sd = {"m": torch.empty(3, 4, device="meta"), "x": torch.ones(2), "mb": torch.empty(5, device="meta").bfloat16()}
    path = write_upstream(tmp_path / "meta.tensors", sd)
    d = TensorDeserializer(path)
    assert d.index.version == 4 and d.index.tensors["m"].length == 0
    assert torch.equal(d["m"], torch.zeros(3, 4)) and torch.equal(d["x"], torch.ones(2))
    assert d["mb"].dtype == torch.bfloat16 and not d["mb"].any()
    assert torch.equal(TensorDeserializer(path, mmap=True)["m"], torch.zeros(3, 4))
    verify_upstream(d)


class Root(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.randn(3))
        self.register_buffer("offset", torch.randn(3))
        self.lin = torch.nn.Linear(3, 2)
        self.norm = torch.nn.BatchNorm1d(2)


def test_write_module_names_and_kinds(tmp_path: Path) -> None:
    torch.manual_seed(1)
    src = Root()
    s = tensorizer.TensorSerializer(str(tmp_path / "mod.tensors"))
    s.write_module(src)
    s.close()
    raw = (tmp_path / "mod.tensors").read_bytes()
    assert b"\x06\x00.scale" in raw  # upstream stores the root module's tensors with a leading dot
    d = TensorDeserializer(tmp_path / "mod.tensors")
    assert set(d) == set(src.state_dict())
    assert d.kind("scale") is TensorKind.PARAMETER and d.kind("offset") is TensorKind.BUFFER
    assert d.kind("norm.num_batches_tracked") is TensorKind.BUFFER
    torch.manual_seed(2)
    dst = Root()
    d.load_into_module(dst)
    for k, v in src.state_dict().items():
        assert same(dst.state_dict()[k], v), k


def test_structured_names(tmp_path: Path) -> None:
    sd = {"model": {"layers": [{"w": torch.ones(2)}, {"w": torch.zeros(3)}]}, "top": torch.arange(3)}
    d = TensorDeserializer(write_upstream(tmp_path / "n.tensors", sd))
    assert list(d) == ["model.layers.0.w", "model.layers.1.w", "top"]
    assert torch.equal(d["model.layers.1.w"], torch.zeros(3))


def test_encrypted_random_key(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(3)
    sd = {"small": torch.randn(3, 5, generator=g), "big": torch.randn(1_300_000, generator=g),  # 3 chunks of 2 MiB
          "bf": torch.randn(5001, generator=g).bfloat16(), "meta": torch.empty(2, 2, device="meta")}  # fmt: skip
    params = EncryptionParams.random()
    path = write_upstream(tmp_path / "enc.tensors", sd, params)
    ref = tensorizer.TensorDeserializer(str(path), device="cpu", encryption=DecryptionParams.from_key(params.key))
    index = read_index(MemSource(path.read_bytes()))
    assert index.encrypted and index.block_size == 2 << 20
    for key in (EncryptionKey(params.key), params.key):
        for kw in ({}, {"chunk_bytes": 4096, "num_readers": 4}, {"strategy": "odirect"}):
            d = TensorDeserializer(path, encryption=key, **kw)
            for name in sd:
                assert same(d[name], ref[name]), (name, kw)
            assert same(d["big"], sd["big"]) and not d["meta"].any()
    with open_upstream(path, encryption=params.key, verify_hash=True) as d:  # SHA-256 over the plaintext
        assert same(d["small"], sd["small"])
    with pytest.raises(MissingKeyError):
        TensorDeserializer(path)
    with pytest.raises(DecryptionError):
        TensorDeserializer(path, encryption=EncryptionKey(bytes(32)))
    with pytest.raises(DecryptionError):  # a key for a passphrase-less file is fine; a passphrase is not
        TensorDeserializer(path, encryption=Passphrase("nope"))
    plain = write_upstream(tmp_path / "plain.tensors", {"a": torch.ones(2)})
    with pytest.raises(DecryptionError):  # a key for a plain file: refuse, never downgrade silently
        TensorDeserializer(plain, encryption=params.key)


def test_encrypted_passphrase(tmp_path: Path) -> None:
    sd = {"w": torch.randn(700_000), "b": torch.randn(3).bfloat16()}
    ep = EncryptionParams.from_string(
        "correct horse", opslimit=EncryptionParams.OpsLimit.MIN, memlimit=EncryptionParams.MemLimit.MIN
    )
    path = write_upstream(tmp_path / "pw.tensors", sd, ep)
    d = open_upstream(path, encryption=Passphrase("correct horse"), verify_hash=True)
    for name, t in sd.items():
        assert same(d[name], t)
    with pytest.raises(DecryptionError):
        TensorDeserializer(path, encryption=Passphrase("wrong horse"))
    with pytest.raises(DecryptionError):
        TensorDeserializer(path, encryption=EncryptionKey(bytes(32)))


def test_tampering_is_detected(tmp_path: Path) -> None:
    sd = {"a": torch.randn(1000), "b": torch.randn(10)}
    raw = bytearray(write_upstream(tmp_path / "p.tensors", sd).read_bytes())
    d = TensorDeserializer(MemSource(bytes(raw)))
    raw[d.index.tensors["a"].offset + 17] ^= 0x40
    bad = tmp_path / "bad.tensors"
    bad.write_bytes(bytes(raw))
    assert not same(TensorDeserializer(bad)["a"], sd["a"])  # loads: the index carries no digests
    with pytest.raises(HashMismatchError) as err:
        open_upstream(bad, verify_hash=True)
    assert err.value.tensors == ["a"]
    params = EncryptionParams.random()
    enc = bytearray(write_upstream(tmp_path / "e.tensors", sd, params).read_bytes())
    enc[read_index(MemSource(bytes(enc))).tensors["b"].offset + 3] ^= 1
    with pytest.raises(DecryptionError, match="'b'"):
        TensorDeserializer(MemSource(bytes(enc)), encryption=params.key)


def test_tiny_llama_logits_identical(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)  # fmt: skip
    torch.manual_seed(0)
    ref = transformers.LlamaForCausalLM(cfg).eval()
    s = tensorizer.TensorSerializer(str(tmp_path / "llama.tensors"))
    s.write_module(ref)
    s.close()
    torch.manual_seed(123)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with TensorDeserializer(tmp_path / "llama.tensors") as d:
        assert any(k.endswith("inv_freq") for k in d)  # upstream writes non-persistent buffers...
        info = d.load_into_module(model)  # ... and they load into those buffers, strictly
    assert not info.missing_keys and not info.unexpected_keys
    ids = torch.randint(0, 96, (2, 11), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)


# ---- a spec-following writer: version 5 (u64 dims) and arbitrary headers for fuzzing --------------


def build_upstream(tensors: list[tuple[str, bytes, tuple[int, ...], bytes]], *, version: int = 1,
                   long_dims: bool = False, kind: int = 2) -> bytes:  # fmt: skip
    """An unencrypted upstream file; ``long_dims`` writes version-5 entries with u64 dims."""
    width, code = (8, "Q") if long_dims else (4, "I")
    entries_len = sum((4 if long_dims else 0) + 2 + len(n) + 1 + 1 + len(dt) + 1 + width * len(sh) + 24
                      for n, dt, sh, _ in tensors)  # fmt: skip
    pos = upstream.HEADER_END + entries_len
    index, body = b"", b""
    for name, dtype, shape, data in tensors:
        nb = name.encode()
        head = struct.pack(f"<HBH{len(nb)}sB{len(dtype)}sB{len(shape)}{code}", 0, kind, len(nb), nb, len(dtype), dtype,
                           len(shape), *shape)  # fmt: skip
        hashes = struct.pack("<HBBBIBB32s", 41, 2, 0, 4, 0, 1, 32, bytes(32))
        size = 8 + len(head) + len(hashes) + 8
        header = struct.pack("<Q", size) + head + hashes + struct.pack("<q", len(data))
        crc = zlib.crc32(data, zlib.crc32(header))
        sha = hashlib.sha256(header + data).digest()
        hashes = struct.pack("<HBBBIBB32s", 41, 2, 0, 4, crc, 1, 32, sha)
        header = struct.pack("<Q", size) + head + hashes + struct.pack("<q", len(data))
        entry = struct.pack(f"<H{len(nb)}sBB{len(dtype)}sB{len(shape)}{code}QQQ", len(nb), nb, kind, len(dtype),
                            dtype, len(shape), *shape, pos, pos + size, len(data))  # fmt: skip
        index += (struct.pack("<I", 5) if long_dims else b"") + entry
        body += header + data
        pos += size + len(data)
    flags = (upstream.FLAG_VERSIONED_ENTRIES if long_dims else 0).to_bytes(32, "little")
    head = b"|TZR|" + struct.pack("<I32sQ8xQ", version, flags, len(body), len(tensors))
    return head + struct.pack("<Q", len(index)) + index + body + struct.pack("<Q", 0)


def test_version5_long_dims_entries(tmp_path: Path) -> None:
    a, b = torch.randn(2, 3), torch.arange(5, dtype=torch.int64)
    raw = build_upstream([("a", b"<f4", (2, 3), a.numpy().tobytes()), ("b", b"<i8", (5,), b.numpy().tobytes())],
                         version=5, long_dims=True)  # fmt: skip
    (tmp_path / "v5.tensors").write_bytes(raw)
    ref = tensorizer.TensorDeserializer(str(tmp_path / "v5.tensors"), device="cpu", verify_hash=True)
    assert torch.equal(ref["a"], a)  # the writer above produces what tensorizer itself accepts
    d = open_upstream(tmp_path / "v5.tensors", verify_hash=True)
    assert d.index.version == 5 and torch.equal(d["a"], a) and torch.equal(d["b"], b)
    with pytest.raises(FormatError):  # versioned entries need version 5
        read_index(MemSource(raw[:5] + struct.pack("<I", 4) + raw[9:]))


def test_rejects_bad_headers() -> None:
    good = build_upstream([("a", b"<f4", (2,), bytes(8))])
    read_index(MemSource(good))
    with pytest.raises(UnsupportedVersionError):
        read_index(MemSource(good[:5] + struct.pack("<I", 9) + good[9:]))
    with pytest.raises(UnsupportedVersionError):  # unknown feature flag in a version-4 file
        read_index(MemSource(good[:5] + struct.pack("<I", 4) + (1 << 7).to_bytes(32, "little") + good[41:]))
    with pytest.raises(TruncatedFileError):
        read_index(MemSource(good[:60]))
    with pytest.raises(FormatError):  # data length does not match shape x dtype
        read_index(MemSource(build_upstream([("a", b"<f4", (3,), bytes(8))])))
    with pytest.raises(TensorizerError, match="dtype"):
        read_index(MemSource(build_upstream([("a", b"|O", (1,), bytes(8))])))
    with pytest.raises(FormatError, match="duplicate"):
        read_index(MemSource(build_upstream([("a", b"|u1", (1,), b"x"), (".a", b"|u1", (1,), b"y")])))


@pytest.fixture(scope="module")
def fuzz_seeds(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[bytes, list[int], bytes | None]]:
    """Real and synthesized files, each with the byte positions worth mutating."""
    tmp = tmp_path_factory.mktemp("fuzz")
    sd = {"a": torch.randn(3, 5), "bf": torch.randn(4).bfloat16(), "m": torch.empty(2, device="meta")}
    plain = write_upstream(tmp / "p.tensors", sd).read_bytes()
    params = EncryptionParams.random()
    enc = write_upstream(tmp / "e.tensors", {"a": torch.randn(3)}, params).read_bytes()
    synth = build_upstream([("x", b"<f4", (2,), bytes(8)), ("y", b"<V2\0torch.bfloat16", (3,), bytes(6))], version=5,
                           long_dims=True)  # fmt: skip
    out = []
    for raw, key in ((plain, None), (enc, params.key), (synth, None)):
        # upstream pads its index to 256 KiB with zeros: mutate the header, the entries, and everything
        # from the first per-tensor header on
        first = min(t.header_offset for t in read_index(MemSource(raw)).upstream.values())
        out.append((raw, list(range(min(600, first))) + list(range(first, len(raw))), key))
    return out


def _load_or_typed_error(raw: bytes, key: bytes | None = None) -> None:
    """Loading either succeeds or raises a typed error: never a crash, a hang or a huge allocation."""
    try:
        with TensorDeserializer(MemSource(raw), encryption=key) as d:
            for name in d:
                d[name]
    except TensorizerError:
        pass


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_mutations(fuzz_seeds: list[tuple[bytes, list[int], bytes | None]], data: st.DataObject,
                        monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    monkeypatch.setattr(upstream, "MAX_META_BYTES", 1 << 20)  # hostile meta shapes must not allocate much
    seed, hot, key = data.draw(st.sampled_from(fuzz_seeds))
    raw = bytearray(seed)
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.sampled_from(hot))
        raw[pos] ^= 1 << data.draw(st.integers(0, 7))
    if data.draw(st.booleans()):
        raw = raw[: data.draw(st.integers(0, len(raw)))]
    _load_or_typed_error(bytes(raw), key)


@settings(max_examples=200, deadline=None)
@given(version=st.integers(0, 6), flags=st.integers(0, 7), count=st.integers(0, 2**64 - 1),
       meta_len=st.integers(0, 2**64 - 1), tail=st.binary(max_size=300))  # fmt: skip
def test_fuzz_random_headers(version: int, flags: int, count: int, meta_len: int, tail: bytes) -> None:
    head = b"|TZR|" + struct.pack("<I32sQ8xQ", version, flags.to_bytes(32, "little"), 0, count)
    raw = head + struct.pack("<Q", meta_len % (len(tail) + 2) if meta_len & 1 else meta_len) + tail
    _load_or_typed_error(raw)
