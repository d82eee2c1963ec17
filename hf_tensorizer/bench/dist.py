"""Distributed loads from a bandwidth-capped server: N ranks, tensor-parallel and replica modes.

``hf-tensorizer bench dist`` writes one seeded Llama-shaped checkpoint (tensorized artifact), serves it with nginx
capped at ``--rate`` bytes/s per connection (``limit_rate``; each rank opens ``--connections`` connections, so a
rank's cap is rate x connections, like a per-node NIC), and for each mode and each N in ``--ranks`` starts N fresh
ranks (gloo, CPU, torchrun's environment variables). Timing starts after a barrier (imports excluded) and ends
when the last rank has its tensors. Modes:

- ``replica``: ``TensorDeserializer(url, distributed=True)``: each rank reads ~1/N, the ranks exchange the rest;
- ``tp``: ``from_pretrained(artifact, tp_plan="auto")``: each rank reads its shards and the replicated tensors;
- ``tp+replica``: the same with ``tensorizer_options={"distributed": True}`` (replicated tensors split too).

N = 1 is the single-process load of the same mode (no process group). Reported per run: wall seconds, source
bytes per rank (the ranks' own count) and in total (nginx's access log), exchange seconds (the slowest rank).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .checkpoint import Shape
from .proc import MARK, collect, kill, log, popen

MODES = ("replica", "tp", "tp+replica")


def _child(mode: str, base: str, connections: int) -> dict[str, Any]:
    """One rank: wait for the others, load, report."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        from datetime import timedelta

        dist.init_process_group("gloo", timeout=timedelta(seconds=300))
    import hf_tensorizer

    hf_tensorizer.enable()
    if world > 1:
        dist.barrier()
    t0 = time.time()
    if mode == "replica":
        from hf_tensorizer import TensorDeserializer

        with TensorDeserializer(f"{base}/artifact/model.tensors", distributed=world > 1, num_readers=connections) as d:
            metrics = [d.metrics]
    else:
        from transformers import AutoModelForCausalLM

        options: dict[str, Any] = {"num_readers": connections, "distributed": world > 1 and mode == "tp+replica"}
        tp = {"tp_plan": "auto"} if world > 1 else {}
        model = AutoModelForCausalLM.from_pretrained(f"{base}/artifact", tensorizer_options=options, **tp)
        metrics = model.hf_tensorizer_metrics
    t1 = time.time()
    read = sum(getattr(m, "bytes_read", 0) if m.strategy != "slices" else m.bytes for m in metrics)
    exchange = sum(getattr(m, "exchange_seconds", 0.0) for m in metrics)
    requests = sum(getattr(m, "requests", 0) for m in metrics)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return {"start": t0, "end": t1, "read": read, "exchange_s": exchange, "slice_requests": requests}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _sent(access_log: Path, since: int) -> tuple[int, int]:
    """Bytes nginx sent for model.tensors after byte ``since`` of its log, and the log's new length."""
    data = access_log.read_bytes() if access_log.exists() else b""
    total = 0
    for line in data[since:].decode(errors="replace").splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].endswith("model.tensors"):
            total += int(parts[0])
    return total, len(data)


def run_one(mode: str, world: int, base: str, connections: int, timeout: float,
            slice_gap: int = 0) -> dict[str, Any]:  # fmt: skip
    """Start ``world`` ranks of ``mode``; returns wall time and the ranks' reports."""
    port = _free_port()
    procs = []
    for r in range(world):
        env = {"RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
               "HF_TENSORIZER_REMOTE_CONCURRENCY": str(connections),
               "HF_TENSORIZER_SLICE_MAX_GAP": str(slice_gap)}  # fmt: skip
        procs.append(popen(["--child", mode, base, str(connections)], module=__name__, env=env))
    reports = []
    try:
        for p in procs:
            res, out = collect(p, timeout)
            if res is None:
                raise RuntimeError(f"{mode} N={world}: a rank failed:\n{out[-3000:]}")
            reports.append(res)
    finally:
        for p in procs:
            if p.poll() is None:
                kill(p)
    return {
        "mode": mode, "ranks": world,
        "wall_s": round(max(r["end"] for r in reports) - min(r["start"] for r in reports), 3),
        "read_per_rank": [r["read"] for r in reports],
        "exchange_s": round(max(r["exchange_s"] for r in reports), 3),
        "slice_requests": max(r["slice_requests"] for r in reports),
    }  # fmt: skip


