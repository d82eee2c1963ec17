"""The loaders under comparison, one small function each, and the machine's limits.

Every loader is ``load_<name>(ctx, device) -> dict[str, Tensor]``: it reads the checkpoint in ``ctx.dir``
and returns the state dict on ``device``. The runner imports a loader's modules (``Peer.modules``), runs its
one-time setup (``Peer.setup``) and creates the CUDA context before its timer starts, so a load times I/O
and copies only.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import Tensor

StateDict = dict[str, "Tensor"]

# Checkpoint formats (prepared by the runner) and the files each one consists of.
FORMAT_FILES: dict[str, tuple[str, ...]] = {
    "st": ("hf/model.safetensors", "hf/config.json"),
    "bin": ("model.bin",),
    "hft": ("model.tensors",),
    "tz": ("tensorizer.tensors",),
}
# The tensorized artifact (config.json + a relative symlink to ../model.tensors) written with the ``hft`` format.
ARTIFACT_DIR = "artifact"


@dataclass
class Ctx:
    """Where the checkpoint lives, plus what a loader leaves for the runner (metrics, clean-ups)."""

    dir: Path
    extra: dict[str, Any] = field(default_factory=dict)
    cleanup: list[Callable[[], object]] = field(default_factory=list)

    @property
    def hf_dir(self) -> str:
        return str(self.dir / "hf")

    @property
    def safetensors(self) -> str:
        return str(self.dir / "hf" / "model.safetensors")

    @property
    def bin(self) -> str:
        return str(self.dir / "model.bin")

    @property
    def tensors(self) -> str:
        return str(self.dir / "model.tensors")

    @property
    def tz(self) -> str:
        return str(self.dir / "tensorizer.tensors")

    @property
    def artifact(self) -> str:
        return str(self.dir / ARTIFACT_DIR)


@dataclass(frozen=True)
class Peer:
    """A named loader: what it reads, what it imports and sets up (untimed) and the function that loads."""

    name: str
    label: str
    fmt: str
    modules: tuple[str, ...]
    fn: Callable[[Ctx, str], StateDict]
    cuda_only: bool = False
    ours: bool = False
    setup: Callable[[], object] | None = None  # once per process, after the imports, before the timer

    def missing_module(self) -> str | None:
        """The first module that cannot be found (without importing it), or None."""
        for mod in self.modules:
            try:
                if importlib.util.find_spec(mod) is None:
                    return mod
            except (ImportError, ValueError):
                return mod
        return None

    def data_files(self, d: Path) -> list[Path]:
        """The large files this loader reads (what a cold run evicts)."""
        return [d / f for f in FORMAT_FILES[self.fmt] if not f.endswith(".json")]


def _on(device: str, t: Tensor) -> Tensor:
    """``t`` on ``device`` (no copy when it is already there)."""
    import torch

    want = torch.device(device)
    if t.device.type == want.type and (want.index is None or t.device.index == want.index):
        return t
    return t.to(want, non_blocking=True)


# Peers -------------------------------------------------------------------------------------------------


def load_st(ctx: Ctx, device: str) -> StateDict:
    """safetensors ``load_file(path, device=...)``."""
    from safetensors.torch import load_file

    return load_file(ctx.safetensors, device=device)


def load_pt(ctx: Ctx, device: str) -> StateDict:
    """``torch.load`` of a ``.bin`` state dict (weights_only, mmap), then ``.to(device)``."""
    import torch

    sd = torch.load(ctx.bin, map_location="cpu", weights_only=True, mmap=True)
    return {k: _on(device, v) for k, v in sd.items()}


def load_hf(ctx: Ctx, device: str) -> StateDict:
    """transformers ``from_pretrained(dir, dtype=bf16, device_map=device)``."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(ctx.hf_dir, dtype=torch.bfloat16, device_map=device)
    return dict(model.state_dict())


def load_tz(ctx: Ctx, device: str) -> StateDict:
    """Upstream tensorizer ``TensorDeserializer(path, device=...)``."""
    from tensorizer import TensorDeserializer

    return TensorDeserializer(ctx.tz, device=device)  # type: ignore[no-any-return]


def load_tzmod(ctx: Ctx, device: str) -> StateDict:
    """Upstream tensorizer into a meta-initialised HF model (``load_state_dict(assign=True)``)."""
    import torch
    from accelerate import init_empty_weights
    from tensorizer import TensorDeserializer
    from transformers import AutoConfig, AutoModelForCausalLM

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(ctx.hf_dir), dtype=torch.bfloat16)
    de = TensorDeserializer(ctx.tz, device=device)
    model.load_state_dict(de, assign=True, strict=False)
    de.close()
    return dict(model.state_dict())


