"""transformers integration: ``from_pretrained`` from a tensorized artifact, ``save_pretrained(tensorized=True)``.

Loading reuses transformers' own machinery end to end and replaces only the step that reads weights:
``from_pretrained(None, config=<artifact folder>, state_dict=<placeholder>)`` builds the model on the meta
device, resolves ``dtype``, ``device_map`` (accelerate's ``infer_auto_device_map`` for ``"auto"``),
``_keep_in_fp32_modules`` and the checkpoint conversion mapping (e.g. per-expert MoE weights fused into one
tensor); our hook on ``_load_pretrained_model`` then streams each tensor straight to the device the final
device map gives it (one :class:`~hf_tensorizer.TensorDeserializer` per device) and hands the real tensors
to transformers, which adopts them without a copy when dtype and device already match. Tying, rebuilding
non-persistent buffers (rotary ``inv_freq``), multi-device dispatch and the loading report stay stock.

Saving writes the hub key layout: the same ``remove_tied_weights_from_state_dict`` and
``revert_weight_conversion`` that stock ``save_pretrained`` applies, so fused runtime keys never reach a file.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import os
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch

from ..engine import TensorDeserializer, TensorSerializer
from ..engine.staging import reuse_blocks
from ..errors import UsageError
from . import artifact

_DESERIALIZER_ARGS = frozenset(inspect.signature(TensorDeserializer.__init__).parameters) - {
    "self", "source", "device", "dtype", "filter", "lazy", "index", "source_options",
}  # fmt: skip
_OPTIONS_KWARG = "tensorizer_options"
# Options given to an outer call (AutoModel, a pipeline) reach the inner from_pretrained that streams weights.
current_options: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar("hf_tensorizer_options",
                                                                                         default=None)  # fmt: skip


def split_options(options: dict[str, Any] | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split ``tensorizer_options`` into (TensorDeserializer arguments, transport options)."""
    options = dict(options or {})
    engine = {k: options.pop(k) for k in list(options) if k in _DESERIALIZER_ARGS}
    return engine, options


class TensorizedStateDict(dict):
    """What ``from_pretrained`` receives as ``state_dict``: hub keys mapped to *meta* tensors.

    Stock code that inspects the state dict before loading (dtype ``"auto"`` detection, key checks) sees
    correct names, shapes and dtypes; our ``_load_pretrained_model`` hook recognises the type and streams
    the real tensors once the final device map is known. Keys that match nothing in the model are never read.

    The weights (``model.tensors``, or the shards of a safetensors checkpoint) are opened once, here, and every
    device group reads those open sources: a remote object is pinned once (ETag / VersionId / commit), so an
    overwrite mid-load fails or is ignored, never mixed in. :meth:`close` it when the load is over.

    Raises:
        FormatError: a tensor appears in two weight files.
    """

    def __init__(self, uris: str | list[str], options: dict[str, Any] | None = None) -> None:
        engine, transport = split_options(options)
        self.weights = artifact.open_weights([uris] if isinstance(uris, str) else uris, **transport)
        for name, i in self.weights.file_of.items():
            e = self.weights.indexes[i].tensors[name]
            self[name] = torch.empty(e.shape, dtype=e.dtype, device="meta")
        self.engine_options = engine
        self.metrics: list[Any] = []

    def close(self) -> None:
        """Close the weight sources (connections, descriptors)."""
        self.weights.close()


