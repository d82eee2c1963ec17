"""The switch-free API: what the hooks do, for one call, without patching anything.

``hf_tensorizer.from_pretrained(AutoModelForCausalLM, uri, **kw)``, ``hf_tensorizer.save_pretrained(model, dest,
**kw)`` and ``hf_tensorizer.push_to_hub(model, repo_id, **kw)`` take the arguments the patched methods take and
route the same way: an artifact or checkpoint URI loads through hf_tensorizer, anything else (a Hub id, a stock
folder) through the stock ``from_pretrained``. A library or notebook that uses them leaves transformers and
diffusers exactly as it found them, unlike :func:`~hf_tensorizer.enable`, which changes them for the whole process.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from ..errors import UsageError
from .artifact.publish import save_options
from .artifact.routing import check_local_path, is_artifact, looks_like_uri
from .options import KWARG, TensorizerOptions

TRANSFORMERS_SAVE_ARGS = ("tokenizer", "processor", KWARG)
# the hub arguments a stock Auto class hands both to the config and to the model class
_HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "proxies", "revision", "subfolder", "token")


def _diffusers_classes() -> tuple[type | None, type | None]:
    """``(ModelMixin, DiffusionPipeline)`` when diffusers is imported, else ``(None, None)``.

    A class or object can only be a diffusers one once diffusers is imported (its module imported it), so a call
    with a transformers model never imports diffusers (its import took 2-4 s of a first ``from_pretrained``).
    """
    diffusers = sys.modules.get("diffusers")
    if diffusers is None:
        return None, None
    return diffusers.ModelMixin, diffusers.DiffusionPipeline


def _is_subclass(cls: Any, base: type | None) -> bool:
    return base is not None and isinstance(cls, type) and issubclass(cls, base)


def from_pretrained(cls: type, pretrained_model_name_or_path: Any, *model_args: Any, **kwargs: Any) -> Any:
    """``cls.from_pretrained(pretrained_model_name_or_path, ...)`` as it runs with the hooks enabled, for this call.

    Args:
        cls: a transformers model class (``LlamaForCausalLM``), an Auto model class (``AutoModelForCausalLM``: the
            model class is picked from the artifact's ``config.json`` as the Auto class would), a diffusers model
            class (``UNet2DConditionModel``) or a ``DiffusionPipeline`` class. A pipeline's components are loaded
            by diffusers itself, which calls their classes' ``from_pretrained``: for a pipeline, the hooks are
            installed for the duration of this call only (:func:`~hf_tensorizer.enabled`), and other threads
            see them meanwhile.
        pretrained_model_name_or_path: an artifact or checkpoint URI (``s3://``, ``https://``, ``hf://``,
            ``file://``), a local artifact folder, or anything the stock ``from_pretrained`` takes (loaded stock).
        *model_args: passed on to the model class.
        **kwargs: every stock ``from_pretrained`` argument (``dtype``, ``device_map``, ``variant``,
            ``subfolder``...) and ``tensorizer_options`` (engine and transport options).

    Returns:
        What ``cls.from_pretrained`` returns.

    Raises:
        UsageError: ``cls`` is no class this can load, or unknown ``tensorizer_options``.
        SourceError / FormatError / ObjectChangedError: the artifact cannot be read, is malformed, or changed
            since its manifest recorded its files' versions.
    """
    from transformers import PreTrainedModel

    model_mixin, pipeline = _diffusers_classes()
    path, subfolder = pretrained_model_name_or_path, kwargs.get("subfolder") or ""
    if _is_subclass(cls, pipeline):
        from .switch import enabled

        with enabled():
            return cls.from_pretrained(path, *model_args, **kwargs)
    if not isinstance(cls, type) or not (
        issubclass(cls, PreTrainedModel) or hasattr(cls, "_model_mapping") or _is_subclass(cls, model_mixin)
    ):
        raise UsageError(
            f"hf_tensorizer.from_pretrained takes a transformers or diffusers model class, an Auto model class or a "
            f"DiffusionPipeline class, not {cls!r}"
        )
    check_local_path(path)  # a missing local folder: say so, not stock's "Repo id must be in the form ..."
    if not is_artifact(path, subfolder):  # a Hub id or a stock folder: what the stock call does
        kwargs.pop(KWARG, None)
        return cls.from_pretrained(path, *model_args, **kwargs)
    if _is_subclass(cls, model_mixin):
        from .adapters.diffusers.models import load_model

        return load_model(cls, path, **kwargs)
    from .adapters.transformers.load import load_pretrained

    if issubclass(cls, PreTrainedModel):
        return load_pretrained(cls, path, *model_args, **kwargs)
    model_class, kwargs = _auto_model_class(cls, path, kwargs)
    return load_pretrained(model_class, path, *model_args, **kwargs)


def _auto_model_class(auto: type, path: Any, kwargs: dict[str, Any]) -> tuple[type, dict[str, Any]]:
    """The model class an Auto class would load ``path`` with, and the call's arguments with the config in them
    (read from the artifact's local folder the way the stock Auto class reads it)."""
    from transformers import AutoConfig, PreTrainedConfig
    from transformers.models.auto.auto_factory import _get_model_class

    from .artifact.cache import resolve

    options = TensorizerOptions.parse(kwargs.pop(KWARG, None))
    hub = {k: kwargs.pop(k) for k in _HUB_KWARGS if k in kwargs}
    config = kwargs.pop("config", None)
    if not isinstance(config, PreTrainedConfig):
        folder = resolve(os.fspath(path), variant=kwargs.get("variant"), **options.transport)
        # dtype, quantization_config: arguments of the model load, not config overrides (as in the stock Auto call)
        model_only = {k: kwargs.pop(k) for k in ("dtype", "torch_dtype", "quantization_config") if k in kwargs}
        config_hub = {k: v for k, v in hub.items() if k == "subfolder"}  # the folder is local: no Hub arguments
        config, kwargs = AutoConfig.from_pretrained(folder, return_unused_kwargs=True, **config_hub, **kwargs)
        kwargs.update({k: v for k, v in model_only.items() if v is not None})
    mapping = auto._model_mapping  # type: ignore[attr-defined]
    if type(config) in mapping:
        model_class = _get_model_class(config, mapping)
        text_config = config.sub_configs.get("text_config", None)
        if text_config is not None and getattr(model_class, "config_class", None) == text_config:
            parent_quant = getattr(config, "quantization_config", None)
            config = config.get_text_config()
            if parent_quant is not None:
                config.quantization_config = parent_quant
    else:
        raise UsageError(
            f"{type(config).__name__} ({redacted(path)}) has no model class in {auto.__name__}; load it with its "
            "model class (hf_tensorizer.from_pretrained(MyModelClass, ...))"
        )
    return model_class, {**kwargs, **hub, "config": config, KWARG: options}


def redacted(path: Any) -> str:
    """``path`` for a message: a URI without credentials."""
    from ..sources.uri import redact

    return redact(os.fspath(path)) if isinstance(path, (str, os.PathLike)) else repr(path)


def _pop_tensorized(kwargs: dict[str, Any], what: str) -> None:
    if kwargs.pop("tensorized", True) is not True:
        raise UsageError(f"hf_tensorizer.{what} always writes a tensorized artifact; for a stock one call obj.{what}")


def save_pretrained(obj: Any, save_directory: str | os.PathLike[str], **kwargs: Any) -> str:
    """``obj.save_pretrained(save_directory, tensorized=True, ...)`` without the hooks: write ``obj`` as a tensorized
    artifact.

    Args:
        obj: a transformers model, a diffusers model, or a ``DiffusionPipeline``.
        save_directory: a local folder, ``s3://`` or ``hf://`` prefix.
        **kwargs: what the patched ``save_pretrained(..., tensorized=True)`` takes: ``variant``,
            :class:`~hf_tensorizer.TensorSerializer` arguments (``encryption``, ``digest``, ``metadata``...),
            ``tensorizer_options`` (transport), and for transformers ``tokenizer`` / ``processor``; stock-only
            arguments about shards are ignored.

    Returns:
        ``save_directory`` as a string.

    Raises:
        UsageError: ``obj`` is of no supported type, or an unknown argument.
        SinkError: writing failed.
    """
    _pop_tensorized(kwargs, "save_pretrained")
    model_mixin, pipeline = _diffusers_classes()
    if pipeline is not None and isinstance(obj, pipeline):
        from .adapters.diffusers.models import save_pipeline

        return save_pipeline(obj, save_directory, **save_options(kwargs, (KWARG,)))
    if model_mixin is not None and isinstance(obj, model_mixin):
        from .adapters.diffusers.models import save_model

        return save_model(obj, save_directory, **save_options(kwargs, (KWARG,)))
    from transformers import PreTrainedModel

    if isinstance(obj, PreTrainedModel):
        from .adapters.transformers.save import save_tensorized

        return save_tensorized(obj, save_directory, **save_options(kwargs, TRANSFORMERS_SAVE_ARGS))
    raise UsageError(
        f"cannot save a {type(obj).__name__} tensorized: expected a transformers or diffusers model or pipeline"
    )


def push_to_hub(obj: Any, repo_id: str, **kwargs: Any) -> Any:
    """``obj.push_to_hub(repo_id, tensorized=True, ...)`` without the hooks (see
    :func:`hf_tensorizer.integrations.push.push_to_hub` for the arguments).

    Returns:
        huggingface_hub's ``CommitInfo``.

    Raises:
        UsageError: ``obj`` is of no supported type; SinkError: the upload failed.
    """
    from .push import push_to_hub as push

    _pop_tensorized(kwargs, "push_to_hub")
    if looks_like_uri(repo_id):
        raise UsageError(f"push_to_hub takes a repository id (org/name), not a URI: {redacted(repo_id)}")
    return push(obj, repo_id, **kwargs)
