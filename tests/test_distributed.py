"""Distributed loads over torch.distributed (gloo, CPU), in real processes started like torchrun starts them.

Tensor parallel: each rank reads only its shards (``from_pretrained(..., tp_plan="auto")``), logits bit-identical
to stock transformers' TP load of the same weights. Replicas (``TensorDeserializer(..., distributed=True)``):
each rank reads ~1/N of the file and the ranks exchange the rest. A rank that dies makes the others fail, bounded.
Each launch runs several jobs (starting ranks that import torch and transformers is the slow part).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")
if not torch.distributed.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)

import hf_tensorizer  # noqa: E402
from hf_tensorizer import read_index  # noqa: E402

WORKER = Path(__file__).with_name("dist_worker.py")
ROOT = Path(__file__).resolve().parent.parent
LAUNCH_TIMEOUT_S = 120


def _models() -> dict[str, Any]:
    common = dict(vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=8,
                  max_position_embeddings=64)  # fmt: skip
    return {
        "llama": lambda: transformers.LlamaForCausalLM(
            transformers.LlamaConfig(intermediate_size=128, num_key_value_heads=8, **common)
        ),
        "qwen2": lambda: transformers.Qwen2ForCausalLM(  # GQA, q/k/v biases
            transformers.Qwen2Config(intermediate_size=128, num_key_value_heads=4, **common)
        ),
        "mixtral": lambda: transformers.MixtralForCausalLM(
            transformers.MixtralConfig(
                intermediate_size=96, num_key_value_heads=4, num_local_experts=4, num_experts_per_tok=2, **common
            )
        ),
    }


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Each tiny model saved tensorized (``<name>/art``) and as stock safetensors (``<name>/stock``)."""
    root = tmp_path_factory.mktemp("dist-models")
    os.environ.setdefault("HF_TENSORIZER_CACHE", str(root / "cache"))
    hf_tensorizer.enable()
    try:
        for name, build in _models().items():
            torch.manual_seed(0)
            model = build().eval()
            model.save_pretrained(root / name / "art", tensorized=True)
            model.save_pretrained(root / name / "stock")
    finally:
        hf_tensorizer.disable()
    return root


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(tmp: Path, world: int, jobs: list[dict[str, Any]], *, timeout: int = 30) -> dict[int, Any]:
    """Run ``jobs`` on ``world`` ranks; returns each rank's results (``None`` for a rank that wrote none)."""
    out = tmp / f"out-{time.monotonic_ns()}"
    out.mkdir()
    spec = tmp / f"{out.name}.json"
    spec.write_text(json.dumps({"out": str(out), "jobs": jobs, "timeout": timeout}))
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE=str(world),
               OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               HF_TENSORIZER_CACHE=str(tmp / "cache"), TRANSFORMERS_VERBOSITY="error")  # fmt: skip
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(spec)],
            env=dict(env, RANK=str(r), LOCAL_RANK=str(r)),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for r in range(world)
    ]
    deadline = time.monotonic() + LAUNCH_TIMEOUT_S
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=max(1, deadline - time.monotonic()))[0].decode(errors="replace"))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail(f"ranks still running after {LAUNCH_TIMEOUT_S} s (a hang)")
    results: dict[int, Any] = {}
    for r in range(world):
        f = out / f"rank{r}.json"
        results[r] = json.loads(f.read_text()) if f.exists() else None
    results[-1] = logs  # type: ignore[assignment]
    return results


def _ok(results: dict[int, Any], world: int, name: str) -> list[dict[str, Any]]:
    got = []
    for r in range(world):
        assert results[r] is not None, f"rank {r} wrote nothing:\n{results[-1][r][-3000:]}"
        res = results[r][name]
        assert "error" not in res, f"rank {r}, {name}: {res.get('trace', res)}"
        got.append(res)
    return got


def _data_bytes(folder: Path) -> int:
    return sum(e.length for e in read_index(str(folder / "model.tensors")).tensors.values())


def _check_tp(per_rank: list[dict[str, Any]], world: int, total: int) -> None:
    for res in per_rank:
        assert res["identical"], res  # bit-identical to stock transformers' TP load
        assert res["vs_single"] < 1e-4, res  # TP reductions reorder sums: close to a single-process load
        assert res["replicated"] + res["sharded_total"] == total, res  # every byte of the file is accounted for
        assert res["sharded_read"] <= res["sharded_total"] / world * 1.05, res
        assert res["read"] <= (res["replicated"] + res["sharded_total"] / world) * 1.05, res


@pytest.mark.parametrize("world", [2, 4])
def test_tensor_parallel_reads_only_own_shards(artifacts: Path, tmp_path: Path, world: int) -> None:
    jobs = [
        {"name": name, "kind": "tp", "uri": str(artifacts / name / "art"), "stock": str(artifacts / name / "stock")}
        for name in ("llama", "qwen2", "mixtral")
    ]
    results = launch(tmp_path, world, jobs)
    for name in ("llama", "qwen2", "mixtral"):
        _check_tp(_ok(results, world, name), world, _data_bytes(artifacts / name / "art"))


def test_tensor_parallel_from_http_and_s3(artifacts: Path, tmp_path: Path, http_server: Any, s3_client: Any,
                                          s3_bucket: str, moto_s3: str) -> None:  # fmt: skip
    shutil.copytree(artifacts / "qwen2" / "art", http_server.dir / "qwen2")
    for f in (artifacts / "llama" / "art").iterdir():
        s3_client.upload_file(str(f), s3_bucket, f"llama/{f.name}")
    jobs = [
        {"name": "http", "kind": "tp", "uri": http_server.url("qwen2"), "stock": str(artifacts / "qwen2" / "stock")},
        {"name": "s3", "kind": "tp", "uri": f"s3://{s3_bucket}/llama", "stock": str(artifacts / "llama" / "stock"),
         "options": {"endpoint_url": moto_s3}},
    ]  # fmt: skip
    results = launch(tmp_path, 2, jobs)
    _check_tp(_ok(results, 2, "http"), 2, _data_bytes(artifacts / "qwen2" / "art"))
    _check_tp(_ok(results, 2, "s3"), 2, _data_bytes(artifacts / "llama" / "art"))
    # the server sent what the ranks say they read (plus the small files and the header reads)
    sent = sum(_range_len(e["range"]) for e in http_server.log() if e["path"].endswith("model.tensors"))
    per_rank = _ok(results, 2, "http")
    assert sum(r["read"] for r in per_rank) <= sent <= sum(r["read"] for r in per_rank) + 2 * (1 << 20)


def _range_len(header: str | None) -> int:
    if not header:
        return 0
    a, b = header.split("=")[1].split("-")
    return int(b) - int(a) + 1
