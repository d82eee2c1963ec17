"""Scale-from-zero benchmark: a service process started at t=0 with N concurrent clients retrying until served.

Each run spawns one service process (a row's command line) and, at the same instant, N clients that each send one
request and retry — every 20 ms while the port refuses connections, every 50 ms on a 503 — until they are
served, as a load balancer in front of a service scaled from zero would. Measured from the spawn:

* ``ready_s`` — the readiness endpoint first answers 200 (polled every 20 ms);
* ``first_s`` — the first client is served; ``mean_s`` / ``p50_s`` / ``p95_s`` / ``max_s`` over the N clients
  (each client's latency counts from the spawn: that is when it first tried);
* ``peak_rss_gb`` — the largest resident set of the service's process tree (sampled every 50 ms);
* ``load_s`` — the predictor's own load time (``hf_tensorizer_load_seconds`` on ``/metrics``), when it has one.

Rows (``--rows``), same model (a Llama built from a config with fixed-seed weights, written once as a tensorized
artifact and as a stock ``save_pretrained`` safetensors folder):

* ``predictor`` — our KServe predictor (``python -m integrations.server``), default options (``strategy="pread"``);
* ``predictor-mapped`` — the same with ``strategy=auto`` (the library's CPU default: the file is mapped);
* ``predictor-stock`` — the same predictor with stock ``from_pretrained`` (``--loader hf``) on the safetensors
  folder; from S3 it first downloads the folder (what KServe's storage initializer does), then loads;
* ``vllm``, ``vllm-default``, ``vllm-runai`` — ``vllm serve`` with ``--load-format hf_tensorizer``, its default
  safetensors loader, ``runai_streamer`` (needs ``--vllm`` pointing at a ``vllm`` executable whose environment has
  the hf_tensorizer plugin; OpenAI ``/v1/completions`` requests, ``/health`` readiness).

Sources (``--sources``): ``local`` (files on this disk) and ``s3`` (a moto server process on 127.0.0.1, the same
files uploaded once). Page cache (``--cache``): ``warm`` (files read just before) or ``cold`` (evicted with
``posix_fadvise(DONTNEED)`` before the spawn; local rows only — moto keeps objects in its own memory). Runs
alternate between rows; the summary is the median over ``--repeats``.

    python -m integrations.coldstart --workdir /tmp/coldstart --requests 100 --repeats 2 \\
        --rows predictor,predictor-mapped,predictor-stock --sources local,s3 --cache warm,cold \\
        --json docs/data/cpu-2026-12-07-coldstart.json --plot docs/img/cpu-coldstart-kserve.png
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
NAME = "coldstart"
PROMPT = "Once upon a time"  # 16 tokens (byte tokenizer): vLLM's CPU worker wants prompts over ~8 tokens
ROWS = ("predictor", "predictor-mapped", "predictor-stock", "vllm", "vllm-default", "vllm-runai")
METRICS = ("ready_s", "first_s", "mean_s", "p50_s", "p95_s", "max_s", "peak_rss_gb", "load_s")


@dataclass
class Service:
    """One row's service: its command line (``{port}`` filled in), readiness path and request."""

    argv: list[str]
    ready_path: str
    request_path: str
    body: dict[str, Any]
    env: dict[str, str] = field(default_factory=dict)
    evict: list[Path] = field(default_factory=list)  # files dropped from the page cache for a cold run
    scratch: Path | None = None  # removed after the run (the stock row's S3 download)


def prepare(workdir: Path, hidden: int, layers: int, vocab: int) -> dict[str, Path]:
    """Write the model twice (tensorized artifact, stock safetensors folder) unless already there."""
    paths = {"tensorized": workdir / "tensorized", "safetensors": workdir / "safetensors"}
    if (paths["tensorized"] / "hf_tensorizer.json").exists() and (paths["safetensors"] / "config.json").exists():
        return paths
    import hf_tensorizer
    from integrations.tiny import byte_tokenizer, causal_lm

    model, tok = causal_lm(hidden=hidden, layers=layers, vocab=vocab), byte_tokenizer()
    hf_tensorizer.save_pretrained(model, paths["tensorized"], tokenizer=tok)
    model.save_pretrained(paths["safetensors"])
    tok.save_pretrained(paths["safetensors"])
    return paths


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Moto:
    """A moto S3 server in its own process (not a thread of the clients' process), the model uploaded once."""

    def __init__(self, paths: dict[str, Path]) -> None:
        import boto3

        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        self.env = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1",
                    "AWS_ENDPOINT_URL": self.url, "AWS_EC2_METADATA_DISABLED": "true"}  # fmt: skip
        client = None
        for _ in range(300):
            try:
                client = boto3.client("s3", endpoint_url=self.url, region_name="us-east-1",
                                      aws_access_key_id="bench", aws_secret_access_key="bench")  # fmt: skip
                client.create_bucket(Bucket="bench")
                break
            except Exception:  # not listening yet
                time.sleep(0.1)
        assert client is not None
        from boto3.s3.transfer import TransferConfig

        # moto assembles multipart uploads in memory and has answered 500 to a 1 GB one under load: big parts
        config = TransferConfig(multipart_threshold=256 << 20, multipart_chunksize=256 << 20, max_concurrency=2)
        try:
            for kind, folder in paths.items():
                for f in sorted(folder.iterdir()):
                    client.upload_file(str(f), "bench", f"{kind}/{f.name}", Config=config)
        except Exception:
            self.stop()
            raise

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


