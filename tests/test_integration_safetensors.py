"""Stock transformers checkpoints (safetensors, single or sharded) behind a URI stream through our engine:
``from_pretrained("s3://…" | "http(s)://…" | "hf://…" | "file://…")`` works before anything is converted."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")

from hf_tensorizer.errors import FormatError, SourceError, UsageError  # noqa: E402

pytestmark = pytest.mark.usefixtures("hf_enabled")
INPUT = torch.tensor([[3, 17, 5, 42, 8, 61, 2, 9]])


def _llama() -> Any:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    return transformers.LlamaForCausalLM(cfg).eval()


def _gpt2() -> Any:
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                  bos_token_id=0, eos_token_id=1)  # fmt: skip
    return transformers.GPT2LMHeadModel(cfg).eval()


def _logits(model: Any) -> torch.Tensor:
    with torch.no_grad():
        return model(INPUT).logits


def _tokenizer(tmp_path: Path) -> Any:
    vocab = ["[UNK]", "[CLS]", "[SEP]", "[PAD]", "hello", "world"]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    return transformers.BertTokenizer(vocab=str(tmp_path / "vocab.txt"))


def _stock(tmp_path: Path, model: Any, shard: str | None = None) -> Path:
    """``model`` saved by stock ``save_pretrained`` (safetensors; sharded with ``shard``), with a tokenizer."""
    folder = tmp_path / "stock"
    model.save_pretrained(folder, max_shard_size=shard or "5GB")
    _tokenizer(tmp_path).save_pretrained(folder)
    assert not (folder / "model.tensors").exists()
    return folder


def _streamed_bytes(model: Any) -> int:
    return sum(m.bytes for m in model.hf_tensorizer_metrics)


def _param_bytes(model: Any) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def test_sharded_checkpoint_from_s3(
    tmp_path: Path, moto_s3: str, s3_client: Any, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    ref = _llama()
    folder = _stock(tmp_path, ref, shard="30KB")
    shards = sorted(p.name for p in folder.glob("*.safetensors"))
    assert len(shards) >= 3 and (folder / "model.safetensors.index.json").exists()
    for p in folder.iterdir():
        s3_client.upload_file(str(p), s3_bucket, f"stock/{p.name}")
    uri, opts = f"s3://{s3_bucket}/stock", {"endpoint_url": moto_s3}
    from hf_tensorizer.sources import s3 as s3_source

    real, built = s3_source.make_s3_client, []
    monkeypatch.setattr(s3_source, "make_s3_client", lambda **kw: built.append(kw) or real(**kw))
    loaded = transformers.AutoModelForCausalLM.from_pretrained(uri, tensorizer_options=opts)
    assert len(built) <= 3, built  # shared: the small files, the shard index, the shards (not one per request)
    assert torch.equal(_logits(ref), _logits(loaded))
    assert len(loaded.hf_tensorizer_metrics) == len(shards)  # one deserializer per shard (one device)
    assert _streamed_bytes(loaded) == _param_bytes(ref)  # every weight came through the engine
    tok = transformers.AutoTokenizer.from_pretrained(uri, tensorizer_options=opts)
    assert tok("hello world")["input_ids"] == [1, 4, 5, 2]


def test_single_file_over_http_keeps_ties(tmp_path: Path, http_server: Any) -> None:
    ref = _gpt2()
    shutil.copytree(_stock(tmp_path, ref), http_server.dir / "gpt2")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(http_server.url("gpt2"))
    assert torch.equal(_logits(ref), _logits(loaded))
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    assert _streamed_bytes(loaded) == _param_bytes(ref) - ref.lm_head.weight.nbytes  # tied: stored once


def test_each_shard_is_opened_and_its_header_read_once(tmp_path: Path, http_server: Any) -> None:
    """The placeholder's open and index read serve the tensor reads: one HEAD and one header read per shard."""
    ref = _llama()
    shutil.copytree(_stock(tmp_path, ref, shard="30KB"), http_server.dir / "llama")
    shards = sorted(p.name for p in (http_server.dir / "llama").glob("*.safetensors"))
    http_server.server.reset()
    loaded = transformers.AutoModelForCausalLM.from_pretrained(http_server.url("llama"), device_map="cpu")
    log = http_server.server.log()
    for name in shards:
        mine = [r for r in log if r["path"].endswith("/" + name)]
        assert sum(r["method"] == "HEAD" for r in mine) == 1, mine
        assert sum((r["range"] or "").startswith("bytes=0-") for r in mine) == 1, mine
    assert torch.equal(_logits(ref), _logits(loaded))


