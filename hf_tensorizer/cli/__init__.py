"""``hf-tensorizer``: serialize, inspect, verify, bench (and more, one module per concern).

Each subcommand module exposes ``register(subparsers)``, adding its parser with ``func`` set to a
callable taking the parsed namespace and returning an exit code.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from ..constants import KEY_ENV
from ..errors import MissingKeyError, TensorizerError

# modules under hf_tensorizer.cli that register subcommands; optional ones may be missing
_COMMANDS = ("serialize", "inspect", "verify", "bench", "demo", "crypto")


def add_s3_arguments(p: argparse.ArgumentParser) -> None:
    """``--endpoint-url`` and ``--anonymous``: the S3 transport options a command line needs."""
    p.add_argument("--endpoint-url", default=None, help="S3-compatible endpoint for s3:// URIs")
    p.add_argument("--anonymous", action="store_true", help="unsigned requests: a public s3:// bucket")


def s3_options(args: argparse.Namespace, uri: str) -> dict[str, object]:
    """The transport options :func:`add_s3_arguments` gave, for ``uri`` when it is an ``s3://`` URI."""
    if not uri.startswith("s3://"):
        return {}
    options: dict[str, object] = {"endpoint_url": args.endpoint_url} if args.endpoint_url else {}
    if args.anonymous:
        options["anonymous"] = True
    return options


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
    """Entry point of the console script: every failure is one ``hf-tensorizer: error: ...`` line on stderr.

    Returns:
        0 on success, 1 for an unexpected error, 2 for an hf_tensorizer error, 130 after Ctrl-C, 143 after
        SIGTERM (both interrupt a write cleanly: nothing partial is left behind), 141 when stdout's reader went
        away (``| head``), without a message.
    """
    from .signals import Terminated, sigterm_as_interrupt

    args = build_parser().parse_args(argv)
    try:
        with sigterm_as_interrupt():
            return int(args.func(args) or 0)
    except MissingKeyError as exc:  # the library's advice names Python's encryption= argument
        prefix = "from-" if args.command == "encrypt" else ""
        how = f"give --{prefix}key-file, --{prefix}key-env, --{prefix}passphrase-env or --{prefix}passphrase"
        return _fail(exc.advise(how + ("" if prefix else f" (or set {KEY_ENV})")), 2)
    except TensorizerError as exc:
        return _fail(exc, 2)
    except KeyboardInterrupt as exc:
        signal_name = "SIGTERM" if isinstance(exc, Terminated) else "Ctrl-C"
        print(f"hf-tensorizer: error: interrupted ({signal_name}); partial output removed", file=sys.stderr)
        return 143 if isinstance(exc, Terminated) else 130
    except BrokenPipeError as exc:
        if _stdout_closed():  # `hf-tensorizer inspect f | head`: the reader has what it wanted; stop quietly
            return 141  # as a process killed by SIGPIPE (128 + 13), what `yes | head` gives
        return _fail(f"{type(exc).__name__}: {exc}", 1)
    except Exception as exc:  # a dependency's error (transformers, torch, boto3): one line, not a traceback
        return _fail(f"{type(exc).__name__}: {exc}", 1)


def _stdout_closed() -> bool:
    """Whether stdout's reader has gone (a pipe's write end then polls as an error); if so, stdout is pointed at
    /dev/null so that the interpreter's final flush stays quiet too."""
    import select

    try:
        fd = sys.stdout.fileno()
        poller = select.poll()
        poller.register(fd, select.POLLOUT)
        if not any(event & select.POLLERR for _, event in poller.poll(0)):
            return False
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, fd)
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # no descriptor (a replaced stdout), no poll (Windows)
        return False
    return True


def _fail(message: object, code: int) -> int:
    text = " ".join(str(message).split()) or type(message).__name__  # one line, whatever the message holds
    print(f"hf-tensorizer: error: {text}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
