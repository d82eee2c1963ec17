"""Read speed of fsspec stores next to our native HTTP transport (docs/remote.md, "fsspec stores").

One random object of ``--mib`` MiB is read whole into one buffer, in a fresh process per measurement (open + read,
the median of ``--rounds``), from:

* our HTTP transport against nginx (the native reference; the object on the page cache),
* ``gs://`` through gcsfs against the GCS emulator (gcp-storage-emulator, in memory, on 127.0.0.1),
* ``memory://`` (fsspec's in-process store: the object is put there first, untimed),

each through :class:`~hf_tensorizer.sources.fsspec.FsspecSource` (``cat_file`` ranges in parallel) and, for the
two fsspec stores, through the alternative the design weighed: one file handle per thread, ``seek`` + ``readinto``.

    hf-tensorizer bench fsspec --mib 256 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .proc import ROOT, test_servers

os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")  # the emulator has no gRPC control API


def job(spec: dict[str, Any]) -> None:
    """One measurement (in a fresh process): prints the seconds to open and read the object whole."""
    import threading

    import fsspec

    from hf_tensorizer.sources import open_source

    uri, options, size = spec["uri"], spec.get("options", {}), spec["size"]
    if uri.startswith("memory://"):
        fsspec.filesystem("memory").pipe_file(uri, os.urandom(size))
    buf = bytearray(size)
    start = time.perf_counter()
    if spec["mode"] == "source":
        with open_source(uri, concurrency=spec["concurrency"], part_size=spec["part"], **options) as src:
            src.read_into(0, memoryview(buf))
    else:  # one handle per thread, seek + readinto, no read-ahead cache
        fs, path = fsspec.core.url_to_fs(uri, **options.get("storage_options", {}))
        n, part = spec["concurrency"], spec["part"]
        parts = [(o, min(part, size - o)) for o in range(0, size, part)]

        def worker(k: int) -> None:
            with fs.open(path, "rb", cache_type="none") as f:
                for o, ln in parts[k::n]:
                    f.seek(o)
                    view = memoryview(buf)[o : o + ln]
                    while len(view):
                        got = f.readinto(view)
                        view = view[got:]

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    print(json.dumps({"seconds": time.perf_counter() - start}))


def measure(spec: dict[str, Any], rounds: int) -> float:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)}
    times = []
    for _ in range(rounds):
        out = subprocess.run(
            [sys.executable, "-m", __name__, "--job", json.dumps(spec)],
            capture_output=True,
            text=True,
            check=True,
            env=env,
        ).stdout
        times.append(json.loads(out.strip().splitlines()[-1])["seconds"])
    return statistics.median(times)


def add_fsspec_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mib", type=int, default=256, help="size of the object read whole")
    p.add_argument("--rounds", type=int, default=3, help="fresh processes per row (the median is kept)")
    p.add_argument("--concurrency", type=int, default=8, help="parallel ranges or file handles")
    p.add_argument("--part-mib", type=int, default=16, help="range size")
    p.add_argument("--server", choices=("nginx", "stdlib"), default="nginx",
                   help="the HTTP reference (stdlib: tests/servers/http_range.py, where nginx is missing)")  # fmt: skip


def fsspec_main(args: argparse.Namespace) -> None:
    test_servers()
    import fsspec
    from servers.gcs import GCSEmulator

    from hf_tensorizer.bench.servers import http_server

    size = args.mib << 20
    common = {"size": size, "concurrency": args.concurrency, "part": args.part_mib << 20}
    rows = []
    with tempfile.TemporaryDirectory() as tmp, http_server(Path(tmp), args.server) as (base, server):
        data = os.urandom(size)
        (Path(tmp) / "obj.bin").write_bytes(data)
        emulator = GCSEmulator()
        try:
            gcs = {"endpoint_url": emulator.endpoint, "token": "anon", "project": "bench"}
            fs = fsspec.filesystem("gs", **gcs)
            fs.mkdir("bench")
            fs.pipe_file("bench/obj.bin", data)
            cases = [
                (f"HTTP (ours) ← {args.server}", {"uri": f"{base}/obj.bin", "mode": "source"}),
                ("gs:// FsspecSource (cat_file) ← GCS emulator",
                 {"uri": "gs://bench/obj.bin", "mode": "source", "options": {"storage_options": gcs}}),
                ("gs:// file handles (readinto) ← GCS emulator",
                 {"uri": "gs://bench/obj.bin", "mode": "readinto", "options": {"storage_options": gcs}}),
                ("memory:// FsspecSource (cat_file)", {"uri": "memory://bench/obj.bin", "mode": "source"}),
                ("memory:// file handles (readinto)", {"uri": "memory://bench/obj.bin", "mode": "readinto"}),
            ]  # fmt: skip
            for name, spec in cases:
                seconds = measure({**common, **spec}, args.rounds)
                rows.append((name, seconds))
                print(f"{name:48s} {seconds:7.3f} s  {size / seconds / 1e9:6.2f} GB/s", flush=True)
        finally:
            emulator.stop()
    ref = rows[0][1]
    print(f"\n{args.mib} MiB object, concurrency {args.concurrency}, parts {args.part_mib} MiB, "
          f"median of {args.rounds} fresh processes; HTTP server: {server}")  # fmt: skip
    print("| path | seconds | GB/s | time ÷ HTTP |\n|---|---|---|---|")
    for name, seconds in rows:
        print(f"| {name} | {seconds:.3f} | {size / seconds / 1e9:.2f} | {seconds / ref:.1f}× |")


if __name__ == "__main__":  # one measurement in a fresh process: python -m hf_tensorizer.bench.fsspec --job SPEC
    _job = argparse.ArgumentParser()
    _job.add_argument("--job", required=True)
    job(json.loads(_job.parse_args().job))