def load_fst(ctx: Ctx, device: str) -> StateDict:
    """fastsafetensors ``SafeTensorsFileLoader(nogds=True)``."""
    from fastsafetensors import SafeTensorsFileLoader, SingleGroup

    loader = SafeTensorsFileLoader(SingleGroup(), device=device, nogds=True)
    loader.add_filenames({0: [ctx.safetensors]})
    fb = loader.copy_files_to_device()
    ctx.extra["keepalive"] = (loader, fb)
    return {k: fb.get_tensor(k) for k in loader.get_keys()}


def load_runai(ctx: Ctx, device: str) -> StateDict:
    """Run:ai ``SafetensorsStreamer`` (host buffers, then copied to the device)."""
    from runai_model_streamer import SafetensorsStreamer

    sd: StateDict = {}
    with SafetensorsStreamer() as streamer:
        streamer.stream_file(ctx.safetensors, device=device)
        for k, v in streamer.get_tensors():
            sd[k] = _on(device, v)
    return sd


def _instanttensor(ctx: Ctx, device: str, buffered: bool) -> StateDict:
    from instanttensor import BackendPolicy, safe_open

    kw: dict[str, Any] = {"backend": BackendPolicy.BUFFERED} if buffered else {}
    sd: StateDict = {}
    with safe_open(ctx.safetensors, framework="pt", device=device, **kw) as f:
        for k, v in f.tensors():
            sd[k] = v
    return sd


def load_it(ctx: Ctx, device: str) -> StateDict:
    """InstantTensor ``safe_open`` with its default backend (direct I/O)."""
    return _instanttensor(ctx, device, buffered=False)


def load_itbuf(ctx: Ctx, device: str) -> StateDict:
    """InstantTensor ``safe_open(backend=BackendPolicy.BUFFERED)``."""
    return _instanttensor(ctx, device, buffered=True)


# Ours --------------------------------------------------------------------------------------------------


def load_hft(ctx: Ctx, device: str, **kwargs: Any) -> StateDict:
    """hf_tensorizer ``TensorDeserializer``; ``kwargs`` are its knobs (strategy, num_readers, ...)."""
    from hf_tensorizer import TensorDeserializer

    d = TensorDeserializer(ctx.tensors, device=device, **kwargs)
    sd = dict(d)
    ctx.extra["deserializer"] = d
    ctx.cleanup.append(d.close)
    return sd


def load_hftfp(ctx: Ctx, device: str, *, stock: bool = False, **options: Any) -> StateDict:
    """``hf_tensorizer.enable()``, then transformers ``from_pretrained(artifact, dtype=bf16, device_map=device)``
    (``options``: its ``tensorizer_options``); with ``stock`` the stock safetensors folder as a ``file://`` URI,
    which streams its shards through our engine."""
    import torch
    from transformers import AutoModelForCausalLM

    import hf_tensorizer

    hf_tensorizer.enable()
    where = Path(ctx.hf_dir).resolve().as_uri() if stock else ctx.artifact
    model = AutoModelForCausalLM.from_pretrained(
        where, dtype=torch.bfloat16, device_map=device, tensorizer_options=options or None
    )
    ctx.extra["metrics"] = [m.as_dict() for m in model.hf_tensorizer_metrics]
    return dict(model.state_dict())


def _enable() -> None:
    """``hf_tensorizer.enable()`` before the timer: importing the integration modules (diffusers' hooks too, when
    diffusers is installed: ~0.3 s) is not part of a load."""
    import hf_tensorizer

    hf_tensorizer.enable()


def _from_pretrained(name: str, label: str, fmt: str, **kwargs: Any) -> Peer:
    """A ``load_hftfp`` variant: ours, transformers imported and the hooks enabled before the timer."""
    fn = functools.partial(load_hftfp, **kwargs) if kwargs else load_hftfp
    modules = ("hf_tensorizer", "transformers", "accelerate")
    return Peer(name, label, fmt, modules, fn, ours=True, setup=_enable)


PEERS: dict[str, Peer] = {
    p.name: p
    for p in (
        Peer("st", "safetensors load_file", "st", ("safetensors.torch",), load_st),
        Peer("pt", "torch.load .bin (mmap) + .to", "bin", (), load_pt),
        Peer("hf", "transformers from_pretrained", "st", ("transformers", "accelerate"), load_hf),
        Peer("tz", "tensorizer TensorDeserializer", "tz", ("tensorizer",), load_tz),
        Peer("tzmod", "tensorizer into meta model", "tz", ("tensorizer", "transformers", "accelerate"), load_tzmod),
        Peer("fst", "fastsafetensors nogds", "st", ("fastsafetensors",), load_fst),
        Peer("runai", "Run:ai SafetensorsStreamer", "st", ("runai_model_streamer",), load_runai),
        Peer("it", "InstantTensor default (direct I/O)", "st", ("instanttensor",), load_it, cuda_only=True),
        Peer("itbuf", "InstantTensor BUFFERED", "st", ("instanttensor",), load_itbuf, cuda_only=True),
        _from_pretrained("hftfp", "ours from_pretrained (tensorized artifact)", "hft"),
        _from_pretrained(
            "hftfp-st", "ours from_pretrained of the stock safetensors folder (file:// URI)", "st", stock=True
        ),
        _from_pretrained("hftfp-mmap", "ours from_pretrained, mmap=True (CPU)", "hft", mmap=True),
        _from_pretrained("hftfp-pread", "ours from_pretrained, strategy=pread", "hft", strategy="pread"),
    )
}

