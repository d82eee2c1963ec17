"""The child-process side of the remote benchmark: one timed load (ours, our pipeline driven directly, upstream
tensorizer) or the boto3 downloads, in a fresh process, checked against the checkpoint; and the moto server.

Run through :func:`child` / :func:`time_loads`; the processes are ``python -m hf_tensorizer.bench.remote job ...``.
"""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .checkpoint import read_meta
from .peers import MiB, gbps
from .proc import collect, error_line
from .proc import popen as spawn
from .servers import AWS_ENV

__all__ = [
    "AZURE_METHODS",
    "GCS_METHODS",
    "S3_METHODS",
    "child",
    "downloads",
    "parse_config",
    "run_job",
    "serve_moto",
    "time_loads",
]


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


def popen(args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return spawn(args, module="hf_tensorizer.bench.remote", env={**AWS_ENV, **(env or {})})


def child(job: dict[str, Any], timeout: float = 300.0) -> dict[str, Any]:
    """Run ``job`` (see :func:`run_job`) in a fresh process (with ``job["env"]`` added to its environment);
    raises with the child's last error line."""
    res, out = collect(popen(["job", json.dumps(job)], job.get("env")), timeout)
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
            t = d.metrics.transfer
            shape = f"{t['mode']} ×{t['concurrency']}" if t else ""  # what the adaptive transfer settled on
            return dict(d), {"readers": d.num_readers, "chunk_mib": d.chunk_bytes / MiB, "transfer": shape}
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
    """Imports before the timer (a server process has them loaded), and for our S3 loads botocore's data files: a
    process parses them once (~0.15 s), every later client reuses them (see ``sources.s3``), like an import."""
    import torch  # noqa: F401

    import hf_tensorizer.engine.reader
    import hf_tensorizer.sources.http  # noqa: F401

    if uri.startswith("s3://"):
        import boto3  # noqa: F401

        from hf_tensorizer.sources.s3 import make_s3_client

        if kind.startswith("hft"):
            make_s3_client(endpoint_url="http://127.0.0.1:9", anonymous=True).close()  # no request is sent
    if kind == "tz":
        import tensorizer.stream_io  # noqa: F401
    if uri.startswith(("gs://", "az://")):
        _import_store(uri.startswith("gs://"))


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    """A child's work: one timed load (``kind`` ``hft``, ``hft-staged`` or ``tz``, transport knobs from
    ``config``, peak RSS with ``mem``) checked against the checkpoint, or ``s3dl`` (the boto3 downloads)."""
    if job["kind"] == "s3dl":
        return _s3_downloads(job)
    if job["kind"] in ("gcsdl", "azdl"):
        return _store_downloads(job)
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


class _Into:
    """A seekable writable stream over one preallocated buffer (what the Azure SDK's parallel readinto needs)."""

    def __init__(self, size: int) -> None:
        self.view = memoryview(bytearray(size))
        self.pos = 0

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, pos: int, whence: int = 0) -> int:
        self.pos = pos if whence == 0 else self.pos + pos if whence == 1 else len(self.view) + pos
        return self.pos

    def tell(self) -> int:
        return self.pos

    def write(self, b: bytes) -> int:
        n = len(b)
        self.view[self.pos : self.pos + n] = b
        self.pos += n
        return n


def downloads(job: dict[str, Any], names: Sequence[str], reps: int) -> dict[str, Any]:
    """Time each reference client (``names``, see :func:`_s3_downloads` / :func:`_store_downloads`) ``reps`` times,
    each run in a fresh process with its client made inside the timer, as our loads are timed; best kept."""
    out: dict[str, Any] = {}
    for _ in range(reps):
        for name in names:
            row = child({**job, "only": [name], "reps": 1})[name]
            out.setdefault(name, {"runs": []})["runs"] += row["runs"]
    for row in out.values():
        row["best_s"] = min(row["runs"])
        row["gbps"] = gbps(job["size"], row["best_s"])
    return out


S3_METHODS = ("boto3 download_fileobj → BytesIO", "boto3 download_fileobj → discard",
              "boto3 get_object (one stream) → bytes", "boto3 get_object (one stream) → discard")  # fmt: skip