def fetch(uri: str, dest: str) -> None:
    """Download every object under an ``s3://bucket/prefix`` to ``dest`` (the stock row's storage initializer)."""
    import boto3

    bucket, _, prefix = uri[len("s3://") :].partition("/")
    client = boto3.client("s3")
    os.makedirs(dest, exist_ok=True)
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix.rstrip("/") + "/"):
        for obj in page.get("Contents", []):
            client.download_file(bucket, obj["Key"], os.path.join(dest, obj["Key"].rsplit("/", 1)[-1]))


def make_service(row: str, source: str, paths: dict[str, Path], moto: Moto | None, args: argparse.Namespace) -> Service:
    """The service process and request of ``row`` reading from ``source``."""
    s3 = source == "s3"
    env = dict(moto.env) if s3 and moto else {}
    env["HF_TENSORIZER_CACHE"] = tempfile.mkdtemp(prefix="coldstart-cache-")  # configs fetched afresh each run
    tensorized = "s3://bench/tensorized" if s3 else str(paths["tensorized"])
    stock = "s3://bench/safetensors" if s3 else str(paths["safetensors"])
    ours = row in ("predictor", "predictor-mapped", "vllm")
    evict = [] if s3 else sorted(paths["tensorized" if ours else "safetensors"].iterdir())
    if row.startswith("predictor"):
        body = {"instances": [{"prompt": PROMPT, "max_new_tokens": args.max_new_tokens}]}
        server = [sys.executable, "-m", "integrations.server", "--model-name", NAME, "--port", "{port}",
                  "--precision", args.precision, "--ready-wait", "600", "--max-queue", str(args.requests + 8),
                  "--device", args.device, "--log-level", "warning"]  # fmt: skip
        ready, path = f"/v1/models/{NAME}", f"/v1/models/{NAME}:predict"
        if row == "predictor":
            return Service([*server, "--model-uri", tensorized], ready, path, body, env, evict)
        if row == "predictor-mapped":
            return Service([*server, "--model-uri", tensorized, "--tensorizer-option", "strategy=auto"], ready, path,
                           body, env, evict)  # fmt: skip
        if not s3:
            return Service([*server, "--loader", "hf", "--model-uri", stock], ready, path, body, env, evict)
        scratch = Path(tempfile.mkdtemp(prefix="coldstart-download-"))
        line = (f"{sys.executable} -m integrations.coldstart fetch {stock} {scratch} && exec "
                + " ".join([*server, "--loader", "hf", "--model-uri", str(scratch)]))  # fmt: skip
        return Service(["sh", "-c", line], ready, path, body, env, evict, scratch)
    if not args.vllm:
        raise SystemExit(f"row {row} needs --vllm PATH (a vllm executable with the hf_tensorizer plugin)")
    vllm = [args.vllm, "serve"]
    common = ["--served-model-name", NAME, "--port", "{port}", "--host", "127.0.0.1", "--dtype", args.precision,
              "--max-model-len", "512"]  # fmt: skip
    fmt = {"vllm": ["--load-format", "hf_tensorizer"], "vllm-default": [], "vllm-runai": ["--load-format",
           "runai_streamer"]}[row]  # fmt: skip
    body = {"model": NAME, "prompt": PROMPT, "max_tokens": args.max_new_tokens, "temperature": 0}
    return Service([*vllm, tensorized if row == "vllm" else stock, *fmt, *common], "/health", "/v1/completions",
                   body, env, evict)  # fmt: skip


