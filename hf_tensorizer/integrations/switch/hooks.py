"""The patches ``enable()`` installs on transformers and diffusers classes (recorded in :mod:`.patches`).

- ``PreTrainedModel``: ``from_pretrained`` of an artifact or checkpoint URI loads through
  :mod:`.transformers`; ``save_pretrained(..., tensorized=True)`` and ``push_to_hub(..., tensorized=True)`` write
  artifacts; ``_load_pretrained_model`` streams a ``TensorizedStateDict``.
- The Auto classes, configs, tokenizers, generation configs and processor families: a remote URI given to their
  ``from_pretrained`` is fetched to its local cached folder first (:func:`resolving`).
- Everywhere: a bare Hub id whose repository holds a tensorized artifact is taken as its ``hf://`` URI
  (:func:`~.hub_ids.route_hub_id`); every other id stays stock.
- diffusers' ``ModelMixin`` and ``DiffusionPipeline``: the same for models and whole pipelines.
"""

from __future__ import annotations

import functools
import importlib
import sys
from collections.abc import Callable
from typing import Any

from .. import patches
from ..adapters.diffusers.models import load_model, load_pipeline, save_model, save_pipeline
from ..adapters.transformers.load import install_load_hook, load_pretrained
from ..adapters.transformers.save import save_tensorized
from ..artifact.cache import resolve
from ..artifact.hub_ids import route_hub_id
from ..artifact.publish import save_options
from ..artifact.routing import is_artifact, is_pipeline_artifact, looks_like_uri, reached_through
from ..options import KWARG, TensorizerOptions

TRANSFORMERS_SAVE_ARGS = ("tokenizer", "processor", KWARG)

# ---- transformers -------------------------------------------------------------------------------------------


def _pretrained_model() -> type:
    from transformers import PreTrainedModel

    return PreTrainedModel


def _named(result: Any, name: str) -> Any:
    """``result`` (a model, config, tokenizer... or ``(model, info)``) named ``name``, as a stock load names it."""
    obj = result[0] if isinstance(result, tuple) else result
    for target, attr in ((obj, "name_or_path"), (getattr(obj, "config", None), "_name_or_path"),
                         (obj, "_name_or_path")):  # fmt: skip
        if target is not None and isinstance(getattr(target, attr, None), str):
            try:
                setattr(target, attr, name)
            except AttributeError:  # a read-only property
                pass
    return result


def _from_pretrained(cls: type, pretrained_model_name_or_path: Any = None, *args: Any, **kwargs: Any) -> Any:
    path = route_hub_id(pretrained_model_name_or_path, kwargs)
    if path is not pretrained_model_name_or_path:  # a Hub id naming an artifact
        return _named(load_pretrained(cls, path, *args, **kwargs), pretrained_model_name_or_path)
    if is_artifact(pretrained_model_name_or_path, kwargs.get("subfolder", "") or ""):
        return load_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs)
    kwargs.pop(KWARG, None)  # an Auto class passes the options on; a stock load has no use for them
    stock = patches.stock(_pretrained_model(), "from_pretrained")
    return stock.__func__(cls, pretrained_model_name_or_path, *args, **kwargs)


def _save_pretrained(self: Any, save_directory: Any, *args: Any, tensorized: bool = False, **kwargs: Any) -> Any:
    if tensorized or looks_like_uri(save_directory):
        return save_tensorized(self, save_directory, **save_options(kwargs, TRANSFORMERS_SAVE_ARGS))
    return patches.stock(_pretrained_model(), "save_pretrained")(self, save_directory, *args, **kwargs)


def _push_to_hub(self: Any, repo_id: str, *args: Any, tensorized: bool = False, **kwargs: Any) -> Any:
    if tensorized:
        from ..push import push_to_hub

        return push_to_hub(self, repo_id, **kwargs)
    return patches.stock(_pretrained_model(), "push_to_hub")(self, repo_id, *args, **kwargs)


