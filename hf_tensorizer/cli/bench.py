"""``hf-tensorizer bench``: our loader against its peers on this machine, warm and cold (docs/benchmarks.md)."""

from __future__ import annotations

import argparse

from . import describe


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    from ..bench.runner import add_bench_arguments, bench_main

    p = sub.add_parser("bench", help="compare load speed with safetensors, transformers and other loaders",
                       description=describe(__doc__))  # fmt: skip
    add_bench_arguments(p)
    p.set_defaults(func=bench_main)
