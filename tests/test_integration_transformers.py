"""transformers integration: tensorized round trips of tiny real models, compared bit for bit."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")

from helpers import meta_tensors  # noqa: E402

import hf_tensorizer  # noqa: E402
from hf_tensorizer import read_index  # noqa: E402
from hf_tensorizer.errors import UsageError  # noqa: E402
from hf_tensorizer.integrations.adapters.transformers.save import save_tensorized  # noqa: E402
from hf_tensorizer.integrations.artifact.manifest import MANIFEST_NAME  # noqa: E402
from hf_tensorizer.integrations.mixin import TensorizerMixin  # noqa: E402
from hf_tensorizer.sources import open_source  # noqa: E402

VOCAB = 96


def _llama() -> Any:
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(cfg)


def _gpt2() -> Any:
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                  bos_token_id=0, eos_token_id=1)  # fmt: skip
    return transformers.GPT2LMHeadModel(cfg)


def _bert() -> Any:
    cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=64)  # fmt: skip
    return transformers.BertForMaskedLM(cfg)


def _mixtral() -> Any:
    cfg = transformers.MixtralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                     num_experts_per_tok=2, max_position_embeddings=64)  # fmt: skip
    return transformers.MixtralForCausalLM(cfg)


MODELS = {"llama": _llama, "gpt2": _gpt2, "bert": _bert, "mixtral": _mixtral}
INPUT = torch.tensor([[3, 17, 5, 42, 8, 61, 2, 9]])


def _build(name: str) -> Any:
    torch.manual_seed(0)
    return MODELS[name]().eval()


def _logits(model: Any) -> torch.Tensor:
    with torch.no_grad():
        return model(INPUT.to(model.device)).logits


pytestmark = pytest.mark.usefixtures("hf_enabled")


@pytest.mark.parametrize("name", list(MODELS))
def test_round_trip_bit_identical(name: str, tmp_path: Path) -> None:
    ref = _build(name)
    ref.save_pretrained(tmp_path / "art", tensorized=True)
    ref.save_pretrained(tmp_path / "stock")  # stock safetensors: the hub key layout we must match
    from safetensors import safe_open

    with safe_open(str(tmp_path / "stock" / "model.safetensors"), "pt") as f:
        stock_keys = set(f.keys())
    with open_source(str(tmp_path / "art" / "model.tensors")) as src:
        assert set(read_index(src).tensors) == stock_keys
    loaded, info = type(ref).from_pretrained(tmp_path / "art", output_loading_info=True)
    assert type(loaded) is type(ref)
    assert not meta_tensors(loaded)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert torch.equal(_logits(ref), _logits(loaded))
    for (n, a), b in zip(ref.named_buffers(), loaded.buffers()):  # non-persistent buffers rebuilt (inv_freq)
        assert torch.equal(a, b), n


def test_mixtral_file_has_per_expert_hub_keys(tmp_path: Path) -> None:
    ref = _build("mixtral")
    save_tensorized(ref, tmp_path / "art")
    with open_source(str(tmp_path / "art" / "model.tensors")) as src:
        keys = set(read_index(src).tensors)
    assert "model.layers.0.block_sparse_moe.experts.3.w2.weight" in keys
    assert not any("gate_up_proj" in k for k in keys)  # runtime-fused names never reach the file


def test_auto_class_and_tied_weights(tmp_path: Path) -> None:
    ref = _build("gpt2")
    ref.save_pretrained(tmp_path / "art", tensorized=True)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "art"))
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    assert torch.equal(_logits(ref), _logits(loaded))


def test_dtype_and_keep_in_fp32(tmp_path: Path) -> None:
    ref = _build("llama")
    ref.save_pretrained(tmp_path / "art", tensorized=True)
    ref.save_pretrained(tmp_path / "stock")
    loaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "art", dtype=torch.bfloat16)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    # the reference is stock from_pretrained with the same dtype: it keeps buffers such as rotary inv_freq in
    # float32, which ref.to(bfloat16) would cast (transformers 5.2x), so the logits of the two differ
    stock = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "stock", dtype=torch.bfloat16)
    ref_bf16 = ref.to(torch.bfloat16)
    assert all(torch.equal(a, b) for a, b in zip(ref_bf16.parameters(), loaded.parameters(), strict=True))
    assert torch.equal(_logits(stock), _logits(loaded))

    torch.manual_seed(0)
    cfg = transformers.T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4)
    t5 = transformers.T5ForConditionalGeneration(cfg).eval()
    t5.save_pretrained(tmp_path / "t5", tensorized=True)
    half = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path / "t5", dtype=torch.float16)
    assert half.encoder.block[0].layer[1].DenseReluDense.wo.weight.dtype == torch.float32
    assert half.encoder.block[0].layer[0].SelfAttention.q.weight.dtype == torch.float16


def test_device_map_cpu_and_explicit_dict(tmp_path: Path) -> None:
    ref = _build("llama")
    ref.save_pretrained(tmp_path / "art", tensorized=True)
    m1 = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "art", device_map="cpu")
    assert {p.device.type for p in m1.parameters()} == {"cpu"}
    assert torch.equal(_logits(ref), _logits(m1))
    dmap = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "cpu", "model.norm": "cpu",
            "model.rotary_emb": "cpu", "lm_head": "cpu"}  # fmt: skip
    m2 = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "art", device_map=dmap)
    assert {p.device.type for p in m2.parameters()} == {"cpu"}
    assert not meta_tensors(m2)
    assert torch.equal(_logits(ref), _logits(m2))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_device_map_split_cuda_cpu(tmp_path: Path) -> None:
    ref = _build("llama")
    ref.save_pretrained(tmp_path / "art", tensorized=True)
    dmap = {"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": "cpu", "model.norm": 0,
            "model.rotary_emb": 0, "lm_head": 0}  # fmt: skip
    m = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "art", device_map=dmap)
    assert m.model.embed_tokens.weight.device.type == "cuda"
    assert not meta_tensors(m)
    torch.testing.assert_close(_logits(ref), _logits(m).cpu())  # GPU kernels differ from CPU ones
    m_auto = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "art", device_map="auto")
    assert m_auto.model.embed_tokens.weight.device.type == "cuda"


def test_loading_info_across_heads(tmp_path: Path) -> None:
    ref = _build("bert")
    ref.save_pretrained(tmp_path / "art", tensorized=True)
    base, info = transformers.BertModel.from_pretrained(tmp_path / "art", output_loading_info=True)
    assert info["missing_keys"] == {"pooler.dense.weight", "pooler.dense.bias"}
    assert "cls.predictions.bias" in info["unexpected_keys"]
    assert not meta_tensors(base)
    with torch.no_grad():
        assert torch.equal(ref.bert(INPUT).last_hidden_state, base(INPUT).last_hidden_state)


def test_artifact_files_config_generation_tokenizer(tmp_path: Path) -> None:
    ref = _build("llama")
    ref.generation_config.max_new_tokens = 7
    tok = _tokenizer(tmp_path)
    ref.save_pretrained(tmp_path / "art", tensorized=True, tokenizer=tok)
    manifest = json.loads((tmp_path / "art" / MANIFEST_NAME).read_text())
    assert "model.tensors" in manifest["files"] and "config.json" in manifest["files"]
    assert "tokenizer.json" in manifest["files"]
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "art")
    assert loaded.generation_config.max_new_tokens == 7
    tok2 = transformers.AutoTokenizer.from_pretrained(tmp_path / "art")
    assert tok2("hello world")["input_ids"] == tok("hello world")["input_ids"]


def _tokenizer(tmp_path: Path) -> Any:
    vocab = {"[UNK]": 0, "[CLS]": 1, "[SEP]": 2, "[PAD]": 3, "hello": 4, "world": 5}
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    return transformers.BertTokenizer(vocab=str(tmp_path / "vocab.txt"))


def test_mixin_without_global_switch(tmp_path: Path) -> None:
    hf_tensorizer.disable()

    class MyLlama(TensorizerMixin, transformers.LlamaForCausalLM):
        pass

    ref = _build("llama")
    save_tensorized(ref, tmp_path / "art")
    loaded = MyLlama.from_pretrained(tmp_path / "art")
    assert torch.equal(_logits(ref), _logits(loaded))
    loaded.save_pretrained(tmp_path / "again", tensorized=True)
    assert (tmp_path / "again" / "model.tensors").is_file()
    hf_tensorizer.enable()  # the fixture's disable() pairs with this


def test_switch_is_explicit_and_reversible(tmp_path: Path) -> None:
    ref = _build("llama")
    save_tensorized(ref, tmp_path / "art")
    ref.save_pretrained(tmp_path / "stock", tensorized=False)
    assert (tmp_path / "stock" / "model.safetensors").is_file()
    stock = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "stock")  # falls through unchanged
    assert torch.equal(_logits(ref), _logits(stock))
    hf_tensorizer.disable()
    from transformers import PreTrainedModel

    assert "hf_tensorizer" not in PreTrainedModel.from_pretrained.__func__.__module__
    with pytest.raises(OSError):
        transformers.LlamaForCausalLM.from_pretrained(tmp_path / "art")  # stock: no weights it knows
    with hf_tensorizer.enabled():
        assert torch.equal(_logits(ref), _logits(transformers.LlamaForCausalLM.from_pretrained(tmp_path / "art")))
    assert not hf_tensorizer.integrations.is_enabled()
    hf_tensorizer.enable()


_LATE_IMPORTS = """
import sys
import torch
import hf_tensorizer

