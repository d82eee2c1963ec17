"""``hf-tensorizer verify URI``: check every tensor against its digests; exit 1 naming the failures."""

from __future__ import annotations

import argparse
import time

from . import add_s3_arguments, describe, s3_options


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("verify", help="check a file's data against its digests", description=describe(__doc__))
    p.add_argument("uri", help="local path or URI of a .tensors file")
    p.add_argument("--readers", type=int, default=4, help="parallel readers")
    add_s3_arguments(p)
    from .crypto import add_key_arguments

    add_key_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    t = time.perf_counter()
    from ..engine.verify_file import verify_file
    from .crypto import key_from_args

    options = s3_options(args, args.uri)
    report = verify_file(args.uri, num_readers=args.readers, encryption=key_from_args(args), **options)
    dt = time.perf_counter() - t
    if report.ok:
        print(f"OK {report.uri}: {report.tensors} tensors, {report.bytes:,} bytes verified in {dt:.2f} s")
        return 0
    print(f"FAILED {report.uri}: {len(report.failed)} of {report.tensors} tensors do not match their digests:")
    for name in report.failed:
        print(f"  {name}")
    return 1