def resolving(orig: Callable[..., Any], *, static: bool = False, forwards: bool = False) -> Callable[..., Any]:
    """Wrap a ``from_pretrained`` so a remote artifact URI becomes its local (cached) folder.

    Args:
        orig: the stock function.
        static: ``orig`` is a staticmethod (no ``cls`` argument).
        forwards: the stock call passes unknown keyword arguments on to the model class (Auto model classes) or
            returns or drops them (configs): ``tensorizer_options`` then stays in the call, parsed, and reaches the
            model's ``from_pretrained`` as a parameter. Other classes (tokenizers, processors) would keep it as an
            init argument, so it is taken out.
    """

    @functools.wraps(orig)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        args = list(args)  # type: ignore[assignment]
        pos = 0 if static else 1
        path = args[pos] if len(args) > pos else kwargs.get("pretrained_model_name_or_path")
        hub_id = path
        path = route_hub_id(path, kwargs)  # a Hub id naming an artifact: its hf:// URI, options in kwargs
        given = kwargs.get(KWARG) if forwards else kwargs.pop(KWARG, None)
        options = TensorizerOptions.parse(given)
        if forwards and given is not None:
            kwargs[KWARG] = options
        local = path
        if looks_like_uri(path):
            local = resolve(path, variant=kwargs.get("variant"), **options.transport)
            if len(args) > pos:
                args[pos] = local  # type: ignore[index]
            else:
                kwargs["pretrained_model_name_or_path"] = local
        with reached_through(path, local):
            result = orig(*args, **kwargs)
        return _named(result, hub_id) if path is not hub_id else result

    return wrapper


# Auto classes whose modules cost little to import; the processor-like ones pull in image/video stacks (1.5-2 s),
# so they are patched only when the program has imported them (after_import in enable()).
_CHEAP_AUTO_MODULES = ("modeling_auto", "configuration_auto", "tokenization_auto")
_HEAVY = {"ProcessorMixin": "transformers.processing_utils",
          "ImageProcessingMixin": "transformers.image_processing_base",
          "FeatureExtractionMixin": "transformers.feature_extraction_utils"}  # fmt: skip
# Patched when imported (1.5 s to import up front): the processor families and their Auto classes.
LAZY_MODULES = (*_HEAVY.values(), *(f"transformers.models.auto.{m}" for m in (
    "processing_auto", "image_processing_auto", "feature_extraction_auto", "video_processing_auto")))  # fmt: skip


def _resolving_targets() -> list[tuple[type, bool]]:
    """Classes whose ``from_pretrained`` gets remote URIs rewritten, each with whether it forwards options: the
    Auto classes (each defines its own copy), configs, tokenizers, generation configs, and the processor families
    already imported."""
    import transformers

    auto = "transformers.models.auto."
    loaded = {m[len(auto) :] for m in sys.modules if m.startswith(auto)}
    names = []
    for mod in set(_CHEAP_AUTO_MODULES) | loaded:
        module = sys.modules.get(auto + mod) or importlib.import_module(auto + mod)
        names += [(module, n) for n in dir(module) if n.startswith("Auto") and not n.startswith("AutoConfig_")]
    names += [(transformers, n) for n in ("PreTrainedConfig", "PreTrainedTokenizerBase", "GenerationConfig")]
    names += [(transformers, n) for n, m in _HEAVY.items() if m in sys.modules]
    out: list[tuple[type, bool]] = []
    for module, n in names:
        try:
            c = getattr(module, n, None)
        except Exception:  # an Auto class whose backend is missing
            continue
        if isinstance(c, type) and "from_pretrained" in c.__dict__ and all(c is not o for o, _ in out):
            forwards = hasattr(c, "_model_mapping") or issubclass(c, transformers.PreTrainedConfig) or n == "AutoConfig"
            out.append((c, forwards))
    return out