def test_stock_repo_from_the_hub(tmp_path: Path, hub_server: Any) -> None:
    from huggingface_hub import HfApi

    ref = _llama()
    api = HfApi(endpoint=hub_server.endpoint, token=hub_server.token)
    api.create_repo("tester/stock-llama")
    info = api.upload_folder(repo_id="tester/stock-llama", folder_path=str(_stock(tmp_path, ref, shard="30KB")))
    for uri in ("hf://tester/stock-llama", f"hf://tester/stock-llama@{info.oid}"):
        hub_server.log.clear()
        loaded = transformers.LlamaForCausalLM.from_pretrained(uri, tensorizer_options={"token": hub_server.token})
        assert torch.equal(_logits(ref), _logits(loaded))
        assert _streamed_bytes(loaded) == _param_bytes(ref)
        # the repository is listed once, not probed name by name: nothing is asked for that is not there
        assert sum("/tree/" in r["path"] for r in hub_server.log) == 1
        assert not [r["path"] for r in hub_server.log if r["path"].endswith(("vocab.json", "model.tensors"))]


def test_file_uri_goes_through_the_engine_plain_path_stays_stock(tmp_path: Path) -> None:
    ref = _llama()
    folder = _stock(tmp_path, ref, shard="30KB")
    ours = transformers.AutoModelForCausalLM.from_pretrained(folder.as_uri(), dtype=torch.bfloat16)
    assert _streamed_bytes(ours) == _param_bytes(ref)  # read as stored (fp32), cast by transformers
    # the reference: stock from_pretrained of the same folder with the same dtype (it keeps buffers such as rotary
    # inv_freq in float32, which ref.to(bfloat16) would cast, so ref's logits differ from both)
    stock_bf16 = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    assert all(torch.equal(a, b) for a, b in zip(ref.to(torch.bfloat16).parameters(), ours.parameters(), strict=True))
    assert torch.equal(_logits(stock_bf16), _logits(ours))
    stock = transformers.AutoModelForCausalLM.from_pretrained(folder)
    assert not hasattr(stock, "hf_tensorizer_metrics")


def test_bad_stock_checkpoints(tmp_path: Path, http_server: Any) -> None:
    ref = _llama()
    folder = _stock(tmp_path, ref, shard="30KB")
    shutil.copytree(folder, http_server.dir / "missing-shard")
    next((http_server.dir / "missing-shard").glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(SourceError):
        transformers.AutoModelForCausalLM.from_pretrained(http_server.url("missing-shard"))
    shutil.copytree(folder, http_server.dir / "escape")
    index = http_server.dir / "escape" / "model.safetensors.index.json"
    index.write_text(index.read_text().replace('"model-00001', '"../model-00001'))
    with pytest.raises(FormatError):
        transformers.AutoModelForCausalLM.from_pretrained(http_server.url("escape"))
    shutil.copytree(folder, http_server.dir / "twice")
    first, second = sorted((http_server.dir / "twice").glob("model-0000*.safetensors"))[:2]
    shutil.copy(first, second)  # the second shard now repeats the first one's tensors
    with pytest.raises(FormatError, match="appears in two weight files"):
        transformers.AutoModelForCausalLM.from_pretrained(http_server.url("twice"))
    (http_server.dir / "config-only").mkdir()
    shutil.copy(folder / "config.json", http_server.dir / "config-only")
    with pytest.raises(UsageError, match=r"no model\.tensors and no safetensors"):
        transformers.AutoModelForCausalLM.from_pretrained(http_server.url("config-only"))
