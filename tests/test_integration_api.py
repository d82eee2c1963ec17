"""The switch-free API: hf_tensorizer.from_pretrained / save_pretrained / push_to_hub, with no hooks installed."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")

import hf_tensorizer  # noqa: E402
from hf_tensorizer import integrations  # noqa: E402
from hf_tensorizer.errors import UsageError  # noqa: E402
from hf_tensorizer.integrations import patches  # noqa: E402

INPUT = torch.tensor([[3, 17, 5, 42, 8, 61, 2, 9]])


@pytest.fixture(autouse=True)
def _no_hooks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """Every test starts and ends with nothing patched: the API must not need (or leave) the switch."""
    monkeypatch.setenv("HF_TENSORIZER_CACHE", str(tmp_path / "cache"))
    assert not integrations.is_enabled()
    yield
    assert not integrations.is_enabled()
    assert not patches.is_patched(transformers.PreTrainedModel, "from_pretrained")


def _llama(seed: int = 0) -> Any:
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(cfg).eval()


def _logits(model: Any) -> torch.Tensor:
    with torch.no_grad():
        return model(INPUT).logits


def test_exported_lazily() -> None:
    assert hf_tensorizer.from_pretrained is integrations.from_pretrained
    assert hf_tensorizer.save_pretrained is integrations.save_pretrained
    assert hf_tensorizer.push_to_hub is integrations.push_to_hub


def test_auto_class_model_class_and_stock_folder(tmp_path: Path) -> None:
    ref = _llama()
    assert hf_tensorizer.save_pretrained(ref, tmp_path / "art") == str(tmp_path / "art")
    assert (tmp_path / "art" / "model.tensors").is_file()
    auto = hf_tensorizer.from_pretrained(transformers.AutoModelForCausalLM, tmp_path / "art")
    assert type(auto) is transformers.LlamaForCausalLM
    assert torch.equal(_logits(ref), _logits(auto))
    direct = hf_tensorizer.from_pretrained(transformers.LlamaForCausalLM, f"file://{tmp_path / 'art'}",
                                           dtype=torch.bfloat16, tensorizer_options={"verify_hash": True})  # fmt: skip
    assert direct.dtype == torch.bfloat16
    base = hf_tensorizer.from_pretrained(transformers.AutoModel, tmp_path / "art")
    assert type(base) is transformers.LlamaModel
    # a stock folder loads the stock way, through the same call
    ref.save_pretrained(tmp_path / "stock")
    stock = hf_tensorizer.from_pretrained(transformers.AutoModelForCausalLM, tmp_path / "stock",
                                          tensorizer_options={"num_readers": 2})  # fmt: skip
    assert torch.equal(_logits(ref), _logits(stock))


def test_s3_round_trip(moto_s3: str, s3_bucket: str) -> None:
    ref = _llama()
    uri, opts = f"s3://{s3_bucket}/m", {"endpoint_url": moto_s3}
    hf_tensorizer.save_pretrained(ref, uri, tensorizer_options=opts, tensorized=True)
    loaded = hf_tensorizer.from_pretrained(transformers.AutoModelForCausalLM, uri, tensorizer_options=opts)
    assert torch.equal(_logits(ref), _logits(loaded))
    assert loaded.name_or_path == uri


def test_errors(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="model class"):
        hf_tensorizer.from_pretrained(transformers.AutoTokenizer, tmp_path)
    with pytest.raises(UsageError, match="cannot save a dict"):
        hf_tensorizer.save_pretrained({}, tmp_path / "x")
    with pytest.raises(UsageError, match="always writes a tensorized"):
        hf_tensorizer.save_pretrained(_llama(), tmp_path / "x", tensorized=False)
    with pytest.raises(UsageError, match="does not take 'bogus'"):
        hf_tensorizer.save_pretrained(_llama(), tmp_path / "x", bogus=1)
    with pytest.raises(UsageError, match="repository id"):
        hf_tensorizer.push_to_hub(_llama(), "s3://bucket/x")


def test_save_pretrained_tensorized_without_enable_writes_stock(tmp_path: Path) -> None:
    """Why the docs warn: without the hooks transformers ignores ``tensorized=True`` and writes safetensors."""
    _llama().save_pretrained(tmp_path / "m", tensorized=True)
    assert (tmp_path / "m" / "model.safetensors").is_file()
    assert not (tmp_path / "m" / "model.tensors").exists()


def test_push_to_hub(hub_server: Any) -> None:
    ref = _llama()
    hf_tensorizer.push_to_hub(ref, "me/tiny", token=hub_server.token)
    loaded = hf_tensorizer.from_pretrained(transformers.AutoModelForCausalLM, "hf://me/tiny",
                                           tensorizer_options={"token": hub_server.token})  # fmt: skip
    assert torch.equal(_logits(ref), _logits(loaded))


def test_diffusers_model_and_pipeline(tmp_path: Path) -> None:
    diffusers = pytest.importorskip("diffusers")
    from test_integration_diffusers import _image, _pipeline

    pipe = _pipeline(tmp_path)
    image = _image(pipe)
    hf_tensorizer.save_pretrained(pipe, tmp_path / "sd")
    assert (tmp_path / "sd" / "unet" / "model.tensors").is_file()
    loaded = hf_tensorizer.from_pretrained(diffusers.StableDiffusionPipeline, f"file://{tmp_path / 'sd'}")
    assert not integrations.is_enabled()  # the hooks were there for the call only
    assert (_image(loaded) == image).all()
    hf_tensorizer.save_pretrained(pipe.unet, tmp_path / "unet")
    unet = hf_tensorizer.from_pretrained(diffusers.UNet2DConditionModel, tmp_path / "unet")
    assert all(torch.equal(a, b) for a, b in zip(pipe.unet.state_dict().values(), unet.state_dict().values()))
    pipe2 = copy.deepcopy(pipe)  # a stock pipeline folder still loads stock
    pipe2.save_pretrained(tmp_path / "stock")
    stock = hf_tensorizer.from_pretrained(diffusers.StableDiffusionPipeline, os.fspath(tmp_path / "stock"))
    assert (_image(stock) == image).all()
