"""LoRA adapters for vLLM from tensorized PEFT artifacts, the parts that need no vLLM: ``--lora-modules`` entries
naming a tensorized adapter become folders vLLM's LoRA loader reads, holding the stock adapter's exact tensors
(tests/test_vllm.py serves them through the real server and compares completions)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import hf_tensorizer
from hf_tensorizer.crypto import EncryptionKey
from hf_tensorizer.errors import DecryptionError, SourceError
from hf_tensorizer.integrations.adapters.vllm.lora import _lora_values, adapter_folder, resolve_lora_modules

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A stock LoRA adapter folder, the same adapter tensorized, and encrypted (key in ``root/key``)."""
    root = tmp_path_factory.mktemp("adapters")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    lora = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = peft.get_peft_model(transformers.LlamaForCausalLM(cfg), lora)
    model.save_pretrained(root / "stock")
    key = EncryptionKey.generate()
    key.save(str(root / "key"))
    with hf_tensorizer.enabled():
        model.save_pretrained(root / "tensorized", tensorized=True)
        model.save_pretrained(root / "encrypted", tensorized=True, encryption=key)
    return root


def _tensors(folder: str | Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(os.path.join(folder, "adapter_model.safetensors"))


def _same(folder: str | Path, stock: Path) -> None:
    ours, ref = _tensors(folder), _tensors(stock)
    assert set(ours) == set(ref)
    for name, value in ref.items():
        assert ours[name].dtype == value.dtype and torch.equal(ours[name], value), name
    assert json.loads((Path(folder) / "adapter_config.json").read_text()) == json.loads(
        (stock / "adapter_config.json").read_text()
    )


def test_tensorized_lora_modules_become_folders_vllm_reads(adapters: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    monkeypatch.setenv("HF_TENSORIZER_CACHE", str(tmp_path / "cache"))
    stock, tz = adapters / "stock", adapters / "tensorized"
    argv = ["x", "--lora-modules", f"a={tz}", json.dumps({"name": "b", "path": tz.as_uri()}), f"s={stock}",
            "--port", "1", f"--lora-modules=c={tz}"]  # fmt: skip
    assert resolve_lora_modules(argv) == ["a", "b", "c"]
    a, b, c = argv[2].partition("=")[2], json.loads(argv[3])["path"], argv[7].partition("=")[2].partition("=")[2]
    assert argv[4:7] == [f"s={stock}", "--port", "1"]  # a stock folder and other flags stay as they are
    for folder in (a, b, c):
        assert folder.startswith(str(tmp_path / "cache")) and not os.path.exists(Path(folder) / "adapter_model.tensors")
        _same(folder, stock)
    assert os.stat(a).st_mode & 0o077 == 0  # owner-only: an encrypted adapter's tensors are decrypted there


def test_encrypted_adapter_needs_its_key(adapters: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TENSORIZER_CACHE", str(tmp_path / "cache"))
    enc = str(adapters / "encrypted")
    argv = ["x", "--lora-modules", f"e={enc}"]
    resolve_lora_modules(argv, json.dumps({"key_file": str(adapters / "key"), "verify_hash": True}))
    _same(argv[2].partition("=")[2], adapters / "stock")
    wrong = tmp_path / "wrong"
    EncryptionKey.generate().save(str(wrong))
    with pytest.raises(DecryptionError):
        resolve_lora_modules(["x", "--lora-modules", f"e={enc}"], json.dumps({"key_file": str(wrong)}))
    with pytest.raises(SourceError):
        adapter_folder((tmp_path / "missing").as_uri())


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(["--lora-modules", "--port", "1", "a=b", "-x", "--lora-modules=z=y", "{}"]),
                max_size=12))  # fmt: skip
def test_lora_module_values_are_the_arguments_after_the_flag(argv: list[str]) -> None:
    positions = _lora_values(argv)
    for i, arg in enumerate(argv):
        after_flag = any(argv[j] == "--lora-modules" and all(not a.startswith("-") for a in argv[j + 1 : i + 1])
                         for j in range(i))  # fmt: skip
        expected = arg.startswith("--lora-modules=") or (not arg.startswith("-") and after_flag)
        assert (i in positions) == expected, (argv, i)