def stream_state_dict(model: torch.nn.Module, placeholder: TensorizedStateDict, load_config: Any) -> dict[str, Any]:
    """Load the tensors of ``placeholder`` onto the devices ``load_config.device_map`` assigns them.

    Keys are mapped to model keys with transformers' own ``rename_source_key`` (prefix handling, renamings,
    converters), so placement matches what transformers will do with the tensors; a converter that runs on
    the CPU by design (``force_cpu``) gets its inputs on the CPU. One deserializer per (device, weight file).
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
    groups: dict[tuple[torch.device, int], list[str]] = defaultdict(list)
    for key in placeholder:
        renamed, pattern = rename_source_key(key, renamings, converters, prefix, meta_sd)
        if renamed not in meta_sd and key in meta_sd:
            renamed, pattern = key, None
        if renamed not in meta_sd:
            continue  # unexpected: reported by transformers, never read
        if pattern is not None and getattr(by_pattern.get(pattern), "force_cpu", False):
            device = torch.device("cpu")
        else:
            device = _as_device(get_device(device_map, renamed, valid_torch_device=True))
        groups[(device, placeholder.weights.file_of[key])].append(key)
    out: dict[str, Any] = dict(placeholder)  # unread keys keep their meta placeholder
    with reuse_blocks():  # one pinned staging block for every group and shard, not one each
        for (device, file), names in groups.items():
            source, index = placeholder.weights.sources[file], placeholder.weights.indexes[file]
            options = placeholder.engine_options
            with TensorDeserializer(source, device=device, filter=names, index=index, **options) as d:
                out.update(d.items())
                placeholder.metrics.append(d.metrics)
    return out


def _as_device(value: Any) -> torch.device:
    if isinstance(value, int):
        return torch.device("cuda", value)
    return torch.device(value)


# ---- loading ------------------------------------------------------------------------------------------------

_STOCK: dict[str, Any] = {}


def _stock(name: str) -> Any:
    """The unpatched ``PreTrainedModel`` attribute ``name`` (captured before any patching)."""
    from transformers import PreTrainedModel

    if name not in _STOCK:
        _STOCK[name] = PreTrainedModel.__dict__[name]
    return _STOCK[name]


def _hooked_load_pretrained_model(model: Any, state_dict: Any, checkpoint_files: Any, load_config: Any, *a: Any,
                                  **kw: Any) -> Any:  # fmt: skip
    if isinstance(state_dict, TensorizedStateDict):
        state_dict = stream_state_dict(model, state_dict, load_config)
    return _stock("_load_pretrained_model").__func__(model, state_dict, checkpoint_files, load_config, *a, **kw)


def install_load_hook() -> None:
    """Route ``TensorizedStateDict`` loads through us. Other loads pass through unchanged."""
    from transformers import PreTrainedModel

    _stock("_load_pretrained_model")
    if PreTrainedModel.__dict__["_load_pretrained_model"] is _STOCK["_load_pretrained_model"]:
        PreTrainedModel._load_pretrained_model = staticmethod(_hooked_load_pretrained_model)


def load_pretrained(cls: type, pretrained_model_name_or_path: Any, *model_args: Any, **kwargs: Any) -> Any:
    """``cls.from_pretrained`` for a tensorized artifact (local folder or URI).

    Accepts every stock ``from_pretrained`` argument (``dtype``, ``device_map``, ``max_memory``,
    ``output_loading_info``, ``config``, ``subfolder``, ...) plus ``tensorizer_options``: a dict of
    :class:`~hf_tensorizer.TensorDeserializer` arguments (``verify_hash``, ``num_readers``, ``transform``, ...)
    and transport options (``endpoint_url``, ``token``, ``headers``, ...).

    Returns:
        The model, or ``(model, loading_info)`` with ``output_loading_info=True``.

    Raises:
        SourceError: the artifact cannot be read; UsageError: it has no weights.
    """
    options = kwargs.pop(_OPTIONS_KWARG, None) or current_options.get() or {}
    _engine, transport = split_options(options)
    subfolder = kwargs.pop("subfolder", "") or ""
    root = os.fspath(pretrained_model_name_or_path)
    folder, weights = artifact.locate(root, subfolder, **transport)
    install_load_hook()
    placeholder = TensorizedStateDict(weights, options)
    config = kwargs.pop("config", None)
    if config is None:
        config = folder
    user_generation_config = kwargs.get("generation_config") is not None
    try:
        result = _stock("from_pretrained").__func__(
            cls, None, *model_args, config=config, state_dict=placeholder, **kwargs
        )
    finally:
        placeholder.close()
    model = result[0] if isinstance(result, tuple) else result
    model.config.name_or_path = root
    model.name_or_path = root
    gen_file = os.path.join(folder, "generation_config.json")
    if not user_generation_config and model.can_generate() and os.path.isfile(gen_file):
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(folder)
    model.hf_tensorizer_metrics = placeholder.metrics
    return result


# ---- saving -------------------------------------------------------------------------------------------------


def hub_state_dict(model: Any) -> dict[str, torch.Tensor]:
    """``model``'s weights under the keys stock ``save_pretrained`` writes (hub layout, ties removed).

    Raises:
        UsageError: the model is quantized, or has weights on the meta device (disk offload).
    """
    from transformers.core_model_loading import revert_weight_conversion
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    if getattr(model, "hf_quantizer", None) is not None:
        raise UsageError("saving quantized models tensorized is not supported; save the unquantized model")
    state_dict = model.state_dict()
    for key in getattr(model, "_keys_to_ignore_on_save", None) or []:
        state_dict.pop(key, None)
    meta = [k for k, v in state_dict.items() if isinstance(v, torch.Tensor) and v.is_meta]
    if meta:
        raise UsageError(f"model has weights on the meta device (offloaded?): {meta[:5]}; load it fully first")
    state_dict = remove_tied_weights_from_state_dict(state_dict, model)
    return revert_weight_conversion(model, state_dict)


def save_tensorized(
    model: Any,
    dest: str | os.PathLike[str],
    *,
    tokenizer: Any = None,
    processor: Any = None,
    metadata: dict[str, str] | None = None,
    tensorizer_options: dict[str, Any] | None = None,
    **serializer_options: Any,
) -> str:
    """Write ``model`` as a tensorized artifact to a local folder or ``s3://`` / ``hf://`` prefix.

    Writes config.json, generation_config.json (generative models), the tokenizer/processor files when given,
    ``model.tensors`` (hub key layout) and, last, the ``hf_tensorizer.json`` manifest.

    Args:
        model: a ``PreTrainedModel``.
        dest: the artifact root.
        tokenizer: optional tokenizer saved alongside (so ``AutoTokenizer.from_pretrained(dest)`` works).
        processor: optional processor / image processor / feature extractor saved alongside.
        metadata: extra string metadata stored in the weights file.
        tensorizer_options: transport options for remote destinations (``endpoint_url``, ``token``, ...).
        **serializer_options: :class:`~hf_tensorizer.TensorSerializer` arguments (``digest``, ``block_size``, ...).

    Returns:
        ``dest`` as a string.

    Raises:
        UsageError: the model cannot be saved this way; SinkError: writing failed.
    """
    dest = os.fspath(dest)
    with artifact.Staging(dest, tensorizer_options) as staging:
        if model.is_remote_code():
            from transformers.dynamic_module_utils import custom_object_save

            custom_object_save(model, staging.folder, config=model.config)
        write_model(model, staging.folder, staging.weights(), staging.transport, metadata=metadata,
                    **serializer_options)  # fmt: skip
        for extra in (tokenizer, processor):
            if extra is not None:
                extra.save_pretrained(staging.folder)
        staging.publish([artifact.WEIGHTS_NAME], "transformers", {"architectures": model.config.architectures})
    return dest


def write_model(model: Any, folder: str, weights: str, transport: dict[str, Any], *,
                metadata: dict[str, str] | None = None, **serializer_options: Any) -> None:  # fmt: skip
    """A transformers model's config, generation config (into ``folder``) and weights (to ``weights``).

    Also used for the text encoders of diffusers pipelines.
    """
    state_dict = hub_state_dict(model)  # raises before anything is written for unsupported models
    config = model.config
    config.dtype = str(model.dtype).split(".")[1]
    config.architectures = [type(model).__name__]
    config.save_pretrained(folder)
    if model.can_generate():
        model.generation_config.save_pretrained(folder)
    meta = {"format": "pt", "hf_tensorizer.layout": "transformers", **(metadata or {})}
    with TensorSerializer(weights, metadata=meta, **serializer_options, **transport) as s:
        s.write_state_dict(state_dict)


# ---- the mixin and the patches ------------------------------------------------------------------------------


class TensorizerMixin:
    """Put first in the bases of a ``PreTrainedModel`` subclass to give it tensorized load/save without
    enabling the global hook::

        class MyModel(TensorizerMixin, LlamaForCausalLM): ...
        MyModel.from_pretrained("s3://bucket/my-model", device_map="cuda")
        model.save_pretrained("s3://bucket/out", tensorized=True)
    """

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any = None, *model_args: Any, **kwargs: Any) -> Any:
        if artifact.is_artifact(pretrained_model_name_or_path, kwargs.get("subfolder", "") or ""):
            return load_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs)
        kwargs.pop(_OPTIONS_KWARG, None)
        return super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)  # type: ignore[misc]

    def save_pretrained(self, save_directory: Any, *args: Any, tensorized: bool = False, **kwargs: Any) -> Any:
        if tensorized or artifact.looks_like_uri(save_directory):
            return save_tensorized(self, save_directory, **_save_kwargs(kwargs))
        return super().save_pretrained(save_directory, *args, **kwargs)  # type: ignore[misc]

    def push_to_hub(self, repo_id: str, *args: Any, tensorized: bool = False, **kwargs: Any) -> Any:
        if tensorized:
            from .hub import push_to_hub

            return push_to_hub(self, repo_id, **kwargs)
        return super().push_to_hub(repo_id, *args, **kwargs)  # type: ignore[misc]


def _save_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    return artifact.save_options(kwargs, ("tokenizer", "processor", "tensorizer_options"))


def _patched_from_pretrained(cls: type, pretrained_model_name_or_path: Any = None, *args: Any, **kwargs: Any) -> Any:
    if artifact.is_artifact(pretrained_model_name_or_path, kwargs.get("subfolder", "") or ""):
        return load_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs)
    return _stock("from_pretrained").__func__(cls, pretrained_model_name_or_path, *args, **kwargs)


def _patched_save_pretrained(
    self: Any, save_directory: Any, *args: Any, tensorized: bool = False, **kwargs: Any
) -> Any:
    if tensorized or artifact.looks_like_uri(save_directory):
        return save_tensorized(self, save_directory, **_save_kwargs(kwargs))
    return _stock("save_pretrained")(self, save_directory, *args, **kwargs)


def _patched_push_to_hub(self: Any, repo_id: str, *args: Any, tensorized: bool = False, **kwargs: Any) -> Any:
    if tensorized:
        from .hub import push_to_hub

        return push_to_hub(self, repo_id, **kwargs)
    return _stock("push_to_hub")(self, repo_id, *args, **kwargs)


def resolving(orig: Callable[..., Any], *, static: bool = False) -> Callable[..., Any]:
    """Wrap a ``from_pretrained`` so a remote artifact URI becomes its local folder.

    ``tensorizer_options`` is taken out of the arguments and made current for the call, so the model's own
    ``from_pretrained`` (called by an Auto class) streams with the same transport options.
    """

    @functools.wraps(orig)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        args = list(args)  # type: ignore[assignment]
        pos = 0 if static else 1
        path = args[pos] if len(args) > pos else kwargs.get("pretrained_model_name_or_path")
        options = kwargs.pop(_OPTIONS_KWARG, None) or current_options.get() or {}
        local = path
        if artifact.looks_like_uri(path):
            _engine, transport = split_options(options)
            local = artifact.resolve(path, **transport)
            if len(args) > pos:
                args[pos] = local  # type: ignore[index]
            else:
                kwargs["pretrained_model_name_or_path"] = local
        token = current_options.set(options)  # local folders too: the inner load needs keys, engine options
        try:
            with artifact.reached_through(path, local):
                return orig(*args, **kwargs)
        finally:
            current_options.reset(token)

    wrapper.__hf_tensorizer_original__ = orig  # type: ignore[attr-defined]
    return wrapper


# Auto classes whose modules cost little to import; the processor-like ones pull in image/video stacks
# (1.5-2 s), so they are patched only when the program has imported them already (enable() again after
# importing them covers them too).
_CHEAP_AUTO_MODULES = ("modeling_auto", "configuration_auto", "tokenization_auto")
_HEAVY = {"ProcessorMixin": "transformers.processing_utils",
          "ImageProcessingMixin": "transformers.image_processing_base",
          "FeatureExtractionMixin": "transformers.feature_extraction_utils"}  # fmt: skip
# Patched when imported (1.5 s to import up front): the processor families and their Auto classes.
LAZY_MODULES = (*_HEAVY.values(), *(f"transformers.models.auto.{m}" for m in (
    "processing_auto", "image_processing_auto", "feature_extraction_auto", "video_processing_auto")))  # fmt: skip


def _resolving_targets() -> list[type]:
    """Classes whose ``from_pretrained`` gets remote URIs rewritten: the Auto classes (each defines its own
    copy), configs, tokenizers, generation configs, and the processor families already imported."""
    import sys

    import transformers

    auto = "transformers.models.auto."
    loaded = {m[len(auto) :] for m in sys.modules if m.startswith(auto)}
    names = []
    for mod in set(_CHEAP_AUTO_MODULES) | loaded:
        module = sys.modules.get(auto + mod)
        if module is None:
            import importlib

            module = importlib.import_module(auto + mod)
        names += [(module, n) for n in dir(module) if n.startswith("Auto") and not n.startswith("AutoConfig_")]
    names += [(transformers, n) for n in ("PreTrainedConfig", "PreTrainedTokenizerBase", "GenerationConfig")]
    names += [(transformers, n) for n, m in _HEAVY.items() if m in sys.modules]
    out: list[type] = []
    for module, n in names:
        try:
            c = getattr(module, n, None)
        except Exception:  # an Auto class whose backend is missing
            continue
        if isinstance(c, type) and "from_pretrained" in c.__dict__ and c not in out:
            out.append(c)
    return out


_PATCHED: list[tuple[type, str, Any]] = []


def patch() -> None:
    """Install the transformers hooks (idempotent). See :func:`hf_tensorizer.enable`."""
    from transformers import PreTrainedModel

    done = {cls for cls, _, _ in _PATCHED}
    for name in ("from_pretrained", "save_pretrained", "push_to_hub", "_load_pretrained_model"):
        _stock(name)
    for cls in _resolving_targets():
        if cls in done:  # enable() again: only classes imported since
            continue
        orig = cls.__dict__["from_pretrained"]
        _PATCHED.append((cls, "from_pretrained", orig))
        if isinstance(orig, classmethod):
            cls.from_pretrained = classmethod(resolving(orig.__func__))
        elif isinstance(orig, staticmethod):  # AutoTokenizer & co. in some versions
            cls.from_pretrained = staticmethod(resolving(orig.__func__, static=True))
        else:
            _PATCHED.pop()
    if PreTrainedModel in done:
        return
    for name, new in (("from_pretrained", classmethod(_patched_from_pretrained)),
                      ("save_pretrained", _patched_save_pretrained), ("push_to_hub", _patched_push_to_hub),
                      ("_load_pretrained_model", staticmethod(_hooked_load_pretrained_model))):  # fmt: skip
        _PATCHED.append((PreTrainedModel, name, PreTrainedModel.__dict__[name]))
        setattr(PreTrainedModel, name, new)


def unpatch() -> None:
    """Restore every attribute :func:`patch` replaced (and the load hook)."""
    from transformers import PreTrainedModel

    while _PATCHED:
        cls, name, orig = _PATCHED.pop()
        setattr(cls, name, orig)
    if "_load_pretrained_model" in _STOCK:
        PreTrainedModel._load_pretrained_model = _STOCK["_load_pretrained_model"]
