"""``hf-tensorizer demo``: the whole story on an embedded default, no network needed.

Builds a small Llama-shaped model from a config (random weights, fixed seed), writes it as
``.tensors``, safetensors, a ``torch.save`` file and a transformers directory, loads each back on the
best available device (page cache warm, best of three), checks the weights are identical, and prints
a comparison table. The files (about 1.3 GB at the default size) go to a temporary folder removed at the end;
with ``--dir`` they are kept there.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from . import describe

if TYPE_CHECKING:
    import torch


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "demo", help="serialize and load a small model, compare with other loaders", description=describe(__doc__)
    )
    p.add_argument("--dir", default=None, help="keep the files in this folder (default: a temporary one, removed)")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--repeats", type=int, default=3, help="loads per loader; the best is reported")
    p.set_defaults(func=run)


def _model(layers: int, hidden: int) -> torch.nn.Module:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        hidden_size=hidden, intermediate_size=hidden * 3, num_attention_heads=max(1, hidden // 128),
        num_key_value_heads=max(1, hidden // 512), num_hidden_layers=layers, vocab_size=32000,
        tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).to(torch.bfloat16).eval()


def _touch(tensors: dict[str, torch.Tensor]) -> None:
    """Read one byte of every page: lazy (mmap) loaders do their I/O here, eager ones already did."""
    from ..engine.memory import as_bytes

    for t in tensors.values():
        if t.numel():
            as_bytes(t.contiguous())[::4096].sum()


def _best(fn: Callable[[], dict[str, torch.Tensor]], repeats: int, device: str) -> tuple[float, float, dict]:
    """Best load time and best load-plus-touch time over ``repeats`` runs (page cache warm)."""
    import torch

    best, best_touched, out = float("inf"), float("inf"), {}
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        out = fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        loaded = time.perf_counter() - t
        _touch(out)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        best, best_touched = min(best, loaded), min(best_touched, time.perf_counter() - t)
    return best, best_touched, out


def run(args: argparse.Namespace) -> int:
    if args.dir:
        os.makedirs(args.dir, exist_ok=True)
        code = _run(args, args.dir)
        print(f"files kept in {args.dir} (--dir)")
        return code
    work = tempfile.mkdtemp(prefix="hf-tensorizer-demo-")
    try:
        return _run(args, work)
    finally:  # also after an error, Ctrl-C or SIGTERM
        shutil.rmtree(work, ignore_errors=True)


def _run(args: argparse.Namespace, work: str) -> int:
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    from ..engine.reader import TensorDeserializer
    from ..engine.writer import TensorSerializer

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = _model(args.layers, args.hidden)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    nbytes = sum(v.numel() * v.element_size() for v in sd.values())
    print(f"model: Llama {args.layers} layers, hidden {args.hidden}, {nbytes / 1e6:.0f} MB bf16; device {device}")

    paths = {"tensors": os.path.join(work, "model.tensors"), "st": os.path.join(work, "model.safetensors"),
             "pt": os.path.join(work, "model.pt"), "hf": os.path.join(work, "hf")}  # fmt: skip
    t = time.perf_counter()
    with TensorSerializer(paths["tensors"]) as s:
        s.write_module(model)
    t_ours = time.perf_counter() - t
    t = time.perf_counter()
    save_file(sd, paths["st"])
    t_st = time.perf_counter() - t
    torch.save(sd, paths["pt"])
    model.save_pretrained(paths["hf"])
    print(f"serialize: hf_tensorizer {t_ours:.2f} s, safetensors {t_st:.2f} s")

    def ours() -> dict[str, torch.Tensor]:
        with TensorDeserializer(paths["tensors"], device=device) as d:
            return dict(d)

    def hf() -> dict[str, torch.Tensor]:
        m = AutoModelForCausalLM.from_pretrained(paths["hf"], dtype=torch.bfloat16, device_map=device)
        return m.state_dict()

    def ours_pread() -> dict[str, torch.Tensor]:
        with TensorDeserializer(paths["tensors"], device=device, strategy="pread") as d:
            return dict(d)

    # our default first (strategy="auto": on CPU a zero-copy private mapping, pages faulted in by the load)
    loaders: dict[str, Callable[[], dict[str, torch.Tensor]]] = {"hf_tensorizer": ours}
    if device == "cpu":
        loaders["hf_tensorizer (strategy='pread')"] = ours_pread
    loaders |= {
        "safetensors load_file": lambda: load_file(paths["st"], device=device),
        "torch.load (mmap)": lambda: {
            k: v.to(device) for k, v in torch.load(paths["pt"], weights_only=True, mmap=True).items()
        },
        "transformers from_pretrained": hf,
    }
    rows = []
    for name, fn in loaders.items():
        seconds, touched, out = _best(fn, args.repeats, device)
        same = set(out) >= set(sd) and all(torch.equal(out[k].cpu(), sd[k]) for k in sd)
        rows.append((name, seconds, touched, same))
    base = rows[0][2]
    print("\n| loader | load s | load + touch s | GB/s (load + touch) | time vs hf_tensorizer | identical |")
    print("|---|---|---|---|---|---|")
    for name, seconds, touched, same in rows:
        print(
            f"| {name} | {seconds:.3f} | {touched:.3f} | {nbytes / touched / 1e9:.2f} | {touched / base:.2f}x "
            f"| {'yes' if same else 'NO'} |"
        )
    print("\nload + touch reads one byte per page afterwards: mmap-based loaders (safetensors, torch.load mmap)")
    print("defer their reads to first access, so only that column compares them fairly on CPU. hf_tensorizer's")
    print("default on CPU maps the file too (private copy-on-write) but faults every page in during the load.")
    return 0 if all(r[3] for r in rows) else 1
