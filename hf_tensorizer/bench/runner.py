"""Drive the load-time benchmark: prepare a checkpoint, then time each loader in a fresh process.

``python -m hf_tensorizer.bench.runner [bench options]`` runs the whole benchmark (``hf-tensorizer bench``);
the sub-commands ``write``, ``limits`` and ``load`` are what it runs in its child processes.

Method (as the anchors in shared/anchors): every load runs in a fresh process; imports and CUDA context
creation happen before the timer; the timer stops after ``torch.cuda.synchronize()``; "warm" = file in the
page cache (best of ``warm_runs``), "cold" = after ``fsync`` + ``posix_fadvise(DONTNEED)``. Each load is
checked against per-tensor float64 sums recorded when the checkpoint was written.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .checkpoint import prepare, read_meta, verify, write_format
from .peers import FORMAT_FILES, PEERS, Ctx, Peer, evict, gbps, limits, read_once, read_parallel, resolve, scratch_copy
from .proc import MARK, Log, collect, error_line, log, popen

DEFAULT_CUDA_LOADERS = (
    "hft",
    "hft-pread8",
    "hft-pread16",
    "hft-odirect",
    "hft-register",
    "hftfp",
    "itbuf",
    "fst",
    "st",
    "hf",
    "runai",
    "tz",
    "tzmod",
    "pt",
    "it",
)
# hft: the default (``auto``: a zero-copy mapping on CPU); hft-pread / hftfp-pread: the parallel-read path, forced
DEFAULT_CPU_LOADERS = ("hft", "hft-pread", "hftfp", "hftfp-pread", "st", "pt", "hf", "tz", "tzmod", "fst", "runai")
PACKAGES = (
    "torch",
    "transformers",
    "safetensors",
    "accelerate",
    "tensorizer",
    "fastsafetensors",
    "runai-model-streamer",
    "instanttensor",
)


class BenchStopped(Exception):
    """Raised (by SIGTERM) to end a benchmark early; what was measured is still reported."""


# One load, in this process -----------------------------------------------------------------------------


def run_one(d: str | Path, loader: str, device: str, cold: bool = False) -> dict[str, Any]:
    """Load the checkpoint once with ``loader`` in this process and check it; JSON-able result."""
    import torch

    d = Path(d)
    meta = read_meta(d)
    if meta is None:
        raise FileNotFoundError(f"no checkpoint in {d}: run prepare first")
    peer = resolve(loader)
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
        torch.zeros(1, device=device)
        torch.cuda.synchronize()
    for mod in peer.modules:
        importlib.import_module(mod)
    if "transformers" in peer.modules:
        import transformers

        # resolve the lazy modules (the Llama modelling code too) outside the timing
        _ = transformers.AutoModelForCausalLM, transformers.AutoConfig, transformers.LlamaForCausalLM
    if peer.setup is not None:
        peer.setup()
    ctx = Ctx(d)
    if cold:
        evict(peer.data_files(d))
    faults0 = _minor_faults()
    t0 = time.perf_counter()
    sd = peer.fn(ctx, device)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    else:
        _touch(sd)  # CPU: memory-mapped loaders read on first access; only load + touch compares them fairly
    seconds = time.perf_counter() - t0
    faults = _minor_faults() - faults0
    why = verify(dict(sd), meta, device)
    t1 = time.perf_counter()
    for fn in ctx.cleanup:
        fn()
    close_s = time.perf_counter() - t1
    res: dict[str, Any] = {
        "loader": loader,
        "cold": cold,
        "seconds": round(seconds, 6),
        "bytes": meta["bytes"],
        "gbps": gbps(meta["bytes"], seconds),
        "ok": why is None,
        "close_s": round(close_s, 4),
        "minor_faults": faults,  # a mapped warm file: about one per page-cache folio (see read_once)
    }
    if why is not None:
        res["why"] = why
    de = ctx.extra.get("deserializer")
    metrics = getattr(de, "metrics", None)
    if metrics is None:
        metrics = ctx.extra.get("metrics")  # hftfp: one dict per device group
    if metrics is not None:
        res["metrics"] = metrics.as_dict() if hasattr(metrics, "as_dict") else metrics
    return res


def _minor_faults() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt  # the whole process: loader threads included


def _touch(sd: Any) -> None:
    """Read one byte per 4 KiB page of every tensor (the first access a lazy, mmap-backed loader defers)."""
    from ..engine.memory import as_bytes

    for t in dict(sd).values():
        if t.numel():
            as_bytes(t.contiguous())[::4096].sum()


def _env(device: str) -> dict[str, Any]:
    env: dict[str, Any] = {"python": sys.version.split()[0], "cpus": os.cpu_count()}
    for p in PACKAGES:
        try:
            env[p] = importlib.metadata.version(p)
        except importlib.metadata.PackageNotFoundError:
            pass
    if device.startswith("cuda"):
        import torch

        env["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return env


# Child processes ---------------------------------------------------------------------------------------


def _child(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="hf_tensorizer.bench.runner")
    sub = p.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("write", help="generate the tensors and write one format")
    w.add_argument("dir")
    w.add_argument("fmt", choices=sorted(FORMAT_FILES))
    w.add_argument("gen_device")
    lim = sub.add_parser("limits", help="this machine's bandwidth limits")
    lim.add_argument("dir")
    lim.add_argument("device")
    lim.add_argument("--threads", type=int, default=16)
    ld = sub.add_parser("load", help="one timed load in this process")
    ld.add_argument("dir")
    ld.add_argument("loader")
    ld.add_argument("device")
    ld.add_argument("--cold", action="store_true")
    a = p.parse_args(argv)
    if a.cmd == "write":
        res = write_format(Path(a.dir), a.fmt, a.gen_device)
    elif a.cmd == "limits":
        d = Path(a.dir)
        files = [d / FORMAT_FILES[f][0] for f in ("hft", "st", "tz", "bin") if (d / FORMAT_FILES[f][0]).exists()]
        # the limits evict and re-read with many threads: on a copy, so no loader's file is left in small folios
        scratch = scratch_copy(files[0], d / ".limits.scratch")
        try:
            res = {"limits": limits(scratch, a.device, a.threads), "env": _env(a.device), "file": files[0].name}
        finally:
            scratch.unlink(missing_ok=True)
    else:
        res = run_one(a.dir, a.loader, a.device, a.cold)
    print(MARK + json.dumps(res, default=str), flush=True)
    return 0


# The benchmark -----------------------------------------------------------------------------------------


def default_device() -> str:
    import torch

    return "cuda:0" if torch.cuda.is_available() else "cpu"


def default_loaders(device: str) -> list[str]:
    return list(DEFAULT_CUDA_LOADERS if device.startswith("cuda") else DEFAULT_CPU_LOADERS)


def run_bench(
    d: str | Path,
    loaders: Sequence[str] | None = None,
    device: str | None = None,
    *,
    layers: int = 10,
    hidden: int = 4096,
    vocab: int = 128256,
    cold: bool = True,
    warm_runs: int = 2,
    cold_runs: int = 1,
    timeout: float = 120.0,
    budget: float | None = None,
    with_limits: bool = True,
    threads: int = 16,
    busy: int = 0,
    page_cache: str = "same",
    log: Log = log,
) -> dict[str, Any]:
    """Prepare (if needed), measure the limits, then time every loader in fresh processes.

    ``busy``: that many CPU-bound processes (``while True: pass``) run beside every load, as on a server or a
    notebook whose cores are not idle; the limits are measured before they start (on a scratch copy).

    ``page_cache``: the page-cache history of the files before the warm runs. ``"same"`` (default): every
    loader's files are evicted and read once in turn by one sequential reader (:func:`read_once`), so the warm
    rows compare loaders; ``"as-written"``: the files are left as their writers (and earlier runs) left them,
    what a user meets right after saving (pass a fresh ``d`` for that). Mapping a file costs a fault per
    page-cache folio, and folio sizes follow that history (see ``read_once``). After cold runs every file is
    read back with ``read_once`` in both modes.

    Order: all loaders warm once, all cold (``cold_runs`` rounds, best kept, like the warm runs), then the
    remaining warm runs, so that a ``budget`` (seconds for the whole call) that runs out trims repeats first;
    each round starts one loader further along the list (:func:`run_order`).
    Returns ``{"rows": [...], "limits": ..., ...}``
    with one row per loader: status (ok / skipped / error / wrong / timeout), warm and cold GB/s and seconds.
    """
    start = time.monotonic()
    deadline = start + budget if budget else float("inf")
    d = Path(d)
    device = device or default_device()
    names = list(loaders) if loaders else default_loaders(device)
    peers = [resolve(n) for n in names]  # unknown names fail here, before any work
    rows: dict[str, dict[str, Any]] = {
        p.name: {
            "loader": p.name,
            "label": p.label,
            "ours": p.ours,
            "status": "pending",
            "warm_gbps": None,
            "warm_s": None,
            "cold_gbps": None,
            "cold_s": None,
            "warm_runs": [],
            "warm_runs_s": [],
            "cold_runs": [],
            "ok": None,
            "note": "",
        }
        for p in peers
    }
    results: dict[str, Any] = {
        "device": device,
        "dir": str(d),
        "rows": list(rows.values()),
        "limits": {},
        "env": {},
        "stopped": None,
        "busy": busy,
        "page_cache": page_cache,
    }
    if page_cache not in ("same", "as-written"):
        raise ValueError(f"page_cache must be 'same' or 'as-written', got {page_cache!r}")
    runnable: list[Peer] = []
    hogs: list[subprocess.Popen[bytes]] = []  # the --busy processes
    for p in peers:
        missing = p.missing_module()
        if missing:
            _mark(rows[p.name], "skipped", f"not installed ({missing})")
        elif p.cuda_only and not device.startswith("cuda"):
            _mark(rows[p.name], "skipped", "needs CUDA")
        else:
            runnable.append(p)
    try:
        meta = prepare(
            d,
            layers,
            hidden,
            vocab,
            device,
            sorted({p.fmt for p in runnable}),
            timeout=min(600.0, max(10.0, deadline - time.monotonic())),
            log=log,
        )
        results.update(
            bytes=meta["bytes"],
            tensors=meta["tensors"],
            shape=meta["shape"],
            prepare={k: v for k, v in meta["formats"].items()},
        )
        for p in list(runnable):
            if p.fmt not in meta["formats"]:
                _mark(rows[p.name], "error", f"prepare failed: {meta['errors'].get(p.fmt, '?')}")
                runnable.remove(p)
        if not runnable:
            raise BenchStopped("nothing to run")
        if with_limits:
            res, out = collect(
                popen(["limits", str(d), device, "--threads", str(threads)]),
                min(120.0, max(5.0, deadline - time.monotonic())),
            )
            if res is None:
                log(f"limits failed: {error_line(out)}")
            else:
                results["limits"], results["env"] = res["limits"], res["env"]
                log("limits (GB/s): " + ", ".join(f"{k} {v}" for k, v in res["limits"].items()))
        files = sorted({f for p in runnable for f in p.data_files(d)})
        if page_cache == "same":
            read_once(files)
        else:
            read_parallel(files, threads)  # anything not cached yet (a no-op for files just written)
        hogs.extend(subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(busy))
        if hogs:
            log(f"{busy} CPU-bound processes running beside the loads")
        durations: dict[str, float] = {}
        from .peers import run_order

        plan = run_order(runnable, warm_runs, cold_runs if cold else 0)
        for i, (p, is_cold) in enumerate(plan):
            row = rows[p.name]
            if row["status"] in ("error", "timeout", "wrong"):
                continue
            if i > 0 and not is_cold and plan[i - 1][1]:
                read_once(files)  # the cold runs evicted them: read back alike
            now = time.monotonic()
            est = durations.get(p.name) or (statistics.median(durations.values()) if durations else 0.0)
            if now + est > deadline or deadline - now < 3:
                row["note"] = "budget ran out"
                continue
            t = time.monotonic()
            res, out = collect(
                popen(["load", str(d), p.name, device] + (["--cold"] if is_cold else [])), min(timeout, deadline - now)
            )
            durations[p.name] = time.monotonic() - t
            _record(row, res, out, is_cold, log)
        for row in rows.values():
            if row["status"] == "pending":
                _mark(row, "skipped", row["note"] or "not run")
    except (BenchStopped, KeyboardInterrupt) as e:
        results["stopped"] = f"stopped early: {e or type(e).__name__}"
        log(results["stopped"])
        for row in rows.values():
            if row["status"] == "pending":
                _mark(row, "skipped", "stopped early")
    finally:
        _stop(hogs)
    results["elapsed_s"] = round(time.monotonic() - start, 1)
    return results


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        proc.kill()
    for proc in procs:
        proc.wait()


def _mark(row: dict[str, Any], status: str, note: str) -> None:
    row["status"], row["note"] = status, note
    if status != "skipped":
        row["ok"] = False


def _record(row: dict[str, Any], res: dict[str, Any] | None, out: str, cold: bool, log: Log) -> None:
    mode = "cold" if cold else "warm"
    if res is None:
        status = "timeout" if out.startswith("timeout") else "error"
        _mark(row, status, error_line(out))
        log(f"  {row['loader']:<14} {mode}  {status.upper()}: {row['note']}")
        return
    if not res["ok"]:
        _mark(row, "wrong", res.get("why", "check failed"))
    elif row["status"] == "pending" or row["status"] == "ok":
        row["status"], row["ok"] = "ok", True
    if cold:
        row["cold_runs"].append(res["gbps"])
        if row["cold_s"] is None or res["seconds"] < row["cold_s"]:
            row["cold_gbps"], row["cold_s"] = res["gbps"], res["seconds"]
    else:
        row["warm_runs"].append(res["gbps"])
        row["warm_runs_s"].append(res["seconds"])
        row.setdefault("warm_runs_faults", []).append(res.get("minor_faults"))
        if row["warm_s"] is None or res["seconds"] < row["warm_s"]:
            row["warm_gbps"], row["warm_s"] = res["gbps"], res["seconds"]
            if "metrics" in res:
                row["metrics"] = res["metrics"]
    log(
        f"  {row['loader']:<14} {mode}  {res['seconds']:7.3f} s  {res['gbps']:6.2f} GB/s  "
        f"{'ok' if res['ok'] else 'WRONG: ' + res.get('why', '')}"
    )


# CLI ---------------------------------------------------------------------------------------------------

QUICK = {"layers": 2, "hidden": 1024, "vocab": 32000, "warm_runs": 1}


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``hf-tensorizer bench`` options."""
    parser.add_argument("--dir", default=".bench/ckpt", help="checkpoint directory (prepared when missing)")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default 10; --quick: 2)")
    parser.add_argument("--hidden", type=int, default=None, help="hidden size (default 4096; --quick: 1024)")
    parser.add_argument("--vocab", type=int, default=None, help="vocabulary size (default 128256)")
    parser.add_argument("--device", default=None, help="cuda:0 or cpu (default: cuda:0 when available)")
    parser.add_argument(
        "--loaders",
        default=None,
        help="comma-separated: " + ",".join(PEERS) + ",hft[-STRATEGY[N]][-cMiB][-sMiB] (default: ours and every peer)",
    )
    parser.add_argument("--out", default=".bench/results", help="where results.json, table.md, bench.png go")
    parser.add_argument("--no-cold", action="store_true", help="skip the cold (evicted page cache) runs")
    parser.add_argument("--quick", action="store_true", help="a ~0.2 GB model and one warm run")
    parser.add_argument("--warm-runs", type=int, default=None, help="warm runs per loader, best kept (default 2)")
    parser.add_argument("--cold-runs", type=int, default=1, help="cold runs per loader, best kept (default 1)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per load")
    parser.add_argument("--budget", type=float, default=None, help="seconds for everything; later runs skipped")
    parser.add_argument("--no-limits", action="store_true", help="skip measuring the machine's limits")
    parser.add_argument("--threads", type=int, default=16, help="threads of the parallel-read limit")
    parser.add_argument("--clean", action="store_true", help="delete the checkpoint directory afterwards")
    parser.add_argument("--no-table", action="store_true", help="do not print the table (it is in OUT/table.md)")
    parser.add_argument("--busy", type=int, default=0, metavar="N",
                        help="N CPU-bound processes run beside every load (cores that are not idle)")  # fmt: skip
    parser.add_argument("--page-cache", choices=("same", "as-written"), default="same",
                        help="before the warm runs: evict every file and read each once alike (same, default), or "
                             "leave them as their writers left them (as-written; use a fresh --dir)")  # fmt: skip


