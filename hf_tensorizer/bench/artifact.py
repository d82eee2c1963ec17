"""How long ``from_pretrained`` takes for remote artifacts whose cost is round trips, not bytes.

Two setups, each timed as the median of 3 loads (the first of 4 is a warm-up) in this process:

* ``http``: a stock sharded-safetensors Llama (5 shards, 0.25 GB bf16) behind the test range server
  (``tests/servers/http_range.py``) answering every request after ``--latency`` seconds, as a distant server would;
* ``s3``: moto's S3 server with a stock sharded Llama (4 shards), the same model as a tensorized artifact, and a
  stock tiny Stable Diffusion pipeline (the one of ``tests/test_integration_diffusers.py``).

``--code DIR`` runs another checkout's ``hf_tensorizer`` (e.g. a worktree of an older commit) for a before/after
comparison; the servers always come from this checkout. Prints one JSON line.

    hf-tensorizer bench artifact --latency 0.03 [--code /tmp/old-checkout]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .proc import test_servers


def _median(fn: Callable[[], Any], runs: int = 3) -> float:
    fn()  # warm-up: imports, first-call costs
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return round(statistics.median(times), 3)


def _llama(hidden: int, layers: int, dtype: Any) -> Any:
    """A Llama with fixed-seed random weights, vocab 32000, heads of 64."""
    import torch
    import transformers

    torch.manual_seed(0)
    heads = hidden // 64
    cfg = transformers.LlamaConfig(
        vocab_size=32000,
        hidden_size=hidden,
        intermediate_size=hidden * 8 // 3 // 16 * 16,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
    )
    return transformers.LlamaForCausalLM(cfg).to(dtype)


def bench_http(root: Path, latency: float) -> dict[str, Any]:
    import torch
    import transformers
    from servers.http_range import RangeServer

    _llama(512, 8, torch.bfloat16).save_pretrained(root / "llama", max_shard_size="20MB")
    server = RangeServer(root)
    try:
        server.config(latency=latency)
        seconds = _median(lambda: transformers.AutoModelForCausalLM.from_pretrained(server.url("llama")))
        server.reset()
        server.config(latency=latency)
        transformers.AutoModelForCausalLM.from_pretrained(server.url("llama"))
        requests = len(server.log())
    finally:
        server.stop()
    return {"latency_s": latency, "stock sharded Llama over HTTP (s)": seconds, "requests per load": requests}


def bench_s3(root: Path) -> dict[str, Any]:
    import boto3
    import diffusers
    import torch
    import transformers
    from moto.server import ThreadedMotoServer
    from test_integration_diffusers import _pipeline

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ["AWS_ENDPOINT_URL"] = f"http://{host}:{port}"
    try:
        s3 = boto3.client("s3")
        s3.create_bucket(Bucket="bench-bucket")
        model = _llama(256, 4, torch.float32)
        model.save_pretrained(root / "s3" / "llama", max_shard_size="10MB")
        _pipeline(root).save_pretrained(root / "s3" / "sd")
        for p in (root / "s3").rglob("*"):
            if p.is_file():
                s3.upload_file(str(p), "bench-bucket", p.relative_to(root / "s3").as_posix())
        model.save_pretrained("s3://bench-bucket/tensorized", tensorized=True)
        auto, pipe = transformers.AutoModelForCausalLM, diffusers.DiffusionPipeline
        return {
            "stock sharded Llama from S3 (s)": _median(lambda: auto.from_pretrained("s3://bench-bucket/llama")),
            "tensorized Llama from S3 (s)": _median(lambda: auto.from_pretrained("s3://bench-bucket/tensorized")),
            "stock tiny SD pipeline from S3 (s)": _median(lambda: pipe.from_pretrained("s3://bench-bucket/sd")),
        }
    finally:
        server.stop()


def add_artifact_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--latency", type=float, default=0.03, help="seconds each HTTP request waits")
    parser.add_argument("--code", type=Path, default=None, help="another checkout whose hf_tensorizer to time")


def artifact_main(args: argparse.Namespace) -> None:
    test_servers()
    if args.code:  # its hf_tensorizer shadows this one: drop the modules already imported from here
        sys.path.insert(0, str(args.code.resolve()))
        for name in [m for m in sys.modules if m == "hf_tensorizer" or m.startswith("hf_tensorizer.")]:
            del sys.modules[name]
    os.environ.update(
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_EC2_METADATA_DISABLED="true",
        HF_TENSORIZER_CACHE=tempfile.mkdtemp(),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_VERBOSITY="error",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
    )
    import diffusers.utils.logging as dlog

    import hf_tensorizer

    dlog.disable_progress_bar()
    hf_tensorizer.enable()
    with tempfile.TemporaryDirectory() as tmp:
        out = {"code": str(Path(hf_tensorizer.__file__).parent.parent)}
        out.update(bench_http(Path(tmp), args.latency))
        out.update(bench_s3(Path(tmp)))
    print(json.dumps(out))
