"""Staging-pool sweep on a GPU machine: which pinned allocation, reader count and chunk size load fastest.

One process, CUDA initialised once; every configuration loads the same ~6.5 GB checkpoint twice (page
cache warm) and prints a JSON line. Then the best configuration and the best peer (InstantTensor
buffered) run in fresh processes, warm and cold, like the full benchmark. Driven by tests/gpu/sweep.sh.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import torch

import hf_tensorizer as ht
from hf_tensorizer.bench import checkpoint

MiB = 1 << 20
DEVICE = os.environ.get("SWEEP_DEVICE", "cuda:0")  # "cpu" for a dry run of this script on a CPU machine
SIZE = {k: int(v) for k, v in (kv.split("=") for kv in os.environ.get("SWEEP_SIZE", "").split(",") if kv)}


def pinned_costs() -> dict[str, float]:
    from hf_tensorizer.engine.staging import StagingPool

    out = {}
    for mode in ("lazy", "block", "hugepage"):
        t = time.perf_counter()
        pool = StagingPool(16 * MiB, 18, pin=DEVICE != "cpu", allocation=mode)
        if mode == "lazy":
            bufs = [pool.acquire() for _ in range(18)]
            for b in bufs:
                pool.release(b)
        out[f"alloc_288MiB_{mode}_s"] = round(time.perf_counter() - t, 4)
        pool.close()
        getattr(torch._C, "_host_emptyCache", lambda: None)()
    return out


def sweep(path: str, nbytes: int) -> list[dict]:
    configs = [
        {"staging_allocation": a, "num_readers": 16, "chunk_bytes": 16 * MiB} for a in ("lazy", "block", "hugepage")
    ]
    for alloc in ("block", "hugepage"):
        configs += [
            {"staging_allocation": alloc, "num_readers": r, "chunk_bytes": c * MiB}
            for r, c in ((8, 16), (24, 16), (32, 8), (16, 8), (16, 32), (12, 32))
        ]
    rows = []
    for cfg in configs:
        best = None
        for _ in range(2):
            sync()
            t = time.perf_counter()
            with ht.TensorDeserializer(path, device=DEVICE, strategy="pread", **cfg) as d:
                out = dict(d)
                sync()
                dt = time.perf_counter() - t
                m = d.metrics.as_dict()
            del out
            if best is None or dt < best[0]:
                best = (dt, m)
        row = {**cfg, "s": round(best[0], 4), "GBs": round(nbytes / best[0] / 1e9, 2), "metrics": best[1]}
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def sweep_cold(path: str, nbytes: int) -> None:
    from hf_tensorizer.engine.pagecache import evict

    for strategy, readers, chunk in (("pread", 16, 16), ("pread", 32, 16), ("odirect", 16, 16), ("odirect", 32, 16),
                                     ("odirect", 64, 8), ("odirect", 32, 32)):  # fmt: skip
        evict(path)
        sync()
        t = time.perf_counter()
        with ht.TensorDeserializer(
            path,
            device=DEVICE,
            strategy=strategy,
            num_readers=readers,
            chunk_bytes=chunk * MiB,
            staging_allocation="block",
            staging_bytes=2 << 30,
        ) as d:
            out = dict(d)
            sync()
            dt = time.perf_counter() - t
        del out
        print(json.dumps({"cold": True, "strategy": strategy, "readers": readers, "chunk_MiB": chunk,
                          "GBs": round(nbytes / dt / 1e9, 2)}), flush=True)  # fmt: skip


def sync() -> None:
    if DEVICE != "cpu":
        torch.cuda.synchronize()


def fresh(d: str, loader: str, cold: bool, env: dict[str, str]) -> dict:
    cmd = [sys.executable, "-m", "hf_tensorizer.bench.runner", "load", d, loader, DEVICE] + (["--cold"] if cold else [])
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=90, env={**os.environ, **env})
    for line in p.stdout.splitlines()[::-1]:
        if "{" in line:
            return json.loads(line[line.index("{") :])
    return {"loader": loader, "error": (p.stderr or p.stdout)[-400:]}


def main() -> None:
    d = sys.argv[1]
    meta = checkpoint.prepare(d, device=DEVICE, formats=("hft", "st"), **SIZE)
    path = os.path.join(d, "model.tensors")
    nbytes = os.path.getsize(path)
    torch.zeros(1, device=DEVICE)
    if os.environ.get("SWEEP_MODE") == "confirm":  # the defaults only, fresh processes, against the best peer
        table = []
        for loader in ("hft", "itbuf"):
            for cold in (False, False, True) if loader == "hft" else (False, False):
                r = fresh(d, loader, cold, {})
                print(json.dumps(r, default=str)[:700], flush=True)
                table.append((loader, cold, r.get("gbps")))
        print("\n| loader | warm/cold | GB/s |\n|---|---|---|")
        for loader, cold, g in table:
            print(f"| {loader} | {'cold' if cold else 'warm'} | {g} |")
        return
    print(json.dumps(pinned_costs()), flush=True)
    rows = sweep(path, nbytes)
    sweep_cold(path, nbytes)
    best = max(rows, key=lambda r: r["GBs"])
    print("BEST", json.dumps({k: v for k, v in best.items() if k != "metrics"}), flush=True)
    name = f"hft-pread{best['num_readers']}-c{best['chunk_bytes'] // MiB}"
    env = {"HF_TENSORIZER_STAGING_ALLOCATION": best["staging_allocation"]}
    table = []
    for loader, e in ((name, env), ("hft", env), ("itbuf", {})):
        for cold in (False, False, True):
            r = fresh(d, loader, cold, e)
            print(json.dumps(r, default=str)[:400], flush=True)
            table.append((loader + (" " + best["staging_allocation"] if e else ""), cold, r.get("gbps")))
    print(json.dumps(meta, default=str)[:300])
    print("\n| loader | warm/cold | GB/s |\n|---|---|---|")
    for loader, cold, g in table:
        print(f"| {loader} | {'cold' if cold else 'warm'} | {g} |")


if __name__ == "__main__":
    main()
