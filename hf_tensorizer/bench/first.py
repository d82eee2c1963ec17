"""``hf-tensorizer bench first``: time to the first tensor in a fresh process, ours against safetensors.

Each run is a new interpreter (``python -c``) timed from spawn to the end of its work: interpreter start, the
import (``from hf_tensorizer import TensorDeserializer`` / ``from safetensors import safe_open``, each importing
torch), opening the file and one tensor read in full (``.sum()``). Runs alternate between the loaders, and the
import alone is timed the same way, so the difference between the two is what our package adds. The file is the
same tensors in both formats (seeded, bf16), warm in the page cache.

Two differences are reported per round. The judged one (issue 24: ours ≤ safetensors + 50 ms) is the whole
process, interpreter start to the first tensor, as a user meets it. Beside it, "after torch": each child imports
torch first and times, inside itself, from that import's end to the first tensor (our import, open and read
against safetensors'), which leaves out the interpreter's and torch's start, the same for both and ±0.1-0.5 s
from one process to the next on a shared machine.

Our package is byte-compiled first (``compileall``, as ``pip install`` does; torch's and safetensors' modules were
compiled when they were installed): where ``PYTHONDONTWRITEBYTECODE`` is set, as on the dev VM, a source checkout
would otherwise compile every module again in every fresh interpreter (~0.1-0.2 s), which no installed user pays.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .proc import ROOT

CODE = {
    "ours": "from hf_tensorizer import TensorDeserializer\n"
    "d = TensorDeserializer(PATH + '.tensors')\nfloat(d[NAME].sum())\n",
    "safetensors": "from safetensors import safe_open\n"
    "with safe_open(PATH + '.safetensors', framework='pt') as f:\n    float(f.get_tensor(NAME).sum())\n",
    "ours-import": "from hf_tensorizer import TensorDeserializer\n",
    "safetensors-import": "from safetensors import safe_open\nimport torch\n",
}
# every child imports torch first and reports the seconds from then to its end ("after torch")
_PROLOGUE = "import time\nimport torch\n_T0 = time.perf_counter()\n"
_EPILOGUE = "print('@@after_torch %.6f' % (time.perf_counter() - _T0))\n"
#: the target of issue 24: ours - safetensors, interpreter start to first tensor (median of the rounds)
TARGET_S = 0.050


def prepare(d: Path, tensors: int, mib: int) -> tuple[str, str]:
    """The same seeded bf16 tensors as ``d/first.tensors`` and ``d/first.safetensors``; (path stem, a name)."""
    import torch
    from safetensors.torch import save_file

    from ..engine.writer import TensorSerializer

    d.mkdir(parents=True, exist_ok=True)
    stem = str(d / "first")
    g = torch.Generator().manual_seed(0)
    sd = {f"layers.{i}.weight": torch.randn(mib << 19, generator=g).to(torch.bfloat16) for i in range(tensors)}
    save_file(sd, stem + ".safetensors")
    with TensorSerializer(stem + ".tensors") as s:
        s.write_state_dict(sd)
    for suffix in (".tensors", ".safetensors"):
        Path(stem + suffix).read_bytes()  # warm
    return stem, next(iter(sd))


def compile_package() -> bool:
    """Write the ``.pyc`` files of our package (whatever ``PYTHONDONTWRITEBYTECODE`` says), as an install does.

    Returns:
        Whether every module compiled.
    """
    import compileall

    return bool(compileall.compile_dir(str(ROOT / "hf_tensorizer"), quiet=1))


def run_once(kind: str, stem: str, name: str) -> tuple[float, float]:
    """Seconds from spawning a fresh interpreter to the end of ``CODE[kind]``, and from the end of its
    ``import torch`` to the end (timed by the child)."""
    code = f"PATH, NAME = {stem!r}, {name!r}\n" + _PROLOGUE + CODE[kind] + _EPILOGUE
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], check=True, env=env, capture_output=True, text=True)
    whole = time.perf_counter() - t0
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith("@@after_torch "))
    return whole, float(line.split()[1])


def run_first(d: str | Path, runs: int, tensors: int, mib: int, *, warmup: bool = True) -> dict[str, Any]:
    """``runs`` rounds of every kind, alternating; per kind the times, median and minimum. ``warmup``: one untimed
    run of each kind first (.pyc files written, libraries in the page cache)."""
    stem, name = prepare(Path(d), tensors, mib)
    compiled = compile_package()
    for kind in CODE if warmup else ():
        run_once(kind, stem, name)
    times: dict[str, list[float]] = {k: [] for k in CODE}
    after: dict[str, list[float]] = {k: [] for k in CODE}
    for r in range(runs):
        for kind in list(CODE)[r % 2 :] + list(CODE)[: r % 2]:
            whole, after_torch = run_once(kind, stem, name)
            times[kind].append(round(whole, 4))
            after[kind].append(round(after_torch, 4))

    def summary(t: dict[str, list[float]]) -> dict[str, dict[str, Any]]:
        return {k: {"median": round(statistics.median(v), 4), "min": min(v), "runs": v} for k, v in t.items()}

    per_round = [round(o - s, 4) for o, s in zip(times["ours"], times["safetensors"])]
    per_round_after = [round(o - s, 4) for o, s in zip(after["ours"], after["safetensors"])]
    return {"tensors": tensors, "tensor_mib": mib, "compiled": compiled, "times": summary(times),
            "after_torch": summary(after), "ours_minus_safetensors": per_round,
            "median_difference": round(statistics.median(per_round), 4),
            "after_torch_ours_minus_safetensors": per_round_after,
            "after_torch_median_difference": round(statistics.median(per_round_after), 4),
            "target_s": TARGET_S}  # fmt: skip


def verdict_lines(res: dict[str, Any]) -> list[str]:
    """The difference lines of a :func:`run_first` result: the judged one (whole process; its median against
    :data:`TARGET_S`: ``met`` or ``not met``) and the "after torch" one, labelled as not judged."""
    target = res.get("target_s", TARGET_S)
    whole, median = res["ours_minus_safetensors"], res["median_difference"]
    within = sum(d <= target for d in whole)
    lines = [
        f"JUDGED (issue 24): ours - safetensors, interpreter start to first tensor, round by round: {whole} "
        f"(median {median:+.3f} s); target median <= +{target * 1000:.0f} ms: "
        f"{'met' if median <= target else 'not met'} ({within} of {len(whole)} rounds within)"
    ]
    if "after_torch_ours_minus_safetensors" in res:
        lines.append(
            "not judged: ours - safetensors after torch (from `import torch` done to the first tensor), round by "
            f"round: {res['after_torch_ours_minus_safetensors']} (median {res['after_torch_median_difference']:+.4f} s)"
        )
    return lines


def add_first_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``hf-tensorizer bench first`` options."""
    parser.add_argument("--dir", default=".bench/first", help="where the two files are written")
    parser.add_argument("--runs", type=int, default=5, help="rounds (each kind once per round)")
    parser.add_argument("--tensors", type=int, default=144, help="tensors in the file")
    parser.add_argument("--tensor-mib", type=int, default=4, help="MiB per tensor")
    parser.add_argument("--out", default=".bench/results", help="where first.json goes")


def first_main(args: argparse.Namespace) -> int:
    """Run the first-use benchmark from parsed options."""
    res = run_first(args.dir, max(1, args.runs), args.tensors, args.tensor_mib)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "first.json").write_text(json.dumps(res, indent=1))
    for kind, t in res["times"].items():
        a = res["after_torch"][kind]
        print(f"{kind:<20} median {t['median']:.3f} s  min {t['min']:.3f} s  runs {t['runs']}  "
              f"(after torch: median {a['median']:.4f} s, runs {a['runs']})")  # fmt: skip
    for line in verdict_lines(res):
        print(line)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hf-tensorizer bench first", description=__doc__.splitlines()[0])
    add_first_arguments(parser)
    return first_main(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
