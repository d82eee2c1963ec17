"""Remote-streaming benchmark: HTTP against nginx, S3 against moto, and the memory bound of remote loads.

``python -m hf_tensorizer.bench.remote [--only http,s3,memory] [--quick]`` prepares bf16 checkpoints (our format
and upstream tensorizer's, see ``checkpoint.prepare``), starts the servers on 127.0.0.1, times every reader in fresh
processes and writes ``results.json``, ``table.md`` and ``remote.png`` into ``--out``. Method:

* HTTP: nginx (sendfile, keep-alive) serves the checkpoint directory; the reference is N parallel
  ``curl --range`` downloads of the file to /dev/null (N = 1, 2, 4, 8, best kept), timed in the same rounds as our
  loader (``TensorDeserializer(url, device="cpu")``, after a sweep of its transport knobs) and upstream tensorizer.
  Without nginx (``--server stdlib``) the test suite's range server stands in, and the report says so.
* S3: moto's ``ThreadedMotoServer`` in its own process; boto3 ``download_fileobj`` (s3transfer) into a BytesIO and
  into a discarding sink and one plain ``get_object`` (read whole into bytes, or into a discarding sink); the best
  that fills fresh memory, as a load does, is the server's figure (each in a fresh process, its client made inside
  the timer, as ours makes its own); ours and upstream tensorizer
  (``open_stream`` with ``s3_endpoint``) read the same objects.
* Memory: one load per fresh process; peak RSS (sampled every ms, and ``ru_maxrss``) minus the RSS before the
  load minus the tensor bytes is the loader's own memory, for two model sizes, both larger than the staging pool.

Every load is checked against the per-tensor sums recorded when the checkpoint was written.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .checkpoint import prepare, read_meta
from .peers import MiB, gbps, read_parallel
from .proc import MARK, log
from .remote_jobs import S3_METHODS, downloads, parse_config, run_job, serve_moto, time_loads
from .remote_report import TARGET, default_ratio, format_report, machine, plot
from .remote_stores import bench_store
from .servers import AWS_ENV, NGINX_BUCKET, curl_parallel, http_server, moto_server

__all__ = ["main", "parse_config", "run"]

Log = Callable[[str], None]
# (layers, hidden, vocab) of the Llama-shaped checkpoints; full and --quick sizes
SIZES = {"http": (1, 4096, 32000), "s3": (1, 1536, 32000), "mem2": (3, 4096, 32000)}
QUICK_SIZES = {"http": (1, 1024, 32000), "s3": (1, 512, 8000), "mem2": (2, 1024, 32000)}
BUCKET = "bench"
FIXED_BYTES = 8 * MiB  # allowed on top of a memory bound: reader threads' stacks, connections, the index


# The benchmark -----------------------------------------------------------------------------------------

HTTP_SWEEP = ("default", "c4", "c8", "c4-k16", "c8-k16")
S3_SWEEP = ("default", "c4-k64-p64")
STORE_SWEEP = ("default", "c4", "c16")


def _best(rows: dict[str, Any]) -> str:
    return max(rows, key=lambda k: rows[k]["gbps"])


def bench_http(base: Path, url: str, *, sweep: Sequence[str], sweep_reps: int, rounds: int, curl_ns: Sequence[int],
               log: Log, s3: bool = False) -> dict[str, Any]:  # fmt: skip
    """Sweep our transport knobs (into pre-faulted tensors: the knobs' effect without first-touch noise), then
    time curl, ours (default and best; fresh loads, and the transport alone), with ``s3`` ours through boto3 on
    the same server (nginx's anonymous path-style bucket), and upstream in the same rounds.

    The reference is the best N parallel ``curl --range`` into fresh files on tmpfs (fresh memory, as a load
    fills), else into /dev/null."""
    d = base / "http"
    meta = read_meta(d)
    assert meta is not None
    ours_url, tz_url = f"{url}/http/model.tensors", f"{url}/http/tensorizer.tensors"
    size, nbytes = (d / "model.tensors").stat().st_size, meta["bytes"]
    job = {"kind": "hft", "dir": str(d), "uri": ours_url}
    s3job = {"kind": "hft", "dir": str(d), "uri": f"s3://{NGINX_BUCKET}/http/model.tensors",
             "opts": {"endpoint_url": url, "addressing_style": "path", "anonymous": True}}  # fmt: skip
    swept = time_loads({**job, "kind": "hft-prefaulted"}, sweep, sweep_reps)
    for k, r in swept.items():
        log(f"  sweep {k:<12} {r['gbps']:.3f} GB/s  (readers {r['readers']}, chunk {r['chunk_mib']:.0f} MiB)")
    best = _best(swept)
    configs = list(dict.fromkeys(["default", best]))
    finals = {f"ours ({c}){suffix}": (kind, c)
              for c in configs
              for kind, suffix in (("hft", ""), ("hft-prefaulted", ", transport only"))}  # fmt: skip
    tmpfs = "/dev/shm" if os.path.isdir("/dev/shm") and shutil.disk_usage("/dev/shm").free > 2 * size else None
    times: dict[str, list[float]] = {}
    for r in range(rounds):
        for n in curl_ns:
            times.setdefault(f"curl --range ×{n} → /dev/null", []).append(curl_parallel(ours_url, size, n))
            if tmpfs:
                times.setdefault(f"curl --range ×{n} → tmpfs", []).append(curl_parallel(ours_url, size, n, tmpfs))
        for name, (kind, c) in finals.items():
            times.setdefault(name, []).append(time_loads({**job, "kind": kind}, [c], 1)[c]["best_s"])
            if s3 and kind == "hft":
                times.setdefault(f"ours S3 ({c})", []).append(time_loads(s3job, [c], 1)[c]["best_s"])
                if c == "default":  # the same with every range a boto3 get_object, for comparison
                    row = time_loads({**s3job, "env": {"HF_TENSORIZER_S3_PRESIGNED": "0"}}, [c], 1)[c]
                    times.setdefault("ours S3 (default), boto3 get_object", []).append(row["best_s"])
        if s3:  # boto3's own downloads of the same object from nginx as an S3 bucket: the S3 client reference
            dl = downloads({"kind": "s3dl", "endpoint": url, "bucket": NGINX_BUCKET, "key": "http/model.tensors",
                            "size": size}, ["boto3 download_fileobj → BytesIO"], 1)  # fmt: skip
            for k, v in dl.items():
                times.setdefault(f"{k} (nginx as S3)", []).append(v["best_s"])
        tz = time_loads({"kind": "tz", "dir": str(d), "uri": tz_url}, ["default"], 1)["default"]["best_s"]
        times.setdefault("upstream tensorizer (curl stream)", []).append(tz)
        log(f"  round {r + 1}: " + ", ".join(f"{k} {gbps(size if k.startswith('curl') else nbytes, v[-1]):.2f}"
                                            for k, v in times.items()))  # fmt: skip
    rows = [{"reader": k, "gbps": gbps(size if k.startswith(("curl", "boto3")) else nbytes, min(v)), "runs": v,
             "kind": "ref" if k.startswith("curl") else "ours" if k.startswith("ours") else
             "ref-s3" if k.startswith("boto3") else "peer"}
            for k, v in times.items()]  # fmt: skip
    sink = "tmpfs" if tmpfs else "/dev/null"
    ref_row = max((r for r in rows if r["reader"].endswith(sink)), key=lambda r: r["gbps"])
    ref = ref_row["gbps"]
    for row in rows:
        row["of_ref"] = round(row["gbps"] / ref, 3)
    for row in rows:  # fresh-process loads of one of our configurations (not transport-only): the sweep's verdict
        if row["reader"].startswith("ours (") and "," not in row["reader"]:
            row["config"] = row["reader"][6:-1]
    out = {"file_bytes": size, "tensor_bytes": nbytes, "tensors": meta["tensors"], "rounds": rounds,
           "sweep": swept, "best_config": best, "ref": ref_row["reader"], "ref_gbps": ref, "rows": rows,
           "target_met": default_ratio(rows, ref) >= TARGET,  # judged on the default, never the sweep's best
           "default_of_ref": rows_of(rows, "ours (default)")["of_ref"],
           "transport_of_ref": max(r["of_ref"] for r in rows if r["reader"].endswith("transport only"))}  # fmt: skip
    if s3:  # boto3 against our own HTTP path on the same server, config by config
        ratios = {c: round(rows_of(rows, f"ours S3 ({c})")["gbps"] / rows_of(rows, f"ours ({c})")["gbps"], 3)
                  for c in configs}  # fmt: skip
        boto = max(r["gbps"] for r in rows if r["kind"] == "ref-s3")
        out.update(s3_of_http=ratios, s3_target_met=ratios["default"] >= TARGET,
                   s3_of_boto3=round(rows_of(rows, "ours S3 (default)")["gbps"] / boto, 3))  # fmt: skip
    return out


def rows_of(rows: list[dict[str, Any]], reader: str) -> dict[str, Any]:
    return next(r for r in rows if r["reader"] == reader)


def bench_s3(base: Path, *, sweep: Sequence[str], reps: int, log: Log) -> dict[str, Any]:
    """ours vs boto3 vs upstream tensorizer against moto; the best boto3 download is the server's figure."""
    import boto3

    d = base / "s3"
    meta = read_meta(d)
    assert meta is not None
    size = (d / "model.tensors").stat().st_size
    with moto_server() as endpoint:
        client = boto3.client("s3", endpoint_url=endpoint, region_name=AWS_ENV["AWS_DEFAULT_REGION"],
                              aws_access_key_id=AWS_ENV["AWS_ACCESS_KEY_ID"],
                              aws_secret_access_key=AWS_ENV["AWS_SECRET_ACCESS_KEY"])  # fmt: skip
        client.create_bucket(Bucket=BUCKET)
        for name in ("model.tensors", "tensorizer.tensors"):
            client.upload_file(str(d / name), BUCKET, name)
        s3job = {"kind": "s3dl", "endpoint": endpoint, "bucket": BUCKET, "key": "model.tensors", "size": size}
        dl = downloads(s3job, S3_METHODS, reps)  # each in a fresh process, its client made inside the timer
        opts = {"endpoint_url": endpoint, "addressing_style": "path"}
        job = {"kind": "hft", "dir": str(d), "uri": f"s3://{BUCKET}/model.tensors", "opts": opts}
        ours = time_loads(job, sweep, reps)
        tzjob = {"kind": "tz", "dir": str(d), "uri": f"s3://{BUCKET}/tensorizer.tensors", "opts": opts}
        tz = time_loads(tzjob, ["default"], reps)["default"]
        mem = time_loads({**job, "mem": True}, ["default"], 1)["default"]  # the adaptive default's own memory
    rows = [{"reader": k, "gbps": r["gbps"], "kind": "ref"} for k, r in dl.items()]
    rows += [{"reader": f"ours ({k})", "config": k, "gbps": r["gbps"], "kind": "ours", "transfer": r.get("transfer")}
             for k, r in ours.items()]  # fmt: skip
    rows.append({"reader": "upstream tensorizer (open_stream, curl)", "gbps": tz["gbps"], "kind": "peer"})
    # the reference fills fresh memory as a load does (as HTTP's curl into tmpfs); the discarding reads are shown
    ref_row = max((r for r in rows if r["kind"] == "ref" and not r["reader"].endswith("discard")),
                  key=lambda r: r["gbps"])  # fmt: skip
    ref = ref_row["gbps"]
    for row in rows:
        row["of_ref"] = round(row["gbps"] / ref, 3)
        log(f"  {row['reader']:<42} {row['gbps']:.3f} GB/s  {row['of_ref']:.2f} × server")
    return {
        "object_bytes": size,
        "tensor_bytes": meta["bytes"],
        "memory": {k: mem.get(k) for k in ("overhead", "readers", "chunk_mib", "transfer", "rss_peak", "out_bytes")},
        "reps": reps,
        "ref": ref_row["reader"],
        "ref_gbps": ref,
        "rows": rows,
    }


def bench_memory(base: Path, url: str, *, log: Log) -> dict[str, Any]:
    """Peak RSS over (before + tensor bytes) of HTTP loads to the CPU, direct and through staging, two sizes."""
    rows = []
    for sub in ("http", "mem2"):
        meta = read_meta(base / sub)
        assert meta is not None
        for kind in ("hft", "hft-staged"):
            r = time_loads({"kind": kind, "dir": str(base / sub), "uri": f"{url}/{sub}/model.tensors", "mem": True},
                           ["default"], 1)["default"]  # fmt: skip
            # direct: reads land in the tensors, at most readers × chunk bytes are in flight; staged: the pool
            bound = r["readers"] * r["chunk_mib"] * MiB if kind == "hft" else r["staging_bound"]
            bound += FIXED_BYTES
            rows.append({"model_bytes": meta["bytes"], "mode": "direct into tensors" if kind == "hft" else "staged",
                         "readers": r["readers"], "overhead": r["overhead"], "bound": int(bound),
                         "gbps": r["gbps"], "rss_peak": r["rss_peak"], "rss_before": r["rss_before"],
                         "staging_peak": r.get("staging_peak")})  # fmt: skip
            log(f"  {meta['bytes'] / 1e9:.2f} GB {rows[-1]['mode']:<20} overhead {r['overhead'] / MiB:7.1f} MiB "
                f"(bound {bound / MiB:.0f} MiB)")  # fmt: skip
    return {"rows": rows, "bounded": all(r["overhead"] <= r["bound"] for r in rows)}


# CLI ---------------------------------------------------------------------------------------------------


def run(args: argparse.Namespace, log: Log = log) -> dict[str, Any]:
    """Prepare, start the servers, run the selected sections; returns the results (also written to --out)."""
    import importlib.metadata

    sizes = QUICK_SIZES if args.quick else SIZES
    only = set(args.only.split(","))
    base = Path(args.dir)
    res: dict[str, Any] = {"machine": machine(), "date": time.strftime("%Y-%m-%d"),
                           "command": "python -m hf_tensorizer.bench.remote " + " ".join(args.argv)}  # fmt: skip
    for p in ("tensorizer", "moto", "boto3"):
        res[p] = importlib.metadata.version(p)
    need = {"http": ("hft", "tz"), "s3": ("hft", "tz"), "mem2": ("hft",)}
    want = [s for s in ("http", "s3", "mem2") if (s in only) or (s == "http" and "memory" in only)]
    want += ["s3"] if only & {"gcs", "azure"} else []
    want += ["mem2"] if "memory" in only and "mem2" not in want else []
    for sub in dict.fromkeys(want):
        prepare(base / sub, *sizes[sub], formats=need[sub], log=log)
    t0 = time.monotonic()
    if only & {"http", "memory"}:
        read_parallel([p for s in ("http", "mem2") if (base / s).exists() for p in (base / s).glob("*.tensors")], 2)
        with http_server(base, args.server) as (url, desc):
            res["http_server"] = desc
            if "http" in only:
                log(f"HTTP ({desc})")
                curl_ns = [int(n) for n in args.curl.split(",")]
                res["http"] = bench_http(base, url, sweep=args.sweep.split(","), sweep_reps=args.sweep_reps,
                                         rounds=args.rounds, curl_ns=curl_ns, log=log,
                                         s3=args.server == "nginx")  # fmt: skip
            if "memory" in only:
                log("memory")
                res["memory"] = bench_memory(base, url, log=log)
    if "s3" in only:
        log("S3 (moto)")
        res["s3"] = bench_s3(base, sweep=args.s3_sweep.split(","), reps=args.s3_reps, log=log)
    for store in ("gcs", "azure"):
        if store in only:
            log({"gcs": "GCS (gcp-storage-emulator)", "azure": "Azure Blob (Azurite)"}[store])
            res[store] = bench_store(base, store, sweep=args.store_sweep.split(","), reps=args.s3_reps, log=log)
    res["elapsed_s"] = round(time.monotonic() - t0, 1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(res, indent=1))
    (out / "table.md").write_text(format_report(res))
    plot(res, out / "remote.png")
    return res


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["job"]:
        print(MARK + json.dumps(run_job(json.loads(argv[1]))), flush=True)
        return 0
    if argv[:1] == ["moto"]:
        return serve_moto()
    p = argparse.ArgumentParser(prog="python -m hf_tensorizer.bench.remote", description=__doc__.splitlines()[0])
    p.add_argument("--dir", default=".bench/remote", help="checkpoints (prepared when missing, reused after)")
    p.add_argument("--out", default=".bench/remote/results", help="where results.json, table.md, remote.png go")
    p.add_argument(
        "--only",
        default="http,s3,gcs,azure,memory",
        help="sections: http (nginx, and nginx as S3), s3 (moto), gcs, azure, memory (comma-separated)",
    )
    p.add_argument("--server", choices=("nginx", "stdlib"), default="nginx", help="HTTP server (stdlib: no nginx)")
    p.add_argument("--quick", action="store_true", help="small checkpoints (a smoke test, not a measurement)")
    p.add_argument("--rounds", type=int, default=2, help="interleaved curl / ours / upstream rounds (best kept)")
    p.add_argument("--curl", default="1,2,4,8", help="parallel curl counts")
    p.add_argument("--sweep", default=",".join(HTTP_SWEEP), help="our HTTP configs, e.g. default,c4-k16 (see code)")
    p.add_argument("--sweep-reps", type=int, default=2, help="repeats of each HTTP sweep config (best kept)")
    p.add_argument("--s3-sweep", default=",".join(S3_SWEEP), help="our S3 configs")
    p.add_argument("--s3-reps", type=int, default=2, help="repeats of each S3, GCS and Azure reader (best kept)")
    p.add_argument("--store-sweep", default=",".join(STORE_SWEEP), help="our GCS and Azure configs")
    args = p.parse_args(argv)
    args.argv = argv
    res = run(args)
    print(format_report(res), flush=True)
    print(f"results in {args.out}/ (results.json, table.md, remote.png)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