def add_dist_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dir", default=None, help="checkpoint folder (default: a temporary one)")
    p.add_argument("--ranks", default="1,2,4", help="comma-separated rank counts")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {MODES}")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=8000)
    p.add_argument("--rate", default="10m", help="nginx limit_rate per connection (bytes/s, k/m suffixes)")
    p.add_argument("--connections", type=int, default=2, help="connections (and reader threads) per rank")
    p.add_argument(
        "--slice-gap",
        type=int,
        default=0,
        help="HF_TENSORIZER_SLICE_MAX_GAP of the ranks: row gaps read rather than cut (TP modes)",
    )
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--plot", default=None, help="write a PNG plot here (matplotlib)")


def dist_main(args: argparse.Namespace) -> int:
    from .servers import http_server
    from .ttr import write_checkpoint

    shape = Shape(layers=args.layers, hidden=args.hidden, vocab=args.vocab)
    with tempfile.TemporaryDirectory(prefix="hft-dist-") as tmp:
        root = Path(args.dir) if args.dir else Path(tmp) / "ckpt"
        root.mkdir(parents=True, exist_ok=True)
        meta = write_checkpoint(root, shape)
        size = (root / "artifact" / "model.tensors").stat().st_size
        access = Path(tmp) / "access.log"
        results: dict[str, Any] = {"shape": meta["shape"], "file_bytes": size, "rate": args.rate,
                                   "connections": args.connections, "slice_gap": args.slice_gap,
                                   "date": time.strftime("%Y-%m-%d"), "runs": []}  # fmt: skip
        with http_server(root, limit_rate=args.rate, access_log=access) as (base, desc):
            log(f"# {desc}, limit_rate {args.rate} per connection, {args.connections} connections per rank; "
                f"model.tensors {size / 1e6:.1f} MB")  # fmt: skip
            log(f"{'mode':<11} {'N':>2} {'wall s':>8} {'x N=1':>6} {'MB/rank max':>12} {'MB total':>9} "
                f"{'src/file':>8} {'exch s':>7} {'slice reqs':>10}")  # fmt: skip
            for mode in args.modes.split(","):
                single = None
                for world in (int(n) for n in args.ranks.split(",")):
                    mark = _sent(access, 0)[1]
                    run = run_one(mode, world, base, args.connections, args.timeout, args.slice_gap)
                    time.sleep(0.2)  # nginx writes the log line when the response is done
                    run["source_bytes"] = _sent(access, mark)[0]
                    single = single or run["wall_s"]
                    results["runs"].append(run)
                    log(_row(run, single, size))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    if args.plot:
        plot(results, args.plot)
    return 0


def _row(run: dict[str, Any], single: float, size: int) -> str:
    return (f"{run['mode']:<11} {run['ranks']:>2} {run['wall_s']:>8.2f} {run['wall_s'] / single:>6.2f} "
            f"{max(run['read_per_rank']) / 1e6:>12.1f} {run['source_bytes'] / 1e6:>9.1f} "
            f"{run['source_bytes'] / size:>8.2f} {run['exchange_s']:>7.2f} {run['slice_requests']:>10}")  # fmt: skip


def plot(results: dict[str, Any], path: str) -> None:
    """Wall time against N per mode, with the ideal 1/N of each mode's single-rank time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for mode in dict.fromkeys(r["mode"] for r in results["runs"]):
        runs = [r for r in results["runs"] if r["mode"] == mode]
        ns = [r["ranks"] for r in runs]
        ax.plot(ns, [r["wall_s"] for r in runs], marker="o", label=mode)
        ax.plot(ns, [runs[0]["wall_s"] * runs[0]["ranks"] / n for n in ns], ls=":", color="gray")
    ax.set_xlabel("ranks (N)")
    ax.set_ylabel("wall seconds (dotted: ideal 1/N)")
    ax.set_xticks(sorted({r["ranks"] for r in results["runs"]}))
    ax.set_title(f"{results['file_bytes'] / 1e6:.0f} MB over HTTP, limit_rate {results['rate']} x "
                 f"{results['connections']} connections per rank")  # fmt: skip
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--child":
        mode, base, connections = argv[1], argv[2], int(argv[3])
        print(MARK + json.dumps(_child(mode, base, connections)), flush=True)
        return 0
    p = argparse.ArgumentParser(description=__doc__)
    add_dist_arguments(p)
    return dist_main(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