def patch_transformers() -> None:
    """Install the transformers hooks (idempotent: an ``enable()`` after more imports covers the new classes)."""
    for cls, forwards in _resolving_targets():
        if patches.is_patched(cls, "from_pretrained"):
            continue
        orig = cls.__dict__["from_pretrained"]
        if isinstance(orig, classmethod):
            patches.replace(cls, "from_pretrained", classmethod(resolving(orig.__func__, forwards=forwards)))
        elif isinstance(orig, staticmethod):  # AutoTokenizer & co. in some versions
            patches.replace(cls, "from_pretrained", staticmethod(resolving(orig.__func__, static=True)))
    model = _pretrained_model()
    if patches.is_patched(model, "from_pretrained"):
        return
    patches.replace(model, "from_pretrained", classmethod(_from_pretrained))
    patches.replace(model, "save_pretrained", _save_pretrained)
    patches.replace(model, "push_to_hub", _push_to_hub)
    install_load_hook()


# ---- diffusers ----------------------------------------------------------------------------------------------


def _diffusers() -> tuple[type, type]:
    from diffusers import DiffusionPipeline, ModelMixin

    return ModelMixin, DiffusionPipeline


def _model_from_pretrained(cls: type, pretrained_model_name_or_path: Any = None, **kwargs: Any) -> Any:
    path = route_hub_id(pretrained_model_name_or_path, kwargs)
    if path is not pretrained_model_name_or_path:
        return load_model(cls, path, **kwargs)
    if is_artifact(pretrained_model_name_or_path, kwargs.get("subfolder") or ""):
        return load_model(cls, pretrained_model_name_or_path, **kwargs)
    kwargs.pop(KWARG, None)
    return patches.stock(_diffusers()[0], "from_pretrained").__func__(cls, pretrained_model_name_or_path, **kwargs)


def _model_save_pretrained(self: Any, save_directory: Any, *args: Any, tensorized: bool = False, **kw: Any) -> Any:
    if tensorized or looks_like_uri(save_directory):
        return save_model(self, save_directory, **save_options(kw, (KWARG,)))
    return patches.stock(_diffusers()[0], "save_pretrained")(self, save_directory, *args, **kw)


def _pipe_from_pretrained(cls: type, pretrained_model_name_or_path: Any = None, **kwargs: Any) -> Any:
    path = route_hub_id(pretrained_model_name_or_path, kwargs)
    if path is not pretrained_model_name_or_path:
        return load_pipeline(cls, path, **kwargs)
    if looks_like_uri(pretrained_model_name_or_path) or is_pipeline_artifact(pretrained_model_name_or_path):
        return load_pipeline(cls, pretrained_model_name_or_path, **kwargs)
    kwargs.pop(KWARG, None)
    return patches.stock(_diffusers()[1], "from_pretrained").__func__(cls, pretrained_model_name_or_path, **kwargs)


def _pipe_save_pretrained(self: Any, save_directory: Any, *args: Any, tensorized: bool = False, **kw: Any) -> Any:
    if tensorized or looks_like_uri(save_directory):
        return save_pipeline(self, save_directory, **save_options(kw, (KWARG,)))
    return patches.stock(_diffusers()[1], "save_pretrained")(self, save_directory, *args, **kw)


def patch_diffusers() -> None:
    """Install the diffusers hooks (idempotent)."""
    model, pipe = _diffusers()
    if patches.is_patched(model, "from_pretrained"):
        return
    for cls, name, new in (
        (model, "from_pretrained", classmethod(functools.wraps(model.__dict__["from_pretrained"].__func__)(
            _model_from_pretrained))),
        (model, "save_pretrained", functools.wraps(model.__dict__["save_pretrained"])(_model_save_pretrained)),
        (pipe, "from_pretrained", classmethod(functools.wraps(pipe.__dict__["from_pretrained"].__func__)(
            _pipe_from_pretrained))),
        (pipe, "save_pretrained", functools.wraps(pipe.__dict__["save_pretrained"])(_pipe_save_pretrained)),
    ):  # fmt: skip
        patches.replace(cls, name, new)


def unpatch() -> None:
    """Restore every attribute the hooks replaced."""
    patches.restore()
