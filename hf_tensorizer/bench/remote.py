"""Remote-streaming benchmark: HTTP against nginx, S3 against moto, and the memory bound of remote loads.

``python -m hf_tensorizer.bench.remote [--only http,s3,memory] [--quick]`` prepares bf16 checkpoints (our format
and upstream tensorizer's, see ``checkpoint.prepare``), starts the servers on 127.0.0.1, times every reader in fresh
processes and writes ``results.json``, ``table.md`` and ``remote.png`` into ``--out``. Method:

* HTTP: nginx (sendfile, keep-alive) serves the checkpoint directory; the reference is N parallel
  ``curl --range`` downloads of the file to /dev/null (N = 1, 2, 4, 8, best kept), timed in the same rounds as our
  loader (``TensorDeserializer(url, device="cpu")``, after a sweep of its transport knobs) and upstream tensorizer.
  Without nginx (``--server stdlib``) the test suite's range server stands in, and the report says so.
* S3: moto's ``ThreadedMotoServer`` in its own process; boto3 ``download_fileobj`` (s3transfer) into a BytesIO and
  into a discarding sink and one plain ``get_object`` are the server's figure; ours and upstream tensorizer
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
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .checkpoint import prepare, read_meta
from .peers import MiB, gbps, read_parallel
from .proc import MARK, collect, error_line, log
from .proc import popen as spawn
from .servers import AWS_ENV, curl_parallel, http_server, moto_server

Log = Callable[[str], None]
# (layers, hidden, vocab) of the Llama-shaped checkpoints; full and --quick sizes
SIZES = {"http": (1, 4096, 32000), "s3": (1, 1536, 32000), "mem2": (3, 4096, 32000)}
QUICK_SIZES = {"http": (1, 1024, 32000), "s3": (1, 512, 8000), "mem2": (2, 1024, 32000)}
BUCKET = "bench"
FIXED_BYTES = 8 * MiB  # allowed on top of a memory bound: reader threads' stacks, connections, the index


def parse_config(name: str) -> dict[str, int]:
    """``c4-p16-k8-r4`` -> ``concurrency=4, part_size=16 MiB, chunk_bytes=8 MiB, num_readers=4`` (each optional);
    ``default`` -> ``{}`` (the library's defaults)."""
    keys = {"c": ("concurrency", 1), "p": ("part_size", MiB), "k": ("chunk_bytes", MiB), "r": ("num_readers", 1)}
    out: dict[str, int] = {}
    for part in name.split("-"):
        if part == "default":
            continue
        if not part or part[0] not in keys or not part[1:].isdigit():
            raise ValueError(f"bad config {name!r}: expected e.g. c4-p16-k8-r4 or default")
        key, unit = keys[part[0]]
        out[key] = int(part[1:]) * unit
    return out


# Child processes ---------------------------------------------------------------------------------------


def popen(args: list[str]) -> subprocess.Popen[str]:
    return spawn(args, module="hf_tensorizer.bench.remote", env=AWS_ENV)


def child(job: dict[str, Any], timeout: float = 300.0) -> dict[str, Any]:
    """Run ``job`` (see :func:`run_job`) in a fresh process; raises with the child's last error line."""
    res, out = collect(popen(["job", json.dumps(job)]), timeout)
    if res is None:
        raise RuntimeError(f"{job['kind']} failed: {error_line(out)}")
    return res


class _RSS:
    """Peak resident set size during a block: sampled every ms, cross-checked with ``ru_maxrss``."""

    def __enter__(self) -> _RSS:
        import resource

        import psutil

        self._proc = psutil.Process()
        self._ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        self.before = self.peak = self._proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, self._proc.memory_info().rss)

    def __exit__(self, *exc: object) -> None:
        import resource

        self._stop.set()
        self._thread.join()
        ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        if ru > self._ru:  # the high-water mark moved during the block: it is this block's peak
            self.peak = max(self.peak, ru)


