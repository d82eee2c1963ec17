"""Time to ready: from interpreter start to a model that has answered its first forward pass.

``hf-tensorizer bench ttr`` writes one Llama-shaped checkpoint (seeded, like the load benchmark's) twice:
as a tensorized artifact (``save_pretrained(..., tensorized=True)``) and as a stock safetensors folder
(``save_pretrained``). Then each loader runs in fresh interpreters (``python -c``), runs interleaved:

- ``ours``: ``hf_tensorizer.enable()`` + ``AutoModelForCausalLM.from_pretrained(<artifact>)``;
- ``stock``: ``AutoModelForCausalLM.from_pretrained(<safetensors folder>)``;
- ``raw``: the model built under ``init_empty_weights`` + ``TensorDeserializer(...).load_into_module``.

Each child prints wall-clock timestamps; the phases are ``startup`` (spawn to the child's first line:
interpreter and site), ``imports`` (torch, transformers, hf_tensorizer where used; on CUDA also the
context), ``construct`` (config and the model built on meta: for ``from_pretrained``, until the model's
``__init__`` returns), ``weights`` (the rest of the load) and ``forward`` (one forward pass of 16 tokens,
synchronized). ``total`` runs from spawn to the forward's end. The page cache is warm unless ``--cold``
(the loader's files evicted before each run; the libraries stay cached). Every run's logits are checked
against the others'.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..errors import UsageError
from .checkpoint import SEED, Shape
from .proc import MARK, ROOT
from .report import save_mode_results

LOADERS = {
    "ours": "hf_tensorizer.enable() + from_pretrained(artifact)",
    "stock": "from_pretrained(safetensors folder)",
    "raw": "meta model + TensorDeserializer.load_into_module",
}
PHASES = ("startup", "imports", "construct", "weights", "forward")
STOCK_DIR, ARTIFACT_DIR, META = "stock", "artifact", "ttr.json"
DEFAULT_SHAPE = Shape(layers=12, hidden=1024, vocab=32000)  # 0.46 GB bf16
QUICK_SHAPE = Shape(layers=2, hidden=64, vocab=512)
INPUT_TOKENS = 16

# The child: one load and one forward pass, from interpreter start; prints the timestamps as one MARK line.
CHILD = r"""
import time
t0 = time.time()
import functools, json, os, sys
loader, folder, device = sys.argv[1:4]
import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM
with open(os.path.join(folder, "config.json")) as f:
    cls = getattr(transformers, json.load(f)["architectures"][0])
t_stock_imports = time.time()
if loader == "ours":
    import hf_tensorizer
    hf_tensorizer.enable()
elif loader == "raw":
    from accelerate import init_empty_weights
    from hf_tensorizer import TensorDeserializer
cuda = device.startswith("cuda")
if cuda:
    torch.zeros(1, device=device)
    torch.cuda.synchronize()
built = []
init = cls.__init__
@functools.wraps(init)
def timed_init(self, *args, **kwargs):
    init(self, *args, **kwargs)
    built.append(time.time())
cls.__init__ = timed_init
t_imports = time.time()
if loader == "raw":
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder), dtype=torch.bfloat16)
    t_built = time.time()
    with TensorDeserializer(os.path.join(folder, "model.tensors"), device=device) as d:
        d.load_into_module(model)
    model.to(device).eval()  # buffers (rotary inv_freq) were built on the CPU
else:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, device_map=device)
    t_built = built[-1]
if cuda:
    torch.cuda.synchronize()
t_weights = time.time()
ids = (torch.arange(__TOKENS__) * 7919 % model.config.vocab_size).unsqueeze(0).to(device)
with torch.inference_mode():
    logits = model(ids).logits
if cuda:
    torch.cuda.synchronize()
t_ready = time.time()
check = [float(logits.double().sum()), float(logits.double().abs().sum())]
stamps = {"t0": t0, "stock_imports": t_stock_imports, "imports": t_imports, "built": t_built, "weights": t_weights,
          "ready": t_ready}
