"""How cost grows: load time and memory against model size, from a local file and over HTTP.

``hf-tensorizer bench scale --sizes 0.1,0.25,0.5,1,2 --sources local,http`` writes one seeded, Llama-shaped bf16
checkpoint per size (our format, ``bench/checkpoint.py``; a fixed hidden size and vocabulary, the layer count
chosen for the size), then loads each one with the default loader, ``TensorDeserializer(uri, device="cpu")``, in
fresh processes (``python -m hf_tensorizer.bench.scale job ...``), interleaved over sizes and sources, warm page
cache. The timer covers construction (open, index, every tensor) and reading one byte of every 4 KiB page of the
result (what a mapped load defers); imports come before it. Every load is checked against the per-tensor sums
recorded when the checkpoint was written.

Memory, per load, from ``/proc/self/status``: the peak resident set (``VmHWM``, reset through
``/proc/self/clear_refs`` just before the timer, so it is the load's own peak) minus the resident set before the
load minus the tensor bytes is the **overhead**: what the loader holds besides the tensors. It means the same for
both sources because each tensor byte is resident exactly once: locally as file-backed pages of the mapping
(``RssFile``: the page-cache pages themselves, no copy), over HTTP as new anonymous memory (``RssAnon``); both
growths are recorded too.

The fits (``bench/scale_report.py``): time = a + b·size by least squares over the best run of each size (on a
shared machine noise only adds time; the fit over every run is kept in the JSON too), and a + b·size + c·size² with
c's t statistic, its p-value and its share of the fitted time at the largest size.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from ..errors import UsageError
from .checkpoint import Shape, prepare, read_meta
from .peers import read_parallel
from .proc import MARK, Log, collect, error_line, log, popen
from .report import save_mode_results
from .scale_report import fit_all, format_table, plot

SOURCES = ("local", "http")
DEFAULT_SIZES = "0.1,0.25,0.5,1,2"
HIDDEN, VOCAB = 1536, 8000  # 61 MB per layer, 49 MB of embeddings: 0.1 GB is one layer, 2 GB 32
PAGE = 4096


# Checkpoints -------------------------------------------------------------------------------------------


def shape_for(gb: float, hidden: int = HIDDEN, vocab: int = VOCAB) -> Shape:
    """The Llama shape (``hidden``, ``vocab`` fixed) whose bf16 tensors come closest to ``gb`` GB (≥ 1 layer).

    Raises:
        UsageError: ``gb`` is not positive.
    """
    if not gb > 0:
        raise UsageError(f"sizes must be positive, got {gb}")
    one, two = (model_bytes(Shape(n, hidden, vocab)) for n in (1, 2))
    layer = two - one
    return Shape(max(1, round((gb * 1e9 - (one - layer)) / layer)), hidden, vocab)


def model_bytes(shape: Shape) -> int:
    """Bytes of the bf16 state dict of ``shape`` (from a meta-device model)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(shape.config(), dtype=torch.bfloat16)
    return sum(2 * t.numel() for t in model.state_dict().values())


def size_dir(base: Path, shape: Shape) -> Path:
    """One directory per shape under ``base`` (reused by later runs)."""
    return base / f"l{shape.layers}-h{shape.hidden}-v{shape.vocab}"


# The child ---------------------------------------------------------------------------------------------


def _status() -> dict[str, int]:
    """Bytes of ``VmHWM``, ``VmRSS``, ``RssAnon``, ``RssFile`` and ``RssShmem`` of this process."""
    keys = ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem")
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            name, _, rest = line.partition(":")
            if name in keys:
                out[name] = int(rest.split()[0]) * 1024
    return out