def _load(kind: str, uri: str, opts: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """One load; returns (state dict, extra info)."""
    if kind == "hft":
        from hf_tensorizer import TensorDeserializer

        with TensorDeserializer(uri, device="cpu", **opts) as d:
            return dict(d), {"readers": d.num_readers, "chunk_mib": d.chunk_bytes / MiB}
    if kind in ("hft-staged", "hft-prefaulted"):
        return _load_pipeline(uri, opts, staged=kind == "hft-staged")
    import tensorizer
    from tensorizer.stream_io import open_stream

    if uri.startswith("s3://"):
        stream = open_stream(uri, "rb", AWS_ENV["AWS_ACCESS_KEY_ID"], AWS_ENV["AWS_SECRET_ACCESS_KEY"],
                             s3_endpoint=opts["endpoint_url"], force_http=True)  # fmt: skip
        d = tensorizer.TensorDeserializer(stream, device="cpu")
    else:
        d = tensorizer.TensorDeserializer(uri, device="cpu")
    sd = dict(d)
    d.close()
    return sd, {}


def _load_pipeline(uri: str, opts: dict[str, Any], *, staged: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """Our read pipeline driven directly, sized as ``TensorDeserializer`` sizes it:

    * ``staged``: the GPU path (bounded staging pool, one copy per chunk) with CPU tensors as the target: what a
      GPU load holds in host memory;
    * else the CPU path into destination tensors faulted in before the timer starts (the transport alone, without
      the first-touch cost of fresh memory that a /dev/null download never pays).
    """
    import torch

    from hf_tensorizer import constants
    from hf_tensorizer.engine.header import read_index
    from hf_tensorizer.engine.pipeline import load_cpu, load_staged
    from hf_tensorizer.engine.plan import plan_chunks
    from hf_tensorizer.engine.staging import StagingPool
    from hf_tensorizer.sources import open_source

    opts = dict(opts)
    chunk = opts.pop("chunk_bytes", constants.CHUNK_BYTES)
    staging = opts.pop("staging_bytes", constants.STAGING_BYTES)
    readers = opts.pop("num_readers", 0)
    with open_source(uri, **opts) as src:
        entries = list(read_index(src).tensors.values())
        readers = readers or max(4, src.preferred_concurrency)
        chunks = plan_chunks(entries, chunk)
        dests = {e.name: torch.empty(e.shape, dtype=e.dtype) for e in entries}
        info: dict[str, Any] = {"readers": readers, "chunk_mib": chunk / MiB}
        if not staged:
            t0 = time.perf_counter()
            for t in dests.values():
                t.zero_()
            info["untimed_s"] = time.perf_counter() - t0  # taken off the load's time by run_job
            load_cpu(src, chunks, dests, threads=readers, verifier=None)
            return dests, info
        buffer_bytes = 1 << max(12, (max(c.length for c in chunks) - 1).bit_length())
        nbuf = max(1, min(readers + 2, len(chunks), staging // buffer_bytes))
        pool = StagingPool(buffer_bytes, nbuf, pin=False, allocation="lazy")
        try:
            load_staged(src, chunks, dests, threads=readers, pool=pool, verifier=None)
            info.update(staging_bound=nbuf * buffer_bytes, staging_peak=pool.peak_allocated * buffer_bytes)
        finally:
            pool.close()
    return dests, info


def _warm(kind: str, uri: str) -> None:
    """Imports before the timer (a server process has them loaded)."""
    import torch  # noqa: F401

    import hf_tensorizer.engine.reader
    import hf_tensorizer.sources.http

    if uri.startswith("s3://"):
        import boto3  # noqa: F401

        import hf_tensorizer.sources.s3  # noqa: F401
    if kind == "tz":
        import tensorizer.stream_io  # noqa: F401


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    """A child's work: one timed load (``kind`` ``hft``, ``hft-staged`` or ``tz``, transport knobs from
    ``config``, peak RSS with ``mem``) checked against the checkpoint, or ``s3dl`` (the boto3 downloads)."""
    if job["kind"] == "s3dl":
        return _s3_downloads(job)
    from .checkpoint import verify

    meta = read_meta(Path(job["dir"]))
    assert meta is not None
    config = job.get("config", "default")
    opts = {**job.get("opts", {}), **parse_config(config)}
    _warm(job["kind"], job["uri"])
    rss = _RSS() if job.get("mem") else None
    t0 = time.perf_counter()
    if rss is not None:
        with rss:
            sd, row = _load(job["kind"], job["uri"], opts)
    else:
        sd, row = _load(job["kind"], job["uri"], opts)
    row["seconds"] = round(time.perf_counter() - t0 - row.pop("untimed_s", 0.0), 4)
    row["why"] = verify(sd, meta, "cpu")
    if rss is not None:
        out_bytes = sum(t.numel() * t.element_size() for t in sd.values())
        row.update(rss_before=rss.before, rss_peak=rss.peak, out_bytes=out_bytes,
                   overhead=rss.peak - rss.before - out_bytes)  # fmt: skip
    return row


def time_loads(job: dict[str, Any], configs: Sequence[str], reps: int) -> dict[str, Any]:
    """``reps`` interleaved rounds of one fresh process per config; best time kept; raises on wrong tensors."""
    meta = read_meta(Path(job["dir"]))
    assert meta is not None
    out: dict[str, Any] = {}
    for _ in range(reps):
        for c in configs:
            r = child({**job, "config": c})
            if r["why"]:
                raise RuntimeError(f"{job['kind']} {c} returned wrong tensors: {r['why']}")
            row = out.setdefault(c, {**r, "runs": []})
            row["runs"].append(r["seconds"])
    for row in out.values():
        row["best_s"] = min(row["runs"])
        row["gbps"] = gbps(meta["bytes"], row["best_s"])
    return out


class _Discard:
    """A writable sink that drops everything (download_fileobj needs write/seek/tell)."""

    def __init__(self) -> None:
        self.n = 0

    def write(self, b: bytes) -> int:
        self.n += len(b)
        return len(b)

    def seek(self, *a: int) -> int:
        return 0

    def tell(self) -> int:
        return self.n


def _s3_downloads(job: dict[str, Any]) -> dict[str, Any]:
    """boto3 reads of one object: ``download_fileobj`` into a BytesIO and into a discarding sink (s3transfer
    defaults: 8 MiB parts, 10 threads), and one plain ``get_object`` streamed into a discarding sink."""
    import io

    import boto3

    t0 = time.perf_counter()
    client = boto3.client("s3", endpoint_url=job["endpoint"])
    client_s = time.perf_counter() - t0  # paid by every load that makes its own client (ours does), not timed here
    bucket, key = job["bucket"], job["key"]

    def get_object() -> None:
        body = client.get_object(Bucket=bucket, Key=key)["Body"]
        while body.read(8 * MiB):
            pass

    methods = {
        "boto3 download_fileobj → BytesIO": lambda: client.download_fileobj(bucket, key, io.BytesIO()),
        "boto3 download_fileobj → discard": lambda: client.download_fileobj(bucket, key, _Discard()),
        "boto3 get_object (one stream) → discard": get_object,
    }
    out: dict[str, Any] = {}
    for _ in range(job.get("reps", 1)):
        for name, fn in methods.items():
            t0 = time.perf_counter()
            fn()
            out.setdefault(name, {"runs": []})["runs"].append(round(time.perf_counter() - t0, 4))
    for row in out.values():
        row["best_s"] = min(row["runs"])
        row["gbps"] = gbps(job["size"], row["best_s"])
    out["client_s"] = round(client_s, 4)
    return out


def _serve_moto() -> int:
    from moto.server import ThreadedMotoServer

    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})  # inherited by the server's threads
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    print(f"PORT {server.get_host_and_port()[1]}", flush=True)
    signal.sigwait({signal.SIGTERM, signal.SIGINT})
    server.stop()
    return 0


# The benchmark -----------------------------------------------------------------------------------------

HTTP_SWEEP = ("default", "c4", "c8", "c4-k16", "c8-k16")
S3_SWEEP = ("default", "c4-k64-p64")


def _best(rows: dict[str, Any]) -> str:
    return max(rows, key=lambda k: rows[k]["gbps"])


def bench_http(base: Path, url: str, *, sweep: Sequence[str], sweep_reps: int, rounds: int, curl_ns: Sequence[int],
               log: Log) -> dict[str, Any]:  # fmt: skip
    """Sweep our transport knobs (into pre-faulted tensors: the knobs' effect without first-touch noise), then
    time curl, ours (default and best; fresh loads, and the transport alone) and upstream in the same rounds."""
    d = base / "http"
    meta = read_meta(d)
    assert meta is not None
    ours_url, tz_url = f"{url}/http/model.tensors", f"{url}/http/tensorizer.tensors"
    size, nbytes = (d / "model.tensors").stat().st_size, meta["bytes"]
    job = {"kind": "hft", "dir": str(d), "uri": ours_url}
    swept = time_loads({**job, "kind": "hft-prefaulted"}, sweep, sweep_reps)
    for k, r in swept.items():
        log(f"  sweep {k:<12} {r['gbps']:.3f} GB/s  (readers {r['readers']}, chunk {r['chunk_mib']:.0f} MiB)")
    best = _best(swept)
    finals = {f"ours ({c}){suffix}": (kind, c)
              for c in dict.fromkeys(["default", best])
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
        tz = time_loads({"kind": "tz", "dir": str(d), "uri": tz_url}, ["default"], 1)["default"]["best_s"]
        times.setdefault("upstream tensorizer (curl stream)", []).append(tz)
        log(f"  round {r + 1}: " + ", ".join(f"{k} {gbps(size if k.startswith('curl') else nbytes, v[-1]):.2f}"
                                            for k, v in times.items()))  # fmt: skip
    rows = [{"reader": k, "gbps": gbps(size if k.startswith("curl") else nbytes, min(v)),
             "kind": "ref" if k.startswith("curl") else "ours" if k.startswith("ours") else "peer"}
            for k, v in times.items()]  # fmt: skip
    ref_row = max((r for r in rows if r["reader"].endswith("/dev/null")), key=lambda r: r["gbps"])
    ref = ref_row["gbps"]
    for row in rows:
        row["of_ref"] = round(row["gbps"] / ref, 3)
    fresh = [r["of_ref"] for r in rows if r["kind"] == "ours" and "," not in r["reader"]]
    return {"file_bytes": size, "tensor_bytes": nbytes, "tensors": meta["tensors"], "rounds": rounds,
            "sweep": swept, "best_config": best, "ref": ref_row["reader"], "ref_gbps": ref, "rows": rows,
            "target_met": max(fresh) >= 0.9, "default_of_ref": rows_of(rows, "ours (default)")["of_ref"],
            "transport_of_ref": max(r["of_ref"] for r in rows if r["reader"].endswith("transport only"))}  # fmt: skip


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
        s3job = {"endpoint": endpoint, "bucket": BUCKET, "key": "model.tensors", "size": size, "reps": reps}
        dl = child({"kind": "s3dl", **s3job})
        client_s = dl.pop("client_s")
        opts = {"endpoint_url": endpoint, "addressing_style": "path"}
        job = {"kind": "hft", "dir": str(d), "uri": f"s3://{BUCKET}/model.tensors", "opts": opts}
        ours = time_loads(job, sweep, reps)
        tzjob = {"kind": "tz", "dir": str(d), "uri": f"s3://{BUCKET}/tensorizer.tensors", "opts": opts}
        tz = time_loads(tzjob, ["default"], reps)["default"]
    rows = [{"reader": k, "gbps": r["gbps"], "kind": "ref"} for k, r in dl.items()]
    rows += [{"reader": f"ours ({k})", "config": k, "gbps": r["gbps"], "kind": "ours"} for k, r in ours.items()]
    rows.append({"reader": "upstream tensorizer (open_stream, curl)", "gbps": tz["gbps"], "kind": "peer"})
    ref = max(r["gbps"] for r in rows if r["kind"] == "ref")
    for row in rows:
        row["of_ref"] = round(row["gbps"] / ref, 3)
        log(f"  {row['reader']:<42} {row['gbps']:.3f} GB/s  {row['of_ref']:.2f} × server")
    return {
        "object_bytes": size,
        "tensor_bytes": meta["bytes"],
        "reps": reps,
        "ref_gbps": ref,
        "rows": rows,
        "boto3_client_s": client_s,
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


# Report ------------------------------------------------------------------------------------------------


def format_report(res: dict[str, Any]) -> str:
    """Markdown tables of every section that ran."""
    out = [f"{res['machine']}; {res['date']}; `{res['command']}`", ""]
    if "http" in res:
        h = res["http"]
        out += [f"**HTTP** ({res['http_server']}): {h['file_bytes'] / 1e9:.2f} GB file, {h['tensors']} bf16 tensors; "
                f"best of {h['rounds']} interleaved rounds. Reference: {h['ref']} = {h['ref_gbps']:.3f} GB/s; target "
                f"ours ≥ 0.9 × reference: **{'met' if h['target_met'] else 'NOT met'}** (default config "
                f"{h['default_of_ref']:.2f}×, transport alone {h['transport_of_ref']:.2f}×).", "",
                "| reader | GB/s | ÷ reference |", "|---|---|---|"]  # fmt: skip
        out += [f"| {r['reader']} | {r['gbps']:.3f} | {r['of_ref']:.2f} |" for r in h["rows"]]
        out += ["", "Sweep of our knobs, transport only (c = concurrency, k = chunk MiB, p = part MiB):", "",
                "| config | readers | chunk MiB | GB/s |", "|---|---|---|---|"]  # fmt: skip
        out += [f"| {k} | {r['readers']} | {r['chunk_mib']:.0f} | {r['gbps']:.3f} |" for k, r in h["sweep"].items()]
        out.append("")
    if "s3" in res:
        s = res["s3"]
        out += [f"**S3** (moto {res.get('moto', '?')} in its own process): {s['object_bytes'] / 1e6:.0f} MB object; "
                f"best of {s['reps']}. Server figure = best boto3 download = {s['ref_gbps']:.3f} GB/s.", "",
                "| reader | GB/s | ÷ server figure |", "|---|---|---|"]  # fmt: skip
        out += [f"| {r['reader']} | {r['gbps']:.3f} | {r['of_ref']:.2f} |" for r in s["rows"]]
        out.append("")
    if "memory" in res:
        m = res["memory"]
        out += [f"**Memory** (HTTP load to CPU, fresh process each): bounded: **{'yes' if m['bounded'] else 'NO'}**.",
                "", "| model GB | mode | readers | peak RSS − before − tensors (MiB) | bound (MiB) | GB/s |",
                "|---|---|---|---|---|---|"]  # fmt: skip
        out += [f"| {r['model_bytes'] / 1e9:.2f} | {r['mode']} | {r['readers']} | {r['overhead'] / MiB:.1f} "
                f"| {r['bound'] / MiB:.0f} | {r['gbps']:.3f} |" for r in m["rows"]]  # fmt: skip
        out.append("")
    return "\n".join(out)


def plot(res: dict[str, Any], path: Path) -> bool:
    """One panel per section; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    panels = [k for k in ("http", "s3", "memory") if k in res]
    fig, axes = plt.subplots(len(panels), 1, figsize=(9, 3.2 * len(panels)), squeeze=False)
    colors = {"ref": "tab:gray", "ours": "tab:blue", "peer": "tab:orange"}
    for ax, key in zip([a[0] for a in axes], panels, strict=True):
        if key == "memory":
            rows = res[key]["rows"]
            labels = [f"{r['model_bytes'] / 1e9:.2f} GB {r['mode']}" for r in rows]
            ys = range(len(rows))
            ax.barh([y - 0.2 for y in ys], [r["overhead"] / MiB for r in rows], 0.4, label="measured overhead")
            ax.barh([y + 0.2 for y in ys], [r["bound"] / MiB for r in rows], 0.4, color="tab:gray", label="bound")
            ax.set_yticks(list(ys), labels)
            ax.set_xlabel("MiB (peak RSS − RSS before − tensor bytes)")
            ax.legend(fontsize=8)
        else:
            rows = res[key]["rows"]
            ax.barh(range(len(rows)), [r["gbps"] for r in rows], color=[colors[r["kind"]] for r in rows])
            ax.set_yticks(range(len(rows)), [r["reader"] for r in rows])
            ax.axvline(res[key]["ref_gbps"], color="k", linestyle="--", linewidth=0.8)
            if key == "http":
                ax.axvline(0.9 * res[key]["ref_gbps"], color="tab:red", linestyle=":", label="0.9 × reference")
                ax.legend(fontsize=8, loc="lower right")
            ax.set_xlabel("GB/s")
        ax.invert_yaxis()
        ax.set_title({"http": f"HTTP, {res.get('http_server', '')[:60]}", "s3": "S3 (moto server)",
                      "memory": "memory of HTTP loads to CPU"}[key], fontsize=10)  # fmt: skip
    fig.suptitle(f"{res['machine']}, {res['date']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _machine() -> str:
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "?")
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} CPUs, loopback"


# CLI ---------------------------------------------------------------------------------------------------


def run(args: argparse.Namespace, log: Log = log) -> dict[str, Any]:
    """Prepare, start the servers, run the selected sections; returns the results (also written to --out)."""
    import importlib.metadata

    sizes = QUICK_SIZES if args.quick else SIZES
    only = set(args.only.split(","))
    base = Path(args.dir)
    res: dict[str, Any] = {"machine": _machine(), "date": time.strftime("%Y-%m-%d"),
                           "command": "python -m hf_tensorizer.bench.remote " + " ".join(args.argv)}  # fmt: skip
    for p in ("tensorizer", "moto", "boto3"):
        res[p] = importlib.metadata.version(p)
    need = {"http": ("hft", "tz"), "s3": ("hft", "tz"), "mem2": ("hft",)}
    want = [s for s in ("http", "s3", "mem2") if (s in only) or (s == "http" and "memory" in only)]
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
                                         rounds=args.rounds, curl_ns=curl_ns, log=log)  # fmt: skip
            if "memory" in only:
                log("memory")
                res["memory"] = bench_memory(base, url, log=log)
    if "s3" in only:
        log("S3 (moto)")
        res["s3"] = bench_s3(base, sweep=args.s3_sweep.split(","), reps=args.s3_reps, log=log)
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
        return _serve_moto()
    p = argparse.ArgumentParser(prog="python -m hf_tensorizer.bench.remote", description=__doc__.splitlines()[0])
    p.add_argument("--dir", default=".bench/remote", help="checkpoints (prepared when missing, reused after)")
    p.add_argument("--out", default=".bench/remote/results", help="where results.json, table.md, remote.png go")
    p.add_argument("--only", default="http,s3,memory", help="sections: http, s3, memory (comma-separated)")
    p.add_argument("--server", choices=("nginx", "stdlib"), default="nginx", help="HTTP server (stdlib: no nginx)")
    p.add_argument("--quick", action="store_true", help="small checkpoints (a smoke test, not a measurement)")
    p.add_argument("--rounds", type=int, default=2, help="interleaved curl / ours / upstream rounds (best kept)")
    p.add_argument("--curl", default="1,2,4,8", help="parallel curl counts")
    p.add_argument("--sweep", default=",".join(HTTP_SWEEP), help="our HTTP configs, e.g. default,c4-k16 (see code)")
    p.add_argument("--sweep-reps", type=int, default=2, help="repeats of each HTTP sweep config (best kept)")
    p.add_argument("--s3-sweep", default=",".join(S3_SWEEP), help="our S3 configs")
    p.add_argument("--s3-reps", type=int, default=2, help="repeats of each S3 reader (best kept)")
    args = p.parse_args(argv)
    args.argv = argv
    res = run(args)
    print(format_report(res), flush=True)
    print(f"results in {args.out}/ (results.json, table.md, remote.png)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
