"""``hf-tensorizer keygen`` / ``encrypt`` / ``decrypt``: keys and encryption of existing files.

Keys come from a key file (``--key-file``), an environment variable holding a key (``--key-env``,
default ``HF_TENSORIZER_KEY``) or a passphrase (``--passphrase-env VAR`` or an interactive prompt with
``--passphrase``). Keys are never accepted as command-line values: those end up in shell history and
``ps`` output.
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys
import time
from typing import Any

from ..constants import KEY_ENV
from ..errors import MissingKeyError, UsageError
from . import add_s3_arguments, describe, s3_options


def add_key_arguments(p: argparse.ArgumentParser, *, prefix: str = "", writing: bool = False) -> None:
    """Add the key options (``--{prefix}key-file`` etc.) to ``p``; read them back with :func:`key_from_args`."""
    dest = prefix.replace("-", "_")
    g = p.add_argument_group(f"{prefix or ''}key" + (" (for the new file)" if writing else ""))
    g.add_argument(
        f"--{prefix}key-file", dest=f"{dest}key_file", metavar="PATH", help="key file (hf-tensorizer keygen)"
    )
    g.add_argument(
        f"--{prefix}key-env", dest=f"{dest}key_env", metavar="VAR", help=f"env var holding a key ({KEY_ENV})"
    )
    g.add_argument(f"--{prefix}passphrase-env", dest=f"{dest}passphrase_env", metavar="VAR",
                   help="env var holding a passphrase (Argon2id)")  # fmt: skip
    g.add_argument(f"--{prefix}passphrase", dest=f"{dest}passphrase", action="store_true",
                   help="prompt for a passphrase")  # fmt: skip
    if writing:
        g.add_argument("--opslimit", type=int, default=None, help="Argon2id passes (default 3)")
        g.add_argument("--memlimit", type=int, default=None, help="Argon2id memory in bytes (default 256 MiB)")


def key_from_args(args: argparse.Namespace, *, prefix: str = "", writing: bool = False) -> Any:
    """The ``EncryptionKey``/``Passphrase`` the options name, or ``None`` when none was given.

    Raises:
        UsageError: more than one key option.
    """
    from ..crypto import EncryptionKey, Passphrase

    dest = prefix.replace("-", "_")
    kf, ke = getattr(args, f"{dest}key_file"), getattr(args, f"{dest}key_env")
    pe, pp = getattr(args, f"{dest}passphrase_env"), getattr(args, f"{dest}passphrase")
    if sum(x is not None and x is not False for x in (kf, ke, pe, pp)) > 1:
        raise UsageError("give one of --key-file, --key-env, --passphrase-env, --passphrase")
    cost = {"opslimit": getattr(args, "opslimit", None), "memlimit": getattr(args, "memlimit", None)}
    if kf:
        return EncryptionKey.from_file(kf)
    if ke:
        return EncryptionKey.from_env(ke)
    if pe:
        value = os.environ.get(pe, "")
        if not value:
            raise MissingKeyError(f"environment variable {pe} is not set")
        return Passphrase(value, **cost) if writing else Passphrase(value)
    if pp:
        pw = getpass.getpass("passphrase: ")
        if writing and getpass.getpass("again: ") != pw:
            raise UsageError("the passphrases differ")
        return Passphrase(pw, **cost) if writing else Passphrase(pw)
    return None


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("keygen", help="create a random encryption key file", description=describe(__doc__))
    p.add_argument("path", nargs="?", default="-", help="key file to create (mode 0600); '-' prints the key")
    p.add_argument("--force", action="store_true", help="overwrite an existing key file")
    p.set_defaults(func=_keygen)

    p = sub.add_parser("encrypt", help="encrypt (or re-key) a .tensors file", description=describe(__doc__))
    p.add_argument("src", help="plain (or encrypted, with --from-*) .tensors path or URI")
    p.add_argument("dest", help="new encrypted .tensors path or URI")
    p.add_argument(
        "--block-size",
        type=int,
        default=None,
        help="block size of DEST in bytes (default: 4 MiB for a plain source, the source's when re-keying)",
    )
    add_key_arguments(p, writing=True)
    add_key_arguments(p, prefix="from-")
    add_s3_arguments(p)
    p.set_defaults(func=_encrypt)

    p = sub.add_parser("decrypt", help="decrypt a .tensors file to a plain one", description=describe(__doc__))
    p.add_argument("src", help="encrypted .tensors path or URI")
    p.add_argument("dest", help="new plain .tensors path or URI")
    add_key_arguments(p)
    add_s3_arguments(p)
    p.set_defaults(func=_decrypt)


def _keygen(args: argparse.Namespace) -> int:
    from ..crypto import EncryptionKey

    key = EncryptionKey.generate()
    if args.path == "-":
        print(key.to_text())
        return 0
    key.save(args.path, overwrite=args.force)
    print(f"wrote a new key to {args.path} (mode 0600); back it up: files encrypted with it are lost without it",
          file=sys.stderr)  # fmt: skip
    return 0


def _encrypt(args: argparse.Namespace) -> int:

    key = key_from_args(args, writing=True)
    if key is None:
        raise UsageError("encrypt needs a key: --key-file, --key-env, --passphrase-env or --passphrase")
    return _run(args, read_key=key_from_args(args, prefix="from-"), write_key=key, block_size=args.block_size)


def _decrypt(args: argparse.Namespace) -> int:
    key = key_from_args(args)
    if key is None and not os.environ.get(KEY_ENV):
        raise UsageError(f"decrypt needs a key: --key-file, --key-env, --passphrase-env, --passphrase or {KEY_ENV}")
    return _run(args, read_key=key, write_key=None)


def _run(args: argparse.Namespace, **kwargs: Any) -> int:
    from ..engine.reencrypt import convert

    t = time.perf_counter()
    kwargs.update(s3_options(args, args.src))  # for whichever side is on S3
    if args.dest.startswith("s3://"):
        kwargs["sink_options"] = s3_options(args, args.dest)
    index = convert(args.src, args.dest, **kwargs)
    what = "encrypted" if index.encrypted else "decrypted"
    print(f"{what} {args.src} -> {args.dest}: {len(index.tensors)} tensors, {index.file_size:,} bytes "
          f"in {time.perf_counter() - t:.2f} s")  # fmt: skip
    return 0
