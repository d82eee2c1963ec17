"""Quantized transformers models: what a tensorized save writes, and what a load hands the quantizer.

Saving mirrors stock ``save_pretrained``: the quantizer's ``get_state_dict_and_metadata`` (torchao flattens its
tensor subclasses into plain component tensors plus a JSON description per tensor; bitsandbytes, compressed-tensors
and the others give plain tensors: ``weight`` + ``SCB``, ``weight.absmax`` + the quant state packed as a uint8
tensor, ``weight_packed`` + ``weight_scale``...) or else ``model.state_dict()``. The tensors go into
``model.tensors`` under the same keys as stock's safetensors file and the metadata into that file's own string
metadata map: nothing is pickled, and what a format needs beyond plain tensors is JSON. ``config.json`` carries the
``quantization_config`` as stock writes it.

Loading a pre-quantized checkpoint (artifact, or stock safetensors behind a URI) hands transformers' quantizer the
checkpoint keys, as stock does; :func:`prepare_quantizer` gives it the files' metadata that stock reads with
``safe_open`` (torchao needs it to rebuild its subclasses). Quantize-on-load keeps streaming: :func:`lazy_tensors`
gives transformers one lazy value per tensor, read in windows of at most :data:`WINDOW_BYTES` when the quantizer
asks for it, so the full-precision model never sits in host memory at once.
"""

from __future__ import annotations

import contextlib
import copy
import threading
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from ....errors import UsageError
from ....format.dtypes import dtype_name
from ...loading.weights import OpenWeights, Target, stream_to_devices

#: full-precision bytes read ahead of the quantizer during a quantize-on-load (besides one tensor larger than it)
WINDOW_BYTES = 256 << 20

# safetensors' dtype names, for ``get_dtype()`` (what transformers asks of a lazily loaded checkpoint tensor)
_ST_NAMES = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16", "int64": "I64",
             "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL"}  # fmt: skip


@contextlib.contextmanager
def parameters_kept(model: torch.nn.Module) -> Iterator[None]:
    """Undo what collecting a state dict does to the model in memory: bitsandbytes' 4-bit ``_save_to_state_dict``
    (0.50) turns a CPU-repacked weight (the layout its first CPU forward makes where avx512-bf16 is available) back
    into the portable layout *in place*, replacing ``weight.data`` and ``weight.quant_state``, so the model's next
    forward differs (max 0.024 on the tiny test Llama). The state dict keeps the portable tensors; every parameter
    gets back its own data and quant state."""
    # a quant state is a few small tensors, and bitsandbytes edits it in place: a copy
    kept = [(p, p.data, p.data_ptr(), p.shape, copy.deepcopy(getattr(p, "quant_state", None)))
            for p in model.parameters()]  # fmt: skip
    try:
        yield
    finally:
        for p, data, ptr, shape, quant_state in kept:
            if p.data_ptr() != ptr or p.shape != shape:
                p.data = data
                if quant_state is not None:
                    p.quant_state = quant_state  # type: ignore[attr-defined]