_HFT = re.compile(r"^hft(?:-(auto|pread|odirect|register|mmap)(\d+)?)?(?:-c(\d+)M?)?(?:-s(\d+)M?)?$")
MiB = 1 << 20


def hft_kwargs(name: str) -> dict[str, Any]:
    """``hft[-STRATEGY[READERS]][-cCHUNK_MIB][-sSTAGING_MIB]`` -> TensorDeserializer keywords
    (STRATEGY ``mmap`` means ``mmap=True``).

    >>> hft_kwargs("hft-pread16-c32")
    {'strategy': 'pread', 'num_readers': 16, 'chunk_bytes': 33554432}
    """
    m = _HFT.match(name)
    if m is None:
        raise KeyError(name)
    strategy, readers, chunk, staging = m.groups()
    kw: dict[str, Any] = {"mmap": True} if strategy == "mmap" else {"strategy": strategy or "auto"}
    if readers:
        kw["num_readers"] = int(readers)
    if chunk:
        kw["chunk_bytes"] = int(chunk) * MiB
    if staging:
        kw["staging_bytes"] = int(staging) * MiB
    return kw


def loaders_legend() -> str:
    """What each ``--loaders`` code means (the ``bench --help`` epilog)."""
    width = max(len(n) for n in PEERS)
    lines = ["loaders (--loaders codes):", f"  {'hft':<{width}}  ours, TensorDeserializer (strategy auto)"]
    lines += [f"  {p.name:<{width}}  {p.label}{' (CUDA only)' if p.cuda_only else ''}" for p in PEERS.values()]
    lines += [
        "  hft-STRATEGY[N][-cMiB][-sMiB]: ours with strategy auto|pread|odirect|register|mmap, N reader threads,",
        "  chunk size and staging pool in MiB; e.g. hft-pread16-c32 = strategy='pread', 16 readers, 32 MiB chunks",
    ]
    return "\n".join(lines)


# what a load imports on first use (the package imports lazily): imported before the timer, as every peer's are
_HFT_MODULES = ("hf_tensorizer", "hf_tensorizer.engine.reader", "hf_tensorizer.engine.mapping")


def resolve(name: str) -> Peer:
    """The Peer for a loader name (peers by name, ours as ``hft`` plus keyword variants)."""
    if name in PEERS:
        return PEERS[name]
    kw = hft_kwargs(name)
    desc = ", ".join(
        f"{k.replace('num_', '').replace('_bytes', '')}={v // MiB if k.endswith('bytes') else v}" for k, v in kw.items()
    )

    def fn(ctx: Ctx, device: str) -> StateDict:
        return load_hft(ctx, device, **kw)

    fn.__doc__ = load_hft.__doc__
    return Peer(name, f"ours ({desc})", "hft", _HFT_MODULES, fn, cuda_only=kw.get("strategy") == "register", ours=True)


# Limits ------------------------------------------------------------------------------------------------


def evict(paths: list[Path]) -> None:
    """Drop files from the page cache (see ``engine.pagecache.evict``)."""
    from ..engine.pagecache import evict as evict_one

    for p in paths:
        evict_one(p)


def read_parallel(paths: list[Path], threads: int, chunk: int = 16 * MiB, *, fresh: bool = False) -> int:
    """Read files with ``threads`` threads of ``os.preadv``; returns bytes.

    Each thread reuses one buffer, or with ``fresh`` every byte lands in never-touched memory (an anonymous
    mapping), as it does for any loader that returns new tensors: then page faults are part of the cost.
    """
    import mmap

    jobs = [
        (p, off, min(chunk, size - off)) for p in paths for size in [p.stat().st_size] for off in range(0, size, chunk)
    ]
    total = [0] * threads
    dest = mmap.mmap(-1, sum(n for _, _, n in jobs) or 1) if fresh else None
    starts = {}
    pos = 0
    for job in jobs:
        starts[job] = pos
        pos += job[2]

    def work(i: int) -> None:
        buf = memoryview(bytearray(chunk)) if dest is None else memoryview(dest)
        fds: dict[Path, int] = {}
        try:
            for job in jobs[i::threads]:
                p, off, n = job
                fd = fds.get(p)
                if fd is None:
                    fd = fds[p] = os.open(p, os.O_RDONLY)
                at = 0 if dest is None else starts[job]
                total[i] += os.preadv(fd, [buf[at : at + n]], off)
        finally:
            for fd in fds.values():
                os.close(fd)
            buf.release()

    ts = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return sum(total)


