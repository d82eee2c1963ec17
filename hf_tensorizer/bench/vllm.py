"""vLLM weight loading: ``--load-format hf_tensorizer`` against vLLM's default safetensors loader, same model.

vLLM runs in its own venv (``scripts/vllm_env.sh`` builds ``.venv-vllm``); each vLLM start is a child process of
that venv's Python::

    hf-tensorizer bench vllm --dir /tmp/vllm-bench --runs 3

Builds a Llama-shaped model once (``tests/vllm/build_models.py``: hidden 1024, 8 layers, vocabulary 32000,
float32: 0.67 GB) as a stock safetensors folder and an artifact, then starts vLLM (``vllm.LLM``, a fresh process
each time, formats alternating) and reads vLLM's own "Loading weights took X seconds" line from its log. The files
are read once first, so every run is warm (page cache).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
from pathlib import Path

from .proc import ROOT

CHILD = """
import sys
from vllm import LLM
if __name__ == "__main__":
    LLM(model=sys.argv[1], load_format=sys.argv[2], enforce_eager=True, dtype="float32", max_model_len=256, seed=0)
"""
TOOK = re.compile(r"Loading weights took ([0-9.]+) seconds")


def one(python: str, model: Path, load_format: str) -> float:
    """Seconds vLLM's log gives for ``load_format`` loading ``model`` in a fresh vLLM process."""
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([python, "-c", CHILD, str(model), load_format], capture_output=True, text=True,
                         env=env, timeout=900)  # fmt: skip
    found = TOOK.findall(out.stdout + out.stderr)
    if out.returncode != 0 or not found:
        raise SystemExit(f"{load_format} run failed ({out.returncode}):\n{(out.stdout + out.stderr)[-3000:]}")
    return float(found[-1])


def add_vllm_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dir", default="/tmp/vllm-bench", help="where the model is built (kept for later runs)")
    p.add_argument("--runs", type=int, default=3, help="vLLM starts per load format")
    p.add_argument("--python", default=str(ROOT / ".venv-vllm" / "bin" / "python"),
                   help="the vLLM venv's Python (scripts/vllm_env.sh)")  # fmt: skip


def vllm_main(args: argparse.Namespace) -> None:
    from ..errors import UsageError

    if not os.access(args.python, os.X_OK):
        raise UsageError(f"no vLLM venv at {args.python}: run scripts/vllm_env.sh (or give --python)")
    d = Path(args.dir)
    if not (d / "artifact" / "model.tensors").exists():
        subprocess.run([args.python, str(ROOT / "tests" / "vllm" / "build_models.py"), str(d), "--hidden", "1024",
                        "--layers", "8", "--vocab", "32000", "--only", "stock,artifact"], check=True)  # fmt: skip
    size = (d / "artifact" / "model.tensors").stat().st_size
    for f in (d / "artifact" / "model.tensors", *(d / "stock").glob("*.safetensors")):
        with open(f, "rb") as fh:  # warm: both files in the page cache
            while fh.read(64 << 20):
                pass
    rows: dict[str, list[float]] = {"safetensors": [], "hf_tensorizer": []}
    for i in range(args.runs):
        for name, folder in (("safetensors", d / "stock"), ("hf_tensorizer", d / "artifact")):
            rows[name].append(one(args.python, folder, name))
            print(f"run {i + 1}: {name} {rows[name][-1]:.3f} s", flush=True)
    print(f"model: {size / 1e9:.2f} GB, {args.runs} runs each, warm page cache")
    for name, times in rows.items():
        print(
            f"{name:14s} median {statistics.median(times):.3f} s  range {min(times):.3f}-{max(times):.3f} s  "
            f"({size / 1e9 / statistics.median(times):.2f} GB/s)  runs {times}"
        )
