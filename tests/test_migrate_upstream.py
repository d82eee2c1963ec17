"""Migrating from CoreWeave's tensorizer: the rows of docs/compat.md's migration table, each run here.

Upstream files are written with the real ``tensorizer`` package; models are tiny ones built from configs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from hf_tensorizer import TensorDeserializer, TensorSerializer
from hf_tensorizer.crypto import EncryptionKey, Passphrase
from hf_tensorizer.errors import UsageError
from hf_tensorizer.upstream import compat_kwargs, open_upstream

tensorizer = pytest.importorskip("tensorizer")
transformers = pytest.importorskip("transformers")
from tensorizer.serialization import DecryptionParams, EncryptionParams  # noqa: E402

IDS = torch.arange(12)[None]


def gpt_neo_config() -> Any:
    return transformers.GPTNeoConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=2,
                                     max_position_embeddings=64, attention_types=[[["global", "local"], 1]],
                                     window_size=8)  # fmt: skip


def llama_config() -> Any:
    return transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=2, num_key_value_heads=1,
                                    tie_word_embeddings=False)  # fmt: skip


CONFIGS = {"gpt-neo": gpt_neo_config, "llama": llama_config}


def tiny(kind: str) -> Any:
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(CONFIGS[kind]()).eval()


def meta_model(kind: str) -> Any:
    with torch.device("meta"):
        return transformers.AutoModelForCausalLM.from_config(CONFIGS[kind]()).eval()


def write_upstream_module(path: Path, model: torch.nn.Module, encryption: Any = None, **kw: Any) -> Path:
    s = tensorizer.TensorSerializer(str(path), encryption=encryption)
    s.write_module(model, **kw)
    s.close()
    return path


def sd_file(path: Path, encryption: Any = None) -> Path:
    s = tensorizer.TensorSerializer(str(path), encryption=encryption)
    s.write_state_dict({"a": torch.arange(6.0).reshape(2, 3), "b": torch.ones(4, dtype=torch.float16)})
    s.close()
    return path


def logits(model: Any) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


# ---- non-persistent buffers (issue 15: load_into_module of upstream write_module files) ---------------------


@pytest.mark.parametrize("kind", ["gpt-neo", "llama"])
def test_write_module_buffers_into_meta_model(tmp_path: Path, kind: str) -> None:
    ref = tiny(kind)
    path = write_upstream_module(tmp_path / "m.tensors", ref)
    model = meta_model(kind)
    with TensorDeserializer(path) as d:
        assert any(k.endswith(("attention.bias", "inv_freq")) for k in d)  # upstream stores non-persistent buffers
        info = d.load_into_module(model)  # strict
    assert info.missing_keys == [] and info.unexpected_keys == []
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    assert torch.equal(logits(model), logits(ref))


# ---- the migration table ------------------------------------------------------------------------------------


def test_row_plain_load(tmp_path: Path) -> None:
    path = sd_file(tmp_path / "w.tensors")
    with TensorDeserializer(path, device="cpu", dtype=torch.float16) as d:
        assert d["a"].dtype == torch.float16 and torch.equal(d["a"].float(), torch.arange(6.0).reshape(2, 3))


def test_row_filter(tmp_path: Path) -> None:
    path = sd_file(tmp_path / "w.tensors")
    with TensorDeserializer(path, filter=lambda n: n == "b") as d:
        assert list(d) == ["b"]
    with open_upstream(path, **compat_kwargs(filter_func=lambda n: n == "b")) as d:
        assert list(d) == ["b"]


def test_row_lazy(tmp_path: Path) -> None:
    path = sd_file(tmp_path / "w.tensors")
    with TensorDeserializer(path, **compat_kwargs(lazy_load=True)) as d:
        assert torch.equal(d["b"], torch.ones(4, dtype=torch.float16))


def test_row_plaid_mode(tmp_path: Path) -> None:
    path = sd_file(tmp_path / "w.tensors")
    assert compat_kwargs(plaid_mode=True, plaid_mode_buffers=4, device="cpu") == {"device": "cpu"}
    with TensorDeserializer(path, **compat_kwargs(plaid_mode=True)) as d:
        assert set(d) == {"a", "b"}


def test_row_verify_hash(tmp_path: Path) -> None:
    path = sd_file(tmp_path / "w.tensors")
    with open_upstream(path, **compat_kwargs(verify_hash=True)) as d:
        assert set(d) == {"a", "b"}
    with pytest.raises(UsageError, match="open_upstream"):
        TensorDeserializer(path, verify_hash=True)


def test_row_encryption_key(tmp_path: Path) -> None:
    params = EncryptionParams.random()
    path = sd_file(tmp_path / "e.tensors", params)
    with TensorDeserializer(path, encryption=EncryptionKey(params.key)) as d:
        assert torch.equal(d["b"], torch.ones(4, dtype=torch.float16))
    kw = compat_kwargs(encryption=DecryptionParams.from_key(params.key))
    assert isinstance(kw["encryption"], EncryptionKey)
    with TensorDeserializer(path, **kw) as d:
        assert set(d) == {"a", "b"}


def test_row_encryption_passphrase(tmp_path: Path) -> None:
    path = sd_file(tmp_path / "p.tensors", EncryptionParams.from_string("pw"))
    with TensorDeserializer(path, encryption=Passphrase("pw")) as d:
        assert set(d) == {"a", "b"}
    kw = compat_kwargs(encryption=DecryptionParams.from_string("pw"))
    assert isinstance(kw["encryption"], Passphrase)
    with TensorDeserializer(path, **kw) as d:
        assert set(d) == {"a", "b"}


def test_row_load_into_module(tmp_path: Path) -> None:
    ref = tiny("llama")
    path = write_upstream_module(tmp_path / "m.tensors", ref)
    model = meta_model("llama")
    with TensorDeserializer(path) as d:
        d.load_into_module(model)
    assert torch.equal(logits(model), logits(ref))


def test_row_load_into_module_filter(tmp_path: Path) -> None:
    ref = tiny("llama")
    path = write_upstream_module(tmp_path / "m.tensors", ref)
    model = tiny("llama")
    with torch.no_grad():
        model.lm_head.weight.zero_()
    with TensorDeserializer(path, filter=lambda n: n.startswith("lm_head")) as d:
        info = d.load_into_module(model, strict=False)
    assert "model.embed_tokens.weight" in info.missing_keys
    assert torch.equal(model.lm_head.weight, ref.lm_head.weight)


def test_row_write_module(tmp_path: Path) -> None:
    ref = tiny("gpt-neo")
    with TensorSerializer(tmp_path / "ours.tensors") as s:
        s.write_module(ref)
        with pytest.raises(TypeError):
            s.write_module(ref, remove_tensors=True)  # type: ignore[call-arg]
    model = meta_model("gpt-neo")
    with TensorDeserializer(tmp_path / "ours.tensors") as d:
        assert not any(k.endswith("attention.bias") for k in d)  # non-persistent buffers left out by default
        d.load_into_module(model)  # ... and rebuilt by the model's init hook
    assert torch.equal(logits(model), logits(ref))


def test_row_serializer_encryption(tmp_path: Path) -> None:
    key = EncryptionKey.generate()
    sd = {"w": torch.randn(8, 8, generator=torch.Generator().manual_seed(1))}
    for spec, path in ((key, tmp_path / "k.tensors"), (Passphrase("pw"), tmp_path / "p.tensors")):
        with TensorSerializer(path, encryption=spec) as s:
            s.write_state_dict(sd)
    with TensorDeserializer(tmp_path / "k.tensors", encryption=key) as d:
        assert torch.equal(d["w"], sd["w"])
    with TensorDeserializer(tmp_path / "p.tensors", encryption=Passphrase("pw")) as d:
        assert torch.equal(d["w"], sd["w"])


def _upload_with_open_stream(local: Path, uri: str, endpoint: str) -> None:
    from tensorizer import stream_io

    with stream_io.open_stream(uri, "wb", s3_access_key_id="testing-key-id", s3_secret_access_key="testing-secret-key",
                               s3_endpoint=endpoint, force_http=True) as f:  # fmt: skip
        f.write(local.read_bytes())


def test_row_open_stream_s3_read(tmp_path: Path, moto_s3: str, s3_bucket: str) -> None:
    uri = f"s3://{s3_bucket}/w.tensors"
    _upload_with_open_stream(sd_file(tmp_path / "w.tensors"), uri, moto_s3)  # upstream's way to put it there
    with TensorDeserializer(uri, endpoint_url=moto_s3) as d:  # credentials: AWS_ACCESS_KEY_ID/... (fixture)
        assert torch.equal(d["a"], torch.arange(6.0).reshape(2, 3))
    with pytest.raises(UsageError, match="endpoint_url"):
        TensorDeserializer(uri, s3_endpoint=moto_s3)


def test_row_open_stream_s3_write(moto_s3: str, s3_bucket: str) -> None:
    uri = f"s3://{s3_bucket}/out.tensors"
    with TensorSerializer(uri, endpoint_url=moto_s3) as s:
        s.write_state_dict({"x": torch.ones(3)})
    with TensorDeserializer(uri, endpoint_url=moto_s3) as d:
        assert torch.equal(d["x"], torch.ones(3))


def test_row_no_init_or_tensor(tmp_path: Path) -> None:
    from tensorizer.utils import no_init_or_tensor

    ref = tiny("llama")
    path = write_upstream_module(tmp_path / "m.tensors", ref)
    with no_init_or_tensor():
        model = transformers.AutoModelForCausalLM.from_config(llama_config()).eval()
    with TensorDeserializer(path) as d:
        d.load_into_module(model)
    assert torch.equal(logits(model), logits(ref))


# ---- compat_kwargs: what is refused -------------------------------------------------------------------------


def test_compat_kwargs_refuses_unknown_and_duplicates() -> None:
    with pytest.raises(UsageError, match="unknown keyword 'plaid'"):
        compat_kwargs(plaid=True)
    with pytest.raises(UsageError, match="given twice"):
        compat_kwargs(filter=["a"], filter_func=lambda n: True)
    with pytest.raises(UsageError, match="DecryptionParams"):
        compat_kwargs(encryption=EncryptionParams.random())


@pytest.mark.parametrize("name", ["filter_func", "lazy_load", "plaid_mode"])
def test_engine_points_upstream_spellings_to_compat(tmp_path: Path, name: str) -> None:
    path = sd_file(tmp_path / "w.tensors")
    with pytest.raises(UsageError, match="compat_kwargs"):
        TensorDeserializer(path, **{name: True})


# ---- pre-tensorized folders through from_pretrained ---------------------------------------------------------


def _upstream_folder(folder: Path, model: Any, encryption: Any = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(folder)
    write_upstream_module(folder / "model.tensors", model, encryption)
    return folder


@pytest.mark.parametrize("kind", ["gpt-neo", "llama"])
def test_from_pretrained_upstream_folder(tmp_path: Path, hf_enabled: None, kind: str,
                                         capfd: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    ref = tiny(kind)
    folder = _upstream_folder(tmp_path / "plain", ref)
    params = EncryptionParams.random()
    enc = _upstream_folder(tmp_path / "enc", ref, params)
    for root, opts in (
        (str(folder), None),
        (folder.as_uri(), None),
        (str(enc), {"encryption": EncryptionKey(params.key)}),
    ):
        model, info = transformers.AutoModelForCausalLM.from_pretrained(root, tensorizer_options=opts,
                                                                        output_loading_info=True)  # fmt: skip
        assert info["unexpected_keys"] == set() or not info["unexpected_keys"], info
        assert not info["missing_keys"], info
        assert torch.equal(logits(model), logits(ref))
    assert "UNEXPECTED" not in capfd.readouterr().err


def test_from_pretrained_upstream_s3_prefix(tmp_path: Path, hf_enabled: None, moto_s3: str, s3_bucket: str) -> None:
    ref = tiny("llama")
    params = EncryptionParams.random()
    for name, encryption in (("plain", None), ("enc", params)):
        folder = _upstream_folder(tmp_path / name, ref, encryption)
        for f in ("config.json", "model.tensors"):
            _upload_with_open_stream(folder / f, f"s3://{s3_bucket}/{name}/{f}", moto_s3)
    plain = transformers.AutoModelForCausalLM.from_pretrained(f"s3://{s3_bucket}/plain",
                                                              tensorizer_options={"endpoint_url": moto_s3})  # fmt: skip
    assert torch.equal(logits(plain), logits(ref))
    opts = {"endpoint_url": moto_s3, "encryption": EncryptionKey(params.key)}
    enc = transformers.AutoModelForCausalLM.from_pretrained(f"s3://{s3_bucket}/enc", tensorizer_options=opts)
    assert torch.equal(logits(enc), logits(ref))


# ---- non-weight files of the source carried into the artifact -----------------------------------------------


def sentence_transformers_folder(folder: Path) -> Path:
    """A sentence-transformers-style folder, by hand: the transformer at the root plus the pipeline's files."""
    ref = tiny("llama")
    ref.save_pretrained(folder)
    (folder / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]))  # fmt: skip
    (folder / "config_sentence_transformers.json").write_text('{"similarity_fn_name": "cosine"}')
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(
        '{"word_embedding_dimension": 32, "pooling_mode_mean_tokens": true}'
    )
    (folder / "2_Dense").mkdir()
    (folder / "2_Dense" / "model.safetensors").write_bytes(b"dense weights of another module")
    (folder / "README.md").write_text("# tiny\n")
    (folder / "pytorch_model.bin").write_bytes(b"replaced")
    (folder / ".git").mkdir()
    (folder / ".git" / "HEAD").write_text("ref")
    return folder


