"""PEFT adapters from URIs (S3, HTTP, file://), stock safetensors and tensorized, compared bit for bit with
stock loading of the same adapter from its local folder."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import hf_tensorizer  # noqa: E402
from hf_tensorizer.errors import SourceError  # noqa: E402
from hf_tensorizer.integrations import patches  # noqa: E402
from hf_tensorizer.integrations.artifact.manifest import MANIFEST_NAME  # noqa: E402

INPUT = torch.tensor([[3, 17, 5, 42, 8, 61, 2, 9]])


def _base() -> Any:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(cfg).eval()


def _adapter(seed: int = 1) -> Any:
    """A LoRA adapter with random (non-zero) weights, so a wrong or missing load changes the logits."""
    torch.manual_seed(seed)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    return peft.get_peft_model(_base(), cfg)


def _logits(model: Any) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(INPUT).logits


@pytest.fixture
def stock_folder(tmp_path: Path) -> Path:
    """A stock adapter folder (adapter_config.json + adapter_model.safetensors), written before enable()."""
    folder = tmp_path / "stock"
    _adapter().save_pretrained(folder)
    assert (folder / "adapter_model.safetensors").is_file()
    return folder


@pytest.fixture
def reference(stock_folder: Path) -> torch.Tensor:
    """Stock peft loading of the local folder, hooks off (fixtures run in argument order: before hf_enabled)."""
    assert not hf_tensorizer.integrations.is_enabled()
    return _logits(peft.PeftModel.from_pretrained(_base(), str(stock_folder)))


def _check_all_entry_points(uri: str, reference: torch.Tensor, **kw: Any) -> None:
    assert torch.equal(_logits(peft.PeftModel.from_pretrained(_base(), uri, **kw)), reference)
    base = _base()
    base.load_adapter(uri, adapter_name="mine", **kw)  # transformers' PeftAdapterMixin
    assert torch.equal(_logits(base), reference)
    other = peft.get_peft_model(_base(), peft.LoraConfig(r=2, target_modules=["q_proj"]), adapter_name="other")
    other.load_adapter(uri, adapter_name="streamed", **kw)  # a multi-LoRA server: one more adapter on the model
    other.set_adapter("streamed")
    assert torch.equal(_logits(other), reference)
    config = peft.PeftConfig.from_pretrained(uri, **kw)
    assert config.r == 4 and sorted(config.target_modules) == ["down_proj", "q_proj", "v_proj"]


def test_s3_stock_and_tensorized(
    stock_folder: Path, reference: torch.Tensor, moto_s3: str, s3_client: Any, s3_bucket: str, hf_enabled: None
) -> None:
    for name in os.listdir(stock_folder):
        s3_client.upload_file(str(stock_folder / name), s3_bucket, f"adapters/stock/{name}")
    opts = {"tensorizer_options": {"endpoint_url": moto_s3}}
    _check_all_entry_points(f"s3://{s3_bucket}/adapters/stock", reference, **opts)
    tensorized = f"s3://{s3_bucket}/adapters/tz"
    peft.PeftModel.from_pretrained(_base(), str(stock_folder)).save_pretrained(tensorized, **opts)
    keys = {o["Key"] for o in s3_client.list_objects_v2(Bucket=s3_bucket, Prefix="adapters/tz/")["Contents"]}
    assert {"adapters/tz/adapter_model.tensors", f"adapters/tz/{MANIFEST_NAME}"} <= keys
    assert "adapters/tz/adapter_model.safetensors" not in keys
    _check_all_entry_points(tensorized, reference, **opts)
    # weights were streamed, not cached: the cache holds the config and the marker only
    cached = {p.name for p in Path(os.environ["HF_TENSORIZER_CACHE"]).rglob("*") if p.is_file()}
    assert not any(n.startswith("adapter_model") for n in cached) and "adapter_config.json" in cached


def test_http_stock_and_tensorized(stock_folder: Path, reference: torch.Tensor, http_server: Any,
                                   hf_enabled: None) -> None:  # fmt: skip
    (http_server.dir / "stock").mkdir()
    for name in os.listdir(stock_folder):
        (http_server.dir / "stock" / name).write_bytes((stock_folder / name).read_bytes())
    _check_all_entry_points(http_server.url("stock"), reference)
    model = peft.PeftModel.from_pretrained(_base(), str(stock_folder))
    model.save_pretrained(http_server.dir / "tz", tensorized=True)
    _check_all_entry_points(http_server.url("tz"), reference)


def test_local_tensorized_and_file_uri(stock_folder: Path, reference: torch.Tensor, tmp_path: Path,
                                       hf_enabled: None) -> None:  # fmt: skip
    _check_all_entry_points(f"file://{stock_folder}", reference)
    model = peft.PeftModel.from_pretrained(_base(), str(stock_folder))
    model.save_pretrained(tmp_path / "tz", tensorized=True)
    assert sorted(os.listdir(tmp_path / "tz")) == [
        "README.md", "adapter_config.json", "adapter_model.tensors", MANIFEST_NAME,
    ]  # fmt: skip
    _check_all_entry_points(str(tmp_path / "tz"), reference)  # a plain path to a tensorized folder
    _check_all_entry_points(f"file://{tmp_path / 'tz'}", reference)
    assert (
        peft.load_peft_weights(str(tmp_path / "tz"), device="cpu").keys()
        == peft.load_peft_weights(str(stock_folder), device="cpu").keys()
    )


def test_named_adapters_saved_in_subfolders(stock_folder: Path, tmp_path: Path, hf_enabled: None) -> None:
    model = peft.PeftModel.from_pretrained(_base(), str(stock_folder))
    two = _adapter(seed=2)
    two.save_pretrained(tmp_path / "two")
    model.load_adapter(str(tmp_path / "two"), adapter_name="two")
    model.save_pretrained(tmp_path / "both", tensorized=True)
    assert (tmp_path / "both" / "adapter_model.tensors").is_file()
    assert (tmp_path / "both" / "two" / "adapter_model.tensors").is_file()
    loaded = peft.PeftModel.from_pretrained(_base(), f"file://{tmp_path / 'both'}/two")
    assert torch.equal(_logits(loaded), _logits(peft.PeftModel.from_pretrained(_base(), str(tmp_path / "two"))))


def test_missing_adapter_is_a_source_error(moto_s3: str, s3_bucket: str, hf_enabled: None) -> None:
    with pytest.raises(SourceError):
        peft.PeftModel.from_pretrained(_base(), f"s3://{s3_bucket}/nothing",
                                       tensorizer_options={"endpoint_url": moto_s3})  # fmt: skip


def test_disable_restores_peft(hf_enabled: None) -> None:
    from peft import peft_model
    from peft.utils import save_and_load

    assert patches.is_patched(peft.PeftModel, "from_pretrained")
    assert patches.is_patched(peft_model, "load_peft_weights")
    hf_tensorizer.disable()
    try:
        assert not patches.is_patched(peft_model, "load_peft_weights")
        assert peft_model.load_peft_weights is save_and_load.load_peft_weights
        assert peft_model.load_peft_weights.__module__ == "peft.utils.save_and_load"
    finally:
        hf_tensorizer.enable()


_LATE_IMPORT = """
import sys
import hf_tensorizer
from hf_tensorizer.integrations import patches