hf_tensorizer.enable()  # before the processor classes and diffusers are imported: they are not, yet
assert "diffusers" not in sys.modules and "transformers.processing_utils" not in sys.modules
from transformers import AutoProcessor
from diffusers import AutoencoderKL

tok = AutoProcessor.from_pretrained("file://" + sys.argv[1])  # stock would take the URI for a Hub id
assert tok("hello")["input_ids"] == [1, 4, 2], tok("hello")
torch.manual_seed(0)
vae = AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, latent_channels=2, sample_size=8).eval()
vae.save_pretrained(sys.argv[2], tensorized=True)
back = AutoencoderKL.from_pretrained(sys.argv[2])
assert all(torch.equal(a, b) for a, b in zip(vae.state_dict().values(), back.state_dict().values(), strict=True))
from hf_tensorizer.integrations.switch import import_hooks

assert "diffusers" not in import_hooks._finder.callbacks  # fired once, then forgotten
hf_tensorizer.disable()
assert AutoencoderKL.from_pretrained.__func__.__module__.startswith("diffusers")
assert import_hooks._finder not in sys.meta_path  # nothing left behind
print("patched after import")
"""


def test_classes_imported_after_enable_are_patched(tmp_path: Path) -> None:
    """enable() does not import diffusers or the processor families (seconds of import time), yet classes
    imported after it load artifacts: they are patched as their modules are imported."""
    import subprocess
    import sys

    pytest.importorskip("diffusers")
    _tokenizer(tmp_path).save_pretrained(tmp_path / "tok")
    r = subprocess.run([sys.executable, "-c", _LATE_IMPORTS, str(tmp_path / "tok"), str(tmp_path / "vae")],
                       capture_output=True, text=True, timeout=300,
                       env={**os.environ, "HF_TENSORIZER_CACHE": str(tmp_path / "cache")})  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert "patched after import" in r.stdout


def test_errors(tmp_path: Path) -> None:
    from hf_tensorizer.integrations.adapters.transformers.load import load_pretrained

    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError):
        load_pretrained(transformers.LlamaForCausalLM, tmp_path / "empty")
    ref = _build("llama")
    ref.model.embed_tokens.weight = torch.nn.Parameter(torch.empty(VOCAB, 32, device="meta"))
    with pytest.raises(UsageError):
        save_tensorized(ref, tmp_path / "bad")
    assert not (tmp_path / "bad" / "model.tensors").exists()


def test_http_artifact(tmp_path: Path, http_server: Any) -> None:
    ref = _build("gpt2")
    save_tensorized(ref, http_server.dir / "gpt2", tokenizer=_tokenizer(tmp_path))
    uri = http_server.url("gpt2")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(uri)
    assert torch.equal(_logits(ref), _logits(loaded))
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    assert transformers.AutoTokenizer.from_pretrained(uri)("hello")["input_ids"] == [1, 4, 2]
    # weights were streamed, not cached: the cache folder holds only the small files
    cached = {p.name for p in Path(os.environ["HF_TENSORIZER_CACHE"]).rglob("*") if p.is_file()}
    assert "model.tensors" not in cached and "config.json" in cached
    (http_server.dir / "gpt2" / MANIFEST_NAME).unlink()  # no manifest: well-known names are probed
    assert torch.equal(_logits(ref), _logits(transformers.GPT2LMHeadModel.from_pretrained(uri)))


def test_s3_round_trip(moto_s3: str, s3_bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    ref = _build("mixtral")
    uri = f"s3://{s3_bucket}/models/mixtral"
    opts = {"endpoint_url": moto_s3}
    ref.save_pretrained(uri, tensorized=True, tensorizer_options=opts)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(uri, tensorizer_options=opts)
    assert torch.equal(_logits(ref), _logits(loaded))
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_s3)  # the usual way: boto3's environment
    cfg = transformers.AutoConfig.from_pretrained(uri)
    assert cfg.num_local_experts == 4
    verified = transformers.MixtralForCausalLM.from_pretrained(uri, tensorizer_options={"verify_hash": True})
    assert torch.equal(_logits(ref), _logits(verified))


@pytest.mark.parametrize("versioned", [True, False], ids=["versioned", "unversioned"])
def test_s3_weights_pinned_once_per_load(
    versioned: bool, moto_s3: str, s3_client: Any, s3_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The weights object is pinned when its index is read: an overwrite that lands before the tensors are
    read is ignored (versioned bucket: the pinned version is read) or reported, never mixed in."""
    from hf_tensorizer.errors import ObjectChangedError
    from hf_tensorizer.integrations.loading import weights as integration  # where every load opens its deserializers

    if versioned:
        s3_client.put_bucket_versioning(Bucket=s3_bucket, VersioningConfiguration={"Status": "Enabled"})
    ref = _build("llama")
    uri, opts = f"s3://{s3_bucket}/models/llama", {"endpoint_url": moto_s3}
    ref.save_pretrained(uri, tensorized=True, tensorizer_options=opts)
    torch.manual_seed(1)
    save_tensorized(transformers.LlamaForCausalLM(ref.config), tmp_path / "other")
    other = (tmp_path / "other" / "model.tensors").read_bytes()  # same names and shapes, other values
    real = integration.TensorDeserializer
    overwrites = []

    def overwritten_first(*args: Any, **kwargs: Any) -> Any:
        if not overwrites:  # a push lands after from_pretrained read the index, before the tensors are read
            overwrites.append(s3_client.put_object(Bucket=s3_bucket, Key="models/llama/model.tensors", Body=other))
        return real(*args, **kwargs)

    monkeypatch.setattr(integration, "TensorDeserializer", overwritten_first)
    if versioned:
        loaded = transformers.AutoModelForCausalLM.from_pretrained(uri, tensorizer_options=opts)
        assert torch.equal(_logits(ref), _logits(loaded))
    else:
        with pytest.raises(ObjectChangedError, match="changed while it was being read"):
            transformers.AutoModelForCausalLM.from_pretrained(uri, tensorizer_options=opts)
    assert overwrites


