"""Cold-start benchmark: the inference server started from zero, hf_tensorizer vs plain ``from_pretrained``.

For each loader the server is started as a fresh process (``python -m integrations.server``) and, at the
moment the process is spawned, N clients fire one predict request each (retrying "connection refused" every
20 ms, as a load balancer in front of a scaled-from-zero service would). The server runs with
``--ready-wait``: a request that reaches it during the load is held until the weights are in (as Knative's
activator holds requests for a service scaled from zero) rather than answered 503 and retried, so the
clients do not steal CPU from the loading process. Measured from the spawn, per run:

* ``ready_s`` — the readiness endpoint first answers 200 (weights loaded; polled every 20 ms);
* ``first_response_s`` — the first client gets its answer;
* ``mean_latency_s`` / ``max_latency_s`` — mean / last completion over the N clients (each client's
  latency counts from the spawn, since that is when it sent its first attempt);
* ``load_s`` — the server's own measure of the load, library imports included (``/v1/models/<name>``).

Both loaders serve the same model (a Llama built from a config with fixed-seed weights, the byte-level
tokenizer of :mod:`integrations.tiny`): ``hf_tensorizer`` from a tensorized artifact folder, ``hf`` from a
stock ``save_pretrained`` safetensors folder. Runs alternate between loaders; the summary is the median.

    python -m integrations.coldstart --workdir /tmp/coldstart --requests 16 --repeats 3 \\
        --loaders hf_tensorizer,hf,hf_tensorizer_mmap --json docs/data/cpu-2026-11-26-coldstart.json \\
        --plot docs/img/cpu-coldstart.png
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
LOADERS = ("hf_tensorizer", "hf")
# name -> (server --loader, extra server flags); "hf_tensorizer_mmap" maps the file like stock safetensors does on CPU
VARIANTS = {"hf_tensorizer": ("hf_tensorizer", []), "hf": ("hf", []),
            "hf_tensorizer_mmap": ("hf_tensorizer", ["--tensorizer-option", "mmap=true"])}  # fmt: skip
METRICS = ("ready_s", "first_response_s", "mean_latency_s", "max_latency_s", "load_s")


def prepare(workdir: Path, hidden: int, layers: int, vocab: int) -> dict[str, Path]:
    """Write the model twice (tensorized artifact, stock safetensors folder) unless already there."""
    paths = {"hf_tensorizer": workdir / "tensorized", "hf": workdir / "safetensors"}
    if (paths["hf_tensorizer"] / "hf_tensorizer.json").exists() and (paths["hf"] / "config.json").exists():
        return paths
    from hf_tensorizer.integrations.adapters.transformers.save import save_tensorized
    from integrations.tiny import byte_tokenizer, causal_lm

    model, tok = causal_lm(hidden=hidden, layers=layers, vocab=vocab), byte_tokenizer()
    save_tensorized(model, paths["hf_tensorizer"], tokenizer=tok)
    model.save_pretrained(paths["hf"])
    tok.save_pretrained(paths["hf"])
    return paths


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_once(
    variant: str, uri: Path, n: int, max_new_tokens: int, precision: str, threads: int, device: str = "cpu"
) -> dict[str, Any]:
    """Start one server from zero with ``n`` requests in flight; return the timings of this run."""
    import httpx

    loader, extra = VARIANTS[variant]
    port, name = _free_port(), "coldstart"
    base = f"http://127.0.0.1:{port}"
    body = {"instances": [{"prompt": "Once upon a time", "max_new_tokens": max_new_tokens}]}
    done: list[float] = []
    errors: list[str] = []
    ready: list[float] = []
    lock = threading.Lock()
    cmd = [sys.executable, "-m", "integrations.server", "--model-uri", str(uri), "--loader", loader, *extra,
           "--model-name", name, "--port", str(port), "--precision", precision, "--log-level", "warning",
           "--ready-wait", "600", "--device", device]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    if threads > 0:  # on a shared machine, spinning OpenMP threads make latencies explode under contention
        env["OMP_NUM_THREADS"] = str(threads)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def client() -> None:
        with httpx.Client(timeout=600) as c:
            while proc.poll() is None:
                try:
                    r = c.post(f"{base}/v1/models/{name}:predict", json=body)
                except httpx.TransportError:
                    time.sleep(0.02)
                    continue
                if r.status_code == 503:
                    time.sleep(0.02)
                    continue
                with lock:
                    (done if r.status_code == 200 else errors).append(
                        time.perf_counter() - t0 if r.status_code == 200 else r.text
                    )
                return

    def readiness() -> None:
        with httpx.Client(timeout=10) as c:
            while proc.poll() is None:
                try:
                    if c.get(f"{base}/v1/models/{name}").status_code == 200:
                        ready.append(time.perf_counter() - t0)
                        return
                except httpx.TransportError:
                    pass
                time.sleep(0.02)

    workers = [threading.Thread(target=client) for _ in range(n)] + [threading.Thread(target=readiness)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    try:
        status = httpx.get(f"{base}/v1/models/{name}", timeout=10).json()
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    if len(done) != n or not ready:
        raise RuntimeError(f"{variant}: {len(done)}/{n} answers, errors {errors[:2]}, server said: {err[-2000:]}")
    return {"ready_s": ready[0], "first_response_s": min(done), "mean_latency_s": statistics.fmean(done),
            "max_latency_s": max(done), "load_s": status.get("load_seconds")}  # fmt: skip


def plot(summary: dict[str, dict[str, float]], title: str, path: Path) -> None:
    """Grouped bars: time to ready, first response, mean latency per loader."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = ("ready_s", "first_response_s", "mean_latency_s")
    labels = ("time to ready", "first response", "mean latency")
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(summary)
    for i, (loader, values) in enumerate(summary.items()):
        xs = [j + i * width for j in range(len(shown))]
        bars = ax.bar(xs, [values[m] for m in shown], width, label=loader)
        ax.bar_label(bars, fmt="%.2f s", fontsize=8)
    ax.set_xticks([j + width * (len(summary) - 1) / 2 for j in range(len(shown))], labels)
    ax.set_ylabel("seconds since process start")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", type=Path, default=Path("/tmp/hf_tensorizer-coldstart"))
    p.add_argument("--requests", type=int, default=16, help="concurrent requests fired at process start")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--precision", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--loaders", default=",".join(LOADERS), help=f"comma-separated, from {sorted(VARIANTS)}")
    p.add_argument("--device", default="cpu", help="the server's --device (cuda on a GPU machine)")
    p.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS for the server (0: torch's default)")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    p.add_argument("--plot", type=Path, default=None, help="write a PNG bar chart here")
    args = p.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    loaders = args.loaders.split(",")
    paths = prepare(args.workdir, args.hidden, args.layers, args.vocab)
    size = sum(f.stat().st_size for f in paths["hf_tensorizer"].glob("*.tensors"))
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in loaders}
    for r in range(args.repeats):
        for loader in loaders:  # alternate so drift on a shared machine hits both alike
            uri = paths[VARIANTS[loader][0]]
            res = run_once(loader, uri, args.requests, args.max_new_tokens, args.precision, args.threads, args.device)
            runs[loader].append(res)
            print(f"run {r} {loader:14s} " + "  ".join(f"{k}={v:.3f}" for k, v in res.items()), flush=True)
    summary = {k: {m: statistics.median(x[m] for x in v) for m in METRICS} for k, v in runs.items()}
    import torch
    import transformers

    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python -m integrations.coldstart", *(argv if argv is not None else sys.argv[1:])]),
        "machine": {
            "platform": platform.platform(),
            "processor": _cpu_name(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
        "model": {
            "arch": "LlamaForCausalLM",
            "hidden": args.hidden,
            "layers": args.layers,
            "vocab": args.vocab,
            "weights_bytes": size,
            "precision": args.precision,
        },
        "requests": args.requests,
        "server_threads": args.threads or "torch default",
        "device": args.device,
        "max_new_tokens": args.max_new_tokens,
        "runs": runs,
        "median": summary,
    }
    print(json.dumps(summary, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    if args.plot:
        title = (f"cold start, {size / 1e6:.0f} MB Llama ({args.precision}), {args.requests} concurrent requests, "
                 f"{os.cpu_count()} CPUs (median of {args.repeats})")  # fmt: skip
        plot(summary, title, args.plot)
    return 0


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor()


if __name__ == "__main__":
    sys.exit(main())