def bench_main(args: argparse.Namespace) -> int:
    """Run the benchmark from parsed options; 1 when a load returned wrong data or ours failed to load."""
    from .report import summary_lines, write_report

    def pick(name: str, default: int) -> int:
        v = getattr(args, name)
        return int(v if v is not None else QUICK.get(name, default) if args.quick else default)

    def stop(signum: int, frame: object) -> None:
        raise BenchStopped(signal.Signals(signum).name)

    try:
        signal.signal(signal.SIGTERM, stop)
    except ValueError:  # not the main thread
        pass
    loaders = [x.strip() for x in args.loaders.split(",") if x.strip()] if args.loaders else None
    results = run_bench(
        args.dir,
        loaders,
        args.device,
        layers=pick("layers", 10),
        hidden=pick("hidden", 4096),
        vocab=pick("vocab", 128256),
        cold=not args.no_cold,
        warm_runs=pick("warm_runs", 2),
        cold_runs=max(1, args.cold_runs),
        timeout=args.timeout,
        budget=args.budget,
        with_limits=not args.no_limits,
        threads=args.threads,
        busy=max(0, args.busy),
        page_cache=args.page_cache,
    )
    table = write_report(results, args.out)
    if args.clean:
        shutil.rmtree(args.dir, ignore_errors=True)
    print(f"results in {args.out}/ (results.json, table.md, bench.png)", flush=True)
    for line in [f"\n{table}"] if not args.no_table else summary_lines(results):  # the judged line in both
        print(line, flush=True)
    bad = [r for r in results["rows"] if r["status"] == "wrong" or (r["ours"] and r["status"] in ("error", "timeout"))]
    return 1 if bad else 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("write", "limits", "load"):
        return _child(argv)
    parser = argparse.ArgumentParser(prog="hf-tensorizer bench", description=__doc__.splitlines()[0])
    add_bench_arguments(parser)
    return bench_main(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
