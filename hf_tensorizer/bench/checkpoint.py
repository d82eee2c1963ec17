"""The benchmark checkpoint: the anchors' Llama-shaped model, generated from a seed, written in each format,
with per-tensor sums recorded so every load can be checked."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .peers import ARTIFACT_DIR, FORMAT_FILES
from .proc import Log, collect, error_line, kill, log, popen

if TYPE_CHECKING:
    from torch import Tensor

SEED = 0
SAMPLE_STRIDE = 4099  # a prime: the strided sample sum catches shifted or permuted data


@dataclass(frozen=True)
class Shape:
    """A Llama-shaped model; the default is the anchors' 6.46 GB checkpoint (93 bf16 tensors)."""

    layers: int = 10
    hidden: int = 4096
    vocab: int = 128256

    def config(self) -> Any:
        from transformers import LlamaConfig

        heads = max(1, self.hidden // 128)
        return LlamaConfig(
            architectures=["LlamaForCausalLM"],  # as a real checkpoint's config.json names it (serialize picks by it)
            hidden_size=self.hidden,
            intermediate_size=self.hidden * 7 // 2,
            num_attention_heads=heads,
            num_key_value_heads=max(1, heads // 4),
            num_hidden_layers=self.layers,
            vocab_size=self.vocab,
            tie_word_embeddings=False,
            dtype="bfloat16",
        )


def _spec(shape: Shape) -> list[tuple[str, list[int]]]:
    """Tensor names and shapes of the model's state dict, in order (from a meta-device model)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(shape.config(), dtype=torch.bfloat16)
    return [(k, list(v.shape)) for k, v in model.state_dict().items()]


def generate(
    spec: Sequence[tuple[str, Sequence[int]]], device: str
) -> tuple[dict[str, Tensor], dict[str, list[float]]]:
    """The checkpoint's tensors (bf16, N(0, 0.02), seeded: identical in every process) on the CPU,
    plus their checks ``name -> [sum, strided sample sum]`` (float64, computed on ``device``)."""
    import torch

    g = torch.Generator(device=device).manual_seed(SEED)
    sd: dict[str, Tensor] = {}
    checks: dict[str, list[float]] = {}
    for name, shape in spec:
        t = (torch.randn(tuple(shape), generator=g, device=device, dtype=torch.float32) * 0.02).to(torch.bfloat16)
        checks[name] = _check(t)
        sd[name] = t.cpu()
    return sd, checks


def _check(t: Tensor) -> list[float]:
    import torch

    flat = t.reshape(-1)
    return [float(t.sum(dtype=torch.float64)), float(flat[::SAMPLE_STRIDE].sum(dtype=torch.float64))]


def write_format(d: Path, fmt: str, gen_device: str) -> dict[str, Any]:
    """Generate the tensors and write one format (to a temporary name, then renamed)."""
    import torch

    spec = json.loads((d / "spec.json").read_text())["tensors"]
    t0 = time.perf_counter()
    sd, checks = generate(spec, gen_device)
    t1 = time.perf_counter()
    path = d / FORMAT_FILES[fmt][0]
    tmp = path.with_name(path.name + ".partial")
    if fmt == "st":
        from safetensors.torch import save_file

        save_file(sd, str(tmp), metadata={"format": "pt"})
    elif fmt == "bin":
        torch.save(sd, tmp)
    elif fmt == "hft":
        from hf_tensorizer import TensorSerializer

        with TensorSerializer(str(tmp)) as s:
            s.write_state_dict(sd)
    elif fmt == "tz":
        from tensorizer import TensorSerializer as UpstreamSerializer

        s = UpstreamSerializer(str(tmp))
        s.write_state_dict(sd)
        s.close()
    else:
        raise ValueError(f"unknown format {fmt!r}")
    os.replace(tmp, path)
    return {
        "fmt": fmt,
        "gen_s": round(t1 - t0, 2),
        "write_s": round(time.perf_counter() - t1, 2),
        "file_bytes": path.stat().st_size,
        "checks": checks,
    }


def write_artifact(d: Path) -> Path:
    """The tensorized artifact folder ``d/artifact`` that ``from_pretrained`` loads (the ``hftfp`` loader):
    ``hf/config.json`` copied and ``model.tensors`` a relative symlink to ``../model.tensors`` (no extra space)."""
    art = d / ARTIFACT_DIR
    art.mkdir(exist_ok=True)
    shutil.copyfile(d / "hf" / "config.json", art / "config.json")
    link, target = art / "model.tensors", os.path.join("..", FORMAT_FILES["hft"][0])
    if not (link.is_symlink() and os.readlink(link) == target):
        link.unlink(missing_ok=True)
        link.symlink_to(target)
    return art


def _meta_path(d: Path) -> Path:
    return d / "meta.json"


def read_meta(d: Path) -> dict[str, Any] | None:
    try:
        meta: dict[str, Any] = json.loads(_meta_path(d).read_text())
        return meta
    except (OSError, ValueError):
        return None


def prepare(
    d: str | Path,
    layers: int = 10,
    hidden: int = 4096,
    vocab: int = 128256,
    device: str = "cpu",
    formats: Sequence[str] = ("st", "bin", "hft", "tz"),
    *,
    timeout: float = 600.0,
    log: Log = log,
    in_process: bool = False,
) -> dict[str, Any]:
    """Write the checkpoint in ``formats`` under ``d`` (reusing what a matching earlier run wrote).

    ``st``: hf/ (config.json + model.safetensors), ``bin``: model.bin (torch.save), ``hft``: model.tensors
    (ours) and the artifact folder around it (:func:`write_artifact`), ``tz``: tensorizer.tensors (upstream).
    Tensors are generated on ``device``'s type (the GPU when it is CUDA) in parallel writer processes.
    Returns meta (also saved as meta.json). ``in_process``: write here, one format after the other (no writer
    process: saves an interpreter start per format where torch is already imported, e.g. for tiny checkpoints).
    """
    d = Path(d)
    shape = Shape(layers, hidden, vocab)
    meta = read_meta(d)
    if meta is None or meta.get("shape") != asdict(shape) or meta.get("seed") != SEED:
        extra = ["meta.json", "spec.json", f"{ARTIFACT_DIR}/config.json", f"{ARTIFACT_DIR}/model.tensors"]
        for f in [f for fs in FORMAT_FILES.values() for f in fs] + extra:
            (d / f).unlink(missing_ok=True)
        meta = None
    todo = [f for f in formats if meta is None or f not in meta["formats"] or not (d / FORMAT_FILES[f][0]).exists()]
    if meta is not None and not todo:
        if "hft" in meta["formats"]:
            write_artifact(d)
        return meta
    t0 = time.perf_counter()
    (d / "hf").mkdir(parents=True, exist_ok=True)
    if meta is None:
        spec = _spec(shape)
        shape.config().save_pretrained(d / "hf")
        (d / "spec.json").write_text(json.dumps({"tensors": spec}))
        nbytes = sum(2 * _numel(s) for _, s in spec)
        meta = {
            "shape": asdict(shape),
            "seed": SEED,
            "bytes": nbytes,
            "tensors": len(spec),
            "shapes": dict(spec),
            "checks": None,
            "formats": {},
            "errors": {},
        }
    gen = "cuda" if device.startswith("cuda") else "cpu"
    jobs = 1 if in_process else max(1, min(len(todo), _mem_available() // max(1, 2 * meta["bytes"])))
    log(
        f"prepare {d}: {meta['tensors']} tensors, {meta['bytes'] / 1e9:.2f} GB, formats {','.join(todo)} "
        f"(generated on {gen}, {jobs} writer(s) at a time)"
    )
    pending = list(todo)
    running: list[tuple[str, subprocess.Popen[str]]] = []
    while pending or running:
        if in_process:
            fmt = pending.pop(0)
            res, out = write_format(d, fmt, gen), ""
        else:
            while pending and len(running) < jobs:
                fmt = pending.pop(0)
                running.append((fmt, popen(["write", str(d), fmt, gen])))
            fmt, proc = running.pop(0)
            try:
                res, out = collect(proc, timeout)
            except BaseException:
                for _, other in running:
                    kill(other)
                raise
        if res is None:
            meta["errors"][fmt] = error_line(out)
            log(f"  {fmt}: FAILED: {meta['errors'][fmt]}")
            continue
        checks = res.pop("checks")
        if meta["checks"] is None:
            meta["checks"] = checks
        elif not _checks_match(meta["checks"], checks):
            raise RuntimeError(f"writer {fmt} generated different tensors than the others")
        meta["formats"][fmt] = res
        meta["errors"].pop(fmt, None)
        log(f"  {fmt}: generated in {res['gen_s']} s, written in {res['write_s']} s")
    if "hft" in meta["formats"]:
        write_artifact(d)
    meta["prepare_s"] = round(time.perf_counter() - t0, 2)
    _meta_path(d).write_text(json.dumps(meta))
    log(f"prepare done in {meta['prepare_s']} s")
    return meta


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _mem_available() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30


def _checks_match(a: dict[str, list[float]], b: dict[str, list[float]], rel: float = 1e-6) -> bool:
    return a.keys() == b.keys() and all(
        abs(x - y) <= rel * max(1.0, abs(x)) for k in a for x, y in zip(a[k], b[k], strict=True)
    )


def verify(sd: dict[str, Tensor], meta: dict[str, Any], device: str) -> str | None:
    """None when ``sd`` holds exactly the checkpoint's tensors (names, shapes, bf16, device, sums)."""
    import torch

    want = torch.device(device)
    checks: dict[str, list[float]] = meta["checks"]
    missing = [k for k in checks if k not in sd]
    if missing:
        return f"{len(missing)} tensors missing, e.g. {missing[0]}"
    if len(sd) != len(checks):
        return f"{len(sd)} tensors, expected {len(checks)}"
    for k, expected in checks.items():
        t = sd[k]
        if t.dtype != torch.bfloat16 or list(t.shape) != meta["shapes"][k]:
            return f"{k}: {t.dtype} {list(t.shape)}, expected bfloat16 {meta['shapes'][k]}"
        if t.device.type != want.type or (want.index is not None and t.device.index != want.index):
            return f"{k} on {t.device}, expected {device}"
        if not _checks_match({k: expected}, {k: _check(t)}):
            return f"{k}: data differs"
    return None
