"""One rank of a distributed test (started by tests/test_distributed.py with torchrun's environment variables).

``python dist_worker.py SPEC.json``: SPEC holds ``out`` (a folder: this rank writes ``rank<N>.json`` there) and
``jobs``, each ``{"kind": ..., ...}``; every job's result (or its error) goes into the rank's JSON. The process
group is created here with a short timeout, so a peer that dies fails the collectives instead of hanging them.
"""

from __future__ import annotations

import faulthandler
import json
import os
import signal
import subprocess
import sys
import time
import traceback
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

INPUT = torch.tensor([[3, 17, 5, 42, 8, 61, 2, 9]])


def _logits(model: Any) -> torch.Tensor:
    with torch.no_grad():
        return model(INPUT.to(model.device)).logits.cpu()


def _bytes(metrics: list[Any]) -> dict[str, int]:
    sliced = [m for m in metrics if getattr(m, "strategy", "") == "slices"]
    whole = [m for m in metrics if m not in sliced]
    return {
        "read": sum(m.bytes for m in sliced) + sum(m.bytes_read for m in whole),
        "replicated": sum(m.bytes for m in whole),
        "sharded_read": sum(m.bytes for m in sliced),
        "sharded_total": sum(m.whole for m in sliced),
        "requests": sum(m.requests for m in sliced),
    }


def tp(job: dict[str, Any]) -> dict[str, Any]:
    """Our TP load against stock transformers' TP load of the same weights from safetensors, and a plain load."""
    import transformers

    options = job.get("options", {})
    tp_plan = {"tp_plan": "auto"} if job.get("tp", True) else {}
    uri = job.get("uris", {}).get(os.environ["RANK"], job["uri"])
    ours = transformers.AutoModelForCausalLM.from_pretrained(uri, tensorizer_options=options, **tp_plan)
    stock = transformers.AutoModelForCausalLM.from_pretrained(job["stock"], **tp_plan)
    a, b = _logits(ours), _logits(stock)
    single = transformers.AutoModelForCausalLM.from_pretrained(job["stock"])
    c = _logits(single)
    return {"identical": bool(torch.equal(a, b)), "vs_single": float((a - c).abs().max()),
            **_bytes(ours.hf_tensorizer_metrics)}  # fmt: skip


def replica(job: dict[str, Any]) -> dict[str, Any]:
    """A replicated load (every rank gets every tensor), compared with a plain load of the local file."""
    from hf_tensorizer import TensorDeserializer
    from hf_tensorizer.crypto import EncryptionKey

    rank = int(os.environ["RANK"])
    kw = dict(job.get("options", {}), **job.get("rank_options", {}).get(str(rank), {}))
    if "dtype" in kw:
        kw["dtype"] = getattr(torch, kw["dtype"])
    if "key" in kw:
        kw["encryption"] = EncryptionKey(bytes.fromhex(kw.pop("key")))
    if "filter" in kw:
        kw["filter"] = list(kw["filter"])
    uri = job.get("uris", {}).get(str(rank), job["uri"])
    device = f"cuda:{os.environ['LOCAL_RANK']}" if job.get("cuda") else "cpu"
    with TensorDeserializer(uri, distributed=True, device=device, **kw) as d:
        got = {k: v.cpu() for k, v in d.items()}
        metrics = d.metrics
    plain = {k: v for k, v in kw.items() if k not in ("endpoint_url", "num_readers", "chunk_bytes")}
    with TensorDeserializer(job["local"], **plain) as ref:
        same = sorted(got) == sorted(ref) and all(
            got[k].dtype == ref[k].dtype and got[k].shape == ref[k].shape
            and torch.equal(got[k].reshape(-1).view(torch.uint8), ref[k].reshape(-1).view(torch.uint8))
            for k in ref
        )  # fmt: skip
    return {"identical": same, "read": metrics.bytes_read, "loaded": metrics.bytes, "tensors": len(got),
            "exchange_s": metrics.exchange_seconds}  # fmt: skip


def docs(job: dict[str, Any]) -> dict[str, Any]:
    """Every python block of docs/distributed.md, run verbatim with ``sys.argv[1]`` = the artifact."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "docs" / "distributed.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    argv = sys.argv
    try:
        for block in blocks:
            sys.argv = ["load.py", job["uri"]]
            exec(compile(block, "docs/distributed.md", "exec"), {"__name__": "__main__"})
    finally:
        sys.argv = argv
    return {"blocks": len(blocks)}


def _die_at(job: dict[str, Any], rank: int) -> None:
    """``die_at: {"rank": R, "op": "broadcast", "after": N, "hang": bool}``: rank R is killed (SIGKILL) at its
    (N+1)th call of ``torch.distributed.<op>``, in the middle of a load; with ``hang``, it stops instead (SIGSTOP:
    its sockets stay open, as for a hung process) and is killed 25 s later."""
    spec = job.get("die_at")
    if not spec or spec["rank"] != rank:
        return
    stock, calls = getattr(dist, spec["op"]), [0]

    def dying(*a: Any, **kw: Any) -> Any:
        calls[0] += 1
        if calls[0] > spec.get("after", 0):
            if spec.get("hang"):
                subprocess.Popen(["sh", "-c", f"sleep 25; kill -9 {os.getpid()}"], start_new_session=True)
                os.kill(os.getpid(), signal.SIGSTOP)
            os.kill(os.getpid(), signal.SIGKILL)
        return stock(*a, **kw)

    setattr(dist, spec["op"], dying)


def main() -> None:
    with open(sys.argv[1]) as f:
        spec = json.load(f)
    faulthandler.dump_traceback_later(100)  # a hang shows where each thread waits, before the launcher kills us
    rank = int(os.environ["RANK"])
    backend = spec.get("backend", "gloo")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group(backend, timeout=timedelta(seconds=spec.get("timeout", 30)))
    import hf_tensorizer

    hf_tensorizer.enable()
    results: dict[str, Any] = {}
    for job in spec["jobs"]:
        if job.get("die_rank") == rank:
            os._exit(3)  # a rank that dies mid-job: the others must fail, not hang
        _die_at(job, rank)
        t0 = time.monotonic()
        try:
            results[job["name"]] = {"tp": tp, "replica": replica, "docs": docs}[job["kind"]](job)
        except Exception as exc:
            results[job["name"]] = {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()[-2000:],
                                    "seconds": time.monotonic() - t0}  # fmt: skip
            if job.get("exit_on_error") == rank:  # like a script whose load raised: the interpreter exits
                with open(os.path.join(spec["out"], f"rank{rank}.json"), "w") as f:
                    json.dump(results, f)
                sys.exit(4)
    with open(os.path.join(spec["out"], f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