print("__MARK__" + json.dumps({**stamps, "check": check, "device": str(logits.device)}), flush=True)
""".replace("__MARK__", MARK).replace("__TOKENS__", str(INPUT_TOKENS))


# Checkpoint --------------------------------------------------------------------------------------------


def write_checkpoint(d: str | Path, shape: Shape) -> dict[str, Any]:
    """Write the seeded model under ``d`` as ``stock/`` (``save_pretrained``, safetensors) and ``artifact/``
    (``save_pretrained(..., tensorized=True)``); returns the metadata saved as ``d/ttr.json`` (written last).

    Args:
        d: the checkpoint directory.
        shape: the Llama shape.

    Returns:
        ``{"shape", "seed", "bytes", "tensors", "write_s"}``.
    """
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    import hf_tensorizer

    from .checkpoint import generate

    d = Path(d)
    t0 = time.perf_counter()
    (d / META).unlink(missing_ok=True)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(shape.config(), dtype=torch.bfloat16)
    spec = [(k, list(v.shape)) for k, v in model.state_dict().items()]
    sd, _ = generate(spec, "cpu")
    model.load_state_dict(sd, assign=True, strict=True)
    model.eval()
    for sub in (STOCK_DIR, ARTIFACT_DIR):
        shutil.rmtree(d / sub, ignore_errors=True)
    model.save_pretrained(d / STOCK_DIR)
    hf_tensorizer.enable()
    try:
        model.save_pretrained(d / ARTIFACT_DIR, tensorized=True)
    finally:
        hf_tensorizer.disable()
    meta = {
        "shape": asdict(shape),
        "seed": SEED,
        "bytes": sum(t.numel() * t.element_size() for t in sd.values()),
        "tensors": len(sd),
        "write_s": round(time.perf_counter() - t0, 2),
    }
    (d / META).write_text(json.dumps(meta))
    return meta


def prepare(d: str | Path, shape: Shape) -> dict[str, Any]:
    """The checkpoint under ``d`` for ``shape``: reused when a complete one is there, else written (in this
    process: only the children are timed)."""
    d = Path(d)
    try:
        meta: dict[str, Any] = json.loads((d / META).read_text())
        if meta["shape"] == asdict(shape) and meta["seed"] == SEED:
            return meta
    except (OSError, ValueError, KeyError):
        pass
    d.mkdir(parents=True, exist_ok=True)
    return write_checkpoint(d, shape)


# One run -----------------------------------------------------------------------------------------------


def folder_of(d: str | Path, loader: str) -> Path:
    """The folder ``loader`` reads: the stock safetensors folder or the tensorized artifact."""
    return Path(d) / (STOCK_DIR if loader == "stock" else ARTIFACT_DIR)


def run_one(d: str | Path, loader: str, device: str, *, cold: bool = False, timeout: float = 300.0) -> dict[str, Any]:
    """One fresh process: ``loader`` loads the checkpoint and runs a forward pass.

    Returns:
        ``{"loader", "ok", "phases": {phase: s}, "total_s", "exit_s", "check"}`` or, on failure,
        ``{"loader", "ok": False, "why"}``.
    """
    if loader not in LOADERS:
        raise UsageError(f"unknown loader {loader!r}; choose from {', '.join(LOADERS)}")
    folder = folder_of(d, loader)
    if cold:
        from ..engine.pagecache import evict

        for f in folder.iterdir():
            evict(f.resolve())
    res, out, spawned = _run_child([sys.executable, "-c", CHILD, loader, str(folder), device], timeout)
    exited = time.time()
    if res is None:
        return {"loader": loader, "ok": False, "why": _last_line(out)}
    stamps = [spawned, res["t0"], res["imports"], res["built"], res["weights"], res["ready"]]
    phases = {p: round(b - a, 4) for p, a, b in zip(PHASES, stamps[:-1], stamps[1:], strict=True)}
    return {
        "loader": loader,
        "ok": True,
        "phases": phases,
        "total_s": round(res["ready"] - spawned, 4),
        # of ``imports``: what comes after torch + transformers (hf_tensorizer, enable(), accelerate, CUDA context)
        "extra_imports_s": round(res["imports"] - res["stock_imports"], 4),
        "exit_s": round(exited - res["ready"], 4),
        "check": res["check"],
        "device": res["device"],
    }


def _run_child(cmd: list[str], timeout: float) -> tuple[dict[str, Any] | None, str, float]:
    """Run ``cmd`` (its own session, killed as a group on timeout); (MARK line, output, spawn timestamp)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env.setdefault("TRANSFORMERS_VERBOSITY", "error")
    spawned = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)  # fmt: skip
    try:
        out, _ = proc.communicate(timeout=timeout)
    except BaseException:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        out, _ = proc.communicate()
        if not isinstance(sys.exc_info()[1], subprocess.TimeoutExpired):
            raise
        out = f"timeout after {timeout:.0f} s\n{out}"
    for line in reversed(out.splitlines()):
        if line.startswith(MARK):
            return json.loads(line[len(MARK) :]), out, spawned
    return None, out, spawned