def _s3_downloads(job: dict[str, Any]) -> dict[str, Any]:
    """boto3 reads of one object, each timed from making its client (as our loads make theirs) to the last byte:
    ``download_fileobj`` into a BytesIO and into a discarding sink (s3transfer defaults: 8 MiB parts, 10 threads),
    and one plain ``get_object`` read whole into bytes (fresh memory, as a load fills) or streamed into a
    discarding sink. botocore's data files are parsed before the timer
    (a throwaway client: what an import is to a server process), as for our loads (:func:`_warm`)."""
    import io

    import boto3

    boto3.client("s3", endpoint_url="http://127.0.0.1:9")  # no request is sent
    bucket, key = job["bucket"], job["key"]

    def get_object(client: Any) -> None:
        body = client.get_object(Bucket=bucket, Key=key)["Body"]
        while body.read(8 * MiB):
            pass

    methods = dict(zip(S3_METHODS, (lambda c: c.download_fileobj(bucket, key, io.BytesIO()),
                                    lambda c: c.download_fileobj(bucket, key, _Discard()),
                                    lambda c: c.get_object(Bucket=bucket, Key=key)["Body"].read(),
                                    get_object), strict=True))  # fmt: skip
    if job.get("only"):
        methods = {k: v for k, v in methods.items() if k in job["only"]}
    out: dict[str, Any] = {}
    for _ in range(job.get("reps", 1)):
        for name, fn in methods.items():
            t0 = time.perf_counter()
            fn(boto3.client("s3", endpoint_url=job["endpoint"]))
            out.setdefault(name, {"runs": []})["runs"].append(round(time.perf_counter() - t0, 4))
    for row in out.values():
        row["best_s"] = min(row["runs"])
        row["gbps"] = gbps(job["size"], row["best_s"])
    return out


GCS_METHODS = ("gcsfs cat_file (one GET)", "gcsfs cat_ranges (8 MiB ranges)")
AZURE_METHODS = ("adlfs cat_file", "azure-storage-blob download_blob ×8 → bytearray")


def _store_downloads(job: dict[str, Any]) -> dict[str, Any]:
    """The store's own clients reading one object into fresh memory, each timed with its client made inside the
    timer (as our loads make theirs; the packages imported before it, as for ours): GCS through gcsfs
    (``cat_file``: one GET; ``cat_ranges``: 8 MiB ranges on fsspec's event loop), Azure through adlfs
    (``cat_file``) and the Azure SDK (``download_blob(max_concurrency=8).readinto``)."""
    import fsspec

    size, path, opts = job["size"], job["path"], job["storage_options"]
    ranges = [(a, min(size, a + 8 * MiB)) for a in range(0, size, 8 * MiB)]
    _import_store(job["kind"] == "gcsdl")

    def fs() -> Any:
        return fsspec.filesystem("gs" if job["kind"] == "gcsdl" else "az", skip_instance_cache=True, **opts)

    methods: dict[str, Any] = {}
    if job["kind"] == "gcsdl":
        methods[GCS_METHODS[0]] = lambda: fs().cat_file(path)
        methods[GCS_METHODS[1]] = lambda: fs().cat_ranges([path] * len(ranges), *map(list, zip(*ranges)))
    else:
        from azure.storage.blob import BlobClient

        container, _, blob = path.partition("/")

        def sdk() -> None:
            client = BlobClient.from_connection_string(opts["connection_string"], container, blob)
            client.download_blob(max_concurrency=8).readinto(_Into(size))

        methods[AZURE_METHODS[0]] = lambda: fs().cat_file(path)
        methods[AZURE_METHODS[1]] = sdk
    if job.get("only"):
        methods = {k: v for k, v in methods.items() if k in job["only"]}
    out: dict[str, Any] = {}
    for _ in range(job.get("reps", 1)):
        for name, fn in methods.items():
            t0 = time.perf_counter()
            data = fn()
            out.setdefault(name, {"runs": []})["runs"].append(round(time.perf_counter() - t0, 4))
            got = len(data) if isinstance(data, bytes) else sum(map(len, data)) if isinstance(data, list) else size
            if got != size:
                raise RuntimeError(f"{name} returned the wrong number of bytes")
    for row in out.values():
        row["best_s"] = min(row["runs"])
        row["gbps"] = gbps(size, row["best_s"])
    return out


def _import_store(gcs: bool) -> None:
    """The store's packages, imported before a timer (for ours and the store's clients alike)."""
    if gcs:
        import gcsfs  # noqa: F401
    else:
        import adlfs  # noqa: F401
        import azure.storage.blob  # noqa: F401


def serve_moto() -> int:
    import logging

    from moto.server import ThreadedMotoServer

    # werkzeug logs every request to stderr: ~150 bytes each, thousands per benchmark, time the server is not serving
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})  # inherited by the server's threads
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    print(f"PORT {server.get_host_and_port()[1]}", flush=True)
    signal.sigwait({signal.SIGTERM, signal.SIGINT})
    server.stop()
    return 0
