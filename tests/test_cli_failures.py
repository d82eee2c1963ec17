"""``hf-tensorizer`` failing: every failure one ``hf-tensorizer: error:`` line and a non-zero exit, and an
interrupted write (SIGTERM as a Kubernetes Job gets, SIGKILL) leaves nothing behind, or nothing the next write
does not clean. The real CLI in a subprocess, real files, moto for S3."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import hf_tensorizer as ht

ROOT = Path(__file__).resolve().parent.parent

# The real CLI, with every sink write slowed (SLOW_WRITE_S) so a signal lands mid-write.
SLOW_CLI = """
import os, sys, time
from hf_tensorizer.sources import file, s3_sink
from hf_tensorizer.cli import main

pause = float(os.environ["SLOW_WRITE_S"])
write, upload = file.FileSink.write, s3_sink.S3Sink._upload_part
file.FileSink.write = lambda self, data: (write(self, data), time.sleep(pause))[0]
s3_sink.S3Sink._upload_part = lambda self, n, buf: (upload(self, n, buf), time.sleep(pause))[0]
sys.exit(main(sys.argv[1:]))
"""


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), **extra}


def _cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "hf_tensorizer", *args], capture_output=True, text=True,
                          timeout=300, env=_env(**env))  # fmt: skip


def _one_error_line(r: subprocess.CompletedProcess[str], code: int, needle: str) -> str:
    assert r.returncode == code, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hf-tensorizer: error: "), r.stderr
    assert needle in lines[0], lines[0]
    assert "Traceback" not in r.stderr
    return lines[0]


def _state_dict(mb: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {f"t{i}": torch.randn(mb << 18, generator=g) for i in range(8)}  # 8 tensors of `mb` MiB


def test_missing_source_and_model_dir(tmp_path: Path) -> None:
    _one_error_line(_cli("serialize", str(tmp_path / "missing.safetensors"), str(tmp_path / "o.tensors")), 2,
                    "missing.safetensors: no such file")  # fmt: skip
    r = _cli("serialize", "--hf-model-id", "./no-such-dir", str(tmp_path / "out"))
    _one_error_line(r, 2, "./no-such-dir: not a model directory")
    (tmp_path / "bad.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    _one_error_line(_cli("serialize", str(tmp_path / "bad.safetensors"), str(tmp_path / "o.tensors")), 2,
                    "not a readable safetensors file")  # fmt: skip
    assert not list(tmp_path.glob("o.tensors*"))


def test_weights_the_model_class_drops_are_refused(tmp_path: Path) -> None:
    """A config without ``architectures`` makes ``serialize --hf-model-id`` load the base model class, which has no
    place for a causal LM's ``lm_head.weight``: refused in one line (transformers only reports it), no artifact."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, tie_word_embeddings=False)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(tmp_path / "model")
    cfg = (tmp_path / "model" / "config.json").read_text()
    (tmp_path / "model" / "config.json").write_text(cfg.replace('"LlamaForCausalLM"', ""))
    r = _cli("serialize", "--hf-model-id", str(tmp_path / "model"), str(tmp_path / "out"))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr  # above it: transformers' own load report
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("hf-tensorizer: error: ") and "lm_head.weight would be left out of the artifact; its " \
        "config.json names no `architectures`" in last, last  # fmt: skip
    assert not (tmp_path / "out" / "model.tensors").exists()
    (tmp_path / "model" / "config.json").write_text(cfg)
    r = _cli("serialize", "--hf-model-id", str(tmp_path / "model"), str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr
    assert "lm_head.weight" in ht.TensorDeserializer(str(tmp_path / "out" / "model.tensors"), device="cpu")


def test_legacy_bin_is_read_without_mapping(tmp_path: Path) -> None:
    """A pre-1.6 (non-zip) ``torch.save`` file: ``torch.load(mmap=True)`` refuses it, so it is read whole."""
    sd = _state_dict()
    torch.save(sd, tmp_path / "legacy.bin", _use_new_zipfile_serialization=False)
    r = _cli("serialize", str(tmp_path / "legacy.bin"), str(tmp_path / "legacy.tensors"))
    assert r.returncode == 0, r.stderr
    out = ht.load_state_dict(tmp_path / "legacy.tensors")
    assert out.keys() == sd.keys() and all(torch.equal(out[k], sd[k]) for k in sd)


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Callable[..., Any], tuple[str]]:
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("zipped", [True, False])
def test_malicious_pickle_is_refused_in_one_line(tmp_path: Path, zipped: bool) -> None:
    marker = tmp_path / "pwned"
    torch.save({"w": torch.ones(2), "x": _Evil(marker)}, tmp_path / "evil.bin",
               _use_new_zipfile_serialization=zipped)  # fmt: skip
    line = _one_error_line(_cli("serialize", str(tmp_path / "evil.bin"), str(tmp_path / "o.tensors")), 2,
                           "not a plain state dict, refused without running it")  # fmt: skip
    assert "system" in line and "weights_only=False" not in line
    assert not marker.exists()


