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

import functools
import os
from collections import defaultdict
from typing import Any

import torch

from ..engine import TensorDeserializer, TensorSerializer
from ..engine.staging import reuse_blocks
from ..errors import UsageError
from . import artifact
from .transformers import current_options, split_options

_AUTO_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")
# stock from_pretrained arguments that mean nothing for a tensorized artifact
_IGNORED = ("cache_dir", "force_download", "proxies", "local_files_only", "token", "revision", "variant",
            "use_safetensors", "low_cpu_mem_usage", "offload_state_dict", "disable_mmap", "offload_folder",
            "mirror", "ignore_mismatched_sizes", "use_flashpack", "flashpack_kwargs", "dduf_entries")  # fmt: skip


def _stream(
    model: torch.nn.Module,
    weights: artifact.OpenWeights,
    dtype: torch.dtype | None,
    keep_fp32: Any,
    device_map: dict[str, Any],
    engine: dict[str, Any],
) -> tuple[list[str], list[str]]:
    """Load the open ``weights`` into ``model``, one read per (device, dtype, file) group; returns the
    (missing, unexpected) keys."""
    expected = list(model.state_dict(keep_vars=True).keys())
    file_of, indexes, sources = weights.file_of, weights.indexes, weights.sources
    groups: dict[tuple[torch.device, torch.dtype | None, int], list[str]] = defaultdict(list)
    for key in expected:
        if key not in file_of:
            continue
        target = dtype
        if target is not None and keep_fp32 and any(m in key.split(".") for m in keep_fp32):
            target = torch.float32
        if target is not None and not indexes[file_of[key]].tensors[key].dtype.is_floating_point:
            target = None
        groups[(_device_of(device_map, key), target, file_of[key])].append(key)
    with reuse_blocks():  # one pinned staging block for every group and file, not one each
        for (device, target, file), keys in groups.items():
            with TensorDeserializer(sources[file], device=device, dtype=target, filter=keys, index=indexes[file],
                                    **engine) as d:  # fmt: skip
                d.load_into_module(model, strict=False)
    return [k for k in expected if k not in file_of], sorted(set(file_of).difference(expected))


def _device_of(device_map: dict[str, Any], name: str) -> torch.device:
    """The device of ``name``: the value of the longest module prefix of ``name`` in ``device_map``."""
    parts = name.split(".")
    for i in range(len(parts), -1, -1):
        prefix = ".".join(parts[:i])
        if prefix in device_map:
            value = device_map[prefix]
            if value == "disk":
                raise UsageError("device_map with 'disk' offload is not supported for tensorized loads")
            return torch.device("cuda", value) if isinstance(value, int) else torch.device(value)
    raise UsageError(f"device_map does not place {name!r}")


def _keep_fp32(cls: type, dtype: torch.dtype | None) -> list[str]:
    modules = getattr(cls, "_keep_in_fp32_modules", None) or []
    return list(modules) if dtype in (torch.float16, torch.bfloat16) else []