def run_once(service: Service, n: int, threads: int, cold: bool, timeout: float = 600.0) -> dict[str, Any]:
    """Start the service from zero with ``n`` clients retrying; return this run's timings."""
    import psutil

    from hf_tensorizer.engine.pagecache import evict, resident_fraction

    resident = None
    if cold:
        for f in service.evict:
            evict(f)
        big = max(service.evict, key=lambda f: f.stat().st_size)
        fd = os.open(big, os.O_RDONLY)
        try:
            resident = resident_fraction(fd, big.stat().st_size)
        finally:
            os.close(fd)
    else:
        for f in service.evict:  # warm: every byte read once just before
            with open(f, "rb") as fh:
                while fh.read(16 << 20):
                    pass
    port = _free_port()
    argv = [a.replace("{port}", str(port)) for a in service.argv]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", **service.env}
    if threads > 0:  # on a shared machine, spinning OpenMP threads make latencies explode under contention
        env["OMP_NUM_THREADS"] = str(threads)
    fd, log = tempfile.mkstemp(prefix="coldstart-", suffix=".log")
    t0 = time.perf_counter()
    with os.fdopen(fd, "wb") as out:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    peak = [0]
    stop = threading.Event()

    def sample() -> None:
        root = psutil.Process(proc.pid)
        while not stop.wait(0.05):
            try:
                rss = sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])
            except psutil.Error:
                continue
            peak[0] = max(peak[0], rss)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        done, errors, ready = asyncio.run(_clients(f"http://127.0.0.1:{port}", service, n, proc, t0, timeout))
        load_s = _load_seconds(f"http://127.0.0.1:{port}")
    finally:
        stop.set()
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        sampler.join()
        shutil.rmtree(service.env["HF_TENSORIZER_CACHE"], ignore_errors=True)
        if service.scratch is not None:
            shutil.rmtree(service.scratch, ignore_errors=True)
    text = Path(log).read_text(errors="replace")
    os.unlink(log)
    if len(done) != n or ready is None:
        said = [ln for ln in text.splitlines() if ln.startswith("error:") or "Error:" in ln][-5:]
        raise RuntimeError(f"{len(done)}/{n} served, exit {proc.returncode}, errors {errors[:2]}, service said: {said}")
    done.sort()
    return {"ready_s": ready, "first_s": done[0], "mean_s": statistics.fmean(done), "p50_s": done[(n - 1) // 2],
            "p95_s": done[min(n - 1, round(0.95 * (n - 1)))], "max_s": done[-1], "peak_rss_gb": peak[0] / 1e9,
            "load_s": load_s, "resident_before": resident}  # fmt: skip


async def _clients(
    base: str, service: Service, n: int, proc: subprocess.Popen[bytes], t0: float, timeout: float
) -> tuple[list[float], list[str], float | None]:
    import httpx

    done: list[float] = []
    errors: list[str] = []
    ready: list[float] = []
    limits = httpx.Limits(max_connections=n + 4, max_keepalive_connections=n + 4)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as c:

        async def client() -> None:
            while proc.poll() is None and time.perf_counter() - t0 < timeout:
                try:
                    r = await c.post(base + service.request_path, json=service.body)
                except httpx.TransportError:
                    await asyncio.sleep(0.02)
                    continue
                if r.status_code in (502, 503, 404) and not ready:  # vLLM answers 404 before its routes exist
                    await asyncio.sleep(0.05)
                    continue
                if r.status_code == 200:
                    done.append(time.perf_counter() - t0)
                else:
                    errors.append(f"{r.status_code} {r.text[:300]}")
                return

        async def readiness() -> None:
            while proc.poll() is None and time.perf_counter() - t0 < timeout:
                try:
                    if (await c.get(base + service.ready_path, timeout=5)).status_code == 200:
                        ready.append(time.perf_counter() - t0)
                        return
                except httpx.TransportError:
                    pass
                await asyncio.sleep(0.02)

        await asyncio.gather(readiness(), *(client() for _ in range(n)))
    return done, errors, ready[0] if ready else None


def _load_seconds(base: str) -> float | None:
    import httpx

    try:
        text = httpx.get(base + "/metrics", timeout=10).text
    except httpx.HTTPError:
        return None
    m = re.search(r"^hf_tensorizer_load_seconds\{[^}]*\} ([0-9.e+-]+)$", text, re.M)
    return float(m.group(1)) if m else None


def plot(summary: dict[str, dict[str, float]], title: str, path: Path) -> None:
    """Grouped bars (ready, first response, p50, p95) per row, and the peak RSS per row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown, labels = ("ready_s", "first_s", "p50_s", "p95_s"), ("ready", "first response", "p50", "p95")
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [3, 1]})
    width = 0.8 / len(summary)
    for i, (row, values) in enumerate(summary.items()):
        xs = [j + i * width for j in range(len(shown))]
        bars = ax.bar(xs, [values[m] for m in shown], width, label=row)
        ax.bar_label(bars, fmt="%.1f", fontsize=6)
        ax2.barh(row, values["peak_rss_gb"])
    ax.set_xticks([j + width * (len(summary) - 1) / 2 for j in range(len(shown))], labels)
    ax.set_ylabel("seconds since the process was spawned")
    ax.legend(fontsize=7)
    ax2.set_xlabel("peak RSS (GB)")
    ax2.tick_params(axis="y", labelsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["fetch"]:  # python -m integrations.coldstart fetch s3://bucket/prefix DIR
        fetch(argv[1], argv[2])
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", type=Path, default=Path("/tmp/hf_tensorizer-coldstart"))
    p.add_argument("--requests", type=int, default=100, help="concurrent clients started with the service")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--max-new-tokens", type=int, default=1)
    p.add_argument("--precision", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--rows", default="predictor,predictor-stock", help=f"comma-separated, from {ROWS}")
    p.add_argument("--sources", default="local,s3")
    p.add_argument("--cache", default="warm,cold", help="warm, cold or both (cold: local sources only)")
    p.add_argument("--device", default="cpu", help="the predictor's --device (cuda on a GPU machine)")
    p.add_argument("--vllm", default=None, help="the vllm executable for the vllm rows")
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS for the service (0: torch's default)")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    p.add_argument("--plot", type=Path, default=None, help="write a PNG chart here")
    args = p.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    paths = prepare(args.workdir, args.hidden, args.layers, args.vocab)
    size = sum(f.stat().st_size for f in paths["tensorized"].glob("*.tensors"))
    combos = [(r, s, c) for s in args.sources.split(",") for c in args.cache.split(",") for r in args.rows.split(",")
              # moto keeps objects in its memory: no cold S3; the strategy only matters for a local file
              if not (s == "s3" and (c == "cold" or r == "predictor-mapped"))]  # fmt: skip
    moto: Moto | None = None
    failures: list[dict[str, Any]] = []
    runs: dict[str, list[dict[str, Any]]] = {f"{r} {s} {c}": [] for r, s, c in combos}
    try:
        for rep in range(args.repeats):
            for row, source, cache in combos:  # alternate so drift on a shared machine hits every row alike
                if source == "s3" and moto is None:
                    moto = Moto(paths)  # started (and the model uploaded) once, when the first S3 row comes
                service = make_service(row, source, paths, moto, args)
                try:
                    res = run_once(service, args.requests, args.threads, cache == "cold")
                except RuntimeError as exc:  # recorded, and the other rows still run
                    print(f"run {rep} {row} {source} {cache} FAILED: {exc}", flush=True)
                    failures.append({"row": f"{row} {source} {cache}", "repeat": rep, "error": str(exc)})
                    continue
                runs[f"{row} {source} {cache}"].append(res)
                shown = "  ".join(f"{k}={v:.2f}" for k, v in res.items() if isinstance(v, float))
                print(f"run {rep} {row:17s} {source:5s} {cache:4s} {shown}", flush=True)
    finally:
        if moto is not None:
            moto.stop()
    summary = {k: {m: statistics.median(x[m] for x in v if x[m] is not None) if any(x[m] is not None for x in v)
                   else None for m in METRICS} for k, v in runs.items() if v}  # fmt: skip
    import torch
    import transformers

    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python -m integrations.coldstart", *argv]),
        "machine": {"platform": platform.platform(), "processor": _cpu_name(), "cpus": os.cpu_count(),
                    "load_average_at_end": os.getloadavg(), "python": platform.python_version(),
                    "torch": torch.__version__, "transformers": transformers.__version__},
        "model": {"arch": "LlamaForCausalLM", "hidden": args.hidden, "layers": args.layers, "vocab": args.vocab,
                  "weights_bytes": size, "precision": args.precision},
        "device": args.device, "requests": args.requests, "max_new_tokens": args.max_new_tokens,
        "service_threads": args.threads,
        "runs": runs, "failures": failures, "median": summary,
    }  # fmt: skip
    print(json.dumps(summary, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    if args.plot:
        title = (f"scale from zero: {size / 1e9:.2f} GB Llama ({args.precision}), {args.requests} clients retrying, "
                 f"{os.cpu_count()} shared CPUs (median of {args.repeats})")  # fmt: skip
        plot({k: v for k, v in summary.items() if v["ready_s"] is not None}, title, args.plot)
    return 0


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor()


if __name__ == "__main__":
    sys.exit(main())