def test_missing_key_advice_names_the_cli_options(tmp_path: Path) -> None:
    pytest.importorskip("nacl")
    key = tmp_path / "k"
    assert _cli("keygen", str(key)).returncode == 0
    ht.save_state_dict({"w": torch.ones(3)}, tmp_path / "enc.tensors",
                       encryption=ht.crypto.EncryptionKey.from_file(key))  # fmt: skip
    env = {"HF_TENSORIZER_KEY": ""}
    line = _one_error_line(_cli("verify", str(tmp_path / "enc.tensors"), **env), 2, "give --key-file")
    assert "encryption=" not in line
    r = _cli("encrypt", str(tmp_path / "enc.tensors"), str(tmp_path / "re.tensors"), "--key-file", str(key), **env)
    assert "encryption=" not in _one_error_line(r, 2, "give --from-key-file")


def _slow_cli(*args: str, pause: float, **env: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", SLOW_CLI, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=_env(SLOW_WRITE_S=str(pause), **env))  # fmt: skip


def _wait_for(cond: Callable[[], bool], proc: subprocess.Popen[str], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the write never started"
        time.sleep(0.05)


def test_sigterm_mid_write_removes_the_temp_file(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    save_file(_state_dict(), str(tmp_path / "w.safetensors"))
    dest = tmp_path / "out" / "w.tensors"
    proc = _slow_cli("serialize", str(tmp_path / "w.safetensors"), str(dest), "--parents", pause=0.2)
    _wait_for(lambda: any(dest.parent.glob("w.tensors.*.tmp")), proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert err.strip().splitlines() == ["hf-tensorizer: error: interrupted (SIGTERM); partial output removed"]
    assert list(dest.parent.iterdir()) == []


def test_sigkill_stray_is_removed_by_the_next_write(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from hf_tensorizer.sources.file import FileSink

    save_file(_state_dict(), str(tmp_path / "w.safetensors"))
    dest = tmp_path / "w.tensors"
    proc = _slow_cli("serialize", str(tmp_path / "w.safetensors"), str(dest), pause=0.2)
    _wait_for(lambda: any(tmp_path.glob("w.tensors.*.tmp")), proc)
    proc.kill()
    proc.communicate(timeout=60)
    (stray,) = tmp_path.glob("w.tensors.*.tmp")
    live = FileSink(dest)  # a writer still running: its temp file must survive the clean-up
    live.write(b"in progress")
    (tmp_path / "w.tensors.other.tmp").write_bytes(b"not ours: no mkstemp name")
    r = _cli("serialize", str(tmp_path / "w.safetensors"), str(dest))
    assert r.returncode == 0, r.stderr
    assert not stray.exists()
    assert sorted(p.name for p in tmp_path.glob("w.tensors.*")) == sorted(
        [os.path.basename(live._tmp), "w.tensors.other.tmp"]
    )
    live.abort()
    assert set(ht.load_state_dict(dest)) == set(_state_dict())


def test_sigterm_mid_upload_aborts_the_multipart_upload(tmp_path: Path, moto_s3: str, s3_client: Any,
                                                        s3_bucket: str) -> None:  # fmt: skip
    from safetensors.torch import save_file

    save_file(_state_dict(mb=4), str(tmp_path / "w.safetensors"))  # 32 MiB: several 5 MiB parts
    env = {k: os.environ[k] for k in os.environ if k.startswith("AWS_")}
    proc = _slow_cli("serialize", str(tmp_path / "w.safetensors"), f"s3://{s3_bucket}/m/w.tensors",
                     "--endpoint-url", moto_s3, pause=1.0, HF_TENSORIZER_S3_PART_BYTES=str(5 << 20), **env)  # fmt: skip
    _wait_for(lambda: bool(s3_client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads")), proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "interrupted (SIGTERM)" in err and "Traceback" not in err
    assert not s3_client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads")
    assert not s3_client.list_objects_v2(Bucket=s3_bucket).get("Contents")


def test_demo_removes_its_files(tmp_path: Path) -> None:
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    r = _cli("demo", "--layers", "1", "--hidden", "128", "--repeats", "1", "--device", "cpu", TMPDIR=str(tmp))
    assert r.returncode == 0, r.stderr
    assert [p for p in tmp.iterdir() if not p.name.startswith("torchinductor_")] == []  # torch's own, shared cache
    r = _cli("demo", "--layers", "1", "--hidden", "128", "--repeats", "1", "--device", "cpu",
             "--dir", str(tmp_path / "kept"), TMPDIR=str(tmp))  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert f"files kept in {tmp_path / 'kept'}" in r.stdout and (tmp_path / "kept" / "model.tensors").exists()


def test_no_s3_credentials_advice_fits_the_cli(tmp_path: Path) -> None:
    """The advice on missing credentials names ways that exist where it is read: the CLI has ``--anonymous``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_CONFIG_FILE=str(tmp_path / "none"), AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"),
               AWS_EC2_METADATA_DISABLED="true", AWS_DEFAULT_REGION="us-east-1",
               AWS_ENDPOINT_URL="http://127.0.0.1:9", PYTHONPATH=str(ROOT))  # fmt: skip
    r = subprocess.run([sys.executable, "-m", "hf_tensorizer", "inspect", "s3://bucket/model.tensors"],
                       capture_output=True, text=True, timeout=120, env=env)  # fmt: skip
    line = _one_error_line(r, 2, "no AWS credentials found")
    assert "AWS_ACCESS_KEY_ID" in line and "--anonymous in the CLI" in line
    r = subprocess.run([sys.executable, "-m", "hf_tensorizer", "inspect", "--help"], capture_output=True, text=True,
                       timeout=120, env=env)  # fmt: skip
    assert "--anonymous" in r.stdout