def _reset_peak() -> bool:
    """Reset ``VmHWM`` to the current RSS (Linux ≥ 4.0); False where that is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    """A child's work: one timed load of ``job["uri"]`` to the CPU, its memory, checked against the checkpoint.

    Returns:
        ``{"seconds", "tensor_bytes", "rss_before", "rss_peak", "overhead", "anon_growth", "file_growth",
        "strategy", "readers", "why"}`` (bytes; ``why`` None when the tensors are right).
    """
    import resource

    import torch  # noqa: F401  (imports before the timer, as a process that serves models has them)

    import hf_tensorizer.engine.reader
    import hf_tensorizer.sources.http  # noqa: F401
    from hf_tensorizer import TensorDeserializer
    from hf_tensorizer.engine.memory import as_bytes

    from .checkpoint import verify

    meta = read_meta(Path(job["dir"]))
    if meta is None:
        raise FileNotFoundError(f"no checkpoint in {job['dir']}")
    ru_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    reset = _reset_peak()
    before = _status()
    t0 = time.perf_counter()
    d = TensorDeserializer(job["uri"], device="cpu")
    sd = dict(d)
    for t in sd.values():  # one byte per page: a mapped load faults its pages in on first access
        if t.numel():
            as_bytes(t.contiguous())[::PAGE].sum()
    seconds = time.perf_counter() - t0
    after = _status()
    peak = after["VmHWM"]
    if not reset:  # without the reset the high-water mark counts only when it moved during the load
        ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        peak = ru if ru > ru_before else after["VmRSS"]
    tensor_bytes = sum(t.numel() * t.element_size() for t in sd.values())
    res = {
        "seconds": round(seconds, 5),
        "tensor_bytes": tensor_bytes,
        "rss_before": before["VmRSS"],
        "rss_peak": peak,
        "overhead": peak - before["VmRSS"] - tensor_bytes,
        "anon_growth": after["RssAnon"] - before["RssAnon"],
        "file_growth": after["RssFile"] - before["RssFile"],
        "peak_exact": reset,
        "strategy": d.metrics.strategy,
        "readers": d.num_readers,
    }
    res["why"] = verify(sd, meta, "cpu")
    d.close()
    return res


def child(job: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Run ``job`` in a fresh process; raises with its last error line."""
    res, out = collect(popen(["job", json.dumps(job)], module="hf_tensorizer.bench.scale"), timeout)
    if res is None:
        raise RuntimeError(f"{job['source']} load of {job['dir']} failed: {error_line(out)}")
    return res


# The benchmark -----------------------------------------------------------------------------------------


def run_scale(
    base: str | Path,
    sizes: list[float],
    sources: list[str],
    *,
    runs: int = 3,
    warmup: int = 1,
    hidden: int = HIDDEN,
    vocab: int = VOCAB,
    server: str = "nginx",
    timeout: float = 600.0,
    log: Log = log,
) -> dict[str, Any]:
    """Prepare one checkpoint per size, then ``warmup`` untimed and ``runs`` timed fresh loads per (size, source),
    interleaved (one of each per round); fit time and overhead against size.

    Args:
        base: checkpoint directory (one sub-directory per shape, reused when complete).
        sizes: model sizes in GB (10⁹ bytes of bf16 tensors; each rounded to whole layers).
        sources: of ``local`` (the file path) and ``http`` (the file served on 127.0.0.1).
        runs, warmup: processes per (size, source).
        hidden, vocab: the fixed part of the shape.
        server: ``nginx`` or ``stdlib`` (tests/servers/http_range.py).
        timeout: seconds per process.
        log: progress lines.

    Returns:
        ``{"points": [{"size_gb", "source", "runs": [...], "median_s", ...}], "fits": {...}, ...}``.

    Raises:
        UsageError: an unknown source or no size.
        RuntimeError: a load failed or returned wrong tensors.
    """
    from .servers import http_server

    for s in sources:
        if s not in SOURCES:
            raise UsageError(f"unknown source {s!r}; choose from {', '.join(SOURCES)}")
    if not sizes or not sources:
        raise UsageError("give at least one size and one source")
    base = Path(base)
    start = time.monotonic()
    shapes = {gb: shape_for(gb, hidden, vocab) for gb in sizes}
    metas = {}
    for gb, shape in shapes.items():
        metas[gb] = prepare(size_dir(base, shape), shape.layers, shape.hidden, shape.vocab, formats=("hft",), log=log,
                            in_process=True)  # fmt: skip
    files = [size_dir(base, s) / "model.tensors" for s in shapes.values()]
    read_parallel(files, 2)  # warm page cache for every size
    points = {(gb, src): {"size_gb": gb, "source": src, "runs": []} for gb in sizes for src in sources}
    server_desc = None
    with http_server(base, server) if "http" in sources else _nothing() as served:
        url, server_desc = served if served else (None, None)
        for i in range(warmup + runs):
            for gb in sizes:
                d = size_dir(base, shapes[gb])
                for src in sources:
                    uri = str(d / "model.tensors") if src == "local" else f"{url}/{d.name}/model.tensors"
                    r = child({"dir": str(d), "uri": uri, "source": src}, timeout)
                    if r["why"]:
                        raise RuntimeError(f"{src} load of {d} returned wrong tensors: {r['why']}")
                    timed = i >= warmup
                    if timed:
                        points[gb, src]["runs"].append(r)
                    log(f"  {metas[gb]['bytes'] / 1e9:6.3f} GB {src:<5} {'run' if timed else 'warm-up'} "
                        f"{i - warmup + 1 if timed else i + 1}: {r['seconds']:.3f} s, overhead "
                        f"{r['overhead'] / 2**20:6.1f} MiB ({r['strategy']})")  # fmt: skip
    rows = []
    for (gb, _src), p in points.items():
        rs = p["runs"]
        rows.append({
            **p,
            "bytes": metas[gb]["bytes"],
            "tensors": metas[gb]["tensors"],
            "layers": shapes[gb].layers,
            "median_s": statistics.median(r["seconds"] for r in rs),
            "min_s": min(r["seconds"] for r in rs),
            "max_s": max(r["seconds"] for r in rs),
            "overhead": statistics.median(r["overhead"] for r in rs),
            "overhead_max": max(r["overhead"] for r in rs),
            "anon_growth": statistics.median(r["anon_growth"] for r in rs),
            "file_growth": statistics.median(r["file_growth"] for r in rs),
            "strategy": rs[0]["strategy"],
        })  # fmt: skip
    return {
        "hidden": hidden,
        "vocab": vocab,
        "runs": runs,
        "warmup": warmup,
        "http_server": server_desc,
        "points": rows,
        "fits": fit_all(rows, sources),
        "python": sys.version.split()[0],
        "elapsed_s": round(time.monotonic() - start, 1),
    }


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


