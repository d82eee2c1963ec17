"""from_pretrained on bad input, through real servers: a typed error that says what happened, the same everywhere."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

transformers = pytest.importorskip("transformers")
import torch  # noqa: E402

from hf_tensorizer.errors import ObjectTooLargeError, SourceError, UsageError  # noqa: E402
from hf_tensorizer.integrations.adapters.transformers.save import save_tensorized  # noqa: E402
from hf_tensorizer.integrations.artifact import cache  # noqa: E402
from hf_tensorizer.integrations.artifact.manifest import MANIFEST_NAME, write_manifest  # noqa: E402
from hf_tensorizer.integrations.options import TensorizerOptions  # noqa: E402

pytestmark = pytest.mark.usefixtures("hf_enabled")


def _tiny_llama() -> Any:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=2)  # fmt: skip
    return transformers.LlamaForCausalLM(config).eval()


def test_missing_file_uri_is_a_source_error_not_a_hub_lookup(tmp_path: Path) -> None:
    uri = (tmp_path / "missing").as_uri()
    for load in (transformers.AutoModelForCausalLM.from_pretrained, transformers.LlamaForCausalLM.from_pretrained,
                 transformers.AutoConfig.from_pretrained):  # fmt: skip
        with pytest.raises(SourceError, match="no such folder"):
            load(uri)


def test_misspelt_option_is_the_same_usage_error_on_every_transport(
    tmp_path: Path, http_server: Any, moto_s3: str, s3_bucket: str
) -> None:
    model = _tiny_llama()
    save_tensorized(model, tmp_path / "art")
    save_tensorized(model, http_server.dir / "art")
    model.save_pretrained(f"s3://{s3_bucket}/art", tensorized=True, tensorizer_options={"endpoint_url": moto_s3})
    messages = set()
    for uri, extra in ((str(tmp_path / "art"), {}), (http_server.url("art"), {}),
                       (f"s3://{s3_bucket}/art", {"endpoint_url": moto_s3})):  # fmt: skip
        with pytest.raises(UsageError, match="num_reader") as err:
            transformers.AutoModelForCausalLM.from_pretrained(uri, tensorizer_options={**extra, "num_reader": 2})
        messages.add(str(err.value))
    assert len(messages) == 1, messages  # rejected the same way, before any transport sees it


def test_options_are_split_once() -> None:
    options = TensorizerOptions.parse({"verify_hash": True, "endpoint_url": "http://127.0.0.1:1", "token": "t"})
    assert dict(options.engine) == {"verify_hash": True}
    assert dict(options.transport) == {"endpoint_url": "http://127.0.0.1:1", "token": "t"}
    assert TensorizerOptions.parse(options) is options
    with pytest.raises(UsageError, match="must be a dict"):
        TensorizerOptions.parse(["verify_hash"])  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="dtype"):
        TensorizerOptions.parse({"dtype": torch.float16})  # set by from_pretrained itself, not an option


def test_huge_small_file_is_refused_before_it_is_read(
    http_server: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A manifest may list any file as a small one: one larger than the cap is refused, nothing is cached."""
    from hf_tensorizer import constants

    art = http_server.dir / "huge"
    art.mkdir()
    (art / "config.json").write_text("{}")
    (art / "tokenizer.json").write_bytes(b"x" * 4096)
    (art / MANIFEST_NAME).write_bytes(write_manifest(["config.json", "tokenizer.json"], "transformers"))
    monkeypatch.setattr(constants, "MAX_SMALL_FILE_BYTES", 1024)
    monkeypatch.setenv("HF_TENSORIZER_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ObjectTooLargeError, match=r"tokenizer\.json"):
        cache.resolve(http_server.url("huge"))
    assert [p for p in (tmp_path / "cache").rglob("*") if p.is_file()] == []


def test_an_auto_class_fetches_a_remote_artifact_once(http_server: Any, tmp_path: Path) -> None:
    """The URI travels one way: the Auto class resolves it to the cached folder and hands that folder on (config,
    model class, generation config), so the manifest and small files are fetched once per call."""
    model = _tiny_llama()
    save_tensorized(model, http_server.dir / "once")
    uri = http_server.url("once")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(uri)
    gets = [e["path"] for e in http_server.log() if e["method"] == "GET"]  # an open is a HEAD, a read a GET
    manifest_gets = [p for p in gets if p.endswith(f"/once/{MANIFEST_NAME}")]
    config_gets = [p for p in gets if p.endswith("/once/config.json")]
    assert len(manifest_gets) == 1, manifest_gets
    assert len(config_gets) == 1, config_gets
    ids = torch.tensor([[1, 2, 3]])
    assert torch.equal(model(ids).logits, loaded(ids).logits)