def test_encrypted_artifact(tmp_path: Path) -> None:
    """A key given as ``tensorizer_options`` reaches the inner load, for Auto classes and model classes."""
    from hf_tensorizer.crypto import EncryptionKey
    from hf_tensorizer.errors import MissingKeyError

    ref = _build("llama")
    key = EncryptionKey.generate()
    save_tensorized(ref, tmp_path / "enc", encryption=key)
    assert read_index(open_source(str(tmp_path / "enc" / "model.tensors"))).encrypted
    with pytest.raises(MissingKeyError, match=r"pass tensorizer_options=\{'encryption': key\}") as err:
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "enc")
    assert "encryption=EncryptionKey" not in str(err.value)  # the engine's advice, which from_pretrained lacks
    for cls in (transformers.AutoModelForCausalLM, transformers.LlamaForCausalLM):
        model = cls.from_pretrained(tmp_path / "enc", tensorizer_options={"encryption": key})
        assert torch.equal(_logits(model), _logits(ref))


def test_save_pretrained_passes_serializer_options(tmp_path: Path) -> None:
    from hf_tensorizer.crypto import EncryptionKey

    ref = _build("gpt2")
    key = EncryptionKey.generate()
    ref.save_pretrained(tmp_path / "enc", tensorized=True, encryption=key, max_shard_size="1GB")
    assert read_index(open_source(str(tmp_path / "enc" / "model.tensors"))).encrypted
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "enc", tensorizer_options={"encryption": key})
    assert torch.equal(_logits(model), _logits(ref))
    with pytest.raises(UsageError, match="digets"):
        ref.save_pretrained(tmp_path / "typo", tensorized=True, digets="sha256")
