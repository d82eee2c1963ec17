"""Tensors whose bytes are read when used, and only the part that survives a ``narrow``.

vLLM's tensor-parallel weight loaders receive each checkpoint tensor whole and cut this rank's shard out of it
(``loaded_weight.narrow(dim, start, size)``, ``loaded_weight[a:b]``, ``torch.chunk``), then copy it into the
parameter. A :class:`LazyTensor` is a tensor subclass (a wrapper without storage) that records those cuts as a box
over a :class:`~hf_tensorizer.engine.slices.TensorSlice` and reads the bytes of the box only when any other
operation (the copy into the parameter) needs values: each rank reads its own shards, and replicated tensors
(norms) whole. Works for every weight loader that narrows first, with no vLLM-specific code.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils._pytree import tree_map

from ....engine.slices import Ranges, TensorSlice

_aten = torch.ops.aten


class LazyTensor(torch.Tensor):
    """A box of one tensor of an open weight file, read on first use.

    Args:
        source: the lazy, sliceable tensor of the file.
        ranges: ``[start, stop)`` per dimension (default: the whole tensor).
    """

    _slice: TensorSlice
    _ranges: Ranges
    __torch_function__ = torch._C._disabled_torch_function_impl  # results of real ops are plain tensors

    @staticmethod
    def __new__(cls, source: TensorSlice, ranges: Ranges | None = None) -> LazyTensor:
        ranges = ranges if ranges is not None else [(0, n) for n in source.get_shape()]
        shape = [b - a for a, b in ranges]
        out = torch.Tensor._make_wrapper_subclass(cls, shape, dtype=source.dtype, device="cpu")  # type: ignore[attr-defined]
        out._slice, out._ranges = source, ranges
        return out

    def materialize(self) -> torch.Tensor:
        """The values of the box, read from the source now (a new CPU tensor)."""
        return self._slice.read(self._ranges)

    def _cut(self, dim: int, start: int, stop: int) -> LazyTensor:
        dim = dim % self.dim()
        n = self.shape[dim]
        start, stop, _ = slice(start, stop).indices(n)
        a = self._ranges[dim][0]
        ranges = list(self._ranges)
        ranges[dim] = (a + start, a + max(start, stop))
        return LazyTensor(self._slice, ranges)

    def __repr__(self) -> str:  # never read values to print
        return f"LazyTensor({self._slice.name!r}, box={self._ranges}, dtype={self.dtype})"

    @classmethod
    def __torch_dispatch__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is _aten.slice.Tensor and not kwargs:
            self, dim, start, end, step = (*args, *(0, None, None, 1)[len(args) - 1 :])
            if step == 1:
                return self._cut(dim, start or 0, self.shape[dim] if end is None else end)
        if func is _aten.narrow.default and not kwargs:
            self, dim, start, length = args
            return self._cut(dim, start, start + length)
        if func is _aten.split.Tensor and not kwargs:  # torch.chunk / split: one lazy piece per part
            self, size, dim = (*args, *(0,)[len(args) - 2 :])
            n = self.shape[dim % self.dim()]
            return [self._cut(dim, a, a + size) for a in range(0, n, size)]
        if func is _aten.split_with_sizes.default and not kwargs:
            self, sizes, dim = (*args, *(0,)[len(args) - 2 :])
            starts = [sum(sizes[:i]) for i in range(len(sizes))]
            return [self._cut(dim, a, a + k) for a, k in zip(starts, sizes, strict=True)]
        if func is _aten.select.int and not kwargs:  # one index: read that row only
            self, dim, index = args
            index = index + self.shape[dim] if index < 0 else index
            return self._cut(dim, index, index + 1).materialize().squeeze(dim)
        if func in (_aten.detach.default, _aten.alias.default) and not kwargs:
            return args[0]
        # every other op needs values: read the boxes, run it on plain tensors
        real = tree_map(lambda a: a.materialize() if isinstance(a, LazyTensor) else a, (args, kwargs))
        return func(*real[0], **real[1])
