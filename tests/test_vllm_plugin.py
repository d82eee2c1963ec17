"""The vLLM plugin's parts that need no vLLM: the extra-config parser, the command-line reading of the front-end,
the lazy tensors tensor-parallel ranks narrow before reading (tests/test_vllm.py runs the real server)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hf_tensorizer import TensorSerializer
from hf_tensorizer.crypto import EncryptionKey, Passphrase
from hf_tensorizer.engine import read_index
from hf_tensorizer.engine.slices import SliceMetrics, TensorSlice
from hf_tensorizer.errors import MissingKeyError, TensorizerError, UsageError
from hf_tensorizer.integrations.adapters.vllm.frontend import engine_args, resolve_command_line, serve_arguments
from hf_tensorizer.integrations.adapters.vllm.lazy import LazyTensor
from hf_tensorizer.integrations.adapters.vllm.options import parse_extra_config, valid_keys
from hf_tensorizer.sources import open_source

# ---- --model-loader-extra-config ----------------------------------------------------------------------------


def test_options_split_into_engine_and_transport() -> None:
    opts = parse_extra_config('{"num_readers": 8, "verify_hash": true, "endpoint_url": "http://127.0.0.1:9"}')
    assert dict(opts.engine) == {"num_readers": 8, "verify_hash": True}
    assert dict(opts.transport) == {"endpoint_url": "http://127.0.0.1:9"}
    assert parse_extra_config(None).engine == {} and parse_extra_config({}).transport == {}


def test_unknown_key_names_every_valid_one() -> None:
    with pytest.raises(UsageError) as exc:
        parse_extra_config({"num_reader": 4, "chunk_bytes": 1 << 20})
    msg = str(exc.value)
    assert "['num_reader']" in msg
    for key in ("num_readers", "chunk_bytes", "verify_hash", "distributed", "endpoint_url", "key_file"):
        assert key in msg
    assert "commit_message" not in valid_keys() and "device" not in valid_keys()  # writer / vLLM's own


@pytest.mark.parametrize(
    ("config", "needle"),
    [
        ("[1, 2]", "JSON object"),
        ("{not json", "not valid JSON"),
        ({"num_readers": 0}, "positive integer"),
        ({"num_readers": True}, "positive integer"),
        ({"chunk_bytes": "8M"}, "positive integer"),
        ({"verify_hash": "yes"}, "true or false"),
        ({"adopt": 1}, "true or false"),
        ({"encryption": "s3cret"}, "key_file"),
        ({"encryption": True}, "may only be false"),
        ({"passphrase_env": "HF_TENSORIZER_TEST_UNSET_VAR"}, "not set"),
        ({"key_file": 3}, "must be a path"),
    ],
)
def test_bad_values_are_usage_errors(config: Any, needle: str) -> None:
    with pytest.raises(UsageError, match=needle):
        parse_extra_config(config)


def test_key_file_and_passphrase_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    key = EncryptionKey.generate()
    key.save(str(tmp_path / "k"))
    opts = parse_extra_config({"key_file": str(tmp_path / "k")})
    assert isinstance(opts.engine["encryption"], EncryptionKey)
    monkeypatch.setenv("MY_PASS", "correct horse")
    assert isinstance(parse_extra_config({"passphrase_env": "MY_PASS"}).engine["encryption"], Passphrase)
    with pytest.raises(MissingKeyError):
        parse_extra_config({"key_file": str(tmp_path / "missing")})
    with pytest.raises(UsageError, match="one of"):
        parse_extra_config({"key_file": str(tmp_path / "k"), "passphrase_env": "MY_PASS"})
    assert parse_extra_config({"encryption": False}).engine["encryption"] is False


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
                           lambda inner: st.lists(inner) | st.dictionaries(st.text(), inner), max_leaves=8)  # fmt: skip


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from([*valid_keys(), "bogus", ""]), json_values, max_size=4))
def test_any_json_object_parses_or_raises_a_typed_error(config: dict[str, Any]) -> None:
    config.pop("key_file", None)  # a path: tested above
    try:
        parse_extra_config(json.dumps(config))
    except TensorizerError:
        pass


# ---- the front-end's command line ---------------------------------------------------------------------------


def test_serve_arguments() -> None:
    extra = '{"num_readers": 2}'
    assert serve_arguments(["vllm", "serve", "s3://b/m", "--load-format", "hf_tensorizer"]) == ("s3://b/m", None)
    assert serve_arguments(["x", "--model=s3://b/m", "--load-format=hf_tensorizer",
                            "--model-loader-extra-config", extra]) == ("s3://b/m", extra)  # fmt: skip
    assert serve_arguments(["vllm", "serve", "s3://b/m", "--load-format", "safetensors"]) is None
    assert serve_arguments(["vllm", "serve", "--load-format", "hf_tensorizer"]) is None


def test_command_line_gets_the_local_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file:// artifact goes the way of a remote one: resolved, put in ARTIFACT's place, served by its name."""
    folder = tmp_path / "art"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    with TensorSerializer(str(folder / "model.tensors")) as s:
        s.write_state_dict({"w": torch.ones(4)})
    monkeypatch.delenv("HF_TENSORIZER_VLLM_RESOLVED", raising=False)
    monkeypatch.setattr("hf_tensorizer.integrations.adapters.vllm.frontend._log_resolved", lambda *a: None)
    uri = folder.as_uri()
    argv = ["vllm", "serve", uri, "--load-format", "hf_tensorizer", "--port", "1"]
    assert resolve_command_line(argv) == str(folder)
    assert argv == ["vllm", "serve", str(folder), "--load-format", "hf_tensorizer", "--port", "1",
                    "--served-model-name", uri]  # fmt: skip
    assert resolve_command_line(list(argv)) is None  # vLLM's own processes: done already
    monkeypatch.delenv("HF_TENSORIZER_VLLM_RESOLVED")
    argv = ["x", f"--model={uri}", "--load-format=hf_tensorizer", "--served-model-name", "m"]
    resolve_command_line(argv)
    assert argv == ["x", f"--model={folder}", "--load-format=hf_tensorizer", "--served-model-name", "m"]
    args = engine_args(uri, {"num_readers": 2})
    assert args["model"] == str(folder) and args["served_model_name"] == uri
    assert args["load_format"] == "hf_tensorizer" and args["model_loader_extra_config"] == {"num_readers": 2}


