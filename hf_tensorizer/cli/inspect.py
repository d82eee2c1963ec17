"""``hf-tensorizer inspect URI``: print the index (one small read, no tensor data).

URI may also be an artifact root, a local folder (or a stock model folder) or a remote prefix with an
``hf_tensorizer.json`` manifest (``s3://bucket/prefix``): then its manifest, its files and a summary of the index of
each weight file (``model.tensors``, or the safetensors shards) are shown.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from typing import Any, TypeVar

from ..errors import FormatError, SourceError
from . import add_s3_arguments, describe, s3_options

T = TypeVar("T")


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "inspect",
        help="print the index of a .tensors file, or an artifact folder's contents",
        description=describe(__doc__),
    )
    p.add_argument("uri", help="local path or URI of a .tensors file, or an artifact root (folder or remote prefix)")
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
    try:
        src = open_source(args.uri, **options)
    except SourceError as exc:  # no object there: a remote artifact root is a prefix, not an object
        if scheme_of(args.uri) == "file":
            raise
        if not _is_artifact_root(args.uri, **options):
            raise SourceError(f"{exc} (nor is it an artifact root: no hf_tensorizer.json under it)") from None
        return inspect_remote_root(args.uri.rstrip("/"), as_json=args.json, **options)
    with src:
        index = _named(src.uri, lambda: read_index(src))
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


def _named(uri: str, read: Callable[[], T]) -> T:
    """``read()``, with ``uri`` leading the message of a format error that does not name it ("bad magic")."""
    try:
        return read()
    except FormatError as exc:
        if uri in str(exc):
            raise
        raise FormatError(f"{uri}: {exc}") from None


def _is_artifact_root(uri: str, **options: Any) -> bool:
    from ..integrations.artifact.cache import read_manifest

    try:
        return read_manifest(uri.rstrip("/"), **options) is not None
    except SourceError:
        return False


def _summary(uri: str, **options: Any) -> dict[str, Any]:
    from ..engine.header import read_index
    from ..format.sniff import sniff
    from ..sources import open_source

    with open_source(uri, **options) as src:
        index = _named(src.uri, lambda: read_index(src))
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
        _print_weights(os.path.relpath(w["file"], folder), w)
    return 0


def inspect_remote_root(root: str, *, as_json: bool = False, **options: Any) -> int:
    """Print a remote artifact (a prefix holding ``hf_tensorizer.json``): its manifest, the files it lists, and
    the index summary of each weight file (one small read each).

    Raises:
        SourceError: the manifest or a weight file cannot be read.
        FormatError: a malformed manifest or weight file.
    """
    from ..integrations.artifact.cache import read_manifest
    from ..sources.uri import join, redact

    manifest = read_manifest(root, **options) or {}
    files = list(manifest.get("files", []))
    weights = [{**_summary(join(root, f), **options), "file": f} for f in files if f.endswith(".tensors")]
    shown = redact(root)
    if as_json:
        print(json.dumps({"root": shown, "manifest": manifest, "files": files, "weights": weights}, indent=1))
        return 0
    print(f"{shown}: artifact ({manifest.get('library', '?')}), {len(files)} files (listed by its manifest)")
    for name in files:
        print(f"  {name}")
    if not weights:
        print("  no weights (model.tensors) listed")
    for w in weights:
        _print_weights(w["file"], w)
    return 0


def _print_weights(name: str, w: dict[str, Any]) -> None:
    enc = ", encrypted" if w["encrypted"] else ""
    print(f"weights {name}: {w['format']}, {w['tensors']} tensors, {w['data_bytes']:,} data bytes, "
          f"file {w['file_size']:,} B, digest {w['digest']}{enc}")  # fmt: skip
