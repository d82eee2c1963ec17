"""``hf-tensorizer bench``: our loader against its peers on this machine, warm and cold (docs/benchmarks.md).

``hf-tensorizer bench dist``: distributed loads (tensor parallel, replicas) for N ranks from a bandwidth-capped
server.

``hf-tensorizer bench ttr``: time to ready, from interpreter start to a model's first forward pass, in fresh
processes: ``from_pretrained`` of a tensorized artifact, stock ``from_pretrained`` and the raw loader.

``hf-tensorizer bench scale``: how load time and memory grow with model size, from a local file and over HTTP.

``hf-tensorizer bench first``: interpreter start to the first tensor read, ours against safetensors.

``hf-tensorizer bench save``: write throughput of our serializer, ``save_pretrained(tensorized=True)`` and
``serialize --hf-model-id`` against safetensors, ``torch.save`` and upstream tensorizer, every file fsynced;
``--s3``: our S3 upload against boto3 ``upload_file`` of the same bytes, on a loopback moto server.

``hf-tensorizer bench artifact``: ``from_pretrained`` of remote artifacts whose cost is round trips, not bytes.

``hf-tensorizer bench fsspec``: read speed of fsspec stores (GCS emulator, ``memory://``) next to our HTTP transport.

``hf-tensorizer bench vllm``: vLLM's weight loading with our load format against its default (the vLLM venv).

``hf-tensorizer bench remote``: HTTP, S3 and fsspec stores against curl and boto3 on the same server
(docs/remote.md). ``hf-tensorizer bench crypto``: encryption and decryption throughput (docs/security.md).

Modes that start the loopback test servers need a source checkout.
"""

from __future__ import annotations

import argparse
import importlib

from . import describe


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    from ..bench import artifact, dist, first, fsspec, save, scale, ttr, vllm
    from ..bench.peers import loaders_legend
    from ..bench.runner import add_bench_arguments, bench_main

    p = sub.add_parser("bench", help="compare load speed with safetensors, transformers and other loaders",
                       description=describe(__doc__), epilog=loaders_legend(),
                       formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    add_bench_arguments(p)
    p.set_defaults(func=bench_main)
    modes = p.add_subparsers(dest="bench_mode", required=False,
                             metavar="{ttr,first,scale,save,dist,artifact,fsspec,vllm,remote,crypto}")  # fmt: skip
    for module, help_text in (
        (ttr, "time to ready: interpreter start to first forward, ours vs stock vs raw"),
        (first, "time to the first tensor in a fresh process, ours vs safetensors"),
        (scale, "how load time and memory grow with model size (local file and HTTP)"),
        (save, "write throughput: our serializer, save_pretrained and serialize against safetensors, torch.save"),
        (dist, "distributed loads: N ranks, tensor parallel and replicas, from a bandwidth-capped server"),
        (artifact, "from_pretrained of remote artifacts whose cost is round trips (HTTP with latency, S3)"),
        (fsspec, "read speed of fsspec stores (GCS emulator, memory://) next to our HTTP transport"),
        (vllm, "vLLM weight loading: --load-format hf_tensorizer against vLLM's safetensors loader"),
    ):
        name = module.__name__.rpartition(".")[2]  # each mode module has add_<name>_arguments and <name>_main
        mode = modes.add_parser(name, help=help_text, description=describe(module.__doc__),
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
        getattr(module, f"add_{name}_arguments")(mode)
        mode.set_defaults(func=getattr(module, f"{name}_main"))
    for name, help_text in (
        ("remote", "remote reads: HTTP, S3 and fsspec stores against curl and boto3 on the same server"),
        ("crypto", "encryption and decryption throughput"),
    ):  # modes with their own argument parser: every argument after the mode is theirs (--help included)
        # no option of its own (prefix_chars that no argument starts with): "--only http" reaches it verbatim
        mode = modes.add_parser(name, help=help_text, add_help=False, prefix_chars="\0")
        mode.add_argument("argv", nargs="*")
        mode.set_defaults(func=lambda args, name=name: _run_own_parser(name, args.argv))


def _run_own_parser(name: str, argv: list[str]) -> int:
    """Run ``hf_tensorizer.bench.<name>.main(argv)``, imported only now (it imports torch; ``--help`` must not)."""
    module = importlib.import_module(f"hf_tensorizer.bench.{name}")
    return int(module.main(argv) or 0)
