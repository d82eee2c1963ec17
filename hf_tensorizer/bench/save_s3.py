"""``hf-tensorizer bench save --s3``: ours (``TensorSerializer("s3://…")``, a streaming multipart upload) against
boto3 ``upload_file`` of the same bytes, to moto's ``ThreadedMotoServer`` on 127.0.0.1 (its own process), each
writer in a fresh process with its client made inside the timer. Run through ``bench/save.py``."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .proc import MARK, Log, collect, error_line, log, popen
from .save_report import load_state_dict, run_rounds, summarize, timed_write

MODULE = "hf_tensorizer.bench.save_s3"


S3_BUCKET = "bench-save"
S3_KEY = "model.tensors"


def _s3_ours(sd: Any, endpoint: str, src: Path) -> None:
    from hf_tensorizer import TensorSerializer

    with TensorSerializer(f"s3://{S3_BUCKET}/ours/{S3_KEY}", endpoint_url=endpoint) as s:
        s.write_state_dict(sd)


def _s3_boto3(sd: Any, endpoint: str, src: Path) -> None:
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint)  # inside the timer, as ours makes its own
    client.upload_file(str(src), S3_BUCKET, f"boto3/{S3_KEY}")  # s3transfer: 8 MiB parts, 10 threads
    client.close()


# name -> (label, needs a state dict, call, ours)
S3_WRITERS: dict[str, tuple[str, bool, Callable[[Any, str, Path], None], bool]] = {
    "hft-s3": ("ours TensorSerializer to s3:// (multipart, streamed)", True, _s3_ours, True),
    "boto3": ("boto3 upload_file of the same bytes", False, _s3_boto3, False),
}
OURS = tuple(n for n, v in S3_WRITERS.items() if v[3])
BASELINE = {"hft-s3": ("boto3",)}


def save_one_s3(d: str | Path, name: str, endpoint: str) -> dict[str, Any]:
    """Time one S3 write by ``name`` (a key of ``S3_WRITERS``) in this process, against ``endpoint``."""
    import boto3  # noqa: F401 - imported before the timer by both writers

    d = Path(d)
    _, needs_sd, fn, _ = S3_WRITERS[name]
    src = d / "s3-src.tensors"
    sd: Any = None
    nbytes = src.stat().st_size
    if needs_sd:
        # before the timer: what our writer and an s3:// sink import on first use (the engine package imports
        # lazily; isal is the CRC32 that hashing picks on first use), as boto3 is imported for both
        import isal.isal_zlib  # noqa: F401

        import hf_tensorizer.engine.writer
        import hf_tensorizer.sources.s3_sink  # noqa: F401

        sd = load_state_dict(d)
    row = timed_write(name, nbytes, lambda: fn(sd, endpoint, src))
    del row["result"]
    return row


def run_s3_save_bench(
    d: str | Path,
    *,
    layers: int,
    hidden: int,
    vocab: int,
    runs: int,
    timeout: float = 300.0,
    settle: float = 2.0,
    log: Log = log,
) -> dict[str, Any]:
    """``runs`` rounds of every S3 writer (fresh processes, order rotated) against one moto server; each object is
    checked (its size) and deleted after its run, so the server holds one at a time. Returns rows and runs."""
    import boto3

    from .checkpoint import prepare
    from .servers import AWS_ENV, moto_server

    d = Path(d)
    meta = prepare(d, layers, hidden, vocab, "cpu", ["st"], log=log)
    src = d / "s3-src.tensors"
    if not src.exists():  # the bytes boto3 uploads: our own file of the same tensors (in a child: torch)
        res, out = collect(popen(["s3-src", str(d)], module=MODULE), timeout)
        if res is None:
            raise RuntimeError(f"writing the S3 source file failed: {error_line(out)}")
    with moto_server() as endpoint:
        creds = {"aws_access_key_id": AWS_ENV["AWS_ACCESS_KEY_ID"],
                 "aws_secret_access_key": AWS_ENV["AWS_SECRET_ACCESS_KEY"], "region_name": "us-east-1"}  # fmt: skip
        client = boto3.client("s3", endpoint_url=endpoint, **creds)
        client.create_bucket(Bucket=S3_BUCKET)

        def check(name: str, res: dict[str, Any]) -> None:  # the object's size, then the server holds no copy
            key = f"{'ours' if name == 'hft-s3' else 'boto3'}/{S3_KEY}"
            size = client.head_object(Bucket=S3_BUCKET, Key=key)["ContentLength"]
            client.delete_object(Bucket=S3_BUCKET, Key=key)
            res.update(file_bytes=size, ok=size == res["bytes"])

        def start(name: str) -> Any:
            return popen(["one-s3", str(d), name, endpoint], module=MODULE, env=AWS_ENV)

        runs_by, errors, loads = run_rounds(list(S3_WRITERS), runs, settle, start, timeout, log, check)
        client.close()
    return {
        "bytes": meta["bytes"],
        "tensors": meta["tensors"],
        "shape": meta["shape"],
        "s3": True,
        "runs": runs_by,
        "errors": errors,
        "loadavg": loads,
        "rows": summarize(runs_by, {n: (v[0], v[3]) for n, v in S3_WRITERS.items()}, BASELINE),
    }


def write_source(d: Path) -> dict[str, Any]:
    """Our file of the checkpoint, kept as ``d/s3-src.tensors`` for boto3 to upload."""
    from hf_tensorizer import TensorSerializer

    src = d / "s3-src.tensors"
    with TensorSerializer(str(src)) as s:
        s.write_state_dict(load_state_dict(d))
    return {"bytes": src.stat().st_size}


def main(argv: list[str] | None = None) -> int:
    """The children of ``run_s3_save_bench``: ``one-s3 DIR WRITER ENDPOINT`` and ``s3-src DIR``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "s3-src":
        res = write_source(Path(argv[1]))
    elif argv and argv[0] == "one-s3":
        res = save_one_s3(argv[1], argv[2], argv[3])
    else:
        print("usage: python -m hf_tensorizer.bench.save_s3 {one-s3 DIR WRITER ENDPOINT | s3-src DIR}")
        return 2
    print(MARK + json.dumps(res), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