def run_order(loaders: Sequence[Peer], warm_runs: int, cold_runs: int) -> list[tuple[Peer, bool]]:
    """The loads of a run, as (loader, cold): one warm pass, the cold passes, then the other warm passes.

    Each pass has every loader once, and the ``k``-th warm (or cold) pass starts ``k`` loaders further along
    (``hft, st, pt``, then ``st, pt, hft``, ...): no loader always runs first or last, right after the page cache
    was read back or right before the cold runs evict it, or always after the same neighbour.
    """
    n = len(loaders)

    def rotated(k: int) -> list[Peer]:
        return list(loaders[k % n :]) + list(loaders[: k % n]) if n else []

    passes = [(0, False)] + [(c, True) for c in range(cold_runs)] + [(w, False) for w in range(1, warm_runs)]
    return [(p, cold) for k, cold in passes for p in rotated(k)]


def read_once(paths: list[Path]) -> int:
    """Evict ``paths``, then read each once, one after the other, front to back on one thread; returns bytes.

    Why: the page cache keeps a file in folios whose sizes follow how its pages got there (a sequential read
    ramps readahead up to large folios, parallel far-apart reads leave small ones), and mapping a file costs a
    fault per folio. The warm runs of ``bench --page-cache same`` start from this, so that every loader's file
    has the same history and the rows compare loaders, not write or read histories.
    """
    evict(paths)
    return sum(_read_one(p, MiB) for p in paths)


def scratch_copy(src: Path, dst: Path, chunk: int = 64 * MiB) -> Path:
    """Copy ``src`` to ``dst`` with large reads and writes (for measurements that must evict a file without
    disturbing the page cache of a file that a loader reads)."""
    buf = bytearray(chunk)
    view = memoryview(buf)
    with open(src, "rb", buffering=0) as f, open(dst, "wb", buffering=0) as out:
        while k := f.readinto(buf):
            out.write(view[:k])
        os.fsync(out.fileno())
    return dst


def _read_one(path: Path, chunk: int = 64 * MiB) -> int:
    buf = bytearray(chunk)
    n = 0
    with open(path, "rb", buffering=0) as f:
        while k := f.readinto(buf):
            n += k
    return n


def gbps(nbytes: int, seconds: float) -> float:
    """GB/s to 4 significant digits."""
    return float(f"{nbytes / max(seconds, 1e-9) / 1e9:.4g}")


def limits(path: Path, device: str, threads: int = 16, h2d_bytes: int = 2 << 30) -> dict[str, float]:
    """The bars no loader can beat on this machine, in GB/s.

    ``h2d_pinned`` / ``h2d_pageable``: host->device copy (CUDA only); ``read_pagecache_1t``: one thread
    reading ``path`` from the page cache; ``read_pagecache_<N>t``: N threads of ``pread`` into reused buffers;
    ``read_fresh_<N>t``: the same into never-touched memory (the bar for loaders returning new CPU tensors);
    ``read_cold_<N>t``: N threads after evicting the file.
    """
    out: dict[str, float] = {}
    if device.startswith("cuda"):
        import torch

        n = h2d_bytes
        dst = torch.empty(n, dtype=torch.uint8, device=device)
        for name, pin in (("h2d_pinned", True), ("h2d_pageable", False)):
            src = torch.ones(n, dtype=torch.uint8, pin_memory=pin)
            dst.copy_(src, non_blocking=pin)
            torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(3):
                dst.copy_(src, non_blocking=pin)
            torch.cuda.synchronize()
            out[name] = gbps(3 * n, time.perf_counter() - t)
            del src
        del dst
    _read_one(path)  # make sure it is cached
    t = time.perf_counter()
    out["read_pagecache_1t"] = gbps(_read_one(path), time.perf_counter() - t)
    t = time.perf_counter()
    out[f"read_pagecache_{threads}t"] = gbps(read_parallel([path], threads), time.perf_counter() - t)
    t = time.perf_counter()
    out[f"read_fresh_{threads}t"] = gbps(read_parallel([path], threads, fresh=True), time.perf_counter() - t)
    evict([path])
    t = time.perf_counter()
    out[f"read_cold_{threads}t"] = gbps(read_parallel([path], threads), time.perf_counter() - t)
    return out