EXTRA = ["1_Pooling/config.json", "2_Dense/model.safetensors", "README.md", "config_sentence_transformers.json",
         "modules.json"]  # fmt: skip


def _check_extras(src: Path, dest: Path) -> None:
    for rel in EXTRA:
        assert (dest / rel).read_bytes() == (src / rel).read_bytes(), rel
    for gone in ("model.safetensors", "pytorch_model.bin", ".git"):
        assert not (dest / gone).exists(), gone
    manifest = json.loads((dest / "hf_tensorizer.json").read_text())
    assert set(EXTRA) <= set(manifest["files"])
    assert json.loads((dest / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]


def test_save_tensorized_keeps_other_files(tmp_path: Path, hf_enabled: None) -> None:
    src = sentence_transformers_folder(tmp_path / "st")
    model = transformers.AutoModelForCausalLM.from_pretrained(src)
    model.save_pretrained(tmp_path / "out", tensorized=True)
    _check_extras(src, tmp_path / "out")
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert torch.equal(logits(again), logits(model))


def test_save_tensorized_of_a_config_model_copies_nothing(tmp_path: Path, hf_enabled: None) -> None:
    tiny("llama").save_pretrained(tmp_path / "out", tensorized=True)
    assert sorted(os.listdir(tmp_path / "out")) == ["config.json", "generation_config.json", "hf_tensorizer.json",
                                                    "model.tensors"]  # fmt: skip


def test_cli_serialize_hf_model_id_keeps_other_files(tmp_path: Path) -> None:
    from hf_tensorizer.cli import main

    src = sentence_transformers_folder(tmp_path / "st")
    assert main(["serialize", "--hf-model-id", str(src), str(tmp_path / "out")]) == 0
    _check_extras(src, tmp_path / "out")


# ---- CLI: inspect of a folder, encrypt/decrypt --endpoint-url, the bench legend ---------------------------------


def test_cli_inspect_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from hf_tensorizer.cli import main

    folder = _upstream_folder(tmp_path / "up", tiny("llama"))
    assert main(["inspect", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "folder without an hf_tensorizer manifest" in out and "config.json" in out
    assert "weights model.tensors: tensorizer" in out
    assert main(["inspect", "--json", str(folder)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["manifest"] is None and doc["weights"][0]["format"] == "tensorizer"
    assert doc["files"] == ["config.json", "model.tensors"]


def test_cli_encrypt_decrypt_endpoint_url(tmp_path: Path, moto_s3: str, s3_bucket: str) -> None:
    from hf_tensorizer.cli import main

    key_file = tmp_path / "key"
    assert main(["keygen", str(key_file)]) == 0
    with TensorSerializer(tmp_path / "plain.tensors") as s:
        s.write_state_dict({"x": torch.arange(5.0)})
    enc = f"s3://{s3_bucket}/enc.tensors"
    assert main(["encrypt", str(tmp_path / "plain.tensors"), enc, "--key-file", str(key_file),
                 "--endpoint-url", moto_s3]) == 0  # fmt: skip
    assert main(["decrypt", enc, str(tmp_path / "back.tensors"), "--key-file", str(key_file),
                 "--endpoint-url", moto_s3]) == 0  # fmt: skip
    with TensorDeserializer(tmp_path / "back.tensors") as d:
        assert torch.equal(d["x"], torch.arange(5.0))


def test_cli_bench_help_has_a_loader_legend(capsys: pytest.CaptureFixture[str]) -> None:
    from hf_tensorizer.cli import main

    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    out = capsys.readouterr().out
    assert "loaders (--loaders codes):" in out and "tzmod" in out and "hft-pread16-c32" in out
