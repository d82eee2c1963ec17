"""The command line where a new user first tripped: remote artifact roots, uploading an existing ``.tensors`` file, a
missing destination folder, ``| head``, errors that name the file, and no deprecation warnings of our own making.
Real subprocesses where the exit code or stderr matters; moto's server for S3."""

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

ROOT = Path(__file__).resolve().parent.parent


def _cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "hf_tensorizer", *args], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT), **env})  # fmt: skip


def _tensors_file(path: Path, n: int = 40) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    sd = {f"layer{i}.weight": torch.randn(16, 8, generator=g) for i in range(n)}
    ht.save_state_dict(sd, str(path))
    return sd


def test_inspect_remote_artifact_root(tmp_path: Path, moto_s3: str, s3_bucket: str, capsys) -> None:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                                   num_hidden_layers=1, vocab_size=128)  # fmt: skip
    torch.manual_seed(0)
    root = f"s3://{s3_bucket}/llama"
    ht.save_pretrained(transformers.LlamaForCausalLM(cfg), root, tensorizer_options={"endpoint_url": moto_s3})
    for uri in (root, root + "/"):
        assert main(["inspect", uri, "--endpoint-url", moto_s3]) == 0
        out = capsys.readouterr().out
        assert out.startswith(f"{root}: artifact (transformers)"), out
        assert "  config.json" in out and "weights model.tensors: hf_tensorizer," in out
    assert main(["inspect", root, "--endpoint-url", moto_s3, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert "model.tensors" in doc["files"] and doc["weights"][0]["tensors"] > 0
    # a prefix without a manifest: still the object's error, and the reason it is no artifact either
    r = _cli("inspect", f"s3://{s3_bucket}/nothing-here", "--endpoint-url", moto_s3)
    assert r.returncode == 2 and "no hf_tensorizer.json" in r.stderr and len(r.stderr.splitlines()) == 1, r.stderr


def test_serialize_uploads_an_existing_tensors_file(
    tmp_path: Path, moto_s3: str, s3_client, s3_bucket: str, capsys
) -> None:
    src = tmp_path / "x.tensors"
    sd = _tensors_file(src)
    dest = f"s3://{s3_bucket}/up/x.tensors"
    assert main(["serialize", str(src), dest, "--endpoint-url", moto_s3]) == 0
    assert "copied" in capsys.readouterr().out
    body = s3_client.get_object(Bucket=s3_bucket, Key="up/x.tensors")["Body"].read()
    assert body == src.read_bytes()  # byte for byte
    # and a rewrite when asked to change it: cast on the way
    assert main(["serialize", str(src), str(tmp_path / "half.tensors"), "--dtype", "float16"]) == 0
    half = ht.load_state_dict(str(tmp_path / "half.tensors"))
    assert all(torch.equal(half[k], v.half()) for k, v in sd.items())


def test_serialize_copy_refuses_a_damaged_file_and_leaves_nothing(tmp_path: Path) -> None:
    src = tmp_path / "x.tensors"
    _tensors_file(src)
    data = bytearray(src.read_bytes())
    data[20:40] = b"\xff" * 20  # inside the preamble / index
    src.write_bytes(bytes(data))
    r = _cli("serialize", str(src), str(tmp_path / "y.tensors"))
    assert r.returncode == 2 and r.stderr.startswith("hf-tensorizer: error:"), r.stderr
    assert not (tmp_path / "y.tensors").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["x.tensors"]


def test_serialize_refuses_a_missing_folder_unless_parents(tmp_path: Path) -> None:
    src = tmp_path / "x.tensors"
    _tensors_file(src, n=2)
    dest = tmp_path / "no" / "such" / "dir" / "x.tensors"
    r = _cli("serialize", str(src), str(dest))
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip() == (
        f"hf-tensorizer: error: {tmp_path}/no/such/dir: no such folder (DEST's parent); create it, or pass --parents"
    )
    assert not (tmp_path / "no").exists()
    r = _cli("serialize", str(src), str(dest), "--parents")
    assert r.returncode == 0, r.stderr
    assert dest.read_bytes() == src.read_bytes()
    assert "--parents" in _cli("serialize", "--help").stdout


def test_inspect_into_head_exits_quietly(tmp_path: Path) -> None:
    path = tmp_path / "big.tensors"
    _tensors_file(path, n=5000)  # far more index lines than a pipe buffer holds
    cmd = f"{sys.executable} -m hf_tensorizer inspect {path} | head -n 2; echo status=${{PIPESTATUS[0]}}"
    r = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})  # fmt: skip
    lines = r.stdout.splitlines()
    assert len(lines) == 3 and lines[0].startswith(str(path)), r.stdout
    assert lines[-1] == "status=141"  # as any program stopped by SIGPIPE
    assert r.stderr == "", r.stderr


def test_inspect_names_the_file_it_cannot_read(tmp_path: Path) -> None:
    config = tmp_path / "config.json"
    config.write_text('{"model_type": "llama"}')
    r = _cli("inspect", str(config))
    assert r.returncode == 2
    assert r.stderr.strip() == f"hf-tensorizer: error: {config}: not an hf_tensorizer file (bad magic)"


def test_our_diffusers_calls_raise_no_dtype_deprecation(tmp_path: Path, recwarn) -> None:
    diffusers = pytest.importorskip("diffusers")
    from hf_tensorizer.cli.serialize import _diffusers_dtype

    kwargs = _diffusers_dtype(torch.float16)
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16),
                                 norm_num_groups=4, layers_per_block=1,
                                 down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"))  # fmt: skip
    pipe = diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDPMScheduler())
    pipe.save_pretrained(tmp_path / "pipe")
    loaded = diffusers.DiffusionPipeline.from_pretrained(tmp_path / "pipe", **kwargs)
    assert loaded.unet.dtype == torch.float16
    deprecations = [str(w.message) for w in recwarn if "torch_dtype" in str(w.message)]
    assert not deprecations, deprecations
    assert _diffusers_dtype(None) == {}
