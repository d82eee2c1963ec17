"""Filling a ``torch.nn.Module`` in place from loaded tensors, leaving nothing on the meta device.

A model built under ``torch.device("meta")`` has every tensor on meta, also its *non-persistent* buffers
(BERT's ``position_ids``/``token_type_ids``, rotary ``inv_freq``): values computed in ``__init__`` that
``state_dict`` leaves out and a file therefore does not hold (unless written with
``include_non_persistent_buffers=True``). Left on meta the model computes garbage (NaN) without a word, so
after the file's tensors are in place each such buffer is

1. taken from the file when the file holds it, else
2. rebuilt by the model's own initialisation hook, the way transformers does after its meta-device init: the
   nearest enclosing module with an ``_init_weights(module)`` method (every ``PreTrainedModel``) is asked to
   initialise the owning submodule, else
3. refused: :class:`~hf_tensorizer.errors.UsageError` naming the buffers.

The hook runs on the owning submodule alone with its loaded parameters swapped for meta stand-ins (so it
cannot overwrite a loaded weight), twice, into buffers pre-filled with 0 and then with 1: a rebuild counts
only when both runs give the same bytes (the hook wrote every element, deterministically).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch

from ..errors import UsageError

_HINT = (
    "build the model with accelerate.init_empty_weights() (include_buffers=False keeps buffers real) instead of "
    "torch.device('meta'), or write the file with write_module(..., include_non_persistent_buffers=True)"
)


class LoadInfo(NamedTuple):
    """What ``load_into_module`` did, like ``Module.load_state_dict``'s result."""

    missing_keys: list[str]
    unexpected_keys: list[str]


def fill_module(
    tensors: Mapping[str, torch.Tensor], module: torch.nn.Module, *, device: torch.device, strict: bool = True
) -> LoadInfo:
    """Fill ``module``'s parameters and buffers from ``tensors`` in place (``TensorDeserializer.load_into_module``).

    Each parameter is replaced by a ``Parameter`` holding the loaded tensor (``requires_grad`` kept), each
    buffer by the tensor (persistence kept); parameters that were one object (tied weights) stay one object.
    Non-persistent buffers left on meta are then loaded from ``tensors`` when present, else rebuilt by the
    model's ``_init_weights`` hook (see the module docstring), else refused.

    Args:
        tensors: the loaded tensors by state-dict key (iteration gives the selected names).
        module: the module to fill.
        device: where rebuilt buffers go when their module holds no loaded tensor to follow.
        strict: raise if keys are missing or unexpected, or if any tensor is left on meta.

    Returns:
        The missing and unexpected keys.

    Raises:
        UsageError: with ``strict``, keys do not match or a tensor is left on meta; a shape mismatch; a
            non-persistent buffer left on meta that neither the file nor the model can rebuild.
    """
    expected = list(module.state_dict(keep_vars=True).keys())
    expected_set = set(expected)
    non_persistent = _non_persistent_buffers(module)
    missing = [k for k in expected if k not in tensors]
    unexpected = [k for k in tensors if k not in expected_set and k not in non_persistent]
    if strict and (missing or unexpected):
        raise UsageError(f"keys do not match the module: missing {missing[:10]}, unexpected {unexpected[:10]}")
    present = [k for k in expected if k not in missing] + [k for k in non_persistent if k in tensors]
    replaced: dict[int, torch.nn.Parameter] = {}
    originals: list[torch.nn.Parameter] = []  # keeps replaced ids alive: a freed id can be reused by a new one
    for name in present:
        owner_name, _, attr = name.rpartition(".")
        owner = module.get_submodule(owner_name) if owner_name else module
        tensor = tensors[name]
        old = owner._parameters.get(attr)
        if old is not None:
            _check_shape(name, old, tensor)
            new = replaced.get(id(old))
            if new is None:
                new = torch.nn.Parameter(tensor, requires_grad=old.requires_grad)
                replaced[id(old)] = new
                originals.append(old)
            owner._parameters[attr] = new
        elif attr in owner._buffers:
            old_buf = owner._buffers[attr]
            if old_buf is not None:
                _check_shape(name, old_buf, tensor)
            owner._buffers[attr] = tensor
        else:
            raise UsageError(f"{name!r} is neither a parameter nor a buffer of the module")
    # parameters tied to a loaded one but absent from state_dict keys (deduplicated names)
    for sub in module.modules():
        for attr, p in list(sub._parameters.items()):
            if p is not None and id(p) in replaced:
                sub._parameters[attr] = replaced[id(p)]
    _rebuild_meta_buffers(module, device)
    if strict:
        left = [n for n, t in _named_tensors(module) if t.is_meta]
        if left:
            raise UsageError(f"tensors left on the meta device after loading: {left[:10]}; {_HINT}")
    return LoadInfo(missing, unexpected)