def load_model(cls: type, pretrained_model_name_or_path: Any, **kwargs: Any) -> Any:
    """``cls.from_pretrained`` for a tensorized diffusers model (``UNet2DConditionModel``, ``AutoencoderKL``...).

    Honours ``dtype``/``torch_dtype`` (with ``_keep_in_fp32_modules``), ``device_map`` (a device, ``"auto"``
    and friends through accelerate, or an explicit dict; several devices are dispatched with accelerate
    hooks), ``max_memory``, ``subfolder``, ``output_loading_info`` and ``tensorizer_options``.

    Raises:
        UsageError: no weights, quantization requested, or weights missing from the file.
    """
    import accelerate

    options = kwargs.pop("tensorizer_options", None) or current_options.get() or {}
    engine, transport = split_options(options)
    if kwargs.pop("quantization_config", None) is not None:
        raise UsageError("quantization_config is not supported for tensorized diffusers loads")
    for k in _IGNORED:
        kwargs.pop(k, None)
    dtype = kwargs.pop("torch_dtype", None) or kwargs.pop("dtype", None)
    kwargs.pop("dtype", None)
    device_map = kwargs.pop("device_map", None)
    max_memory = kwargs.pop("max_memory", None)
    output_loading_info = kwargs.pop("output_loading_info", False)
    subfolder = kwargs.pop("subfolder", None) or ""
    root = os.fspath(pretrained_model_name_or_path)
    folder, weights = artifact.locate(root, subfolder, **transport)

    config, unused = cls.load_config(folder, return_unused_kwargs=True, **kwargs)
    dtype_orig = cls._set_default_torch_dtype(dtype) if dtype is not None else None
    try:
        with accelerate.init_empty_weights():  # parameters on meta; buffers real (rebuilt like stock)
            model = cls.from_config(config, **unused)
    finally:
        if dtype_orig is not None:
            torch.set_default_dtype(dtype_orig)
    keep_fp32 = _keep_fp32(cls, dtype)
    if isinstance(device_map, str) and device_map in _AUTO_MAPS:
        from diffusers.models.model_loading_utils import _determine_device_map

        device_map = _determine_device_map(model, device_map, max_memory, dtype, keep_fp32)
    elif device_map is None:
        device_map = {"": "cpu"}
    elif not isinstance(device_map, dict):
        device_map = {"": device_map}

    # each weight file opened once for its index and every group: a remote object is pinned once, so groups
    # cannot mix versions
    with artifact.open_weights(weights, **transport) as opened:  # names and dtypes; the loads authenticate
        missing, unexpected = _stream(model, opened, dtype, keep_fp32, device_map, engine)
    still_meta = [n for n, p in model.named_parameters() if p.is_meta]
    if still_meta:
        raise UsageError(f"{artifact.redact(root)} lacks weights the model needs: {still_meta[:10]}")
    # buffers were built on the CPU (non-persistent ones are never in the file): move them to their device
    for name, buf in list(model.named_buffers()):
        device = _device_of(device_map, name)
        if buf.device != device:
            owner_name, _, attr = name.rpartition(".")
            owner = model.get_submodule(owner_name)
            owner._buffers[attr] = buf.to(device)
    if len({str(v) for v in device_map.values()}) > 1:
        accelerate.dispatch_model(model, device_map=device_map)
    model.register_to_config(_name_or_path=root)
    model.eval()
    if output_loading_info:
        return model, {"missing_keys": missing, "unexpected_keys": unexpected, "mismatched_keys": [], "error_msgs": []}
    return model


def _write_model(
    model: Any, folder: str, weights_dest: str, transport: dict[str, Any], *, metadata: dict[str, str] | None = None,
    **serializer_options: Any,
) -> None:  # fmt: skip
    model.save_config(folder)
    meta = {"format": "pt", "hf_tensorizer.layout": "diffusers", "class": type(model).__name__, **(metadata or {})}
    with TensorSerializer(weights_dest, metadata=meta, **serializer_options, **transport) as s:
        s.write_module(model)


def save_model(model: Any, dest: str | os.PathLike[str], *, tensorizer_options: dict[str, Any] | None = None,
               **serializer_options: Any) -> str:  # fmt: skip
    """Write a diffusers ``ModelMixin`` as a tensorized artifact (``config.json`` + ``model.tensors``).

    Returns:
        ``dest`` as a string.
    """
    dest = os.fspath(dest)
    with artifact.Staging(dest, tensorizer_options) as staging:
        _write_model(model, staging.folder, staging.weights(), staging.transport, **serializer_options)
        staging.publish([artifact.WEIGHTS_NAME], "diffusers")
    return dest


def save_pipeline(pipe: Any, dest: str | os.PathLike[str], *, tensorizer_options: dict[str, Any] | None = None,
                  **serializer_options: Any) -> str:  # fmt: skip
    """Write a ``DiffusionPipeline``: model_index.json, and per component its files and ``model.tensors``.

    Returns:
        ``dest`` as a string.
    """
    from diffusers import ModelMixin
    from transformers import PreTrainedModel

    from .transformers import write_model

    dest = os.fspath(dest)
    weights: list[str] = []
    with artifact.Staging(dest, tensorizer_options) as staging:
        pipe.save_config(staging.folder)
        for name, comp in pipe.components.items():
            if comp is None:
                continue
            sub = os.path.join(staging.folder, name)
            os.makedirs(sub, exist_ok=True)
            if isinstance(comp, ModelMixin):
                _write_model(comp, sub, staging.weights(name), staging.transport, **serializer_options)
            elif isinstance(comp, PreTrainedModel):
                write_model(comp, sub, staging.weights(name), staging.transport, **serializer_options)
            elif hasattr(comp, "save_pretrained"):
                comp.save_pretrained(sub)
                continue
            else:
                raise UsageError(f"pipeline component {name!r} ({type(comp).__name__}) cannot be saved")
            weights.append(f"{name}/{artifact.WEIGHTS_NAME}")
        staging.publish(weights, "diffusers")
    return dest


