"""Variants: ``variant="fp16"`` saves and loads ``model.fp16.tensors`` (and the stock ``model.fp16.safetensors``
behind a URI), for transformers models and diffusers models and pipelines."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")

from test_integration_api import _llama, _logits  # noqa: E402

import hf_tensorizer  # noqa: E402
from hf_tensorizer.errors import UsageError  # noqa: E402
from hf_tensorizer.integrations.artifact.layout import add_variant, is_weights_name  # noqa: E402
from hf_tensorizer.integrations.artifact.manifest import MANIFEST_NAME  # noqa: E402


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TENSORIZER_CACHE", str(tmp_path / "cache"))


def test_names_follow_transformers_and_diffusers() -> None:
    from diffusers.utils.hub_utils import _add_variant as diffusers_add_variant
    from transformers.modeling_utils import _add_variant as transformers_add_variant

    for name in ("model.tensors", "model.safetensors", "model.safetensors.index.json",
                 "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json"):  # fmt: skip
        ours = add_variant(name, "fp16")
        assert ours == transformers_add_variant(name, "fp16") == diffusers_add_variant(name, "fp16")
        assert add_variant(name, None) == name
    assert is_weights_name("model.fp16.tensors") and is_weights_name("model.tensors")
    assert not is_weights_name("other.tensors") and not is_weights_name("model.a.b.tensors")


def _half(model: Any) -> Any:
    return copy.deepcopy(model).half()


def test_local_artifact_holds_both_variants(tmp_path: Path) -> None:
    ref = _llama()
    hf_tensorizer.save_pretrained(ref, tmp_path / "m")
    hf_tensorizer.save_pretrained(_half(ref), tmp_path / "m", variant="fp16")
    assert {p.name for p in (tmp_path / "m").glob("*.tensors")} == {"model.tensors", "model.fp16.tensors"}
    files = json.loads((tmp_path / "m" / MANIFEST_NAME).read_text())["files"]
    assert "model.tensors" in files and "model.fp16.tensors" in files
    full = hf_tensorizer.from_pretrained(transformers.AutoModelForCausalLM, tmp_path / "m", dtype=torch.float32)
    assert torch.equal(_logits(ref), _logits(full))
    half = hf_tensorizer.from_pretrained(transformers.AutoModelForCausalLM, tmp_path / "m", variant="fp16")
    assert half.dtype == torch.float16
    assert torch.equal(half.lm_head.weight, ref.lm_head.weight.half())
    with pytest.raises(UsageError, match=r"no model\.bf16\.tensors"):
        hf_tensorizer.from_pretrained(transformers.LlamaForCausalLM, tmp_path / "m", variant="bf16")


def test_variant_only_folder_routes_through_hooks(tmp_path: Path, hf_enabled: None) -> None:
    ref = _llama()
    _half(ref).save_pretrained(tmp_path / "m", tensorized=True, variant="fp16")
    assert not (tmp_path / "m" / "model.tensors").exists()
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m", variant="fp16")
    assert torch.equal(loaded.lm_head.weight, ref.lm_head.weight.half())


def test_s3_variants_side_by_side(moto_s3: str, s3_bucket: str, hf_enabled: None) -> None:
    """A remote variant save keeps the other variants listed, as a local folder does."""
    ref = _llama()
    uri, opts = f"s3://{s3_bucket}/m", {"endpoint_url": moto_s3}
    ref.save_pretrained(uri, tensorized=True, tensorizer_options=opts)
    _half(ref).save_pretrained(uri, tensorized=True, variant="fp16", tensorizer_options=opts)
    half = transformers.AutoModelForCausalLM.from_pretrained(uri, variant="fp16", tensorizer_options=opts)
    assert torch.equal(half.lm_head.weight, ref.lm_head.weight.half())
    full = transformers.AutoModelForCausalLM.from_pretrained(uri, dtype=torch.float32, tensorizer_options=opts)
    assert torch.equal(_logits(ref), _logits(full))


def test_stock_variant_checkpoint_behind_uris(tmp_path: Path, moto_s3: str, s3_client: Any, s3_bucket: str,
                                              http_server: Any) -> None:  # fmt: skip
    ref = _llama()
    _half(ref).save_pretrained(tmp_path / "stock", variant="fp16")  # stock names: model.fp16.safetensors
    assert (tmp_path / "stock" / "model.fp16.safetensors").is_file()
    for f in (tmp_path / "stock").iterdir():
        s3_client.upload_file(str(f), s3_bucket, f"stock/{f.name}")
        http_server.write(f.name, f.read_bytes())
    uris = {
        f"file://{tmp_path / 'stock'}": {},
        f"s3://{s3_bucket}/stock": {"endpoint_url": moto_s3},
        http_server.url("").rstrip("/"): {},
    }
    for uri, opts in uris.items():
        half = hf_tensorizer.from_pretrained(transformers.AutoModelForCausalLM, uri, variant="fp16",
                                             tensorizer_options=opts)  # fmt: skip
        assert torch.equal(half.lm_head.weight, ref.lm_head.weight.half()), uri
    with pytest.raises(UsageError, match=r"no model\.tensors and no safetensors weights$"):
        hf_tensorizer.from_pretrained(transformers.AutoModelForCausalLM, f"s3://{s3_bucket}/stock",
                                      tensorizer_options={"endpoint_url": moto_s3})  # fmt: skip


def test_stock_sharded_variant(tmp_path: Path) -> None:
    ref = _llama()
    _half(ref).save_pretrained(tmp_path / "stock", variant="fp16", max_shard_size="20KB")
    assert (tmp_path / "stock" / "model.safetensors.index.fp16.json").is_file()
    half = hf_tensorizer.from_pretrained(transformers.AutoModelForCausalLM, f"file://{tmp_path / 'stock'}",
                                         variant="fp16")  # fmt: skip
    assert torch.equal(half.lm_head.weight, ref.lm_head.weight.half())


def test_diffusers_variants(tmp_path: Path, moto_s3: str, s3_bucket: str) -> None:
    diffusers = pytest.importorskip("diffusers")
    from test_integration_diffusers import _image, _pipeline

    pipe = _pipeline(tmp_path)
    hf_tensorizer.save_pretrained(pipe.unet, tmp_path / "unet", variant="fp16")
    assert (tmp_path / "unet" / "model.fp16.tensors").is_file()
    unet = hf_tensorizer.from_pretrained(diffusers.UNet2DConditionModel, tmp_path / "unet", variant="fp16")
    assert all(torch.equal(a, b) for a, b in zip(pipe.unet.state_dict().values(), unet.state_dict().values()))
    image = _image(pipe)
    uri, opts = f"s3://{s3_bucket}/sd", {"endpoint_url": moto_s3}
    hf_tensorizer.save_pretrained(pipe, uri, variant="fp16", tensorizer_options=opts)
    loaded = hf_tensorizer.from_pretrained(diffusers.StableDiffusionPipeline, uri, variant="fp16",
                                           tensorizer_options=opts)  # fmt: skip
    assert (_image(loaded) == image).all()
    # the stock per-component names (diffusion_pytorch_model.fp16.safetensors) behind a file:// URI
    pipe.save_pretrained(tmp_path / "stock", variant="fp16")
    assert (tmp_path / "stock" / "unet" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    stock = hf_tensorizer.from_pretrained(diffusers.StableDiffusionPipeline, f"file://{tmp_path / 'stock'}",
                                          variant="fp16")  # fmt: skip
    assert (_image(stock) == image).all()