def test_preflight_stops_a_wrong_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from hf_tensorizer.errors import DecryptionError

    key = EncryptionKey.generate()
    with TensorSerializer(str(tmp_path / "model.tensors"), encryption=key) as s:
        s.write_state_dict({"w": torch.ones(4)})
    EncryptionKey.generate().save(str(tmp_path / "wrong"))
    monkeypatch.delenv("HF_TENSORIZER_VLLM_RESOLVED", raising=False)
    argv = ["vllm", "serve", str(tmp_path), "--load-format", "hf_tensorizer", "--model-loader-extra-config"]
    with pytest.raises(DecryptionError):
        resolve_command_line([*argv, json.dumps({"key_file": str(tmp_path / "wrong")})])
    monkeypatch.delenv("HF_TENSORIZER_VLLM_RESOLVED")
    with pytest.raises(MissingKeyError, match="key_file"):
        resolve_command_line([*argv, "{}"])


# ---- lazy tensors: the narrow happens before the read -------------------------------------------------------


@pytest.fixture
def weight(tmp_path: Path) -> tuple[torch.Tensor, TensorSlice, SliceMetrics]:
    torch.manual_seed(0)
    w = torch.randn(64, 48)
    path = str(tmp_path / "m.tensors")
    with TensorSerializer(path) as s:
        s.write_state_dict({"w": w})
    src = open_source(path)
    metrics = SliceMetrics()
    yield w, TensorSlice(src, read_index(src), "w", metrics), metrics
    src.close()


def _column_parallel(loaded: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """What vLLM's ColumnParallelLinear.weight_loader does with a checkpoint tensor."""
    shard = loaded.shape[0] // world
    param = torch.empty(shard, loaded.shape[1])
    param.copy_(loaded.narrow(0, rank * shard, shard))
    return param


def _row_parallel(loaded: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    shard = loaded.shape[1] // world
    param = torch.empty(loaded.shape[0], shard)
    param.copy_(loaded.narrow(1, rank * shard, shard))
    return param


@pytest.mark.parametrize("cut", [_column_parallel, _row_parallel])
def test_each_rank_reads_only_its_shard(weight: Any, cut: Any) -> None:
    w, sl, metrics = weight
    world = 2
    for rank in range(world):
        before = metrics.bytes
        got = cut(LazyTensor(sl), rank, world)
        assert torch.equal(got, cut(w, rank, world))
        assert metrics.bytes - before == w.numel() * w.element_size() // world  # this rank's half, no more


def test_lazy_tensor_ops(weight: Any) -> None:
    w, sl, metrics = weight
    lazy = LazyTensor(sl)
    assert lazy.shape == w.shape and lazy.dtype == w.dtype and metrics.bytes == 0
    parts = torch.chunk(lazy, 4, 0)  # fused weights split per shard (gate/up, q/k/v)
    assert all(isinstance(p, LazyTensor) for p in parts) and metrics.bytes == 0
    assert torch.equal(parts[2].narrow(1, 8, 16).clone(), w[32:48, 8:24])
    assert torch.equal(torch.split(lazy, [10, 38], 1)[1] + 0, w[:, 10:])
    assert torch.equal(lazy[5], w[5]) and torch.equal(lazy[-1, 3:7], w[-1, 3:7])
    assert torch.equal(lazy[:, -4:].to(torch.float64), w[:, -4:].double())
    assert torch.equal(lazy.t().contiguous(), w.t())  # any other op reads the box whole
    assert "LazyTensor('w'" in repr(lazy[2:4])


def test_bare_hub_id_of_an_artifact(hub_server: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``vllm serve me/llama-tz``: the Hub id of a tensorized repository resolves like ``hf://me/llama-tz``."""
    from transformers import GPT2Config, GPT2LMHeadModel

    import hf_tensorizer

    monkeypatch.setenv("HF_TOKEN", hub_server.token)
    monkeypatch.setenv("HF_TENSORIZER_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("HF_TENSORIZER_VLLM_RESOLVED", raising=False)
    monkeypatch.setattr("hf_tensorizer.integrations.adapters.vllm.frontend._log_resolved", lambda *a: None)
    cfg = GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=4, n_positions=32)
    hf_tensorizer.push_to_hub(GPT2LMHeadModel(cfg), "tester/tz")
    argv = ["vllm", "serve", "tester/tz", "--load-format", "hf_tensorizer"]
    folder = resolve_command_line(argv)
    assert folder is not None and folder.startswith(str(tmp_path / "cache"))
    assert argv[2] == folder and argv[-2:] == ["--served-model-name", "tester/tz"]
    assert (Path(folder) / "config.json").is_file() and not (Path(folder) / "model.tensors").exists()