def _last_line(out: str) -> str:
    lines = [ln.strip() for ln in out.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if "Error" in ln or "Exception" in ln or ln.startswith("timeout"):
            return ln[:300]
    return (lines[-1] if lines else "no output")[:300]


# The benchmark -----------------------------------------------------------------------------------------


def run_ttr(
    d: str | Path,
    loaders: list[str] | None = None,
    device: str = "cpu",
    *,
    shape: Shape = DEFAULT_SHAPE,
    runs: int = 5,
    warmup: int = 1,
    cold: bool = False,
    timeout: float = 300.0,
    log: Any = print,
) -> dict[str, Any]:
    """Prepare the checkpoint, then ``warmup`` untimed and ``runs`` timed fresh processes per loader
    (interleaved: one of each loader per round).

    Returns:
        ``{"rows": [{"loader", "label", "status", "runs", "median": {phase: s, "total": s}, "vs_stock"}],
        ...}``; status ``ok``, ``error`` or ``wrong`` (logits differ from the other loaders').
    """
    names = loaders or list(LOADERS)
    for n in names:
        if n not in LOADERS:
            raise UsageError(f"unknown loader {n!r}; choose from {', '.join(LOADERS)}")
    start = time.monotonic()
    meta = prepare(d, shape)
    log(f"checkpoint {d}: {meta['tensors']} tensors, {meta['bytes'] / 1e9:.3f} GB bf16; device {device}, "
        f"{'cold' if cold else 'warm'} page cache, {runs} runs per loader")  # fmt: skip
    if not cold:
        for n in names:
            for f in folder_of(d, n).iterdir():
                with open(f, "rb") as fh:
                    while fh.read(64 << 20):
                        pass
    rows = {n: {"loader": n, "label": LOADERS[n], "status": "ok", "runs": [], "why": ""} for n in names}
    for i in range(warmup + runs):
        for n in names:
            row = rows[n]
            if row["status"] == "error":
                continue
            res = run_one(d, n, device, cold=cold, timeout=timeout)
            if not res["ok"]:
                row["status"], row["why"] = "error", res["why"]
                log(f"  {n:<6} ERROR: {res['why']}")
                continue
            timed = i >= warmup
            if timed:
                row["runs"].append(res)
            p = res["phases"]
            log(f"  {n:<6} {'run' if timed else 'warm-up'} {i - warmup + 1 if timed else i + 1}: total "
                f"{res['total_s']:.2f} s (" + ", ".join(f"{k} {v:.2f}" for k, v in p.items()) + ")")  # fmt: skip
    _check_logits(rows)
    for row in rows.values():
        if row["runs"]:
            per_run = [
                {**r["phases"], "total": r["total_s"], "extra_imports": r["extra_imports_s"]} for r in row["runs"]
            ]
            row["median"] = {k: round(statistics.median(r[k] for r in per_run), 4) for k in per_run[0]}
    stock = rows.get("stock", {}).get("median", {}).get("total")
    for row in rows.values():
        total = row.get("median", {}).get("total")
        row["vs_stock"] = round(total / stock, 3) if total and stock else None
    return {
        "device": device,
        "cold": cold,
        "dir": str(d),
        "shape": meta["shape"],
        "bytes": meta["bytes"],
        "tensors": meta["tensors"],
        "runs": runs,
        "warmup": warmup,
        "python": sys.version.split()[0],
        "cpus": os.cpu_count(),
        "rows": list(rows.values()),
        "elapsed_s": round(time.monotonic() - start, 1),
    }


def _check_logits(rows: dict[str, dict[str, Any]], rel: float = 1e-3) -> None:
    """Mark ``wrong`` a loader whose first-forward logits differ from the first run's (every loader, every run
    computes the same forward on the same weights)."""
    ref = next((r["runs"][0]["check"] for r in rows.values() if r["runs"]), None)
    if ref is None:
        return
    for row in rows.values():
        for r in row["runs"]:
            if any(abs(a - b) > rel * max(1.0, abs(b)) for a, b in zip(r["check"], ref, strict=True)):
                row["status"], row["why"] = "wrong", f"logits differ: {r['check']} vs {ref}"


# Report ------------------------------------------------------------------------------------------------


def format_table(results: dict[str, Any]) -> str:
    """Markdown table of the median seconds per phase and the total, with the ratio to stock."""
    head = "| loader | " + " | ".join(PHASES) + " | total (spawn → ready) | vs stock |"
    lines = [head, "|---" * (len(PHASES) + 3) + "|"]
    for row in results["rows"]:
        if row["status"] != "ok":
            lines.append(f"| {row['loader']} | {row['status']}: {row['why']} |")
            continue
        m = row["median"]
        ratio = f"{row['vs_stock']:.2f}×" if row["vs_stock"] else "–"
        cells = " | ".join(f"{m[p]:.3f}" for p in PHASES)
        lines.append(f"| {row['loader']} ({row['label']}) | {cells} | **{m['total']:.3f}** | {ratio} |")
    gb = results["bytes"] / 1e9
    lines.append(
        f"\nseconds, median of {results['runs']} fresh processes each; {gb:.2f} GB bf16 on {results['device']}, "
        f"{'cold' if results['cold'] else 'warm'} page cache (phase medians need not add up to the total's)"
    )
    extra = [f"{r['loader']} {r['median']['extra_imports']:.3f} s" for r in results["rows"] if r["status"] == "ok"]
    lines.append("imports after torch + transformers (hf_tensorizer, enable(), accelerate): " + ", ".join(extra))
    return "\n".join(lines)


def plot(results: dict[str, Any], path: str | Path) -> bool:
    """Stacked horizontal bars of the median phases per loader; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = [r for r in results["rows"] if r["status"] == "ok"]
    fig, ax = plt.subplots(figsize=(8, 0.6 * len(rows) + 1.6))
    colors = ("#bbbbbb", "#8da0cb", "#66c2a5", "#fc8d62", "#e78ac3")
    for y, row in enumerate(reversed(rows)):
        left = 0.0
        for phase, color in zip(PHASES, colors, strict=True):
            w = row["median"][phase]
            ax.barh(y, w, left=left, color=color, label=phase if y == 0 else None)
            left += w
        ax.text(left, y, f" {row['median']['total']:.2f} s", va="center", fontsize=9)
    ax.set_yticks(range(len(rows)), [r["loader"] for r in reversed(rows)])
    ax.set_xlabel("seconds from spawn (median phases)")
    ax.set_title(f"time to ready: {results['bytes'] / 1e9:.2f} GB Llama, {results['device']}, "
                 f"{'cold' if results['cold'] else 'warm'}", fontsize=10)  # fmt: skip
    ax.legend(ncol=len(PHASES), fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.25))
    ax.set_xlim(0, max(r["median"]["total"] for r in rows) * 1.18 if rows else 1)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


# CLI ---------------------------------------------------------------------------------------------------


def add_ttr_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``hf-tensorizer bench ttr`` options."""
    parser.add_argument("--dir", default=".bench/ttr", help="checkpoint directory (written when missing)")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default 12; --quick 2)")
    parser.add_argument("--hidden", type=int, default=None, help="hidden size (default 1024; --quick 64)")
    parser.add_argument("--vocab", type=int, default=None, help="vocabulary size (default 32000; --quick 512)")
    parser.add_argument("--device", default=None, help="cpu or cuda:0 (default: cuda:0 when available)")
    parser.add_argument("--loaders", default=",".join(LOADERS), help="comma-separated, of: " + ", ".join(LOADERS))
    parser.add_argument("--runs", type=int, default=None, help="timed fresh processes per loader (default 5)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed processes per loader first (default 1)")
    parser.add_argument("--cold", action="store_true", help="evict the loader's files before each run")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per process")
    parser.add_argument("--out", default=".bench/results", help="where ttr.json, ttr.md and ttr.png go")
    parser.add_argument("--quick", action="store_true", help="a tiny model, one run, no warm-up (a smoke test)")
    parser.add_argument("--clean", action="store_true", help="delete the checkpoint directory afterwards")


