"""``hf-tensorizer serialize``: weights to the tensorized format.

Two forms; in both the destination is given as the last positional argument or as ``--dest``:

- ``serialize SRC DEST``: a safetensors / ``.bin`` state dict or a directory of shards to one
  ``.tensors`` file (local path or ``s3://`` / ``hf://`` URI). A SRC that is already an hf_tensorizer file (local
  or a URI) is checked and copied byte for byte: that is how an existing ``.tensors`` file is uploaded. With
  ``--dtype``, ``--encrypt``, ``--digest``, ``--block-size`` or ``--metadata`` it is rewritten instead.
- ``serialize --hf-model-id ID --dest ROOT``: a transformers model or diffusers pipeline (a Hub id or a
  local directory) to a ``from_pretrained``-able artifact: ``model.tensors`` plus config, generation
  config and tokenizer / processor / scheduler files, under a local folder, ``s3://bucket/prefix`` or
  ``hf://org/repo``. ``--dest-bucket BUCKET`` (the Kubernetes Job's form) is ``--dest s3://BUCKET/ID``.

A local DEST's folder must exist (a typo must not create a tree of folders); ``--parents`` creates it.

Interrupted (Ctrl-C, or SIGTERM as a Kubernetes Job gets) a write leaves nothing behind: the local temporary
``DEST.<random>.tmp`` is removed, an S3 multipart upload aborted. SIGKILL cannot be caught: a local stray is
removed by the next successful write of DEST; for S3 add a bucket lifecycle rule
(AbortIncompleteMultipartUpload, e.g. after 1 day) so an upload cut short that way stops being billed.
"""

from __future__ import annotations

import argparse
import glob
import os
import time
from typing import TYPE_CHECKING, Any

from ..errors import FormatError, SourceError, UsageError
from . import describe

if TYPE_CHECKING:
    import torch


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    from .crypto import add_key_arguments

    p = sub.add_parser("serialize", help="convert weights or a whole HF model to the tensorized format",
                       description=describe(__doc__), formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("paths", nargs="*", metavar="SRC DEST",
                   help="a .safetensors or .bin/.pt file, or a directory of shards; then the output .tensors path or "
                        "URI (with --hf-model-id: only DEST)")  # fmt: skip
    p.add_argument("--hf-model-id", help="Hub model id or local directory of a transformers model / diffusers pipeline")
    p.add_argument(
        "--dest",
        help="the destination, instead of the positional DEST: an output .tensors path or URI, "
        "or for --hf-model-id an artifact root: a folder, s3://bucket/prefix or hf://org/repo",
    )
    p.add_argument("--dest-bucket", metavar="BUCKET",
                   help="with --hf-model-id: write to s3://BUCKET/ID (a local directory: its folder name)")  # fmt: skip
    p.add_argument("--revision", default=None, help="Hub revision of --hf-model-id")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="cast floating tensors first")
    p.add_argument("--block-size", type=int, default=None, help="digest (and encryption) block size in bytes")
    p.add_argument("--digest", choices=["crc32", "sha256", "none"], default=None, help="per-block digest (crc32)")
    p.add_argument("--metadata", action="append", default=[], metavar="KEY=VALUE", help="user metadata (repeat)")
    p.add_argument("--endpoint-url", default=None, help="S3-compatible endpoint for s3:// destinations")
    p.add_argument("--parents", action="store_true", help="create a local DEST's missing parent folders")
    p.add_argument("--encrypt", action="store_true", help="encrypt the tensor data (give a key option below)")
    add_key_arguments(p, writing=True)
    p.set_defaults(func=run)


