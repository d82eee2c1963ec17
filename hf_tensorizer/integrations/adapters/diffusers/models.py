"""diffusers integration: ``ModelMixin`` models and whole ``DiffusionPipeline``s, tensorized.

A model artifact is a folder with ``config.json`` and ``model.tensors``. A pipeline artifact is the stock
pipeline layout (``model_index.json``, one subfolder per component) where each component with weights has
its own ``model.tensors``; transformers components (text encoders) are written by the transformers
integration, schedulers, tokenizers and feature extractors by their own ``save_pretrained``.

Models are built with accelerate's ``init_empty_weights`` (parameters on meta, buffers real, under the
requested default dtype like stock diffusers) and filled in place by
:meth:`~hf_tensorizer.TensorDeserializer.load_into_module`, one deserializer per (device, dtype) group, so
every tensor is read straight into its final device and dtype.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from ....engine import TensorSerializer
from ....errors import UsageError
from ....sources.uri import redact
from ... import patches
from ...artifact.cache import resolve
from ...artifact.publish import ArtifactWriter
from ...artifact.routing import reached_through
from ...loading import offload
from ...loading.weights import OpenWeights, Target, device_for, locate, open_weights, placement, stream_to_devices
from ...options import pipeline_options, pop_options, transport_only
from . import quantized as diffusers_quantized

_AUTO_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")
# stock from_pretrained arguments that mean nothing for a tensorized artifact
_IGNORED = ("cache_dir", "force_download", "proxies", "local_files_only", "token", "revision",
            "use_safetensors", "low_cpu_mem_usage", "offload_state_dict", "disable_mmap", "offload_folder",
            "mirror", "ignore_mismatched_sizes", "use_flashpack", "flashpack_kwargs", "dduf_entries")  # fmt: skip


def _stream(
    model: torch.nn.Module,
    weights: OpenWeights,
    dtype: torch.dtype | None,
    keep_fp32: Any,
    device_map: dict[str, Any],
    engine: dict[str, Any],
    disk: dict[str, torch.dtype | None],
) -> tuple[list[str], list[str]]:
    """Load the open ``weights`` into ``model`` on their devices and dtypes; returns the (missing, unexpected)
    keys. Tensors placed on ``"disk"`` are not read: ``disk`` gets their names and dtypes (:mod:`.offload`)."""
    expected = list(model.state_dict(keep_vars=True).keys())
    targets: dict[str, Target] = {}
    for key in expected:
        if key not in weights.file_of:
            continue
        target = dtype
        if target is not None and keep_fp32 and any(m in key.split(".") for m in keep_fp32):
            target = torch.float32
        if target is not None and not weights.entry(key).dtype.is_floating_point:
            target = None
        if placement(device_map, key) == "disk":
            disk[key] = target
            continue
        targets[key] = (device_for(device_map, key), target)
    for d in stream_to_devices(weights, targets, engine):
        d.load_into_module(model, strict=False)
    return [k for k in expected if k not in weights.file_of], sorted(set(weights.file_of).difference(expected))


def _keep_fp32(cls: type, dtype: torch.dtype | None) -> list[str]:
    modules = getattr(cls, "_keep_in_fp32_modules", None) or []
    return list(modules) if dtype in (torch.float16, torch.bfloat16) else []


def load_model(cls: type, pretrained_model_name_or_path: Any, **kwargs: Any) -> Any:
    """``cls.from_pretrained`` for a tensorized diffusers model (``UNet2DConditionModel``, ``AutoencoderKL``...).

    Honours ``dtype``/``torch_dtype`` (with ``_keep_in_fp32_modules``), ``device_map`` (a device, ``"auto"``
    and friends through accelerate, or an explicit dict; several devices are dispatched with accelerate
    hooks), ``max_memory``, ``subfolder``, ``variant`` (``model.<variant>.tensors``, or the stock
    ``diffusion_pytorch_model.<variant>.safetensors``), ``output_loading_info`` and ``tensorizer_options``.

    Raises:
        UsageError: no weights, a pre-quantized checkpoint, or weights missing from the file.
    """
    import accelerate

    options = pop_options(kwargs)
    quantization_config = kwargs.pop("quantization_config", None)
    for k in _IGNORED:
        kwargs.pop(k, None)
    dtype = kwargs.pop("torch_dtype", None) or kwargs.pop("dtype", None)
    kwargs.pop("dtype", None)
    device_map = kwargs.pop("device_map", None)
    max_memory = kwargs.pop("max_memory", None)
    output_loading_info = kwargs.pop("output_loading_info", False)
    subfolder = kwargs.pop("subfolder", None) or ""
    variant = kwargs.pop("variant", None)
    root = os.fspath(pretrained_model_name_or_path)
    folder, weights = locate(root, subfolder, variant=variant, **options.transport)

    config, unused = cls.load_config(folder, return_unused_kwargs=True, **kwargs)
    quantizer = diffusers_quantized.quantizer_for(config, quantization_config)
    if quantizer is not None:
        dtype, device_map = diffusers_quantized.prepare(quantizer, dtype, device_map)
    dtype_orig = cls._set_default_torch_dtype(dtype) if dtype is not None else None
    try:
        with accelerate.init_empty_weights():  # parameters on meta; buffers real (rebuilt like stock)
            model = cls.from_config(config, **unused)
    finally:
        if dtype_orig is not None:
            torch.set_default_dtype(dtype_orig)
    keep_fp32 = _keep_fp32(cls, dtype) if getattr(quantizer, "use_keep_in_fp32_modules", True) else []
    if isinstance(device_map, str) and device_map in _AUTO_MAPS:
        from diffusers.models.model_loading_utils import _determine_device_map

        device_map = _determine_device_map(model, device_map, max_memory, dtype, keep_fp32)
    elif device_map is None:
        device_map = {"": "cpu"}
    elif not isinstance(device_map, dict):
        device_map = {"": device_map}
    if quantizer is not None:  # layers replaced before any weight loads, as stock
        quantizer.preprocess_model(model=model, device_map=device_map, keep_in_fp32_modules=keep_fp32)

    # each weight file opened once for its index and every group: a remote object is pinned once, so groups
    # cannot mix versions
    disk: dict[str, torch.dtype | None] = {}
    with open_weights(weights, **options.transport) as opened:  # names and dtypes; the loads authenticate
        if quantizer is None:
            missing, unexpected = _stream(model, opened, dtype, keep_fp32, device_map, dict(options.engine), disk)
        else:  # quantized as they stream, a window at a time
            missing, unexpected = diffusers_quantized.stream(model, opened, quantizer, dtype, keep_fp32, device_map,
                                                             dict(options.engine))  # fmt: skip
        where = {k: (opened.sources[opened.file_of[k]].uri, opened.indexes[opened.file_of[k]], k) for k in disk}
    still_meta = [n for n, p in model.named_parameters() if p.is_meta and n not in where]
    if still_meta:
        raise UsageError(f"{redact(root)} lacks weights the model needs: {still_meta[:10]}")
    # buffers were built on the CPU (non-persistent ones are never in the file): move them to their device
    for name, buf in list(model.named_buffers()):
        if name in where:
            continue  # read on use, like the parameters
        device = torch.device("cpu") if placement(device_map, name) == "disk" else device_for(device_map, name)
        if buf.device != device:
            owner_name, _, attr = name.rpartition(".")
            owner = model.get_submodule(owner_name)
            owner._buffers[attr] = buf.to(device)
    if where:  # as stock transformers does for safetensors: accelerate's offload index names the file, no copy
        accelerate.dispatch_model(model, device_map=device_map, offload_index=offload.offload_index(where, model))
        offloaded = offload.ArtifactWeights(where, disk, options.transport, options.engine)
        offload.attach(model, offloaded)
        model.hf_tensorizer_offloaded = offloaded
    elif len({str(v) for v in device_map.values()}) > 1:
        accelerate.dispatch_model(model, device_map=device_map)
    model.register_to_config(_name_or_path=root)
    if quantizer is not None:
        diffusers_quantized.finish(model, quantizer, dtype)
    model.eval()
    if output_loading_info:
        return model, {"missing_keys": missing, "unexpected_keys": unexpected, "mismatched_keys": [], "error_msgs": []}
    return model


def _write_model(
    model: Any, folder: str, weights_dest: str, transport: dict[str, Any], *, metadata: dict[str, str] | None = None,
    **serializer_options: Any,
) -> dict[str, str] | None:  # fmt: skip
    if getattr(model, "hf_quantizer", None) is not None:
        raise UsageError("saving quantized diffusers models tensorized is not supported; save the unquantized model "
                         "and load it with quantization_config=...")  # fmt: skip
    model.save_config(folder)
    meta = {"format": "pt", "hf_tensorizer.layout": "diffusers", "class": type(model).__name__, **(metadata or {})}
    with TensorSerializer(weights_dest, metadata=meta, **serializer_options, **transport) as s:
        s.write_module(model)
    return s.committed_version


def save_model(model: Any, dest: str | os.PathLike[str], *, tensorizer_options: dict[str, Any] | None = None,
               variant: str | None = None, **serializer_options: Any) -> str:  # fmt: skip
    """Write a diffusers ``ModelMixin`` as a tensorized artifact (``config.json`` + ``model[.<variant>].tensors``).

    Returns:
        ``dest`` as a string.
    """
    dest = os.fspath(dest)
    with ArtifactWriter(dest, transport_only(tensorizer_options), variant) as staging:
        version = _write_model(model, staging.folder, staging.weights(), staging.transport, **serializer_options)
        staging.record(staging.weights_name, version)
        staging.publish([staging.weights_name], "diffusers")
    return dest


def save_pipeline(pipe: Any, dest: str | os.PathLike[str], *, tensorizer_options: dict[str, Any] | None = None,
                  variant: str | None = None, **serializer_options: Any) -> str:  # fmt: skip
    """Write a ``DiffusionPipeline``: model_index.json, and per component its files and
    ``model[.<variant>].tensors``.

    Returns:
        ``dest`` as a string.
    """
    from diffusers import ModelMixin
    from transformers import PreTrainedModel

    from ..transformers.save import write_model

    dest = os.fspath(dest)
    weights: list[str] = []
    with ArtifactWriter(dest, transport_only(tensorizer_options), variant) as staging:
        pipe.save_config(staging.folder)
        for name, comp in pipe.components.items():
            if comp is None:
                continue
            sub = os.path.join(staging.folder, name)
            os.makedirs(sub, exist_ok=True)
            if isinstance(comp, ModelMixin):
                version = _write_model(comp, sub, staging.weights(name), staging.transport, **serializer_options)
            elif isinstance(comp, PreTrainedModel):
                version = write_model(comp, sub, staging.weights(name), staging.transport, **serializer_options)
            elif hasattr(comp, "save_pretrained"):
                comp.save_pretrained(sub)
                continue
            else:
                raise UsageError(f"pipeline component {name!r} ({type(comp).__name__}) cannot be saved")
            weights.append(f"{name}/{staging.weights_name}")
            staging.record(weights[-1], version)
        staging.publish(weights, "diffusers")
    return dest


def load_pipeline(cls: type, pretrained_model_name_or_path: Any, **kwargs: Any) -> Any:
    """``cls.from_pretrained`` for a tensorized (or stock, behind a URI) pipeline: small files fetched, components
    streamed.

    Stock diffusers does the assembly (model_index.json, schedulers, tokenizers); each component with weights loads
    through :func:`load_model` or the transformers integration, so the hooks must be enabled (``enable()``), as they
    are whenever this runs from the patched ``DiffusionPipeline.from_pretrained``.

    Raises:
        UsageError: the hooks are not enabled, or unknown ``tensorizer_options``.
    """
    from diffusers import DiffusionPipeline

    if not patches.is_patched(DiffusionPipeline, "from_pretrained"):
        raise UsageError("loading a pipeline through hf_tensorizer needs hf_tensorizer.enable() (or enabled())")
    options = pop_options(kwargs)
    folder = resolve(os.fspath(pretrained_model_name_or_path), variant=kwargs.get("variant"), **options.transport)
    stock = patches.stock(DiffusionPipeline, "from_pretrained")
    # components load from the local (cached) folders; their remote weights need the same options
    with pipeline_options(options), reached_through(pretrained_model_name_or_path, folder):
        pipe = stock.__func__(cls, folder, **kwargs)
    if hasattr(pipe, "register_to_config"):
        pipe.register_to_config(_name_or_path=os.fspath(pretrained_model_name_or_path))
    return pipe
