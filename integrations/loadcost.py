"""What the predictor's ``strategy="pread"`` default costs against the library's mapped CPU default.

Each run is a fresh process that loads an artifact exactly as the predictor does (``ModelRunner.load``: the same
``from_pretrained`` path, ``--tensorizer-option strategy=...`` semantics) and then runs one forward pass (a mapped
load defers its page faults to the first use of each weight, so load time alone would flatter it). Strategies
alternate; imports happen before the clock starts; the page cache is warm (the file read just before) or cold
(evicted with ``posix_fadvise``). Reported: ``load_s``, ``first_forward_s``, their sum, the peak RSS.

    python -m integrations.loadcost --artifact /tmp/hf_tensorizer-coldstart/tensorized --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
STRATEGIES = ("pread", "auto")

CHILD = r"""
import json, resource, sys, time
import torch
import hf_tensorizer, transformers.models.llama.modeling_llama  # imports before the clock: the same for both
from transformers import AutoModelForCausalLM, AutoTokenizer
from integrations.server import ModelRunner, ServerConfig
runner = ModelRunner(ServerConfig(model_uri=sys.argv[1], tensorizer_options={"strategy": sys.argv[2]}))
t = time.perf_counter()
runner.load()
load = time.perf_counter() - t
ids = torch.tensor([[1, 2, 3, 4]])
t = time.perf_counter()
with torch.inference_mode():
    runner.model(ids)
first = time.perf_counter() - t
print(json.dumps({"load_s": load, "first_forward_s": first,
                  "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9}))
"""


def run(artifact: Path, strategy: str, cold: bool, threads: int) -> dict[str, Any]:
    """One fresh process loading ``artifact`` with ``strategy``."""
    from hf_tensorizer.engine.pagecache import evict

    files = sorted(artifact.iterdir())
    for f in files:
        if cold:
            evict(f)
        else:
            with open(f, "rb") as fh:
                while fh.read(16 << 20):
                    pass
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(threads)}
    out = subprocess.run([sys.executable, "-c", CHILD, str(artifact), strategy], cwd=ROOT, env=env, check=True,
                         capture_output=True, text=True).stdout  # fmt: skip
    res = json.loads(out.strip().splitlines()[-1])
    res["total_s"] = res["load_s"] + res["first_forward_s"]
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--artifact", type=Path, required=True, help="a tensorized causal-LM folder")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--cache", default="warm,cold")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    runs: dict[str, list[dict[str, Any]]] = {}
    for rep in range(args.repeats):
        for cache in args.cache.split(","):
            for strategy in STRATEGIES:  # alternate: drift on a shared machine hits both alike
                res = run(args.artifact, strategy, cache == "cold", args.threads)
                runs.setdefault(f"{strategy} {cache}", []).append(res)
                print(f"run {rep} {strategy:5s} {cache:4s} " + "  ".join(f"{k}={v:.2f}" for k, v in res.items()),
                      flush=True)  # fmt: skip
    keys = ("load_s", "first_forward_s", "total_s", "peak_rss_gb")
    summary = {k: {m: statistics.median(r[m] for r in v) for m in keys} for k, v in runs.items()}
    size = sum(f.stat().st_size for f in args.artifact.glob("*.tensors"))
    print(f"\n{size / 1e9:.2f} GB artifact, median of {args.repeats}, ranges in the JSON")
    print("| strategy, cache | " + " | ".join(keys) + " |\n|---" * 1 + "|---" * len(keys) + "|")
    for name, v in summary.items():
        print(f"| {name} | " + " | ".join(f"{v[k]:.2f}" for k in keys) + " |")
    if args.json:
        args.json.write_text(json.dumps({"weights_bytes": size, "runs": runs, "median": summary}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
