"""Parameters that *become* the streamed tensors instead of receiving a copy of them (CPU, one rank).

vLLM builds its model with freshly allocated parameters and its weight loaders fill them with
``param.data.copy_(loaded)``. On CPU our tensors are already in memory, as views of the file's page-cache pages
(mapped) or as tensors of their own (read): copying each into a new parameter writes every byte of the model once
more, into memory faulted in for the purpose, and the CPU backend then repacks most linear weights for oneDNN
anyway. :class:`Adoption`, a ``TorchDispatchMode`` around ``model.load_weights``, intercepts ``aten.copy_`` where
a *whole* streamed tensor goes into a *whole* parameter of the same dtype and shape (embeddings, ``lm_head``,
``o_proj``, ``down_proj``, norms...) and sets ``param.data`` to the streamed tensor instead. Every other copy runs
as it would: fused parameters (QKV, gate/up) filled piece by piece, a dtype or shape change, a parameter sharing
its storage with another parameter, a tensor copied a second time, a streamed tensor that is a view of a larger
buffer.

A mapped tensor is moved onto a mapping of only its own pages when taken
(:meth:`~hf_tensorizer.TensorDeserializer.own_pages`), so the file's mapping goes once the copied tensors are
dropped, and a parameter that vLLM replaces in ``process_weights_after_loading`` (the repacked linear weights)
unmaps its pages with it. The parameters still on the file after post-processing (embeddings, ``lm_head``,
norms) stay there when the loader holds a read lease on the file (:mod:`hf_tensorizer.engine.lease`: a process
that opens it for writing waits while they move into private memory); otherwise :meth:`Adoption.release` copies
them out. Either way, rewriting the file in place later cannot change or crash a running server (docs/security.md)
— the guarantee a copying loader gives.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# a streamed tensor -> (what the parameter becomes, whether that is a view of the artifact's file), or None: copy it
Take = Callable[[torch.Tensor], "tuple[torch.Tensor, bool] | None"]


@dataclass
class AdoptionStats:
    """What an :class:`Adoption` did.

    Attributes:
        taken: names (``module.param``) of the parameters that became a streamed tensor.
        taken_bytes: their bytes (copies not made).
        copied: ``aten.copy_`` calls left to run (fused or partial parameters, casts, ...).
        released: parameters still on a file mapping after post-processing, copied out by :meth:`Adoption.release`.
        released_bytes: their bytes.
        kept: parameters left on the file mapping by ``release(copy=False)`` (the file is under a read lease).
        kept_bytes: their bytes.
    """

    taken: list[str] = field(default_factory=list)
    taken_bytes: int = 0
    copied: int = 0
    released: list[str] = field(default_factory=list)
    released_bytes: int = 0
    kept: list[str] = field(default_factory=list)
    kept_bytes: int = 0


def _whole(t: torch.Tensor) -> bool:
    """``t`` is the whole of its storage: contiguous, from its first byte to its last."""
    return (t.is_contiguous() and t.storage_offset() == 0 and t.nbytes > 0
            and t.untyped_storage().nbytes() == t.nbytes)  # fmt: skip


class Adoption(TorchDispatchMode):
    """Turns whole-tensor copies into whole parameters into adoptions, while active (``with adoption:``).

    Args:
        model: the module whose parameters may be adopted (their set is fixed when this is created).
        take: what a parameter becomes for a streamed tensor: ``(tensor, mapped)`` — a mapped tensor's bytes on a
            mapping of their own (:meth:`~hf_tensorizer.TensorDeserializer.own_pages`) and ``True``, or the tensor
            itself and ``False`` (memory of its own) — or ``None`` to copy it after all. Default: the tensor itself.

    Only tensors passed through :meth:`offer` are taken, each at most once: a temporary the model's weight loader
    computes, or a tensor it hands to two parameters, is copied as before.
    """

    def __init__(self, model: torch.nn.Module, take: Take | None = None) -> None:
        super().__init__()
        self._take = take or (lambda t: (t, False))
        self.stats = AdoptionStats()
        # storage -> [Parameter objects on it]: a storage two distinct parameters share is never swapped
        owners: dict[int, list[tuple[str, torch.nn.Parameter]]] = {}
        seen: set[int] = set()
        for name, p in model.named_parameters(remove_duplicate=False):
            if id(p) in seen or p.device.type != "cpu":
                continue
            seen.add(id(p))
            owners.setdefault(p.untyped_storage().data_ptr(), []).append((name, p))
        for name, b in model.named_buffers(remove_duplicate=False):
            if b.device.type == "cpu":  # a buffer on a parameter's storage: that parameter is not whole
                owners.setdefault(b.untyped_storage().data_ptr(), []).append((name, None))  # type: ignore[arg-type]
        self._params: dict[int, tuple[str, torch.nn.Parameter]] = {
            ptr: found[0] for ptr, found in owners.items() if len(found) == 1 and found[0][1] is not None
            and _whole(found[0][1].data)
        }  # fmt: skip
        self._offered: dict[int, tuple[weakref.ref[torch.Tensor], torch.Size, torch.dtype]] = {}
        self._model = model
        # taken views of the file, held weakly: a parameter vLLM replaces (a repacked linear weight) must free its
        # pages, and its mapping, as soon as vLLM drops it
        self._mapped: list[tuple[str, weakref.ref[torch.nn.Parameter], int]] = []

    def offer(self, tensors: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        """Pass ``(name, tensor)`` pairs through, each tensor adoptable while it lives."""
        for name, t in tensors:
            if t.device.type == "cpu" and _whole(t):
                self._offered[t.data_ptr()] = (weakref.ref(t), t.shape, t.dtype)
            yield name, t

    def _taking(self, dst: torch.Tensor, src: torch.Tensor) -> tuple[str, torch.nn.Parameter] | None:
        offered = self._offered.get(src.data_ptr())
        if offered is None:
            return None
        ref, shape, dtype = offered
        # alive: its memory cannot have been handed to another tensor since it was offered
        if ref() is None or src.shape != shape or src.dtype != dtype or not src.is_contiguous():
            return None
        found = self._params.get(dst.data_ptr())
        if found is None or src.device != dst.device:
            return None
        _, param = found
        if dst.shape != param.shape or dst.shape != src.shape or dst.dtype != src.dtype or not dst.is_contiguous():
            return None
        return found

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:  # fmt: skip
        kwargs = kwargs or {}
        if func is torch.ops.aten.copy_.default and len(args) == 2 and not kwargs:
            dst, src = args
            found = self._taking(dst, src)
            taken = self._take(src) if found is not None else None
            if found is not None and taken is not None:
                name, param = found
                # the mode is off inside its own handler: this swap dispatches nothing back here
                param.data = taken[0]
                del self._offered[src.data_ptr()], self._params[dst.data_ptr()]
                if taken[1]:
                    self._mapped.append((name, weakref.ref(param), param.data_ptr()))
                self.stats.taken.append(name)
                self.stats.taken_bytes += param.nbytes
                return dst
            self.stats.copied += 1
        return func(*args, **kwargs)

    def __exit__(self, *exc: object) -> None:
        super().__exit__(*exc)
        self._offered.clear()  # no reference to a streamed tensor outlives the load

    def release(self, copy: bool = True) -> AdoptionStats:
        """Copy into memory of their own the taken parameters that still view the artifact's file (those vLLM's
        post-processing did not replace): afterwards no parameter does.

        Args:
            copy: false leaves them on the mapping and only counts them: the caller holds a read lease on the file
                (:mod:`hf_tensorizer.engine.lease`), which moves them if a writer comes.

        Returns:
            :attr:`stats`, with ``released`` (or ``kept``) filled in.
        """
        present = {id(p) for _, p in self._model.named_parameters(remove_duplicate=False)}
        for name, ref, ptr in self._mapped:
            param = ref()
            if param is not None and id(param) in present and param.data_ptr() == ptr:
                if copy:
                    param.data = param.data.clone()
                    self.stats.released.append(name)
                    self.stats.released_bytes += param.nbytes
                else:
                    self.stats.kept.append(name)
                    self.stats.kept_bytes += param.nbytes
        self._mapped.clear()
        return self.stats