def quantized_state_dict(model: Any) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and file metadata stock ``save_pretrained`` writes for a quantized model (before ties and
    conversions are reverted).

    Returns:
        ``(state_dict, metadata)``: plain tensors only, and a string map for the weights file's metadata.

    Raises:
        UsageError: the quantization method is not serializable (as stock says), a value is a tensor subclass
            that has no plain storage, or the quantizer's metadata is not a string map.
    """
    quantizer = model.hf_quantizer
    method = getattr(quantizer.quantization_config, "quant_method", "?")
    method = getattr(method, "value", method)
    if not quantizer.is_serializable():
        raise UsageError(f"the model is quantized with {method}, which transformers cannot serialize")
    with parameters_kept(model):
        state_dict, metadata = quantizer.get_state_dict_and_metadata(model)
        if state_dict is None:
            state_dict = model.state_dict()
    out = {}
    for key, value in state_dict.items():
        out[key] = _plain(key, value, method)
    metadata = dict(metadata or {})
    bad = [k for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)]
    if bad:
        raise UsageError(f"{method} quantizer metadata is not a string map (keys {bad[:5]})")
    return out, metadata


@contextlib.contextmanager
def without_load_operations(model: Any) -> Iterator[None]:
    """Within: ``model``'s recorded weight conversions without the quantizer's own load operations.

    A pre-quantized load records the quantizer's deserialize converters (torchao, bitsandbytes...), which have no
    reverse: stock ``save_pretrained`` of such a model raises ``NotImplementedError`` in transformers 5.x. The
    quantizer's state dict is already in the serialized layout, so only the model's own conversions are reverted.
    """
    convs = model.__dict__.get("_weight_conversions")
    if not convs:
        yield
        return

    def loads(conv: Any) -> bool:
        return any(getattr(op, "hf_quantizer", None) is not None for op in getattr(conv, "operations", ()))

    model._weight_conversions = [c for c in convs if not loads(c)]
    try:
        yield
    finally:
        model._weight_conversions = convs


def _plain(key: str, value: Any, method: str) -> torch.Tensor:
    """``value`` as a plain tensor: parameters (bitsandbytes' ``Params4bit``/``Int8Params`` too) by their data."""
    if not isinstance(value, torch.Tensor):
        raise UsageError(f"{method}: state dict entry {key!r} is a {type(value).__name__}, not a tensor")
    if type(value) is not torch.Tensor:
        data = value.data
        if type(data) is not torch.Tensor:
            raise UsageError(f"{method}: {key!r} is a {type(value).__name__} tensor subclass without plain storage; "
                             "transformers does not flatten it for saving either")  # fmt: skip
        value = data
    dtype_name(value.dtype)  # raises UnknownDtypeError for dtypes without byte storage
    return value


def prepare_quantizer(quantizer: Any, weights: OpenWeights) -> None:
    """Give a pre-quantized load's quantizer what stock gives it from the checkpoint files: their metadata.

    Stock torchao reads every safetensors file's metadata (``set_metadata``) and rebuilds each tensor subclass from
    its JSON entry; our weights are read through the engine, so the metadata comes from their indexes instead.
    """
    if quantizer is None or not getattr(quantizer, "pre_quantized", False) or not hasattr(quantizer, "set_metadata"):
        return
    merged: dict[str, str] = {}
    for index in weights.indexes:
        merged.update(index.metadata)
    quantizer.metadata = merged


def quantizes_on_load(quantizer: Any) -> bool:
    """True when transformers quantizes the weights as they load (a ``quantization_config`` on a plain checkpoint)."""
    return quantizer is not None and not getattr(quantizer, "pre_quantized", True)


class LazyTensor:
    """One checkpoint tensor, read when transformers materializes it (``tensor[...]``, as with a safetensors slice).

    Answers the questions transformers asks before that (``shape``, ``dtype``, ``get_dtype()``) from the index.
    """

    def __init__(self, window: Window, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        self._window, self.name, self.shape, self.dtype = window, name, torch.Size(shape), dtype

    def __getitem__(self, item: Any) -> torch.Tensor:
        tensor = self._window.take(self.name)
        return tensor if item is Ellipsis else tensor[item]

    def get_dtype(self) -> str:
        name = dtype_name(self.dtype)
        return _ST_NAMES.get(name, name.upper())

    def get_shape(self) -> list[int]:
        return list(self.shape)

    def is_floating_point(self) -> bool:
        return self.dtype.is_floating_point

    def __repr__(self) -> str:
        return f"LazyTensor({self.name!r}, {tuple(self.shape)}, {self.dtype})"


class Window:
    """Reads the tensors of a quantize-on-load a window at a time, in the order transformers loads them.

    Keys are cut into consecutive windows of about ``window_bytes``; asking for a tensor reads its whole window
    through the engine (one deserializer per device, dtype and file, like any load) and hands each tensor out once,
    so at most one window of full-precision tensors waits for the quantizer. :attr:`peak_bytes` records the most
    that ever waited (tests check it).
    """

    def __init__(self, weights: OpenWeights, targets: Mapping[str, Target], engine: Mapping[str, Any],
                 metrics: list[Any], window_bytes: int | None = None) -> None:  # fmt: skip
        window_bytes = WINDOW_BYTES if window_bytes is None else window_bytes  # read now: tests lower it
        try:
            from transformers.core_model_loading import dot_natural_key  # the order transformers loads in
        except ImportError:  # diffusers alone: by name
            dot_natural_key = None

        self._weights, self._targets, self._engine, self._metrics = weights, dict(targets), engine, metrics
        self._lock = threading.Lock()
        self._ready: dict[str, torch.Tensor] = {}
        self._window_of: dict[str, int] = {}
        self._windows: list[list[str]] = []
        size = window_bytes
        for name in sorted(self._targets, key=dot_natural_key):
            e = weights.entry(name)
            nbytes = e.numel * e.dtype.itemsize
            if size + nbytes > window_bytes and (size > 0 or not self._windows):
                self._windows.append([])
                size = 0
            self._windows[-1].append(name)
            self._window_of[name] = len(self._windows) - 1
            size += nbytes
        self.peak_bytes = 0
        self.reads = 0

    def each(self) -> Iterator[dict[str, torch.Tensor]]:
        """Every window not read yet, in order, as ``name -> tensor`` (drop each before asking for the next)."""
        for window in self._windows:
            names = list(window)
            if names:
                yield {n: self.take(n) for n in names}

    def take(self, name: str) -> torch.Tensor:
        """Tensor ``name``, read with its window if not read yet; handed out once.

        Raises:
            UsageError: the tensor was already handed out (transformers asked twice).
        """
        with self._lock:
            if name not in self._ready:
                window = self._windows[self._window_of[name]]
                if not window:
                    raise UsageError(f"tensor {name!r} was already loaded once")
                targets = {n: self._targets[n] for n in window}
                for d in stream_to_devices(self._weights, targets, self._engine):
                    self._ready.update(d.items())
                    self._metrics.append(d.metrics)
                window.clear()
                self.reads += 1
                self.peak_bytes = max(self.peak_bytes, sum(t.nbytes for t in self._ready.values()))
            return self._ready.pop(name)


def lazy_tensors(weights: OpenWeights, targets: Mapping[str, Target], engine: Mapping[str, Any], metrics: list[Any],
                 window_bytes: int | None = None) -> dict[str, LazyTensor]:  # fmt: skip
    """One :class:`LazyTensor` per key of ``targets``, all sharing one :class:`Window` of ``window_bytes``
    (default :data:`WINDOW_BYTES`)."""
    window = Window(weights, targets, engine, metrics, window_bytes)
    out = {}
    for name in targets:
        e = weights.entry(name)
        out[name] = LazyTensor(window, name, tuple(e.shape), e.dtype)
    return out
