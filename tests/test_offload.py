"""``device_map`` entries ``"disk"``: offloaded weights are read from the artifact itself (no copies in
``offload_folder``), outputs equal stock, and resident memory stays bounded on a model larger than the budget."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from hf_tensorizer.errors import ObjectChangedError  # noqa: E402
from hf_tensorizer.integrations.loading.offload import Deferred  # noqa: E402

INPUT = torch.tensor([[3, 17, 5, 42, 8, 61, 2, 9]])
DEVICE_MAP = {
    "model.embed_tokens": "cpu", "model.layers.0": "disk", "model.layers.1": "cpu", "model.layers.2": "disk",
    "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "disk",
}  # fmt: skip


def _llama() -> Any:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(cfg).eval()


def _logits(model: Any) -> torch.Tensor:
    with torch.no_grad():
        return model(INPUT).logits


@pytest.fixture
def saved(tmp_path: Path) -> tuple[Any, Path, Path]:
    """The reference model, its stock folder and its tensorized artifact (saved before the hooks go on)."""
    ref = _llama()
    ref.save_pretrained(tmp_path / "stock")
    from hf_tensorizer.integrations.adapters.transformers.save import save_tensorized

    save_tensorized(ref, tmp_path / "tz")
    return ref, tmp_path / "stock", tmp_path / "tz"


def _stock_offloaded(stock: Path, offload_folder: Path) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(
        stock, device_map=DEVICE_MAP, offload_folder=offload_folder
    )
    return _logits(model)


def test_disk_entries_read_the_artifact(saved: tuple[Any, Path, Path], tmp_path: Path, hf_enabled: None) -> None:
    ref, stock, tz = saved
    expected = _logits(ref)
    assert torch.equal(_stock_offloaded(stock, tmp_path / "stock-offload"), expected)
    for uri in (str(tz), f"file://{tz}", f"file://{stock}"):  # ours, and a stock checkpoint through our engine
        folder = tmp_path / "offload"
        folder.mkdir(exist_ok=True)
        model = transformers.AutoModelForCausalLM.from_pretrained(uri, device_map=DEVICE_MAP, offload_folder=folder)
        assert model.model.layers[0].self_attn.q_proj.weight.is_meta  # offloaded, not held
        assert not model.model.layers[1].self_attn.q_proj.weight.is_meta
        assert torch.equal(_logits(model), expected)
        assert list(folder.iterdir()) == []  # nothing copied
        served = model.hf_tensorizer_offloaded
        assert set(served) == {
            k for k in ref.state_dict() if k.startswith(("model.layers.0.", "model.layers.2.", "lm_head."))
        }
        assert served.reads == len(served)  # one forward: each offloaded tensor read once
        assert torch.equal(_logits(model), expected) and served.reads == 2 * len(served)
    # no offload_folder at all: nothing needs one
    model = transformers.AutoModelForCausalLM.from_pretrained(tz, device_map=DEVICE_MAP)
    assert torch.equal(_logits(model), expected)


def test_disk_entries_remote_and_encrypted(saved: tuple[Any, Path, Path], http_server: Any, tmp_path: Path,
                                           hf_enabled: None) -> None:  # fmt: skip
    from hf_tensorizer.crypto import EncryptionKey

    ref = saved[0]
    expected = _logits(ref)
    key = EncryptionKey.generate()
    from hf_tensorizer.integrations.adapters.transformers.save import save_tensorized

    save_tensorized(ref, http_server.dir / "enc", encryption=key)
    save_tensorized(ref, http_server.dir / "plain")
    model = transformers.AutoModelForCausalLM.from_pretrained(http_server.url("plain"), device_map=DEVICE_MAP)
    assert torch.equal(_logits(model), expected)  # fetched on first use, into the cache
    cached = list((Path(os.environ["HF_TENSORIZER_CACHE"]) / "offload").rglob("*.bin"))
    assert len(cached) == len(model.hf_tensorizer_offloaded)
    requests = len(http_server.log())
    assert torch.equal(_logits(model), expected)  # then mapped from there: no more requests
    assert len(http_server.log()) == requests
    assert not any(p.name.endswith(".tmp") for p in cached[0].parent.iterdir())
    shutil.rmtree(Path(os.environ["HF_TENSORIZER_CACHE"]) / "offload")
    save_tensorized(ref, http_server.dir / "plain", metadata={"version": "2"})  # rewritten after the load
    with pytest.raises(ObjectChangedError):  # never a mix of two versions
        _logits(model)
    local = f"file://{http_server.dir / 'enc'}"
    cases = [(http_server.url("enc"), {"encryption": key}), (local, {"encryption": key, "verify_hash": True})]
    for uri, opts in cases:  # encrypted files are read through the engine on each use, never cached
        model = transformers.AutoModelForCausalLM.from_pretrained(uri, device_map=DEVICE_MAP, tensorizer_options=opts)
        assert torch.equal(_logits(model), expected)
        assert model.hf_tensorizer_offloaded.reads == len(model.hf_tensorizer_offloaded)
    assert not list((Path(os.environ["HF_TENSORIZER_CACHE"]) / "offload").rglob("*.bin"))  # no plaintext on disk


def test_deferred_never_stored() -> None:
    d = Deferred("x")
    assert d[...] is d and d.to(device="cpu", dtype=torch.float16) is d
    with pytest.raises(AttributeError):
        d.shape  # noqa: B018


# A model whose weights (~250 MB fp32) are far above what the loading process may add to its resident memory.
_BIG = dict(vocab_size=512, hidden_size=1024, intermediate_size=2048, num_hidden_layers=6, num_attention_heads=8,
            num_key_value_heads=8, max_position_embeddings=64, tie_word_embeddings=False)  # fmt: skip

_CHILD = textwrap.dedent(
    """
    import json, sys, torch, transformers
    import hf_tensorizer

    def hwm():
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024

    hf_tensorizer.enable()
    layers = int(sys.argv[2])
    device_map = {"model.embed_tokens": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    device_map.update({f"model.layers.{i}": "disk" for i in range(layers)})
    before = hwm()
    model = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], device_map=device_map)
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3, 4]])).logits
    print(json.dumps({"before": before, "after": hwm(), "sum": float(logits.double().sum())}))
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM is Linux's")
def test_peak_memory_bounded(tmp_path: Path) -> None:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(**_BIG)
    with torch.device("meta"):
        shapes = transformers.LlamaForCausalLM(cfg).state_dict()
    layer_bytes = sum(t.numel() * 4 for k, t in shapes.items() if k.startswith("model.layers."))
    model = transformers.LlamaForCausalLM(cfg).eval()
    from hf_tensorizer.integrations.adapters.transformers.save import save_tensorized

    save_tensorized(model, tmp_path / "big")
    with torch.no_grad():
        expected = float(model(torch.tensor([[1, 2, 3, 4]])).logits.double().sum())
    del model
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "HF_TENSORIZER_CACHE": str(tmp_path / "cache")}
    out = subprocess.run([sys.executable, "-c", _CHILD, str(tmp_path / "big"), str(cfg.num_hidden_layers)],
                         capture_output=True, text=True, env=env, timeout=300, check=True)  # fmt: skip
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["sum"] == expected
    grew = got["after"] - got["before"]
    # the disk-offloaded layers are mapped one module at a time: the peak grows by a fraction of their size
    assert grew < 0.4 * layer_bytes, (
        f"peak RSS grew by {grew >> 20} MiB for {layer_bytes >> 20} MiB of offloaded layers"
    )


