"""CUDA paths on a real GPU (skipped on CPU machines; run by tests/gpu/run.sh on a lent GPU).

The CPU suite covers the same planning, staging and fence bookkeeping with CPU targets
(test_plan_staging.py); these tests prove the CUDA streams, events, pinned pool and page registration.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import hf_tensorizer as ht
from hf_tensorizer.engine import pagecache

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def _state_dict() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    sd = {f"big.{i}": torch.randn(1024, 1500, generator=g).to(torch.bfloat16) for i in range(6)}  # 3 MB each
    sd |= {f"small.{i}": torch.randint(0, 1000, (i + 1, 3), generator=g) for i in range(40)}  # packed, 64-aligned
    sd["flag"] = torch.tensor([True, False, True])
    sd["scalar"] = torch.tensor(2.5, dtype=torch.float64)
    sd["empty"] = torch.empty(0, 4)
    sd["fp8"] = torch.randn(33, 17, generator=g).to(torch.float8_e4m3fn)
    sd["tied"] = sd["big.0"]
    return sd


@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, torch.Tensor]]:
    sd = _state_dict()
    path = str(tmp_path_factory.mktemp("cuda") / "m.tensors")
    ht.save_state_dict(sd, path, block_size=1 << 20)
    return path, sd


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    from hf_tensorizer.engine.memory import as_bytes

    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(as_bytes(a.cpu().contiguous()), as_bytes(b))


@pytest.mark.parametrize("strategy", ["pread", "odirect", "register", "auto"])
@pytest.mark.parametrize("chunk", [1 << 20, 16 << 20])
def test_strategies_bit_identical(model_file, strategy: str, chunk: int) -> None:
    path, sd = model_file
    if strategy == "odirect":
        pagecache.evict(path)
    with ht.TensorDeserializer(path, device="cuda", strategy=strategy, chunk_bytes=chunk, num_readers=4) as d:
        out = dict(d)
        # "odirect" falls back to page-cache reads where the filesystem refuses O_DIRECT (tmpfs); "auto" picks
        expected = {"auto": ("pread", "odirect"), "odirect": ("odirect", "pread")}.get(strategy, (strategy,))
        assert d.metrics.strategy in expected
    assert set(out) == set(sd)
    for k in sd:
        assert out[k].device.type == "cuda"
        assert _same(out[k], sd[k]), k
    assert out["tied"] is out["big.0"]


def test_verify_lazy_filter_dtype(model_file) -> None:
    path, sd = model_file
    with ht.TensorDeserializer(path, device="cuda", verify_hash=True, dtype=torch.float16) as d:
        assert d["big.1"].dtype == torch.float16
        assert d["small.3"].dtype == torch.int64 and _same(d["small.3"], sd["small.3"])
        assert torch.equal(d["big.1"].cpu(), sd["big.1"].to(torch.float16))
    with ht.TensorDeserializer(path, device="cuda", lazy=True, filter=lambda n: n.startswith("small")) as d:
        assert len(d) == 40 and d.metrics.bytes == 0
        assert _same(d["small.7"], sd["small.7"])


def test_staging_pool_bounded(model_file) -> None:
    path, _ = model_file
    with ht.TensorDeserializer(path, device="cuda", chunk_bytes=1 << 20, staging_bytes=4 << 20, num_readers=2) as d:
        dict(d)
        assert 0 < d.metrics.staging_peak_bytes <= 4 << 20


def test_pinned_block_reused_across_loads(model_file, monkeypatch) -> None:
    """Inside reuse_blocks() (what from_pretrained does for its shards and device groups) consecutive loads
    pin one huge-page block, not one each, and stay bit-identical; the block is unpinned at the end."""
    from hf_tensorizer.engine import staging

    path, sd = model_file
    made: list[object] = []
    real = staging._HostBlock

    def counting(*args, **kwargs):  # type: ignore[no-untyped-def]
        made.append(real(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(staging, "_HostBlock", counting)
    with staging.reuse_blocks():
        for names in (["big.1", "small.2"], ["big.3", "fp8"], ["big.1"]):
            with ht.TensorDeserializer(path, device="cuda", filter=names, staging_allocation="hugepage") as d:
                assert all(_same(d[n], sd[n]) for n in names)
        assert len(made) == 1 and made[0]._registered
    assert not made[0]._registered and not staging._parked


def test_corruption_detected_on_gpu(model_file, tmp_path) -> None:
    path, _ = model_file
    bad = tmp_path / "bad.tensors"
    data = bytearray(Path(path).read_bytes())
    from hf_tensorizer.sources import open_source

    with open_source(path) as src:
        index = ht.read_index(src)
    entry = index.tensors["big.2"]
    data[entry.offset + 100] ^= 0x40
    bad.write_bytes(bytes(data))
    with pytest.raises(ht.errors.HashMismatchError) as err:
        ht.TensorDeserializer(str(bad), device="cuda", verify_hash=True)
    assert err.value.tensors == ["big.2"]


def test_llama_logits_on_gpu(tmp_path) -> None:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                                   num_hidden_layers=2, vocab_size=256)  # fmt: skip
    torch.manual_seed(0)
    ref = transformers.LlamaForCausalLM(cfg).eval().cuda()
    path = str(tmp_path / "llama.tensors")
    with ht.TensorSerializer(path) as s:
        s.write_module(ref)  # CUDA tensors copied out through pinned buffers
    model = transformers.LlamaForCausalLM(cfg).eval().cuda()
    for p in model.parameters():
        p.data.zero_()
    with ht.TensorDeserializer(path, device="cuda") as d:
        d.load_into_module(model)
    ids = torch.randint(0, 256, (2, 16), device="cuda")
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)