hf_tensorizer.enable()  # before peft is imported
assert "peft" not in sys.modules
import peft
from peft import peft_model

assert patches.is_patched(peft.PeftModel, "from_pretrained") and patches.is_patched(peft_model, "load_peft_weights")
hf_tensorizer.disable()
assert peft_model.load_peft_weights.__module__ == "peft.utils.save_and_load"
assert not patches.is_patched(peft.PeftModel, "from_pretrained")
print("patched after import")
"""


def test_peft_imported_after_enable_is_patched(tmp_path: Path) -> None:
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "HF_TENSORIZER_CACHE": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", _LATE_IMPORT], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0 and "patched after import" in out.stdout, out.stderr[-2000:]


def test_hub_adapter(stock_folder: Path, reference: torch.Tensor, hub_server: Any, hf_enabled: None) -> None:
    from huggingface_hub import HfApi

    api = HfApi(endpoint=hub_server.endpoint, token=hub_server.token)
    api.create_repo("tester/lora")
    commit = api.upload_folder(folder_path=str(stock_folder), repo_id="tester/lora")
    _check_all_entry_points("hf://tester/lora", reference)
    # the branch root is pinned to its commit: config and weights come from one version
    from hf_tensorizer.integrations.adapters.peft.load import adapter_weights, resolve_adapter

    assert adapter_weights(resolve_adapter("hf://tester/lora")) == [
        f"hf://tester/lora@{commit.oid}/adapter_model.safetensors"
    ]


def test_encrypted_adapter(stock_folder: Path, reference: torch.Tensor, tmp_path: Path, hf_enabled: None) -> None:
    from hf_tensorizer.crypto import EncryptionKey
    from hf_tensorizer.errors import MissingKeyError

    key = EncryptionKey.generate()
    model = peft.PeftModel.from_pretrained(_base(), str(stock_folder))
    model.save_pretrained(tmp_path / "enc", tensorized=True, encryption=key)
    opts = {"tensorizer_options": {"encryption": key, "verify_hash": True}}
    _check_all_entry_points(str(tmp_path / "enc"), reference, **opts)
    with pytest.raises(MissingKeyError):
        peft.PeftModel.from_pretrained(_base(), str(tmp_path / "enc"))
