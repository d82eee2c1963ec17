"""The object stores fsspec reaches, in the remote benchmark: Google Cloud Storage (``gcp-storage-emulator``, gcsfs)
and Azure Blob Storage (Azurite from npm, adlfs and the Azure SDK), each against our loader in fresh processes.

The same bf16 checkpoint as the S3 section is uploaded once per server; references are the store's own clients
(see ``remote_jobs._store_downloads``), ours is ``TensorDeserializer("gs://…" | "az://…", storage_options=…)``
with the default and each sweep configuration, interleaved over ``reps`` rounds, best kept.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .checkpoint import read_meta
from .remote_jobs import AZURE_METHODS, GCS_METHODS, downloads, time_loads
from .servers import azurite_server, gcs_server

__all__ = ["bench_store"]

Log = Callable[[str], None]
CONTAINER = "bench"


def bench_store(base: Path, kind: str, *, sweep: Sequence[str], reps: int, log: Log) -> dict[str, Any]:
    """``kind`` ``"gcs"`` or ``"azure"``: upload ``base/s3/model.tensors``, time the store's clients and ours."""
    # gcsfs probes each bucket's type over gRPC at first use (a 60 s timeout against the emulator, which has no
    # gRPC API); read at its import, here and in every child process (they inherit the environment)
    os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
    import fsspec

    d = base / "s3"
    meta = read_meta(d)
    assert meta is not None
    size = (d / "model.tensors").stat().st_size
    server = gcs_server() if kind == "gcs" else azurite_server()
    with server as where:
        if kind == "gcs":
            opts: dict[str, Any] = {"endpoint_url": where, "token": "anon", "project": "bench"}
            scheme, dl = "gs", "gcsdl"
        else:
            opts = {"connection_string": where}
            scheme, dl = "az", "azdl"
        fs = fsspec.filesystem(scheme, **opts)
        fs.mkdir(CONTAINER)
        fs.put_file(str(d / "model.tensors"), f"{CONTAINER}/model.tensors")
        path = f"{CONTAINER}/model.tensors"
        job = {"kind": "hft", "dir": str(d), "uri": f"{scheme}://{path}", "opts": {"storage_options": opts}}
        dlrows: dict[str, Any] = {}
        ours: dict[str, Any] = {}
        for _ in range(reps):  # interleaved: the store's clients, then ours, per round
            names = GCS_METHODS if kind == "gcs" else AZURE_METHODS  # each in a fresh process, as ours
            for name, row in downloads({"kind": dl, "path": path, "size": size, "storage_options": opts}, names,
                                       1).items():  # fmt: skip
                dlrows.setdefault(name, {"runs": []})["runs"] += row["runs"]
            for c, row in time_loads(job, sweep, 1).items():
                mine = ours.setdefault(c, {**row, "runs": []})
                mine["runs"] += row["runs"]
                mine["gbps"] = max(mine["gbps"], row["gbps"])
    rows = [{"reader": k, "gbps": size / min(r["runs"]) / 1e9, "runs": r["runs"], "kind": "ref"}
            for k, r in dlrows.items()]  # fmt: skip
    rows += [{"reader": f"ours ({c})", "config": c, "gbps": r["gbps"], "runs": r["runs"], "kind": "ours",
              "transfer": r.get("transfer")} for c, r in ours.items()]  # fmt: skip
    ref_row = max((r for r in rows if r["kind"] == "ref"), key=lambda r: r["gbps"])
    for row in rows:
        row["of_ref"] = round(row["gbps"] / ref_row["gbps"], 3)
        log(f"  {row['reader']:<48} {row['gbps']:.3f} GB/s  {row['of_ref']:.2f} × best client")
    return {"object_bytes": size, "tensor_bytes": meta["bytes"], "reps": reps, "ref": ref_row["reader"],
            "ref_gbps": ref_row["gbps"], "rows": rows}  # fmt: skip