def read_state_dict(src: str) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors/.bin file or of every shard in a directory (no pickle code runs).

    Raises:
        SourceError: ``src`` does not exist or cannot be read.
        FormatError: the file is not a state dict of its format (a pickle that would run code, a damaged file).
        UsageError: ``src`` is of no format known here.
    """
    if not os.path.exists(src):
        raise SourceError(f"{src}: no such file or directory")
    if os.path.isdir(src):
        files = sorted(glob.glob(os.path.join(src, "*.safetensors"))) or sorted(
            glob.glob(os.path.join(src, "*.bin")) + glob.glob(os.path.join(src, "*.pt"))
        )
        if not files:
            raise UsageError(f"{src} holds no *.safetensors or *.bin weights")
        out: dict[str, torch.Tensor] = {}
        for f in files:
            out.update(read_state_dict(f))
        return out
    if src.endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(src)
        except (SafetensorError, OSError) as exc:
            raise FormatError(f"{src} is not a readable safetensors file: {exc}") from None
    if src.endswith((".bin", ".pt", ".pth")):
        return _torch_load(src)
    if src.endswith(".tensors"):  # ours (rewritten: cast, re-digested...) or upstream tensorizer's
        from ..engine.reader import load_state_dict

        return load_state_dict(src)
    raise UsageError(f"cannot tell the format of {src}: expected .safetensors, .bin/.pt, .tensors or a directory")


def _torch_load(src: str) -> dict[str, torch.Tensor]:
    import pickle
    import zipfile

    import torch

    try:
        # only the zip format can be mapped; a legacy (pre-1.6) file is read whole
        sd = torch.load(src, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(src))
    except pickle.UnpicklingError as exc:  # weights_only refused a global: the pickle would run code
        found = [ln.strip() for ln in str(exc).splitlines() if "GLOBAL" in ln or "Unsupported" in ln]
        raise FormatError(f"{src} is not a plain state dict, refused without running it ("
                          f"{found[0] if found else 'it calls code'}); convert it with code you trust"
                          ) from None  # fmt: skip
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise FormatError(f"{src} is not a readable torch file: {str(exc).splitlines()[0]}") from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise UsageError(f"{src} does not hold a state dict (name -> tensor)")
    return sd


def read_metadata(src: str) -> dict[str, str]:
    """The ``__metadata__`` string maps of a safetensors file or of every shard in a directory, merged (what a
    quantizer needs beyond the tensors, such as torchao's JSON description of its tensor subclasses)."""
    files = sorted(glob.glob(os.path.join(src, "*.safetensors"))) if os.path.isdir(src) else [src]
    out: dict[str, str] = {}
    for f in files:
        if f.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(f, framework="pt") as st:
                out.update(st.metadata() or {})
    return out


def _serializer_options(args: argparse.Namespace) -> dict[str, Any]:
    from .crypto import key_from_args

    meta = {}
    for kv in args.metadata:
        key, sep, value = kv.partition("=")
        if not sep:
            raise UsageError(f"--metadata takes KEY=VALUE, got {kv!r}")
        meta[key] = value
    opts: dict[str, Any] = {"metadata": meta, "digest": args.digest or "crc32"}
    if args.block_size:
        opts["block_size"] = args.block_size
    key = key_from_args(args, writing=True)
    if args.encrypt and key is None:
        raise UsageError("--encrypt needs a key: --key-file, --key-env, --passphrase-env or --passphrase")
    if key is not None and not args.encrypt:
        raise UsageError("a key was given without --encrypt")
    if key is not None:
        opts["encryption"] = key
    if args.endpoint_url:
        opts["endpoint_url"] = args.endpoint_url
    return opts


def run(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    src, dest = _src_and_dest(args)
    _check_parent(dest, args.parents)
    opts = _serializer_options(args)
    if args.hf_model_id:
        written = serialize_model(args.hf_model_id, dest, revision=args.revision, dtype=args.dtype, **opts)
        print(f"wrote {written} from {args.hf_model_id} in {time.perf_counter() - t0:.2f} s")
        return 0
    import torch

    from ..engine.writer import TensorSerializer

    rewrite = args.dtype or args.encrypt or args.digest or args.block_size or args.metadata
    if not rewrite and _is_ours(src):
        size = copy_file(src, dest, **({"endpoint_url": args.endpoint_url} if args.endpoint_url else {}))
        print(f"copied {src} to {dest}: {size:,} bytes in {time.perf_counter() - t0:.2f} s")
        return 0
    sd = read_state_dict(src)
    opts["metadata"] = {**read_metadata(src), **opts["metadata"]}  # e.g. torchao's description of its tensors
    if args.dtype:
        dtype = getattr(torch, args.dtype)
        sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    s = TensorSerializer(dest, progress=None, **opts)
    s.write_state_dict(sd)
    index = s.close()
    print(f"wrote {dest}: {len(index.tensors)} tensors, {index.file_size:,} bytes "
          f"in {time.perf_counter() - t0:.2f} s")  # fmt: skip
    return 0


def _check_parent(dest: str, parents: bool) -> None:
    """Refuse a local DEST whose folder is missing, unless ``--parents`` was given.

    Raises:
        UsageError: the folder is missing.
    """
    from ..sources.uri import local_path, scheme_of

    if scheme_of(dest) != "file":
        return
    parent = os.path.dirname(os.path.abspath(local_path(dest).rstrip("/") or "/"))
    if not parents and not os.path.isdir(parent):
        raise UsageError(f"{parent}: no such folder (DEST's parent); create it, or pass --parents")


def _is_ours(src: str) -> bool:
    """Whether ``src`` (a local file or a URI) is an hf_tensorizer file: then it can be copied as it is."""
    from ..format.sniff import HF_TENSORIZER, sniff
    from ..sources import open_source
    from ..sources.uri import local_path, scheme_of

    local = scheme_of(src) == "file"
    if local and not os.path.isfile(local_path(src)):
        return False
    if local and src.endswith((".safetensors", ".bin", ".pt", ".pth")):
        return False
    with open_source(src) as source:
        return sniff(source.read(0, min(9, source.size))) == HF_TENSORIZER


def copy_file(src: str, dest: str, **sink_options: Any) -> int:
    """Copy the hf_tensorizer file ``src`` to ``dest`` byte for byte (an upload, for a URI), index checked first.

    Returns:
        The bytes copied.

    Raises:
        FormatError: ``src`` is not a valid hf_tensorizer file.
        SourceError, SinkError: reading or writing failed; nothing is left at ``dest`` then.
    """
    from ..engine.header import read_index
    from ..engine.progress import Progress
    from ..sources import open_sink, open_source

    with open_source(src) as source:
        read_index(source)  # a damaged file is refused before anything is written
        sink = open_sink(dest, **sink_options)
        buf = memoryview(bytearray(min(source.size, 16 << 20) or 1))
        try:
            with Progress("copying", source.size) as bar:
                for pos in range(0, source.size, len(buf)):
                    part = buf[: min(len(buf), source.size - pos)]
                    source.read_into(pos, part)
                    sink.write(part)
                    bar.update(len(part))
            sink.commit()
        except BaseException:  # Ctrl-C and SIGTERM too: no partial file, no half-finished upload
            sink.abort()
            raise
        return source.size


def _diffusers_dtype(dtype: torch.dtype | None) -> dict[str, Any]:
    """The dtype keyword this diffusers takes: ``dtype`` where it has replaced ``torch_dtype`` (which then warns
    "torch_dtype is deprecated" at every load), ``torch_dtype`` in older releases."""
    if dtype is None:
        return {}
    from diffusers.utils import deprecation_utils

    return {"dtype" if hasattr(deprecation_utils, "_resolve_dtype") else "torch_dtype": dtype}


def destination(args: argparse.Namespace) -> str:
    """Where ``serialize`` writes, for parsed arguments (``--dest``, ``--dest-bucket`` or the positional DEST).

    Raises:
        UsageError: the arguments name no destination, or more than one.
    """
    return _src_and_dest(args)[1]


def _src_and_dest(args: argparse.Namespace) -> tuple[str, str]:
    """(SRC, DEST) of either form; SRC is ``--hf-model-id`` for models. Raises UsageError on a wrong count."""
    usage = "give SRC DEST (or SRC --dest DEST), or --hf-model-id ID DEST (or --hf-model-id ID --dest DEST)"
    sources = ([args.hf_model_id] if args.hf_model_id else []) + args.paths
    if args.dest is not None:
        sources.append(args.dest)
    if args.dest_bucket is not None:
        if not args.hf_model_id:
            raise UsageError("--dest-bucket goes with --hf-model-id (for a file give SRC DEST or --dest)")
        model = args.hf_model_id
        name = os.path.basename(os.path.normpath(model)) if os.path.isdir(model) else model.strip("/")
        sources.append(f"s3://{args.dest_bucket.removeprefix('s3://').strip('/')}/{name}")
    if len(sources) != 2:
        raise UsageError(usage)
    return sources[0], sources[1]


def serialize_model(model_id: str, dest: str, *, revision: str | None = None, dtype: str | None = None,
                    **options: Any) -> str:  # fmt: skip
    """Load ``model_id`` with transformers (or diffusers, for pipelines) on CPU and write its artifact.

    The class is ``AutoModelForCausalLM`` when the config's ``architectures`` name a causal LM, else ``AutoModel``.

    Returns:
        The artifact root written.

    Raises:
        UsageError: ``model_id`` is no model directory or Hub id, or the checkpoint holds weights the model class
            does not take (they would be missing from the artifact).
        SourceError: its config cannot be loaded.
    """
    import torch
    from huggingface_hub import hf_hub_download

    torch_dtype = getattr(torch, dtype) if dtype else None
    endpoint = options.pop("endpoint_url", None)
    transport = {"endpoint_url": endpoint} if endpoint else {}
    local = os.path.isdir(model_id)
    if not local and (os.path.exists(model_id) or model_id.startswith((".", "/", "~")) or model_id.count("/") > 1):
        raise UsageError(f"--hf-model-id {model_id}: not a model directory (nor a Hub id, org/name)")
    if local:
        is_pipeline = os.path.exists(os.path.join(model_id, "model_index.json"))
    else:
        try:
            hf_hub_download(model_id, "model_index.json", revision=revision)
            is_pipeline = True
        except Exception:
            is_pipeline = False
    if is_pipeline:
        from diffusers import DiffusionPipeline

        from ..integrations.adapters.diffusers.models import save_pipeline

        pipe = DiffusionPipeline.from_pretrained(model_id, revision=revision, **_diffusers_dtype(torch_dtype))
        save_pipeline(pipe, dest, tensorizer_options=transport or None, **options)
        return dest
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    from ..integrations.adapters.transformers.save import save_tensorized

    try:
        config = AutoConfig.from_pretrained(model_id, revision=revision)
    except (OSError, ValueError) as exc:  # not found on the Hub, offline, no config.json in the folder
        raise SourceError(f"cannot load the config of {model_id}: {str(exc).splitlines()[0]}") from None
    auto = AutoModelForCausalLM if any(a.endswith("ForCausalLM") for a in config.architectures or []) else AutoModel
    model, info = auto.from_pretrained(model_id, revision=revision, dtype=torch_dtype, output_loading_info=True)
    dropped = sorted(info.get("unexpected_keys") or ())
    if dropped:  # transformers only reports these; the artifact would silently lack them
        names = ", ".join(dropped[:3]) + (f" and {len(dropped) - 3} more" if len(dropped) > 3 else "")
        hint = ("its config.json names no `architectures`: add the model class (e.g. [\"LlamaForCausalLM\"])"
                if not config.architectures else f"{type(model).__name__} has no place for them")  # fmt: skip
        raise UsageError(f"{model_id}: the checkpoint's {names} would be left out of the artifact; {hint}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_id, revision=revision)
    except Exception:
        tokenizer = None
    save_tensorized(model, dest, tokenizer=tokenizer, tensorizer_options=transport or None, **options)
    return dest
