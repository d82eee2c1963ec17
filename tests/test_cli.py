"""The ``hf-tensorizer`` command line, run as a real subprocess where the exit code matters."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import hf_tensorizer as ht
from hf_tensorizer.cli import main


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "hf_tensorizer", *args], capture_output=True, text=True,
                          timeout=300, env={**os.environ, **(env or {})})  # fmt: skip


@pytest.fixture
def safetensors_file(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    sd = {"w": torch.randn(64, 32, generator=g).to(torch.bfloat16), "b": torch.arange(7), "m": torch.ones(3) > 0}
    path = tmp_path / "weights.safetensors"
    save_file(sd, str(path))
    return path, sd


def test_help_for_every_command() -> None:
    for cmd in ("serialize", "inspect", "verify", "bench", "demo", "keygen", "encrypt", "decrypt"):
        r = _cli(cmd, "--help")
        assert r.returncode == 0, r.stderr
        assert "usage:" in r.stdout


def test_serialize_inspect_verify(tmp_path: Path, safetensors_file, capsys: pytest.CaptureFixture[str]) -> None:
    src, sd = safetensors_file
    dest = tmp_path / "w.tensors"
    assert main(["serialize", str(src), str(dest), "--metadata", "origin=test", "--dtype", "float32"]) == 0
    out = ht.load_state_dict(dest)
    assert out["w"].dtype == torch.float32 and torch.equal(out["w"], sd["w"].float())
    assert torch.equal(out["b"], sd["b"]) and torch.equal(out["m"], sd["m"])
    capsys.readouterr()
    assert main(["inspect", str(dest), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["metadata"] == {"origin": "test"} and {t["name"] for t in doc["tensors"]} == set(sd)
    assert main(["verify", str(dest)]) == 0

    # corrupt one tensor's bytes: verify names it and exits 1
    from hf_tensorizer.sources import open_source

    with open_source(str(dest)) as src:
        entry = ht.read_index(src).tensors["w"]
    data = bytearray(dest.read_bytes())
    data[entry.offset + 5] ^= 1
    dest.write_bytes(bytes(data))
    capsys.readouterr()
    assert main(["verify", str(dest)]) == 1
    assert "  w" in capsys.readouterr().out


def test_errors_are_clear_and_exit_2(tmp_path: Path) -> None:
    (tmp_path / "junk.tensors").write_bytes(b"not a tensors file at all" * 10)
    r = _cli("inspect", str(tmp_path / "junk.tensors"))
    assert r.returncode == 2 and "bad magic" in r.stderr
    (tmp_path / "weights.xyz").write_bytes(b"?")
    r = _cli("serialize", str(tmp_path / "weights.xyz"), str(tmp_path / "o.tensors"))
    assert r.returncode == 2 and "cannot tell the format" in r.stderr
    r = _cli("serialize", "--hf-model-id", str(tmp_path))
    assert r.returncode == 2 and "--dest" in r.stderr


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["a.safetensors", "b.tensors"], ("a.safetensors", "b.tensors")),
        (["a.safetensors", "--dest", "b.tensors"], ("a.safetensors", "b.tensors")),
        (["--hf-model-id", "org/m", "--dest", "s3://b/p"], ("org/m", "s3://b/p")),
        (["--hf-model-id", "org/m", "s3://b/p"], ("org/m", "s3://b/p")),
        (["a.safetensors"], None),
        (["a.safetensors", "b.tensors", "--dest", "c.tensors"], None),
        (["--hf-model-id", "org/m", "x", "--dest", "s3://b/p"], None),
        (["--hf-model-id", "org/m"], None),
        (["--hf-model-id", "org/m", "--dest-bucket", "tensorized"], ("org/m", "s3://tensorized/org/m")),
        (["--hf-model-id", "org/m", "--dest-bucket", "s3://tensorized/"], ("org/m", "s3://tensorized/org/m")),
        (["--hf-model-id", "org/m", "--dest-bucket", "b", "--dest", "s3://b/p"], None),
        (["a.safetensors", "--dest-bucket", "b"], None),
    ],
)
def test_serialize_destination_positional_or_dest(argv: list[str], expected: tuple[str, str] | None) -> None:
    from hf_tensorizer.cli import build_parser
    from hf_tensorizer.cli.serialize import _src_and_dest
    from hf_tensorizer.errors import UsageError

    args = build_parser().parse_args(["serialize", *argv])
    if expected is None:
        with pytest.raises(UsageError, match="--dest"):
            _src_and_dest(args)
    else:
        assert _src_and_dest(args) == expected


def test_serialize_encrypted_and_verify_with_key(tmp_path: Path, safetensors_file) -> None:
    src, sd = safetensors_file
    key = tmp_path / "key"
    assert _cli("keygen", str(key)).returncode == 0
    dest = tmp_path / "enc.tensors"
    r = _cli("serialize", str(src), str(dest), "--encrypt", "--key-file", str(key))
    assert r.returncode == 0, r.stderr
    assert _cli("verify", str(dest)).returncode == 2  # no key: a clear error, not a false report
    r = _cli("verify", str(dest), "--key-file", str(key))
    assert r.returncode == 0, r.stdout + r.stderr
    from hf_tensorizer.crypto import EncryptionKey

    out = ht.load_state_dict(dest, encryption=EncryptionKey.from_file(key))
    assert torch.equal(out["w"], sd["w"])
    r = _cli("serialize", str(src), str(tmp_path / "x.tensors"), "--encrypt")
    assert r.returncode == 2 and "needs a key" in r.stderr


def test_serialize_hf_model_to_s3_layout(tmp_path: Path, moto_s3: str, s3_client, s3_bucket: str) -> None:
    """The seed's job: a local HF model directory to an S3 prefix that from_pretrained loads back."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                                   num_hidden_layers=2, vocab_size=128)  # fmt: skip
    torch.manual_seed(0)
    ref = transformers.LlamaForCausalLM(cfg).eval()
    ref.save_pretrained(tmp_path / "hf")
    prefix = f"s3://{s3_bucket}/llama"
    r = _cli("serialize", "--hf-model-id", str(tmp_path / "hf"), "--dest", prefix, "--endpoint-url", moto_s3,
             env={"AWS_ENDPOINT_URL_S3": moto_s3})  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    keys = {o["Key"] for o in s3_client.list_objects_v2(Bucket=s3_bucket)["Contents"]}
    assert {"llama/model.tensors", "llama/config.json", "llama/hf_tensorizer.json"} <= keys
    os.environ["AWS_ENDPOINT_URL_S3"] = moto_s3
    try:
        with ht.enabled():
            model = transformers.AutoModelForCausalLM.from_pretrained(prefix)
    finally:
        del os.environ["AWS_ENDPOINT_URL_S3"]
    ids = torch.randint(0, 128, (1, 12))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)
