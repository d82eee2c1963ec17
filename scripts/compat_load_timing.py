"""CPU load time of ``hf_tensorizer.compat.tensorizer.TensorDeserializer``: its default strategy against ``pread``.

Each load runs in a fresh process on a warm page cache, the strategies alternating, and reports two times: the
constructor (every tensor loaded, not lazy) and the constructor plus a first touch of every 4 KiB page of every
tensor, because a mapped load defers its page faults to first use. Results: docs/compat.md.

    python scripts/compat_load_timing.py [--dir DIR] [--mb 512] [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

CHILD = r"""
import json, sys, time
import torch
from hf_tensorizer.compat.tensorizer import _deserializer
from hf_tensorizer.engine.reader import TensorDeserializer as Reader

path, strategy = sys.argv[1], sys.argv[2]
if strategy != "default":
    _deserializer._Reader = lambda *a, **k: Reader(*a, strategy=strategy, **k)
t0 = time.perf_counter()
d = _deserializer.TensorDeserializer(path, device="cpu")
t1 = time.perf_counter()
total = sum(float(t.reshape(-1)[:: 4096 // t.element_size()].float().sum()) for t in d.values())  # every page
t2 = time.perf_counter()
ran = d._reader.metrics.strategy
d.close()
print(json.dumps({"strategy": strategy, "ran": ran, "load_s": t1 - t0, "load_use_s": t2 - t0, "check": total}))
"""


def main() -> None:
    """Write the file once, then time fresh-process loads per strategy and print the best and range of each."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default=None)
    ap.add_argument("--mb", type=int, default=512)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    import torch

    from hf_tensorizer.compat.tensorizer import TensorSerializer

    folder = args.dir or tempfile.mkdtemp()
    path = os.path.join(folder, "timing.tensors")
    torch.manual_seed(0)
    s = TensorSerializer(path)
    for i in range(args.mb // 8):
        s.write_tensor(0, f"layer.{i}.weight", 2, torch.randn(2048, 2048, dtype=torch.bfloat16))
    s.close()
    with open(path, "rb") as f:  # warm the page cache
        while f.read(64 << 20):
            pass
    results: dict[str, list[dict]] = {"default": [], "pread": []}
    for _ in range(args.runs):
        for strategy in results:
            out = subprocess.run([sys.executable, "-c", CHILD, path, strategy], check=True, capture_output=True,
                                 text=True).stdout  # fmt: skip
            results[strategy].append(json.loads(out.strip().splitlines()[-1]))
    size = os.path.getsize(path)
    print(f"file {size / 1e9:.3f} GB, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, load avg {os.getloadavg()}")
    for strategy, rows in results.items():
        load = sorted(r["load_s"] for r in rows)
        use = sorted(r["load_use_s"] for r in rows)
        print(f"{strategy:8} (ran {rows[0]['ran']}): load {load[0]:.3f}-{load[-1]:.3f} s, "
              f"load + first use {use[0]:.3f}-{use[-1]:.3f} s")  # fmt: skip
    os.unlink(path)


if __name__ == "__main__":
    main()
