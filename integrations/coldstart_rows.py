"""The rows of the scale-from-zero benchmark (``integrations/coldstart.py``): each row's service command line,
the moto S3 server the S3 rows read from.

Rows, all on the same model (a Llama built from a config with fixed-seed weights):

* ``predictor`` / ``predictor-snapshot`` / ``predictor-pread`` / ``predictor-mapped`` / ``predictor-stock`` — our
  KServe predictor with its default options (a local artifact: the file mapped under a read lease), with
  ``--no-lease`` (a sealed in-memory snapshot, mapped), with ``--no-snapshot`` (``pread``), with ``strategy=auto``
  (the file itself mapped, unguarded), and with stock ``from_pretrained`` on the ``save_pretrained`` folder (from S3
  it downloads the folder first, as KServe's storage initializer does);
* ``vllm`` — vLLM's OpenAI server with ``--load-format hf_tensorizer`` on our artifact (local folder or
  ``s3://``: config, tokenizer and weights all from there);
* ``vllm-default`` — vLLM's default safetensors loader on the stock folder (from S3: downloaded first, as for
  the stock predictor: vLLM's default loader reads local files or the Hub only);
* ``vllm-runai`` — vLLM's ``runai_streamer`` load format on the stock folder (local or ``s3://``);
* ``vllm-tensorizer`` — vLLM's own ``tensorizer`` loader (its ``[tensorizer]`` extra) on upstream tensorizer's file
  of the model (``bench/vllm_peers.tensorize_upstream``; ``--model`` is the stock folder for config and tokenizer,
  the weights come from ``tensorizer_uri``, a local path or ``s3://``), followed by the weights' post-processing
  vLLM's tensorizer loader skips (load format ``tensorizer-postprocessed``,
  ``hf_tensorizer/integrations/adapters/vllm/peers.py``: without it the model serves nothing on vLLM's CPU backend).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hf_tensorizer.bench.vllm import PEER_ENV, PEER_TENSORIZER, RUNAI_MOTO_ENV, logging_env

ROOT = Path(__file__).resolve().parent.parent
NAME = "coldstart"
# 43 tokens with the byte tokenizer: vLLM's CPU worker crashes (SIGILL) on prompts under ~8 tokens here
PROMPT = "Once upon a time, in a cluster scaled to zero"
ROWS = ("predictor", "predictor-snapshot", "predictor-pread", "predictor-mapped", "predictor-stock", "vllm",
        "vllm-default", "vllm-runai", "vllm-tensorizer")  # fmt: skip
# rows that read the hf_tensorizer artifact
OURS = ("predictor", "predictor-snapshot", "predictor-pread", "predictor-mapped", "vllm")
DEFAULT_ROWS = ("vllm", "vllm-default", "vllm-runai", "vllm-tensorizer", "predictor", "predictor-stock")
BUCKET = "bench"
# Upload with one PUT per object (S3 takes up to 5 GB in one): moto assembles a multipart upload in memory on
# CompleteMultipartUpload, which takes minutes for 1 GB on a busy machine; botocore's 60 s read timeout then
# retried the call while moto was still completing the first one, and the second completion's
# `del bucket.multiparts[id]` raised KeyError: moto answered 500. A long read timeout keeps one call in flight.
SINGLE_PUT_LIMIT = 4 << 30
UPLOAD_READ_TIMEOUT = 1800


@dataclass
class Service:
    """One row's service: its command line (``{port}`` filled in), readiness path and request."""

    argv: list[str]
    ready_path: str
    request_path: str
    body: dict[str, Any]
    env: dict[str, str] = field(default_factory=dict)
    evict: list[Path] = field(default_factory=list)  # files dropped from the page cache for a cold run
    scratch: Path | None = None  # removed after the run (an S3 download)
    engine: str = "predictor"  # "predictor" or "vllm": which log line gives the weight-loading time


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def upload_config() -> tuple[Any, Any]:
    """The botocore client config and s3transfer config the uploads use (see ``SINGLE_PUT_LIMIT``)."""
    from boto3.s3.transfer import TransferConfig
    from botocore.config import Config

    client = Config(read_timeout=UPLOAD_READ_TIMEOUT, connect_timeout=60, retries={"max_attempts": 2})
    transfer = TransferConfig(multipart_threshold=SINGLE_PUT_LIMIT, multipart_chunksize=512 << 20, max_concurrency=1)
    return client, transfer