# CLI ---------------------------------------------------------------------------------------------------


def add_scale_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``hf-tensorizer bench scale`` options."""
    parser.add_argument("--sizes", default=DEFAULT_SIZES, help=f"model sizes in GB (default {DEFAULT_SIZES})")
    parser.add_argument("--sources", default=",".join(SOURCES), help="comma-separated, of: " + ", ".join(SOURCES))
    parser.add_argument("--runs", type=int, default=3, help="timed fresh processes per size and source")
    parser.add_argument("--warmup", type=int, default=1, help="untimed processes per size and source first")
    parser.add_argument("--hidden", type=int, default=HIDDEN, help=f"hidden size (default {HIDDEN})")
    parser.add_argument("--vocab", type=int, default=VOCAB, help=f"vocabulary size (default {VOCAB})")
    parser.add_argument("--server", choices=("nginx", "stdlib"), default="nginx", help="HTTP server")
    parser.add_argument("--dir", default=".bench/scale", help="checkpoints (written when missing)")
    parser.add_argument("--out", default=".bench/results", help="where scale.json, scale.md and scale.png go")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per process")
    parser.add_argument("--clean", action="store_true", help="delete the checkpoints afterwards")


def scale_main(args: argparse.Namespace) -> int:
    """Run the benchmark from parsed options and write the report.

    Raises:
        UsageError: a malformed size list.
    """
    try:
        sizes = [float(x) for x in args.sizes.split(",") if x.strip()]
    except ValueError as e:
        raise UsageError(f"--sizes: {e}") from None
    sources = [x.strip() for x in args.sources.split(",") if x.strip()]
    from .remote_report import machine

    try:
        results = run_scale(args.dir, sizes, sources, runs=args.runs, warmup=args.warmup, hidden=args.hidden,
                            vocab=args.vocab, server=args.server, timeout=args.timeout)  # fmt: skip
    finally:
        if args.clean:
            shutil.rmtree(args.dir, ignore_errors=True)
    results.update(machine=machine(), date=time.strftime("%Y-%m-%d"),
                   options={k: v for k, v in vars(args).items() if not callable(v)})  # fmt: skip
    save_mode_results(args.out, "scale", results, format_table(results), plot)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m hf_tensorizer.bench.scale [options]`` (as ``hf-tensorizer bench scale``), or ``job JSON``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["job"]:
        print(MARK + json.dumps(run_job(json.loads(argv[1]))), flush=True)
        return 0
    parser = argparse.ArgumentParser(prog="hf-tensorizer bench scale", description=__doc__.splitlines()[0])
    add_scale_arguments(parser)
    return scale_main(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
