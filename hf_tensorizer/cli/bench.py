"""``hf-tensorizer bench``: our loader against its peers on this machine, warm and cold (docs/benchmarks.md).

``hf-tensorizer bench dist``: distributed loads (tensor parallel, replicas) for N ranks from a bandwidth-capped
server.

``hf-tensorizer bench ttr``: time to ready, from interpreter start to a model's first forward pass, in fresh
processes: ``from_pretrained`` of a tensorized artifact, stock ``from_pretrained`` and the raw loader.

``hf-tensorizer bench scale``: how load time and memory grow with model size, from a local file and over HTTP.
"""

from __future__ import annotations

import argparse

from . import describe


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    from ..bench import dist, scale, ttr
    from ..bench.peers import loaders_legend
    from ..bench.runner import add_bench_arguments, bench_main

    p = sub.add_parser("bench", help="compare load speed with safetensors, transformers and other loaders",
                       description=describe(__doc__), epilog=loaders_legend(),
                       formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    add_bench_arguments(p)
    p.set_defaults(func=bench_main)
    modes = p.add_subparsers(dest="bench_mode", metavar="{ttr,scale,dist}", required=False)
    for module, help_text in (
        (ttr, "time to ready: interpreter start to first forward, ours vs stock vs raw"),
        (scale, "how load time and memory grow with model size (local file and HTTP)"),
        (dist, "distributed loads: N ranks, tensor parallel and replicas, from a bandwidth-capped server"),
    ):
        name = module.__name__.rpartition(".")[2]  # each mode module has add_<name>_arguments and <name>_main
        mode = modes.add_parser(name, help=help_text, description=describe(module.__doc__),
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
        getattr(module, f"add_{name}_arguments")(mode)
        mode.set_defaults(func=getattr(module, f"{name}_main"))