def _named_tensors(module: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    out: list[tuple[str, torch.Tensor]] = list(module.named_parameters(remove_duplicate=False))
    return out + list(module.named_buffers(remove_duplicate=False))


def _non_persistent_buffers(module: torch.nn.Module) -> dict[str, tuple[torch.nn.Module, str]]:
    """Every non-persistent buffer by its dotted name, with its owner and attribute."""
    out = {}
    for path, sub in module.named_modules(remove_duplicate=False):
        for attr in sub._non_persistent_buffers_set:
            if sub._buffers.get(attr) is not None:
                out[f"{path}.{attr}" if path else attr] = (sub, attr)
    return out


def _rebuild_meta_buffers(module: torch.nn.Module, device: torch.device) -> None:
    """Rebuild every non-persistent buffer left on meta with its model's init hook, or raise naming them."""
    owners: dict[int, tuple[str, torch.nn.Module, list[str]]] = {}
    for name, (sub, attr) in _non_persistent_buffers(module).items():
        buf = sub._buffers[attr]
        if buf is not None and buf.is_meta:
            path = name.rpartition(".")[0]
            owners.setdefault(id(sub), (path, sub, []))[2].append(attr)
    if not owners:
        return
    by_path = dict(module.named_modules(remove_duplicate=False))
    failed: list[str] = []
    reasons: list[str] = []
    for path, sub, attrs in owners.values():
        hook = _init_hook(path, by_path)
        names = [f"{path}.{a}" if path else a for a in attrs]
        if hook is None:
            failed += names
            continue
        try:
            _run_hook(hook, sub, attrs, _device_of(sub, device))
        except _NotRebuilt as exc:
            failed += names
            reasons.append(str(exc))
    if failed:
        why = f" ({'; '.join(reasons[:3])})" if reasons else ""
        raise UsageError(
            f"non-persistent buffers are on the meta device and neither the file nor the model can rebuild them: "
            f"{failed[:10]}{why}; {_HINT}"
        )


def _init_hook(path: str, by_path: dict[str, torch.nn.Module]) -> Callable[[torch.nn.Module], Any] | None:
    """The ``_init_weights`` of the nearest module enclosing ``path`` (itself included), if any."""
    parts = path.split(".") if path else []
    for i in range(len(parts), -1, -1):
        hook = getattr(by_path.get(".".join(parts[:i])), "_init_weights", None)
        if callable(hook):
            return hook
    return None


def _device_of(sub: torch.nn.Module, default: torch.device) -> torch.device:
    """Where the module's own loaded tensors are (a rebuilt buffer follows them), else ``default``."""
    for t in list(sub._parameters.values()) + list(sub._buffers.values()):
        if t is not None and not t.is_meta:
            return t.device
    return default


class _NotRebuilt(Exception):
    """The hook did not rebuild the buffers (raised, left them on meta, or wrote them only partly)."""


def _run_hook(
    hook: Callable[[torch.nn.Module], Any], sub: torch.nn.Module, attrs: list[str], device: torch.device
) -> None:
    saved_params = dict(sub._parameters)
    saved_buffers = dict(sub._buffers)
    templates = {a: saved_buffers[a] for a in attrs}
    runs: list[dict[str, torch.Tensor]] = []
    try:
        # the hook sees meta stand-ins for what is loaded: whatever it initialises there costs nothing, changes nothing
        for a, p in saved_params.items():
            if p is not None and not p.is_meta:
                sub._parameters[a] = torch.nn.Parameter(torch.empty_like(p, device="meta"), p.requires_grad)
        for a, b in saved_buffers.items():
            if b is not None and not b.is_meta and a not in templates:
                sub._buffers[a] = torch.empty_like(b, device="meta")
        for fill in (0, 1):
            for a, t in templates.items():
                sub._buffers[a] = torch.full_like(t, fill, device=device)
            with torch.no_grad():
                hook(sub)
            runs.append({a: sub._buffers[a] for a in attrs})
    except Exception as exc:  # a hook written for a real init may trip over meta stand-ins
        raise _NotRebuilt(f"{type(sub).__name__} init hook raised {type(exc).__name__}: {exc}") from exc
    finally:
        for a in saved_params:
            sub._parameters[a] = saved_params[a]
        for a in saved_buffers:
            if a not in templates:
                sub._buffers[a] = saved_buffers[a]
    first, second = runs
    for a, t in templates.items():
        x, y = first[a], second[a]
        ok = isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and not x.is_meta and not y.is_meta
        ok = ok and x.shape == t.shape and x.dtype == t.dtype and _same_bytes(x, y)
        if not ok:
            for b in templates:
                sub._buffers[b] = templates[b]
            raise _NotRebuilt(f"{type(sub).__name__} init hook did not rebuild {a!r}")
        sub._buffers[a] = y


def _same_bytes(x: torch.Tensor, y: torch.Tensor) -> bool:
    if x.shape != y.shape or x.dtype != y.dtype or x.device != y.device:
        return False
    if x.numel() == 0:
        return True
    return torch.equal(x.contiguous().reshape(-1).view(torch.uint8), y.contiguous().reshape(-1).view(torch.uint8))


def _check_shape(name: str, old: torch.Tensor, new: torch.Tensor) -> None:
    if tuple(old.shape) != tuple(new.shape):
        raise UsageError(f"{name!r}: module expects shape {tuple(old.shape)}, file has {tuple(new.shape)}")
