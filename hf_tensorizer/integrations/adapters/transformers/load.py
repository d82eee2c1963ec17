"""transformers integration, loading: ``from_pretrained`` from a tensorized artifact or a stock checkpoint URI.

Loading reuses transformers' own machinery end to end and replaces only the step that reads weights:
``from_pretrained(None, config=<artifact folder>, state_dict=<placeholder>)`` builds the model on the meta
device, resolves ``dtype``, ``device_map`` (accelerate's ``infer_auto_device_map`` for ``"auto"``),
``_keep_in_fp32_modules`` and the checkpoint conversion mapping (e.g. per-expert MoE weights fused into one
tensor); our hook on ``_load_pretrained_model`` then streams each tensor straight to the device the final device
map gives it (:func:`~hf_tensorizer.integrations.weights.stream_to_devices`) and hands the real tensors to
transformers, which adopts them without a copy when dtype and device already match. Tying, rebuilding
non-persistent buffers (rotary ``inv_freq``), multi-device dispatch and the loading report stay stock.

Saving lives in :mod:`.transformers_save`, the patches in :mod:`.hooks`, the mixin in :mod:`.mixin`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch

from ....engine.prewarm import prewarm
from ... import patches
from ...loading import offload
from ...loading.weights import Target, as_device, locate, open_weights, stream_to_devices
from ...options import TensorizerOptions, pop_options
from . import quantized, tensor_parallel


class TensorizedStateDict(dict):
    """What ``from_pretrained`` receives as ``state_dict``: hub keys mapped to *meta* tensors.

    Stock code that inspects the state dict before loading (dtype ``"auto"`` detection, key checks) sees correct
    names, shapes and dtypes; our ``_load_pretrained_model`` hook recognises the type and streams the real tensors
    once the final device map is known. Keys that match nothing in the model are never read.

    The weights (``model.tensors``, or the shards of a safetensors checkpoint) are opened once, here, and every
    device group reads those open sources: a remote object is pinned once (ETag / VersionId / commit), so an
    overwrite mid-load fails or is ignored, never mixed in. :meth:`close` it when the load is over.

    Raises:
        FormatError: a tensor appears in two weight files.
    """

    def __init__(self, uris: str | list[str], options: TensorizerOptions) -> None:
        self.weights = open_weights([uris] if isinstance(uris, str) else uris, **options.transport)
        for name in self.weights.file_of:
            e = self.weights.entry(name)
            self[name] = torch.empty(e.shape, dtype=e.dtype, device="meta")
        self.engine_options = dict(options.engine)
        self.transport = dict(options.transport)
        self.metrics: list[Any] = []
        self.offloaded: offload.ArtifactWeights | None = None  # the "disk" entries of the device map, if any

    def close(self) -> None:
        """Close the weight sources (connections, descriptors)."""
        self.weights.close()


def stream_state_dict(model: torch.nn.Module, placeholder: TensorizedStateDict, load_config: Any,
                      disk: dict[str, str] | None = None) -> dict[str, Any]:  # fmt: skip
    """Load the tensors of ``placeholder`` onto the devices ``load_config.device_map`` assigns them.

    With ``disk`` given, tensors whose module is on ``"disk"`` (and that transformers does not convert) are not
    read: they get a :class:`~.offload.Deferred` placeholder and ``disk`` maps their model key to their file key.

    Keys are mapped to model keys with transformers' own ``rename_source_key`` (prefix handling, renamings,
    converters), so placement matches what transformers will do with the tensors; a converter that runs on the
    CPU by design (``force_cpu``) gets its inputs on the CPU.
    """
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
    from transformers.integrations.accelerate import get_device

    meta_sd = model.state_dict()
    mapping = load_config.weight_mapping or []
    renamings = [w for w in mapping if isinstance(w, WeightRenaming)]
    converters = [w for w in mapping if isinstance(w, WeightConverter)]
    by_pattern = {p: c for c in converters for p in c.source_patterns}
    device_map = load_config.device_map or {"": "cpu"}
    prefix = getattr(model, "base_model_prefix", None)
    targets: dict[str, Target] = {}
    rebuilt = non_persistent_buffer_names(model)
    skipped: list[str] = []
    renamed_of: dict[str, str] = {}
    for key in placeholder:
        renamed, pattern = rename_source_key(key, renamings, converters, prefix, meta_sd)
        if renamed not in meta_sd and key in meta_sd:
            renamed, pattern = key, None
        if renamed not in meta_sd:
            if renamed in rebuilt or key in rebuilt:
                skipped.append(key)  # upstream write_module stores them; transformers rebuilds them from the config
            continue  # unexpected: reported by transformers, never read
        renamed_of[key] = renamed
        if pattern is not None and getattr(by_pattern.get(pattern), "force_cpu", False):
            targets[key] = (torch.device("cpu"), None)
        elif disk is not None and pattern is None and get_device(device_map, renamed) == "disk":
            disk[renamed] = key  # read from the artifact when accelerate's offload hook asks for it
        else:
            targets[key] = (as_device(get_device(device_map, renamed, valid_torch_device=True)), None)
    out: dict[str, Any] = {k: v for k, v in placeholder.items() if k not in skipped}  # unread: meta placeholder
    out.update({key: offload.Deferred(renamed) for renamed, key in (disk or {}).items()})
    if quantized.quantizes_on_load(load_config.hf_quantizer):  # read as the quantizer asks: no full-precision copy
        return {**out, **quantized.lazy_tensors(placeholder.weights, targets, placeholder.engine_options,
                                                placeholder.metrics)}  # fmt: skip
    # tensor parallel: tensors the plan shards go as lazy slices, each rank reads its shard when transformers cuts it
    lazy, slice_metrics = tensor_parallel.split_sharded(placeholder.weights, placeholder.engine_options, meta_sd,
                                                        renamed_of)  # fmt: skip
    out.update(lazy)
    placeholder.metrics += [slice_metrics] if slice_metrics is not None else []
    targets = {k: v for k, v in targets.items() if k not in lazy}
    for d in stream_to_devices(placeholder.weights, targets, placeholder.engine_options):
        out.update(d.items())
        placeholder.metrics.append(d.metrics)
    return out


def prewarm_for(device_map: Any, engine: Mapping[str, Any]) -> None:
    """Start the GPU load's first-use work (:func:`~hf_tensorizer.engine.prewarm.prewarm`) for the first CUDA device
    ``device_map`` names (``"auto"`` and friends: device 0 when there is a GPU)."""
    if device_map is None or not torch.cuda.is_available():
        return
    values = list(device_map.values()) if isinstance(device_map, Mapping) else [device_map]
    for value in values:
        if value in ("auto", "balanced", "balanced_low_0", "sequential"):
            value = 0
        if isinstance(value, int) or (isinstance(value, (str, torch.device)) and str(value).startswith("cuda")):
            sizes = {k: engine[k] for k in ("chunk_bytes", "staging_bytes", "num_readers") if k in engine}
            prewarm(value, allocation=engine.get("staging_allocation"), **sizes)
            return


def non_persistent_buffer_names(model: torch.nn.Module) -> set[str]:
    """The dotted names of ``model``'s non-persistent buffers (``state_dict`` leaves them out; upstream files hold
    them)."""
    return {
        f"{path}.{attr}" if path else attr
        for path, sub in model.named_modules(remove_duplicate=False)
        for attr in sub._non_persistent_buffers_set
    }


def _pretrained_model() -> type:
    from transformers import PreTrainedModel

    return PreTrainedModel


def _hooked_load_pretrained_model(model: Any, state_dict: Any, checkpoint_files: Any, load_config: Any, *a: Any,
                                  **kw: Any) -> Any:  # fmt: skip
    stock = patches.stock(_pretrained_model(), "_load_pretrained_model").__func__
    if not isinstance(state_dict, TensorizedStateDict):
        return stock(model, state_dict, checkpoint_files, load_config, *a, **kw)
    placeholder, disk = state_dict, {}
    quantized.prepare_quantizer(load_config.hf_quantizer, placeholder.weights)
    # quantized loads keep stock disk offload (their weights change on load, so they are re-saved anyway)
    state_dict = stream_state_dict(model, placeholder, load_config, disk if load_config.hf_quantizer is None else None)
    if not disk:
        return stock(model, state_dict, checkpoint_files, load_config, *a, **kw)
    weights = placeholder.weights
    where = {
        t: (weights.sources[weights.file_of[k]].uri, weights.indexes[weights.file_of[k]], k) for t, k in disk.items()
    }
    meta = model.state_dict()
    dtypes = {t: meta[t].dtype for t in disk}
    placeholder.offloaded = offload.ArtifactWeights(where, dtypes, placeholder.transport, placeholder.engine_options)
    with offload.providing(offload.offload_index(where, model)):  # transformers neither reads nor re-saves them
        return stock(model, state_dict, checkpoint_files, load_config, *a, **kw)


def install_load_hook() -> None:
    """Route ``TensorizedStateDict`` loads through us (other loads pass through unchanged); undone by ``disable``."""
    cls = _pretrained_model()
    if not patches.is_patched(cls, "_load_pretrained_model"):
        patches.replace(cls, "_load_pretrained_model", staticmethod(_hooked_load_pretrained_model))
    offload.install()


def load_pretrained(cls: type, pretrained_model_name_or_path: Any, *model_args: Any, **kwargs: Any) -> Any:
    """``cls.from_pretrained`` for a tensorized artifact or a stock checkpoint URI (local folder or URI).

    Accepts every stock ``from_pretrained`` argument (``dtype``, ``device_map``, ``max_memory``,
    ``output_loading_info``, ``config``, ``subfolder``, ``variant``, ...) plus ``tensorizer_options``: a dict of
    :class:`~hf_tensorizer.TensorDeserializer` arguments (``verify_hash``, ``num_readers``, ``encryption``, ...) and
    transport options (``endpoint_url``, ``token``, ``headers``, ...).

    Returns:
        The model, or ``(model, loading_info)`` with ``output_loading_info=True``.

    Raises:
        SourceError: the artifact cannot be read; UsageError: it has no weights, or unknown options.
    """
    options = pop_options(kwargs)
    prewarm_for(kwargs.get("device_map"), options.engine)  # pins while the config is fetched and the model built
    subfolder = kwargs.pop("subfolder", "") or ""
    variant = kwargs.pop("variant", None)
    root = os.fspath(pretrained_model_name_or_path)
    folder, weights = locate(root, subfolder, variant, **options.transport)
    install_load_hook()
    placeholder = TensorizedStateDict(weights, options)
    config = kwargs.pop("config", None)
    if config is None:
        config = folder
    user_generation_config = kwargs.get("generation_config") is not None
    try:
        stock = patches.stock(_pretrained_model(), "from_pretrained")
        result = stock.__func__(cls, None, *model_args, config=config, state_dict=placeholder, **kwargs)
    finally:
        placeholder.close()
    model = result[0] if isinstance(result, tuple) else result
    if placeholder.offloaded is not None:
        offload.attach(model, placeholder.offloaded)  # accelerate's offload hooks read from the artifact
        model.hf_tensorizer_offloaded = placeholder.offloaded
    model.config.name_or_path = root
    model.name_or_path = root
    gen_file = os.path.join(folder, "generation_config.json")
    if not user_generation_config and model.can_generate() and os.path.isfile(gen_file):
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(folder)
    model.hf_tensorizer_metrics = placeholder.metrics
    return result