class Moto:
    """A moto S3 server in its own process (not a thread of the clients' process); ``upload`` puts folders."""

    def __init__(self) -> None:
        import boto3

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        self.env = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1",
                    "AWS_REGION": "us-east-1", "AWS_ENDPOINT_URL": self.url, "AWS_EC2_METADATA_DISABLED": "true",
                    **RUNAI_MOTO_ENV}  # fmt: skip
        config, self.transfer = upload_config()
        self.client = boto3.client("s3", endpoint_url=self.url, region_name="us-east-1", config=config,
                                   aws_access_key_id="bench", aws_secret_access_key="bench")  # fmt: skip
        for _ in range(300):
            try:
                self.client.create_bucket(Bucket=BUCKET)
                return
            except Exception:  # not listening yet
                if self.proc.poll() is not None:
                    break
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"moto server did not start on port {self.port}")

    def upload(self, folder: Path, prefix: str) -> None:
        """Put every file of ``folder`` under ``s3://bench/PREFIX/``, one PUT per file."""
        for f in sorted(folder.iterdir()):
            if f.is_file():
                self.client.upload_file(str(f), BUCKET, f"{prefix}/{f.name}", Config=self.transfer)

    def stop(self) -> None:
        """Stop the server process."""
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def fetch(uri: str, dest: str) -> None:
    """Download every object under an ``s3://bucket/prefix`` to ``dest`` (what a storage initializer does)."""
    import boto3

    bucket, _, prefix = uri[len("s3://") :].partition("/")
    config, transfer = upload_config()
    client = boto3.client("s3", config=config)
    os.makedirs(dest, exist_ok=True)
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix.rstrip("/") + "/"):
        for obj in page.get("Contents", []):
            client.download_file(bucket, obj["Key"], os.path.join(dest, obj["Key"].rsplit("/", 1)[-1]),
                                 Config=transfer)  # fmt: skip