def load_pipeline(cls: type, pretrained_model_name_or_path: Any, **kwargs: Any) -> Any:
    """``cls.from_pretrained`` for a tensorized pipeline: small files fetched, components streamed.

    Stock diffusers does the assembly (model_index.json, schedulers, tokenizers); each component with
    weights loads through :func:`load_model` or the transformers integration (hooks enabled for the call).
    """
    from . import enabled

    options = kwargs.pop("tensorizer_options", None) or current_options.get() or {}
    _engine, transport = split_options(options)
    folder = artifact.resolve(os.fspath(pretrained_model_name_or_path), **transport)
    with enabled():
        from diffusers import DiffusionPipeline

        original = _ORIGINALS.get((DiffusionPipeline, "from_pretrained"), DiffusionPipeline.__dict__["from_pretrained"])
        # components load from the local (cached) folders; their remote weights need the same options
        token = current_options.set(options)
        try:
            with artifact.reached_through(pretrained_model_name_or_path, folder):
                pipe = original.__func__(cls, folder, **kwargs)
        finally:
            current_options.reset(token)
    if hasattr(pipe, "register_to_config"):
        pipe.register_to_config(_name_or_path=os.fspath(pretrained_model_name_or_path))
    return pipe


# ---- patches ------------------------------------------------------------------------------------------------

_ORIGINALS: dict[tuple[type, str], Any] = {}


def patch() -> None:
    """Install the diffusers hooks (idempotent). See :func:`hf_tensorizer.enable`."""
    from diffusers import DiffusionPipeline, ModelMixin

    if _ORIGINALS:
        return
    model_fp = ModelMixin.__dict__["from_pretrained"]
    model_save = ModelMixin.__dict__["save_pretrained"]
    pipe_fp = DiffusionPipeline.__dict__["from_pretrained"]
    pipe_save = DiffusionPipeline.__dict__["save_pretrained"]

    @functools.wraps(model_fp.__func__)
    def model_from_pretrained(cls: type, pretrained_model_name_or_path: Any = None, **kwargs: Any) -> Any:
        if artifact.is_artifact(pretrained_model_name_or_path, kwargs.get("subfolder") or ""):
            return load_model(cls, pretrained_model_name_or_path, **kwargs)
        return model_fp.__func__(cls, pretrained_model_name_or_path, **kwargs)

    @functools.wraps(model_save)
    def model_save_pretrained(self: Any, save_directory: Any, *args: Any, tensorized: bool = False, **kw: Any) -> Any:
        if tensorized or artifact.looks_like_uri(save_directory):
            return save_model(self, save_directory, **artifact.save_options(kw, ("tensorizer_options",)))
        return model_save(self, save_directory, *args, **kw)

    @functools.wraps(pipe_fp.__func__)
    def pipe_from_pretrained(cls: type, pretrained_model_name_or_path: Any = None, **kwargs: Any) -> Any:
        if artifact.looks_like_uri(pretrained_model_name_or_path) or _is_pipeline_artifact(
            pretrained_model_name_or_path
        ):
            return load_pipeline(cls, pretrained_model_name_or_path, **kwargs)
        return pipe_fp.__func__(cls, pretrained_model_name_or_path, **kwargs)

    @functools.wraps(pipe_save)
    def pipe_save_pretrained(self: Any, save_directory: Any, *args: Any, tensorized: bool = False, **kw: Any) -> Any:
        if tensorized or artifact.looks_like_uri(save_directory):
            return save_pipeline(self, save_directory, **artifact.save_options(kw, ("tensorizer_options",)))
        return pipe_save(self, save_directory, *args, **kw)

    for cls, name, orig, new in (
        (ModelMixin, "from_pretrained", model_fp, classmethod(model_from_pretrained)),
        (ModelMixin, "save_pretrained", model_save, model_save_pretrained),
        (DiffusionPipeline, "from_pretrained", pipe_fp, classmethod(pipe_from_pretrained)),
        (DiffusionPipeline, "save_pretrained", pipe_save, pipe_save_pretrained),
    ):
        _ORIGINALS[(cls, name)] = orig
        setattr(cls, name, new)


def _is_pipeline_artifact(path: Any) -> bool:
    if not isinstance(path, (str, os.PathLike)) or not os.path.isdir(path):
        return False
    manifest = os.path.join(os.fspath(path), artifact.MANIFEST_NAME)
    return os.path.isfile(manifest) and os.path.isfile(os.path.join(os.fspath(path), "model_index.json"))


def unpatch() -> None:
    """Restore what :func:`patch` replaced."""
    for (cls, name), orig in list(_ORIGINALS.items()):
        setattr(cls, name, orig)
    _ORIGINALS.clear()
