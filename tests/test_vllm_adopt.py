"""Adoption (``hf_tensorizer.integrations.adapters.vllm.adopt``) without vLLM: a small module filled the way vLLM's
weight loaders fill theirs (``param.data.copy_``, a vocabulary slice, fused parameters filled piece by piece, a
cast), from a real tensorized file, mapped and read. Which copies become adoptions, which stay copies, what the
parameters hold, and what stays mapped (``/proc/self/maps``). tests/test_vllm.py serves the real thing."""

from __future__ import annotations

import functools
import gc
import mmap
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from hf_tensorizer import TensorDeserializer, TensorSerializer
from hf_tensorizer.integrations.adapters.vllm.adopt import Adoption
from hf_tensorizer.integrations.adapters.vllm.loader import _take, _take_leases, streamed
from hf_tensorizer.integrations.loading.weights import open_weights

H = 64


class Tiny(torch.nn.Module):
    """vLLM-shaped parameters: a vocabulary embedding, a fused QKV, an output projection, a norm, a float16
    layer, an ``lm_head`` tied (the same Parameter) or not, and a pair of distinct Parameters sharing storage."""

    def __init__(self, tied: bool) -> None:
        super().__init__()

        def empty(*shape: int, dtype: torch.dtype = torch.float32) -> torch.nn.Parameter:
            return torch.nn.Parameter(torch.empty(*shape, dtype=dtype), requires_grad=False)

        self.embed = empty(128, H)
        self.qkv = empty(3 * H, H)
        self.o_proj = empty(H, H)
        self.norm = empty(H)
        self.fp16 = empty(H, H, dtype=torch.float16)
        self.lm_head = self.embed if tied else empty(128, H)
        shared = torch.empty(2 * H)
        self.a = torch.nn.Parameter(shared[:H], requires_grad=False)  # views of one storage: never swapped
        self.b = torch.nn.Parameter(shared[H:], requires_grad=False)


def _weights() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    names = {"embed": (128, H), "q": (H, H), "k": (H, H), "v": (H, H), "o_proj": (H, H), "norm": (H,),
             "fp16": (H, H), "lm_head": (128, H), "a": (H,), "b": (H,)}  # fmt: skip
    return {n: torch.randn(*s, generator=g) for n, s in names.items()}


def load_weights(model: Tiny, tensors: Iterator[tuple[str, torch.Tensor]]) -> None:
    """What vLLM's weight loaders do with each checkpoint tensor."""
    for name, w in tensors:
        if name in ("q", "k", "v"):  # QKVParallelLinear: one shard of the fused parameter
            model.qkv.data.narrow(0, "qkv".index(name) * H, H).copy_(w)
        elif name == "embed":  # VocabParallelEmbedding: param[: rows].data.copy_
            model.embed[: w.shape[0]].data.copy_(w)
        elif name == "lm_head" and model.lm_head is model.embed:
            continue  # tied: vLLM skips the checkpoint's lm_head
        elif name == "norm":
            model.norm.data.copy_(w * 1)  # a temporary computed by the loader: never offered, copied
        else:  # default_weight_loader (the fp16 layer casts float32 -> float16)
            getattr(model, name).data.copy_(w)