def ttr_main(args: argparse.Namespace) -> int:
    """Run the benchmark from parsed options and write the report; 1 when a loader failed or disagreed."""
    base = QUICK_SHAPE if args.quick else DEFAULT_SHAPE
    shape = Shape(layers=args.layers or base.layers, hidden=args.hidden or base.hidden, vocab=args.vocab or base.vocab)
    runs = args.runs if args.runs is not None else 1 if args.quick else 5
    warmup = args.warmup if args.warmup is not None else 0 if args.quick else 1
    device = args.device
    if device is None:
        import torch

        device = "cuda:0" if torch.cuda.is_available() else "cpu"
    loaders = [x.strip() for x in args.loaders.split(",") if x.strip()]
    results = run_ttr(args.dir, loaders, device, shape=shape, runs=runs, warmup=warmup, cold=args.cold,
                      timeout=args.timeout)  # fmt: skip
    results["options"] = {k: v for k, v in vars(args).items() if not callable(v)}
    if args.clean:
        shutil.rmtree(args.dir, ignore_errors=True)
    save_mode_results(args.out, "ttr", results, format_table(results), plot)
    return 0 if all(r["status"] == "ok" for r in results["rows"]) else 1


def main(argv: list[str] | None = None) -> int:
    """``python -m hf_tensorizer.bench.ttr [options]``: the same as ``hf-tensorizer bench ttr``."""
    parser = argparse.ArgumentParser(prog="hf-tensorizer bench ttr", description=__doc__.splitlines()[0])
    add_ttr_arguments(parser)
    return ttr_main(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
