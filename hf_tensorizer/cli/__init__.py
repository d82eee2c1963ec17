"""``hf-tensorizer``: serialize, inspect, verify, bench (and more, one module per concern).

Each subcommand module exposes ``register(subparsers)``, adding its parser with ``func`` set to a
callable taking the parsed namespace and returning an exit code.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from ..errors import TensorizerError

# modules under hf_tensorizer.cli that register subcommands; optional ones may be missing
_COMMANDS = ("serialize", "inspect", "verify", "bench", "demo", "crypto")


def describe(doc: str | None) -> str:
    """A module docstring as ``--help`` text: reStructuredText literals shown plainly."""
    return (doc or "").replace("``", "")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-tensorizer", description="Fast, safe, streamed PyTorch model loading.")
    from .. import __version__

    parser.add_argument("--version", action="version", version=f"hf-tensorizer {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in _COMMANDS:
        try:
            module = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"{__name__}.{name}":
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except TensorizerError as exc:
        print(f"hf-tensorizer: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
