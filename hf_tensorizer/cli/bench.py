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
    t = modes.add_parser(
        "ttr",
        help="time to ready: interpreter start to first forward, ours vs stock vs raw",
        description=describe(ttr.__doc__),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ttr.add_ttr_arguments(t)
    t.set_defaults(func=ttr.ttr_main)
    s = modes.add_parser(
        "scale",
        help="how load time and memory grow with model size (local file and HTTP)",
        description=describe(scale.__doc__),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    scale.add_scale_arguments(s)
    s.set_defaults(func=scale.scale_main)
    d = modes.add_parser(
        "dist",
        help="distributed loads: N ranks, tensor parallel and replicas, from a bandwidth-capped server",
        description=describe(dist.__doc__),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    dist.add_dist_arguments(d)
    d.set_defaults(func=dist.dist_main)
