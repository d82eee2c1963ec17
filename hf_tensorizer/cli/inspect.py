"""``hf-tensorizer inspect URI``: print the index (one small read, no tensor data).

URI may also be a local artifact folder (or a stock model folder): then its manifest, its files and a summary of
the index of each weight file (``model.tensors``, or the safetensors shards) are shown.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from . import add_s3_arguments, describe, s3_options


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "inspect",
        help="print the index of a .tensors file, or an artifact folder's contents",
        description=describe(__doc__),
    )
    p.add_argument("uri", help="local path or URI of a .tensors file, or a local artifact folder")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--limit", type=int, default=0, help="show at most N tensors (0: all)")
    add_s3_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..engine.header import read_index
    from ..format.dtypes import dtype_name
    from ..sources import open_source
    from ..sources.uri import local_path, scheme_of

    options = s3_options(args, args.uri)
    if scheme_of(args.uri) == "file" and os.path.isdir(local_path(args.uri)):
        return inspect_folder(local_path(args.uri), as_json=args.json)
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


def _summary(uri: str) -> dict[str, Any]:
    from ..engine.header import read_index
    from ..format.sniff import sniff
    from ..sources import open_source

    with open_source(uri) as src:
        index = read_index(src)
        fmt = sniff(src.read(0, min(9, src.size)))
    return {
        "file": uri, "format": fmt, "tensors": len(index.tensors), "data_bytes": index.data_bytes,
        "file_size": index.file_size, "encrypted": index.encrypted, "digest": index.digest,
    }  # fmt: skip


def inspect_folder(folder: str, *, as_json: bool = False) -> int:
    """Print an artifact folder: its manifest, its files, and the index summary of each weight file.

    Raises:
        FormatError: a malformed manifest, shard index or weight file.
    """
    from ..integrations.artifact.cache import read_manifest
    from ..integrations.loading.weights import weights_uris

    manifest = read_manifest(folder)
    files = sorted(
        os.path.relpath(os.path.join(d, n), folder).replace(os.sep, "/")
        for d, _, names in os.walk(folder)
        for n in names
    )
    weights = [_summary(u) for u in weights_uris(folder)]
    if as_json:
        print(json.dumps({"folder": folder, "manifest": manifest, "files": files, "weights": weights}, indent=1))
        return 0
    kind = f"artifact ({manifest.get('library', '?')})" if manifest else "folder without an hf_tensorizer manifest"
    print(f"{folder}: {kind}, {len(files)} files")
    for name in files:
        print(f"  {name}  {os.path.getsize(os.path.join(folder, name)):,} B")
    if not weights:
        print("  no weights (model.tensors or safetensors) found")
    for w in weights:
        enc = ", encrypted" if w["encrypted"] else ""
        print(f"weights {os.path.relpath(w['file'], folder)}: {w['format']}, {w['tensors']} tensors, "
              f"{w['data_bytes']:,} data bytes, file {w['file_size']:,} B, digest {w['digest']}{enc}")  # fmt: skip
    return 0