def vllm_env() -> dict[str, str]:
    """Environment every vLLM process of the benchmark gets (the same for every load format)."""
    # millisecond time stamps: every load format's load step is read off the same two lines
    # (hf_tensorizer.bench.vllm.load_step_seconds), whatever each loader prints itself
    return {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_NO_USAGE_STATS": "1", "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false", **logging_env()}  # fmt: skip


def make_service(row: str, source: str, paths: dict[str, Path], moto: Moto | None, args: argparse.Namespace) -> Service:
    """The service process and request of ``row`` reading from ``source`` (``local`` or ``s3``)."""
    s3 = source == "s3"
    env = dict(moto.env) if s3 and moto else {}
    env["HF_TENSORIZER_CACHE"] = tempfile.mkdtemp(prefix="coldstart-cache-")  # configs fetched afresh each run
    tensorized = f"s3://{BUCKET}/tensorized" if s3 else str(paths["tensorized"])
    stock = f"s3://{BUCKET}/safetensors" if s3 else str(paths["safetensors"])
    evict = [] if s3 else sorted(paths["tensorized" if row in OURS else "safetensors"].iterdir())
    if row.startswith("predictor"):
        return _predictor(row, s3, tensorized, stock, env, evict, args)
    if not args.vllm_python:
        raise SystemExit(f"row {row} needs --vllm-python PATH (the vLLM venv's python, scripts/vllm_bench_env.sh)")
    env.update(vllm_env())
    server = [args.vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--served-model-name", NAME,
              "--host", "127.0.0.1", "--port", "{port}", "--dtype", args.precision, "--max-model-len", "512",
              "--enforce-eager", "--seed", "0", "--max-num-seqs", str(min(args.requests, 128))]  # fmt: skip
    body = {"model": NAME, "prompt": PROMPT, "max_tokens": args.max_new_tokens, "temperature": 0}
    svc = Service([], "/health", "/v1/completions", body, env, evict, engine="vllm")
    if row == "vllm":
        extra = {"endpoint_url": moto.url} if s3 and moto else {}
        svc.argv = [*server, "--model", tensorized, "--load-format", "hf_tensorizer"]
        if extra:
            svc.argv += ["--model-loader-extra-config", json.dumps(extra)]
    elif row == "vllm-runai":
        svc.argv = [*server, "--model", stock, "--load-format", "runai_streamer"]
    elif row == "vllm-tensorizer":
        uri = f"s3://{BUCKET}/vllm-tensorized/model.tensors" if s3 else str(paths["vllm-tensorized"] / "model.tensors")
        # from S3: endpoint and keys from the AWS_* environment (moto's); tensorizer refuses an http:// endpoint
        # given as s3_endpoint ("Non-HTTPS endpoint URLs are not allowed"), not one from AWS_ENDPOINT_URL
        extra = {"tensorizer_uri": uri}
        svc.evict = [] if s3 else [paths["vllm-tensorized"] / "model.tensors"]
        # vLLM's tensorizer loader plus the post-processing it skips (integrations/adapters/vllm/peers.py): plain
        # `tensorizer` serves nothing on vLLM's CPU backend
        env.update(PEER_ENV)
        svc.argv = [*server, "--model", str(paths["safetensors"]), "--load-format", PEER_TENSORIZER,
                    "--model-loader-extra-config", json.dumps(extra)]  # fmt: skip
    elif row == "vllm-default" and not s3:
        svc.argv = [*server, "--model", stock]
    elif row == "vllm-default":
        svc.scratch = Path(tempfile.mkdtemp(prefix="coldstart-download-"))
        line = f"{sys.executable} -m integrations.coldstart fetch {stock} {svc.scratch} && exec " + " ".join(
            [*server, "--model", str(svc.scratch)]
        )
        svc.argv = ["sh", "-c", line]
    else:
        raise SystemExit(f"unknown row {row!r}: rows are {', '.join(ROWS)}")
    return svc


def _predictor(row: str, s3: bool, tensorized: str, stock: str, env: dict[str, str], evict: list[Path],
               args: argparse.Namespace) -> Service:  # fmt: skip
    body = {"instances": [{"prompt": PROMPT, "max_new_tokens": args.max_new_tokens}]}
    server = [sys.executable, "-m", "integrations.server", "--model-name", NAME, "--port", "{port}",
              "--precision", args.precision, "--ready-wait", "600", "--max-queue", str(args.requests + 8),
              "--device", args.device, "--log-level", "warning"]  # fmt: skip
    ready, path = f"/v1/models/{NAME}", f"/v1/models/{NAME}:predict"
    if row == "predictor":
        return Service([*server, "--model-uri", tensorized], ready, path, body, env, evict)
    if row == "predictor-snapshot":
        return Service([*server, "--model-uri", tensorized, "--no-lease"], ready, path, body, env, evict)
    if row == "predictor-pread":
        return Service([*server, "--model-uri", tensorized, "--no-snapshot"], ready, path, body, env, evict)
    if row == "predictor-mapped":
        return Service([*server, "--model-uri", tensorized, "--tensorizer-option", "strategy=auto"], ready, path,
                       body, env, evict)  # fmt: skip
    if not s3:
        return Service([*server, "--loader", "hf", "--model-uri", stock], ready, path, body, env, evict)
    scratch = Path(tempfile.mkdtemp(prefix="coldstart-download-"))
    line = (f"{sys.executable} -m integrations.coldstart fetch {stock} {scratch} && exec "
            + " ".join([*server, "--loader", "hf", "--model-uri", str(scratch)]))  # fmt: skip
    return Service(["sh", "-c", line], ready, path, body, env, evict, scratch)
