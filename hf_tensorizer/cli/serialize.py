"""``hf-tensorizer serialize SRC DEST``: a safetensors / ``.bin`` state dict or a local HF model directory
to one ``.tensors`` file (local path or URI)."""

from __future__ import annotations

import argparse
import glob
import os
import time

import torch

from ..engine.writer import TensorSerializer
from ..errors import UsageError


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("serialize", help="convert a state dict or HF model dir to .tensors", description=__doc__)
    p.add_argument("src", help="a .safetensors or .bin/.pt file, or a directory with *.safetensors / *.bin shards")
    p.add_argument("dest", help="output .tensors path or URI (s3://..., hf://...)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="cast floating tensors first")
    p.add_argument("--block-size", type=int, default=None, help="digest block size in bytes")
    p.add_argument("--digest", choices=["crc32", "sha256", "none"], default="crc32")
    p.add_argument("--metadata", action="append", default=[], metavar="KEY=VALUE", help="user metadata (repeat)")
    p.set_defaults(func=run)


def read_state_dict(src: str) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors/.bin file or of every shard in a directory (no pickle code runs)."""
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
        from safetensors.torch import load_file

        return load_file(src)
    if src.endswith((".bin", ".pt", ".pth")):
        sd = torch.load(src, map_location="cpu", weights_only=True, mmap=True)
        if not isinstance(sd, dict):
            raise UsageError(f"{src} does not hold a state dict")
        return sd
    raise UsageError(f"cannot tell the format of {src}: expected .safetensors, .bin/.pt or a directory")


def run(args: argparse.Namespace) -> int:
    meta = {}
    for kv in args.metadata:
        key, sep, value = kv.partition("=")
        if not sep:
            raise UsageError(f"--metadata takes KEY=VALUE, got {kv!r}")
        meta[key] = value
    t0 = time.perf_counter()
    sd = read_state_dict(args.src)
    if args.dtype:
        dtype = getattr(torch, args.dtype)
        sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    kwargs = {"block_size": args.block_size} if args.block_size else {}
    s = TensorSerializer(args.dest, metadata=meta, digest=args.digest, progress=None, **kwargs)
    s.write_state_dict(sd)
    index = s.close()
    dt = time.perf_counter() - t0
    print(f"wrote {args.dest}: {len(index.tensors)} tensors, {index.file_size:,} bytes in {dt:.2f} s")
    return 0