def test_diffusers_disk_entries(tmp_path: Path, hf_enabled: None) -> None:
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    ref = diffusers.UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, norm_num_groups=32,
    ).eval()  # fmt: skip
    ref.save_pretrained(tmp_path / "unet", tensorized=True)
    device_map = {name: "cpu" for name, _ in ref.named_children()}
    device_map.update({"down_blocks": "disk", "up_blocks": "disk"})
    (tmp_path / "offload").mkdir()
    model = diffusers.UNet2DConditionModel.from_pretrained(
        tmp_path / "unet", device_map=device_map, offload_folder=tmp_path / "offload"
    )
    sample = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    text = torch.randn(1, 3, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = ref(sample, 10, text).sample
        assert torch.equal(model(sample, 10, text).sample, expected)
    assert list((tmp_path / "offload").iterdir()) == []
    served = model.hf_tensorizer_offloaded
    assert set(served) == {k for k in ref.state_dict() if k.startswith(("down_blocks.", "up_blocks."))}
    assert served.reads == len(served)
    assert model.down_blocks[0].resnets[0].conv1.weight.is_meta


def test_adapters_on_disk_offloaded_models_are_refused(saved: tuple[Any, Path, Path], tmp_path: Path,
                                                       hf_enabled: None) -> None:  # fmt: skip
    """peft re-dispatches disk-offloaded models by rewriting safetensors files, and stock ``load_adapter`` ignores
    disk-offloaded modules: a clear error instead of a crash inside safetensors or wrong outputs."""
    peft = pytest.importorskip("peft")
    from hf_tensorizer.errors import UsageError

    ref, _, tz = saved
    torch.manual_seed(1)
    adapter = peft.get_peft_model(ref, peft.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    adapter.save_pretrained(tmp_path / "adapter")
    model = transformers.AutoModelForCausalLM.from_pretrained(tz, device_map=DEVICE_MAP)
    with pytest.raises(UsageError, match="disk"):
        peft.PeftModel.from_pretrained(model, f"file://{tmp_path / 'adapter'}")
    with pytest.raises(UsageError, match="disk"):
        model.load_adapter(f"file://{tmp_path / 'adapter'}")


def test_disk_entries_keep_the_loaded_weights_or_fail_typed(saved: tuple[Any, Path, Path], tmp_path: Path,
                                                             hf_enabled: None) -> None:  # fmt: skip
    """Issue 26: the artifact changing under a running model. Replaced by the project's own save into the same
    folder, or deleted with its folder: forwards keep the loaded weights (the descriptor pins the file). Rewritten
    or truncated in place: ObjectChangedError before the next forward reads it, never new weights or SIGBUS."""
    ref, _, tz = saved
    expected = _logits(ref)
    other = _llama()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1.0)
    art = tmp_path / "art"
    shutil.copytree(tz, art)
    model = transformers.AutoModelForCausalLM.from_pretrained(art, device_map=DEVICE_MAP)
    assert torch.equal(_logits(model), expected)
    other.save_pretrained(art, tensorized=True)  # atomic replace (temp file + rename), other weights
    assert torch.equal(_logits(model), expected)
    shutil.rmtree(art)
    assert torch.equal(_logits(model), expected)

    for how in ("rewrite", "truncate"):
        art = tmp_path / how
        shutil.copytree(tz, art)
        model = transformers.AutoModelForCausalLM.from_pretrained(art, device_map=DEVICE_MAP)
        assert torch.equal(_logits(model), expected)
        (weights,) = art.glob("*.tensors")
        if how == "rewrite":  # cp new old / rsync --inplace: same inode, same size, other bytes
            data = bytearray(weights.read_bytes())
            data[-4096:] = bytes(4096)
            with open(weights, "r+b") as f:
                f.write(data)
        else:
            os.truncate(weights, weights.stat().st_size // 2)
        with pytest.raises(ObjectChangedError, match="rewritten in place"):
            _logits(model)
