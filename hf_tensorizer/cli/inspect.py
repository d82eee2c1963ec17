"""``hf-tensorizer inspect URI``: print the index (one small read, no tensor data)."""

from __future__ import annotations

import argparse
import json

from . import describe


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("inspect", help="print the index of a .tensors file", description=describe(__doc__))
    p.add_argument("uri", help="local path or URI of a .tensors file")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--limit", type=int, default=0, help="show at most N tensors (0: all)")
    p.add_argument("--endpoint-url", default=None, help="S3-compatible endpoint for s3:// URIs")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..engine.header import read_index
    from ..format.dtypes import dtype_name
    from ..sources import open_source

    options = {"endpoint_url": args.endpoint_url} if args.endpoint_url else {}
    with open_source(args.uri, **options) as src:
        index = read_index(src)
        uri = src.uri
    entries = list(index.tensors.values())
    if args.limit:
        entries = entries[: args.limit]
    if args.json:
        doc = {
            "uri": uri, "file_size": index.file_size, "data_offset": index.data_offset,
            "alignment": index.alignment, "block_size": index.block_size, "digest": index.digest,
            "encrypted": index.encrypted, "metadata": index.metadata, "tensors": [e.to_json() for e in entries],
        }  # fmt: skip
        print(json.dumps(doc, indent=1))
        return 0
    print(f"{uri}: {len(index.tensors)} tensors, {index.data_bytes:,} data bytes, file {index.file_size:,} bytes")
    enc = ", encrypted" if index.encrypted else ""
    print(f"  data at {index.data_offset}, alignment {index.alignment}, {index.digest} per {index.block_size:,} B{enc}")
    for k, v in index.metadata.items():
        print(f"  metadata {k} = {v}")
    width = max((len(e.name) for e in entries), default=4)
    for e in entries:
        where = f"-> {e.alias}" if e.alias else f"@{e.offset} +{e.length}"
        print(f"  {e.name:<{width}}  {dtype_name(e.dtype):<10} {list(e.shape)!s:<20} {e.kind.value:<9} {where}")
    return 0