@pytest.fixture
def artifact(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    weights = _weights()
    path = tmp_path / "model.tensors"
    with TensorSerializer(str(path)) as s:
        s.write_state_dict(weights)
    return path, weights


def _mapped(path: Path) -> int:
    gc.collect()
    return Path("/proc/self/maps").read_text().count(str(path))


def _check_values(model: Tiny, weights: dict[str, torch.Tensor]) -> None:
    assert torch.equal(model.qkv, torch.cat([weights["q"], weights["k"], weights["v"]]))
    assert torch.equal(model.fp16, weights["fp16"].half())
    for name in ("embed", "o_proj", "norm", "a", "b"):
        assert torch.equal(getattr(model, name), weights[name]), name
    assert torch.equal(model.lm_head, weights["embed"] if model.lm_head is model.embed else weights["lm_head"])


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads the process's mappings")
@pytest.mark.parametrize("tied", [False, True])
def test_whole_copies_are_adopted_on_their_own_pages(artifact: tuple[Path, dict[str, torch.Tensor]],
                                                     tied: bool) -> None:  # fmt: skip
    path, weights = artifact
    model = Tiny(tied)
    stats = {"strategy": "mmap"}
    with TensorDeserializer(str(path), device="cpu") as d:
        assert d.metrics.strategy == "mmap"
        adoption = Adoption(model, lambda t: _take([d], stats, t))
        with adoption:
            load_weights(model, adoption.offer(d.items()))
        taken = {"embed", "o_proj"} | (set() if tied else {"lm_head"})
        assert set(adoption.stats.taken) == taken  # not: fused qkv, the cast, the temporary, shared storage
        assert adoption.stats.taken_bytes == sum(weights[n].nbytes for n in taken)
        assert adoption.stats.copied == 3 + 1 + 1 + 2  # q/k/v, fp16, norm, a, b
        _check_values(model, weights)
    assert model.lm_head is model.embed if tied else model.lm_head is not model.embed
    d = None  # type: ignore[assignment]  # the loader drops each batch's deserializer (its tensors view the file)
    # the file's mapping is gone with the deserializer; each taken parameter maps only its own pages
    assert _mapped(path) == len(taken)
    # vLLM's post-processing replaces a parameter (a repacked linear weight): its pages go with it
    model.o_proj = torch.nn.Parameter(torch.empty(0), requires_grad=False)
    assert _mapped(path) == len(taken) - 1
    model.embed.data.mul_(2)  # a write lands in this process's private copy of the page, never in the file
    released = adoption.release()
    assert set(released.released) == taken - {"o_proj"}
    assert _mapped(path) == 0  # a running server maps nothing of the artifact
    assert torch.equal(model.embed, weights["embed"] * 2)
    with TensorDeserializer(str(path), device="cpu") as d:
        assert torch.equal(d["embed"], weights["embed"])


def test_read_tensors_are_adopted_as_they_are(artifact: tuple[Path, dict[str, torch.Tensor]]) -> None:
    """A read load (``pread``: each tensor its own memory) adopts the tensors themselves; nothing to release."""
    path, weights = artifact
    model = Tiny(tied=False)
    stats = {"strategy": "pread"}
    with TensorDeserializer(str(path), device="cpu", strategy="pread") as d:
        offered = dict(d.items())
        adoption = Adoption(model, lambda t: _take([d], stats, t))
        with adoption:
            load_weights(model, adoption.offer(offered.items()))
    assert set(adoption.stats.taken) == {"embed", "o_proj", "lm_head"}
    assert model.o_proj.data_ptr() == offered["o_proj"].data_ptr()  # no copy made
    _check_values(model, weights)
    assert adoption.release().released == []


def test_a_tensor_is_adopted_once_and_closed_mappings_are_copied(artifact: tuple[Path, dict[str, torch.Tensor]]
                                                                 ) -> None:  # fmt: skip
    """One streamed tensor given to two parameters: the first takes it, the second gets a copy (two parameters
    never share storage behind vLLM's back). A mapped tensor whose deserializer is closed can no longer be
    re-mapped: copied."""
    path, weights = artifact
    model = Tiny(tied=False)
    with TensorDeserializer(str(path), device="cpu") as d:
        w = d["o_proj"]
        adoption = Adoption(model, lambda t: _take([d], {"strategy": "mmap"}, t))
        with adoption:
            for _, t in adoption.offer([("o_proj", w)]):
                model.o_proj.data.copy_(t)
                model.lm_head[:H].data.copy_(t)  # a slice of lm_head: not whole, copied
                model.fp16.data.copy_(t)
    assert adoption.stats.taken == ["o_proj"] and adoption.stats.copied == 2
    assert model.o_proj.data_ptr() != w.data_ptr() and torch.equal(model.o_proj, weights["o_proj"])
    late = Adoption(model, lambda t: _take([], {"strategy": "mmap"}, t))  # the batch's deserializer closed
    with late:
        for _, t in late.offer([("o_proj", w)]):
            model.lm_head.data.narrow(0, 0, 128).copy_(t.repeat(2, 1))  # a temporary: copied
            model.o_proj.data.copy_(t)
    assert late.stats.taken == [] and late.stats.copied == 2
    assert torch.equal(model.o_proj, weights["o_proj"]) and torch.equal(model.lm_head[H:], weights["o_proj"])


def test_a_load_leaves_nothing_to_the_garbage_collector(artifact: tuple[Path, dict[str, torch.Tensor]]) -> None:
    """The vLLM loader builds and loads an unquantized model on CPU without vLLM's two full ``gc.collect()`` passes
    (``loader._build_and_load``): what a load leaves behind must go by reference counting alone. The loader's own
    pieces (a read lease, ``open_weights``, ``streamed``, ``Adoption`` with ``_take``, the release), the collector
    off; afterwards it finds none of their objects, tensors or mappings unreachable."""
    path, weights = artifact
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)  # unreachable objects are kept in gc.garbage, for the assertion
    leases = []
    try:
        model = Tiny(tied=False)
        leases = _take_leases([str(path)])
        stats = {"bytes": 0, "read": 0, "strategy": "slices"}
        opened: list[TensorDeserializer] = []
        with open_weights([str(path)]) as w:
            adoption = Adoption(model, functools.partial(_take, opened, stats))
            with adoption:
                load_weights(model, adoption.offer(streamed(w, {}, torch.device("cpu"), stats, opened)))
        assert stats["strategy"] == "mmap" and adoption.stats.taken
        adoption.release(copy=not leases)
        _check_values(model, weights)
        del adoption, w, opened
        gc.collect()
        kinds = (torch.Tensor, mmap.mmap, memoryview)
        left = [type(o) for o in gc.garbage if isinstance(o, kinds) or type(o).__module__.startswith("hf_tensorizer")]
        assert left == []
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
        for lease in leases:
            lease.close()
