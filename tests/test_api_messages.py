"""Python-API mistakes a new user makes first: each error's message leads with what to fix, its type is what stock
code raises (an ``OSError`` for a path, ``UsageError`` for options), and its chain is short."""

from __future__ import annotations

import os
import traceback
from pathlib import Path

import pytest
from conftest import isolate_aws

from hf_tensorizer.errors import SourceError, UsageError

transformers = pytest.importorskip("transformers")


def _trace(exc: BaseException) -> str:
    return "".join(traceback.format_exception(exc))


@pytest.mark.parametrize("spelling", ["absolute", "relative", "pathlike", "tilde"])
def test_missing_local_folder_says_where_it_looked(spelling, hf_enabled, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    given = {
        "absolute": str(tmp_path / "models" / "llama"),
        "relative": "./models/llama-tensorized",
        "pathlike": Path("models") / "deeper" / "llama",
        "tilde": "~/models/llama",
    }[spelling]
    with pytest.raises(OSError) as info:  # what stock raises for it, so callers' except clauses still hold
        transformers.AutoModelForCausalLM.from_pretrained(given)
    message = str(info.value)
    assert isinstance(info.value, SourceError)
    assert message.startswith(f"{os.fspath(given)}: no such local folder (looked at {os.path.abspath(given)})")
    assert "Repo id must be" not in message
    with pytest.raises(OSError, match="no such local folder"):  # a model class, not an Auto class
        transformers.LlamaForCausalLM.from_pretrained(given)


def test_missing_local_folder_through_the_function_api(tmp_path) -> None:
    import hf_tensorizer

    missing = tmp_path / "nope"
    with pytest.raises(OSError, match=f"^{missing}: no such local folder"):
        hf_tensorizer.from_pretrained(transformers.AutoModelForCausalLM, str(missing))


def test_hub_ids_and_existing_folders_are_untouched(hf_enabled, tmp_path) -> None:
    from hf_tensorizer.integrations.artifact.routing import check_local_path

    for fine in ("org/name", "gpt2", str(tmp_path), tmp_path, None, "s3://bucket/x", "file:///nope"):
        check_local_path(fine)  # raises nothing: the Hub, the folder or the URI's own source answers


def test_s3_without_credentials_leads_with_the_cause(hf_enabled, tmp_path, monkeypatch) -> None:
    isolate_aws(monkeypatch, tmp_path)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # never AWS; nothing is sent without credentials
    with pytest.raises(SourceError) as info:
        transformers.AutoModelForCausalLM.from_pretrained("s3://bucket/llama")
    message = str(info.value)
    assert message.startswith("s3://bucket/llama/hf_tensorizer.json: no AWS credentials found; set AWS_ACCESS_KEY_ID")
    assert "AWS_PROFILE" in message and message.endswith("(so: no tensorized artifact at s3://bucket/llama "
                                                         "(no hf_tensorizer.json, config or weights))")  # fmt: skip
    trace = _trace(info.value)
    assert "direct cause" not in trace and "During handling" not in trace and "botocore" not in trace


def test_missing_artifact_says_so_first(hf_enabled, moto_s3, s3_bucket, monkeypatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_s3)
    root = f"s3://{s3_bucket}/nothing"
    with pytest.raises(SourceError) as info:
        transformers.AutoModelForCausalLM.from_pretrained(root)
    assert str(info.value) == f"no tensorized artifact at {root} (no hf_tensorizer.json, config or weights)"
    assert "direct cause" not in _trace(info.value)


def test_misspelt_option_gets_a_suggestion(hf_enabled) -> None:
    with pytest.raises(UsageError) as info:
        transformers.AutoModelForCausalLM.from_pretrained("s3://bucket/llama", tensorizer_options={"num_reader": 4})
    assert str(info.value).startswith("unknown tensorizer_options key 'num_reader': did you mean 'num_readers'?")
    from hf_tensorizer.integrations.options import TensorizerOptions

    with pytest.raises(UsageError) as info:
        TensorizerOptions.parse({"zzz": 1, "endpoint": "x", "endpont_url": "y"})
    message = str(info.value)
    assert message.startswith("unknown tensorizer_options keys 'endpont_url': did you mean 'endpoint_url'?, 'zzz':")
    assert "engine options are" in message  # the full lists still follow
