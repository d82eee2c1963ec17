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


def launch(tmp: Path, world: int, jobs: list[dict[str, Any]], *, timeout: int = 30,
           backend: str = "gloo") -> dict[int, Any]:  # fmt: skip
    """Run ``jobs`` on ``world`` ranks; returns each rank's results (``None`` for a rank that wrote none)."""
    out = tmp / f"out-{time.monotonic_ns()}"
    out.mkdir()
    spec = tmp / f"{out.name}.json"
    spec.write_text(json.dumps({"out": str(out), "jobs": jobs, "timeout": timeout, "backend": backend}))
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
            tails = [q.communicate()[0].decode(errors="replace")[-3000:] for q in procs]
            pytest.fail(f"ranks still running after {LAUNCH_TIMEOUT_S} s (a hang); their logs: {tails}")
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


def _tp_jobs(artifacts: Path) -> list[dict[str, Any]]:
    return [
        {"name": name, "kind": "tp", "uri": str(artifacts / name / "art"), "stock": str(artifacts / name / "stock")}
        for name in ("llama", "qwen2", "mixtral")
    ]


def _sent(http_server: Any, path_part: str) -> int:
    return sum(_range_len(e["range"]) for e in http_server.log() if path_part in e["path"] and e["method"] == "GET")


@pytest.fixture(scope="module")
def replica_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A ~2 MB file of many tensors (plain, with small digest blocks) and its encrypted twin."""
    from helpers import random_tensor, write_file

    from hf_tensorizer.crypto import EncryptionKey

    root = tmp_path_factory.mktemp("replica")
    tensors = {f"t{i}": random_tensor(torch.float32, (97 + i * 31, 13), seed=i) for i in range(40)}
    tensors["big"] = random_tensor(torch.bfloat16, (512, 1024), seed=99)
    tensors["i"] = torch.arange(1000, dtype=torch.int64)
    key = EncryptionKey.generate()
    write_file(root / "plain.tensors", tensors, block_size=64 << 10)
    write_file(root / "enc.tensors", tensors, block_size=64 << 10, encryption=key)
    # same layout, other values (the digests in the index differ); and one more tensor (another size)
    write_file(root / "other.tensors", {k: v + 1 if v.is_floating_point() else v for k, v in tensors.items()},
               block_size=64 << 10)  # fmt: skip
    write_file(root / "longer.tensors", {**tensors, "extra": torch.ones(3)}, block_size=64 << 10)
    data = bytearray((root / "plain.tensors").read_bytes())
    index = read_index(str(root / "plain.tensors"))
    last = max(index.tensors.values(), key=lambda e: e.offset)
    data[last.offset + 7] ^= 0xFF  # in the last rank's share
    (root / "bad.tensors").write_bytes(bytes(data))
    return {"root": root, "key": key.raw.hex(),
            "data": sum(e.length for e in index.tensors.values())}  # fmt: skip


def _replica_jobs(files: dict[str, Any], url: str) -> list[dict[str, Any]]:
    root = files["root"]
    local = str(root / "plain.tensors")
    small = {"chunk_bytes": 128 << 10}
    return [
        {"name": "rep_http", "kind": "replica", "uri": url, "local": local, "options": small},
        {"name": "rep_enc", "kind": "replica", "uri": str(root / "enc.tensors"), "local": str(root / "enc.tensors"),
         "options": {"key": files["key"]}},
        {"name": "rep_opts", "kind": "replica", "uri": local, "local": local,
         "options": {"verify_hash": True, "dtype": "float16", "filter": ["big", "i", "t3", "t39"]}},
    ]  # fmt: skip


def _check_replicas(results: dict[int, Any], world: int, files: dict[str, Any], sent: int) -> None:
    for name in ("rep_http", "rep_enc", "rep_opts"):
        per_rank = _ok(results, world, name)
        assert all(r["identical"] for r in per_rank), (name, per_rank)
    http = _ok(results, world, "rep_http")
    assert sum(r["read"] for r in http) <= files["data"] * 1.05, http  # the ranks split the file
    assert max(r["read"] for r in http) <= files["data"] / world * 1.3, http
    # what the server sent: ~1 x the file for N ranks (plus one header read per rank)
    assert files["data"] <= sent <= files["data"] * 1.05 + world * (64 << 10), (sent, files["data"])


def test_two_ranks(artifacts: Path, replica_files: dict[str, Any], tmp_path: Path, http_server: Any,
                   s3_client: Any, s3_bucket: str, moto_s3: str) -> None:  # fmt: skip
    shutil.copytree(artifacts / "qwen2" / "art", http_server.dir / "qwen2")
    url = http_server.write("replica.tensors", (replica_files["root"] / "plain.tensors").read_bytes())
    for f in (artifacts / "llama" / "art").iterdir():
        s3_client.upload_file(str(f), s3_bucket, f"llama/{f.name}")
    jobs = [
        *_tp_jobs(artifacts),
        {"name": "http", "kind": "tp", "uri": http_server.url("qwen2"), "stock": str(artifacts / "qwen2" / "stock")},
        {"name": "s3", "kind": "tp", "uri": f"s3://{s3_bucket}/llama", "stock": str(artifacts / "llama" / "stock"),
         "options": {"endpoint_url": moto_s3}},
        *_replica_jobs(replica_files, url),
        # tensorizer_options={"distributed": True}: data-parallel replicas, and the replicated part of a TP load
        {"name": "dp", "kind": "tp", "tp": False, "uri": str(artifacts / "llama" / "art"),
         "stock": str(artifacts / "llama" / "stock"), "options": {"distributed": True}},
        {"name": "docs", "kind": "docs", "uri": str(artifacts / "llama" / "art")},
        {"name": "tp_rep", "kind": "tp", "uri": str(artifacts / "qwen2" / "art"),
         "stock": str(artifacts / "qwen2" / "stock"), "options": {"distributed": True}},
    ]  # fmt: skip
    results = launch(tmp_path, 2, jobs)
    for name in ("llama", "qwen2", "mixtral"):
        _check_tp(_ok(results, 2, name), 2, _data_bytes(artifacts / name / "art"))
    assert all(r["requests"] <= 40 for r in _ok(results, 2, "llama")), _ok(results, 2, "llama")
    _check_tp(_ok(results, 2, "http"), 2, _data_bytes(artifacts / "qwen2" / "art"))
    _check_tp(_ok(results, 2, "s3"), 2, _data_bytes(artifacts / "llama" / "art"))
    # TP over HTTP: the server sent what the ranks say they read, plus their header reads
    per_rank = _ok(results, 2, "http")
    sent = _sent(http_server, "qwen2/model.tensors")
    assert sum(r["read"] for r in per_rank) <= sent <= sum(r["read"] for r in per_rank) + 2 * (1 << 20)
    _check_replicas(results, 2, replica_files, _sent(http_server, "replica.tensors"))
    llama = _data_bytes(artifacts / "llama" / "art")
    for res in _ok(results, 2, "dp"):
        assert res["identical"] and res["vs_single"] == 0.0, res
        assert res["replicated"] == llama and res["read"] <= llama / 2 * 1.3, res
    assert [r["blocks"] for r in _ok(results, 2, "docs")] == [2, 2]  # docs/distributed.md's examples ran
    for res in _ok(results, 2, "tp_rep"):
        assert res["identical"], res
        assert res["read"] <= (res["replicated"] + res["sharded_total"]) / 2 * 1.3, res


def test_four_ranks(artifacts: Path, replica_files: dict[str, Any], tmp_path: Path, http_server: Any) -> None:
    url = http_server.write("replica.tensors", (replica_files["root"] / "plain.tensors").read_bytes())
    results = launch(tmp_path, 4, _tp_jobs(artifacts) + _replica_jobs(replica_files, url))
    for name in ("llama", "qwen2", "mixtral"):
        _check_tp(_ok(results, 4, name), 4, _data_bytes(artifacts / name / "art"))
    # rowwise (Shard(1)) tensors are read by contiguous rows and all-gathered: a few requests per tensor, not one
    # per row (64 rows per o_proj/down_proj here, 4 of them)
    assert all(r["requests"] <= 40 for r in _ok(results, 4, "llama")), _ok(results, 4, "llama")
    _check_replicas(results, 4, replica_files, _sent(http_server, "replica.tensors"))


def test_a_failing_rank_fails_every_rank(replica_files: dict[str, Any], tmp_path: Path) -> None:
    root = replica_files["root"]
    local = str(root / "plain.tensors")
    jobs = [  # rank 1 reads a corrupted copy: its digest check fails, rank 0 is told
        {"name": "raises", "kind": "replica", "uri": local, "uris": {"1": str(root / "bad.tensors")}, "local": local,
         "options": {"verify_hash": True}},
        {"name": "dies", "kind": "replica", "uri": local, "local": local, "die_rank": 1},
    ]  # fmt: skip
    t0 = time.monotonic()
    results = launch(tmp_path, 2, jobs, timeout=20)
    assert time.monotonic() - t0 < LAUNCH_TIMEOUT_S
    assert results[1] is None  # it died
    assert results[0] is not None, results[-1][0][-3000:]
    assert results[0]["raises"]["error"].startswith("DistributedError: rank 1 failed"), results[0]["raises"]
    assert results[0]["dies"]["error"].startswith("DistributedError"), results[0]["dies"]


def _errors(results: dict[int, Any], world: int, name: str) -> list[str]:
    """Each rank's error for job ``name``, checking it came within seconds (the group's timeout is minutes)."""
    out = []
    for r in range(world):
        assert results[r] is not None, f"rank {r} wrote nothing:\n{results[-1][r][-3000:]}"
        res = results[r][name]
        assert "error" in res, (r, name, res)
        assert res["seconds"] < FAIL_FAST_S, (r, name, res)
        out.append(res["error"])
    return out


FAIL_FAST_S = 15  # every rank must fail within this, with a process group timeout of 300 s


def test_ranks_must_agree_before_exchanging(replica_files: dict[str, Any], tmp_path: Path) -> None:
    """Ranks that opened different files, or failed to open theirs, fail together before any byte is exchanged,
    with a typed error naming the difference, in seconds (the process group's timeout is 300 s here)."""
    root = replica_files["root"]
    local, enc = str(root / "plain.tensors"), str(root / "enc.tensors")
    other = {"uri": local, "local": local, "kind": "replica"}
    jobs = [
        {**other, "name": "values", "uris": {"1": str(root / "other.tensors")}},
        {**other, "name": "values_verified", "uris": {"1": str(root / "other.tensors")},
         "options": {"verify_hash": True}},
        {**other, "name": "size", "uris": {"1": str(root / "longer.tensors")}},
        {**other, "name": "plan", "rank_options": {"1": {"filter": ["big", "i"]}}},
        {**other, "name": "missing", "uris": {"1": str(root / "absent.tensors")}},
        {"kind": "replica", "name": "wrong_key", "uri": enc, "local": enc, "options": {"key": replica_files["key"]},
         "rank_options": {"1": {"key": "00" * 32}}},
        {**other, "name": "after"},  # the group is still usable: nothing was left half-done
    ]  # fmt: skip
    results = launch(tmp_path, 2, jobs, timeout=300)
    for name, field in (("values", "index"), ("values_verified", "index"), ("size", "size"), ("plan", "plan.names")):
        for err in _errors(results, 2, name):
            assert err.startswith("DistributedError: the ranks disagree on what they load"), err
            assert f"({field}" in err, err
            assert "other.tensors" in err or not name.startswith("values"), err
    assert "size, index" in _errors(results, 2, "size")[0]
    missing = _errors(results, 2, "missing")
    assert missing[0].startswith(f"DistributedError: rank 1 failed before the distributed load: {missing[1]}")
    assert "absent.tensors" in missing[1], missing
    wrong = _errors(results, 2, "wrong_key")
    assert wrong[0].startswith(f"DistributedError: rank 1 failed before the distributed load: {wrong[1]}"), wrong
    assert wrong[1].startswith("DecryptionError"), wrong
    assert all(r["identical"] for r in _ok(results, 2, "after"))


def test_a_hung_rank_fails_the_others_in_seconds(replica_files: dict[str, Any], tmp_path: Path) -> None:
    """Rank 1 stops (SIGSTOP) in the middle of the exchange, its connections open, as a hung or wedged process does;
    rank 0 raises DistributedError naming it within seconds although the process group's timeout is 300 s. (A
    SIGKILLed peer is often noticed by gloo itself, at once; a hung one only by our heartbeat watch.)"""
    local = str(replica_files["root"] / "plain.tensors")
    jobs = [
        {"name": "warm", "kind": "replica", "uri": local, "local": local},
        {"name": "hung", "kind": "replica", "uri": local, "local": local, "options": {"chunk_bytes": 128 << 10},
         "die_at": {"rank": 1, "op": "broadcast", "after": 0, "hang": True}},
    ]  # fmt: skip
    results = launch(tmp_path, 2, jobs, timeout=300)
    assert results[1] is None  # it was killed in the end
    assert results[0] is not None, results[-1][0][-3000:]
    assert all(r["identical"] for r in [results[0]["warm"]])
    res = results[0]["hung"]
    assert res.get("error", "").startswith("DistributedError: rank 1 stopped responding"), res
    assert res["seconds"] < FAIL_FAST_S, res


def test_tp_ranks_agree_and_fail_together(artifacts: Path, tmp_path: Path) -> None:
    """Tensor parallel: ranks that opened different weights (same architecture, other values) fail together before
    any row is gathered; a rank whose load raised and whose script then exited fails the others in seconds (the
    process group's timeout is 300 s)."""
    other = tmp_path / "llama-other"
    hf_tensorizer.enable()
    try:
        torch.manual_seed(1)
        _models()["llama"]().save_pretrained(other, tensorized=True)
    finally:
        hf_tensorizer.disable()
    tp = {"kind": "tp", "uri": str(artifacts / "llama" / "art"), "stock": str(artifacts / "llama" / "stock")}
    jobs = [
        {**tp, "name": "values", "uris": {"1": str(other)}},
        {**tp, "name": "exits", "uris": {"1": str(tmp_path / "absent")}, "exit_on_error": 1},
    ]
    results = launch(tmp_path, 2, jobs, timeout=300)
    for err in _errors(results, 2, "values"):
        assert err.startswith("DistributedError: the ranks disagree on what they load (index differ)"), err
    rank0, rank1 = (results[r]["exits"] for r in (0, 1))
    assert "error" in rank1 and "DistributedError" not in rank1["error"], rank1  # its own error, then it exited
    assert rank0["error"].startswith("DistributedError: rank 1 exited"), rank0
    assert rank0["seconds"] < FAIL_FAST_S, rank0


def _range_len(header: str | None) -> int:
    if not header:
        return 0
    a, b = header.split("=")[1].split("-")
    return int(b) - int(a) + 1


def test_distributed_needs_a_process_group(replica_files: dict[str, Any]) -> None:
    from hf_tensorizer import TensorDeserializer
    from hf_tensorizer.errors import UsageError

    with pytest.raises(UsageError, match="process group"):
        TensorDeserializer(replica_files["root"] / "plain.tensors", distributed=True)
    with pytest.raises(UsageError, match="lazy"):
        TensorDeserializer(replica_files["root"] / "plain.tensors", distributed=True, lazy=True)


def test_owners_are_contiguous_and_balanced() -> None:
    from hf_tensorizer.engine.distributed import owners
    from hf_tensorizer.engine.plan import Chunk

    chunks = [Chunk(i * 100, 100) for i in range(10)]
    assert owners(chunks, 2) == [0] * 5 + [1] * 5
    assert owners(chunks, 4) == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]
    assert owners(chunks[:1], 4) == [2]  # fewer chunks than ranks: some ranks read nothing, still exchange
    assert owners([], 3) == []


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="NCCL needs 2 GPUs")
def test_nccl_two_gpus(artifacts: Path, replica_files: dict[str, Any], tmp_path: Path) -> None:
    local = str(replica_files["root"] / "plain.tensors")
    jobs = [
        *_tp_jobs(artifacts),
        {"name": "rep", "kind": "replica", "uri": local, "local": local, "cuda": True},
        {"name": "rep_opts", "kind": "replica", "uri": local, "local": local, "cuda": True,
         "options": {"verify_hash": True, "dtype": "float16"}},
    ]  # fmt: skip
    results = launch(tmp_path, 2, jobs, backend="nccl", timeout=60)
    for name in ("llama", "qwen2", "mixtral"):
        for res in _ok(results, 2, name):
            assert res["identical"] and res["vs_single"] < 1e-3, res
    for name in ("rep", "rep_opts"):
        assert all(r["identical"] for r in _ok(results, 2, name))
