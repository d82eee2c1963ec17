"""PEFT adapters from the same URIs as models: ``PeftModel.from_pretrained(model, "s3://...")``,
``peft_model.load_adapter(uri, adapter_name=...)`` and transformers' ``model.load_adapter(uri)``.

An adapter folder is ``adapter_config.json`` plus ``adapter_model.safetensors`` (stock) or
``adapter_model.tensors`` (written by ``PeftModel.save_pretrained(dest, tensorized=True)``). Enabled, a remote
adapter's config is fetched into the cache (``cache_root()/adapters/<hash>``, with the usual remote marker naming
its weights) and the stock code runs on that local folder; the weights never touch the disk: peft's
``load_peft_weights`` (patched in every module that holds a reference to it) streams them through the engine onto
the requested device, and transformers' ``load_adapter`` gets them as a streamed state dict. Local folders with
safetensors weights stay stock; a local ``adapter_model.tensors`` loads through us.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import hashlib
import importlib
import importlib.util
import os
import re
import sys
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from ....errors import SourceError, UsageError
from ....sources import shared_transport
from ....sources.uri import is_remote, join, local_path, looks_like_uri, redact, scheme_of
from ... import patches
from ...artifact.cache import cache_root, read_marker, swapped_in, write_marker
from ...artifact.manifest import REMOTE_MARKER
from ...artifact.probe import exists, read_bytes
from ...loading.weights import open_weights, stream_to_devices
from ...options import KWARG, TensorizerOptions
from .save import ADAPTER_SAFETENSORS, ADAPTER_TENSORS, save_adapter_tensorized

ADAPTER_CONFIG = "adapter_config.json"

# The options of the running adapter load: peft passes unknown keyword arguments on to the config class, so
# ``tensorizer_options`` cannot travel as an argument from the entry point to ``load_peft_weights``.
_OPTIONS: contextvars.ContextVar[TensorizerOptions | None] = contextvars.ContextVar("hf_tensorizer_peft_options",
                                                                                   default=None)  # fmt: skip

# Modules that bind ``load_peft_weights`` by name (``from .utils import load_peft_weights``): each gets ours.
PEFT_WEIGHT_MODULES = ("peft.utils.save_and_load", "peft.utils", "peft.peft_model", "peft.utils.hotswap", "peft")


# ---- where an adapter is ------------------------------------------------------------------------------------


def adapter_weights(folder: str) -> list[str] | None:
    """The weight URI of an adapter folder that loads through us (``adapter_model.tensors``, or the remote weights
    a cached folder's marker names), or None for a folder stock peft reads itself."""
    tensors = os.path.join(folder, ADAPTER_TENSORS)
    if os.path.isfile(tensors):
        return [tensors]
    marker = os.path.join(folder, REMOTE_MARKER)
    if os.path.isfile(marker):
        root, names = read_marker(marker)
        return [join(root, n) for n in names]
    return None


def is_ours(model_id: Any, subfolder: str | None = None) -> bool:
    """Whether an adapter load of ``model_id`` goes through hf_tensorizer: a URI, or a local tensorized folder."""
    if looks_like_uri(model_id):
        return True
    if not isinstance(model_id, (str, os.PathLike)):
        return False
    folder = os.path.join(os.fspath(model_id), subfolder or "")
    return os.path.isdir(folder) and adapter_weights(folder) is not None


def resolve_adapter(uri: str | os.PathLike[str], subfolder: str | None = None, **transport: Any) -> str:
    """A local folder holding the adapter at ``uri``: itself when local, else its config fetched into the cache
    with a marker naming the remote weights (``adapter_model.tensors`` if present, else the safetensors file).

    Raises:
        SourceError: no ``adapter_config.json`` or no adapter weights at ``uri``.
    """
    text = os.fspath(uri)
    if not is_remote(text):
        path = os.path.join(local_path(text), subfolder or "")
        if not os.path.isdir(path):
            raise SourceError(f"{text}: no such folder")
        return path
    root = join(text.rstrip("/"), subfolder) if subfolder else text.rstrip("/")
    with shared_transport(root, transport) as shared:
        if scheme_of(root) == "hf":
            from ....sources.hub import pin_revision

            root = pin_revision(root, probe=(ADAPTER_CONFIG, ADAPTER_TENSORS, ADAPTER_SAFETENSORS), **shared)
        config = read_bytes(join(root, ADAPTER_CONFIG), **shared)
        name = next((n for n in (ADAPTER_TENSORS, ADAPTER_SAFETENSORS) if exists(join(root, n), **shared)), None)
    if name is None:
        raise SourceError(f"no {ADAPTER_TENSORS} or {ADAPTER_SAFETENSORS} at {redact(root)}")
    dest = os.path.join(cache_root(), "adapters", hashlib.sha256(root.encode()).hexdigest()[:20])
    with swapped_in(dest) as fresh:  # a concurrent reader never sees half a folder
        with open(os.path.join(fresh, ADAPTER_CONFIG), "wb") as f:
            f.write(config)
        write_marker(fresh, root, [name])
    return dest


@contextlib.contextmanager
def _using(options: TensorizerOptions) -> Iterator[None]:
    token = _OPTIONS.set(options)
    try:
        yield
    finally:
        _OPTIONS.reset(token)


def _current_options() -> TensorizerOptions:
    return _OPTIONS.get() or TensorizerOptions.parse(None)


def _options_of(kwargs: dict[str, Any]) -> TensorizerOptions:
    """The call's ``tensorizer_options`` (taken out of ``kwargs``), else those of the load it is part of (peft's
    ``from_pretrained`` calls ``load_adapter``)."""
    given = kwargs.pop(KWARG, None)
    return TensorizerOptions.parse(given) if given is not None else _current_options()


# ---- the weights --------------------------------------------------------------------------------------------


def stream_adapter(folder: str, device: Any, options: TensorizerOptions | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of the adapter in ``folder`` (see :func:`adapter_weights`; or its local safetensors file),
    streamed onto ``device``.

    Raises:
        UsageError: the folder holds no weights we load; SourceError / FormatError: they cannot be read.
    """
    uris = adapter_weights(folder)
    if uris is None and os.path.isfile(os.path.join(folder, ADAPTER_SAFETENSORS)):
        uris = [os.path.join(folder, ADAPTER_SAFETENSORS)]  # a file:// URI: the user asked for our engine
    if uris is None:
        raise UsageError(f"{folder} has no {ADAPTER_TENSORS}, {ADAPTER_SAFETENSORS} or remote adapter weights")
    options = options or _current_options()
    target = (torch.device(device if device is not None else "cpu"), None)
    out: dict[str, torch.Tensor] = {}
    with open_weights(uris, **options.transport) as opened:
        for d in stream_to_devices(opened, {n: target for n in opened.file_of}, options.engine):
            out.update(d.items())
        return {n: out[n] for n in opened.file_of}  # file order, as safetensors' load_file gives them


def remap_keys(weights: Mapping[str, torch.Tensor], key_mapping: Mapping[str, str] | None) -> dict[str, Any]:
    """peft's ``key_mapping`` applied as stock ``load_peft_weights`` does (first matching pattern, prefix kept).

    Raises:
        UsageError: a key without the ``base_model.`` prefix every PEFT state dict has.
    """
    if not key_mapping:
        return dict(weights)
    out = {}
    for key, value in weights.items():
        prefix = next((p for p in ("base_model.model.", "base_model.") if key.startswith(p)), None)
        if prefix is None:
            raise UsageError(f"adapter weight {key!r} has no 'base_model.' prefix; cannot apply key_mapping")
        key = key.removeprefix(prefix)
        for pattern, replacement in key_mapping.items():
            new, n = re.subn(pattern, replacement, key)
            if n:
                key = new
                break
        out[prefix + key] = value
    return out


def _load_peft_weights(model_id: Any, device: Any = None, key_mapping: Mapping[str, str] | None = None,
                       **kwargs: Any) -> dict[str, Any]:  # fmt: skip
    subfolder = kwargs.get("subfolder")
    if is_ours(model_id, subfolder):
        folder = resolve_adapter(model_id, subfolder, **_current_options().transport)
        if device is None:
            from peft.utils.other import infer_device

            device = infer_device()
        return remap_keys(stream_adapter(folder, device), key_mapping)
    stock = patches.stock(sys.modules["peft.utils.save_and_load"], "load_peft_weights")
    return stock(model_id, device=device, key_mapping=key_mapping, **kwargs)  # type: ignore[no-any-return]


# ---- entry points -------------------------------------------------------------------------------------------


def _peft_model() -> type:
    from peft import PeftModel

    return PeftModel


def _refuse_disk_offloaded(model: Any) -> None:
    """peft re-dispatches a disk-offloaded model by rewriting its safetensors files with renamed keys: it cannot do
    that with weights read from an artifact, so say so instead of failing inside safetensors."""
    if getattr(model, "hf_tensorizer_offloaded", None) is not None:
        raise UsageError(
            "PeftModel adapters on a base model with device_map 'disk' entries loaded through hf_tensorizer are not "
            "supported; offload to 'cpu' instead, or use the model's own load_adapter"
        )


def _peft_from_pretrained(cls: type, model: Any, model_id: Any, *args: Any, **kwargs: Any) -> Any:
    _refuse_disk_offloaded(model)
    options = _options_of(kwargs)
    stock = patches.stock(_peft_model(), "from_pretrained").__func__
    if not is_ours(model_id, kwargs.get("subfolder")):
        return stock(cls, model, model_id, *args, **kwargs)
    folder = resolve_adapter(model_id, kwargs.pop("subfolder", None), **options.transport)
    with _using(options):
        return stock(cls, model, folder, *args, **kwargs)


def _peft_load_adapter(self: Any, model_id: Any, *args: Any, **kwargs: Any) -> Any:
    _refuse_disk_offloaded(self.get_base_model())
    options = _options_of(kwargs)
    stock = patches.stock(_peft_model(), "load_adapter")
    if not is_ours(model_id, kwargs.get("subfolder")):
        return stock(self, model_id, *args, **kwargs)
    folder = resolve_adapter(model_id, kwargs.pop("subfolder", None), **options.transport)
    with _using(options):
        return stock(self, folder, *args, **kwargs)


def _peft_save_pretrained(self: Any, save_directory: Any, *args: Any, tensorized: bool = False, **kwargs: Any) -> Any:
    stock = patches.stock(_peft_model(), "save_pretrained")
    if tensorized or looks_like_uri(save_directory):
        if args:
            raise UsageError("save_pretrained(tensorized=True) takes its options by keyword")
        return save_adapter_tensorized(self, save_directory, stock, **kwargs)
    return stock(self, save_directory, *args, **kwargs)


def _adapter_mixin() -> type:
    from transformers.integrations.peft import PeftAdapterMixin

    return PeftAdapterMixin


def _transformers_load_adapter(self: Any, peft_model_id: Any = None, *args: Any, **kwargs: Any) -> Any:
    options = _options_of(kwargs)
    stock = patches.stock(_adapter_mixin(), "load_adapter")
    adapter_kwargs = dict(kwargs.get("adapter_kwargs") or {})
    subfolder = adapter_kwargs.pop("subfolder", None)
    if not is_ours(peft_model_id, subfolder) or kwargs.get("adapter_state_dict") is not None:
        return stock(self, peft_model_id, *args, **kwargs)
    if "disk" in (getattr(self, "hf_device_map", None) or {}).values():
        # stock load_adapter neither places adapters on disk-offloaded modules nor takes a state dict for them
        raise UsageError("load_adapter on a model with device_map 'disk' entries is not supported; use 'cpu' offload")
    folder = resolve_adapter(peft_model_id, subfolder, **options.transport)
    kwargs["adapter_kwargs"] = adapter_kwargs
    if kwargs.get("peft_config") is None:
        from peft import PeftConfig

        kwargs["peft_config"] = PeftConfig.from_pretrained(folder)
    device = getattr(self, "device", None)
    # placed by transformers' own key mapping: the stock load then moves each to its module's device
    kwargs["adapter_state_dict"] = stream_adapter(folder, device if device is not None else "cpu", options)
    return stock(self, folder, *args, **kwargs)


def _config_from_pretrained(orig: Any) -> Any:
    @functools.wraps(orig)
    def wrapper(cls: type, pretrained_model_name_or_path: Any, subfolder: str | None = None, **kwargs: Any) -> Any:
        options = _options_of(kwargs)
        if looks_like_uri(pretrained_model_name_or_path):
            folder = resolve_adapter(pretrained_model_name_or_path, subfolder, **options.transport)
            return orig(cls, folder, **kwargs)
        return orig(cls, pretrained_model_name_or_path, subfolder=subfolder, **kwargs)

    return wrapper


def patch_peft() -> None:
    """Install the peft hooks (idempotent): the weights loader, ``PeftModel``'s entry points, ``PeftConfig``'s
    ``from_pretrained`` and transformers' ``load_adapter``."""
    from peft.config import PeftConfigMixin

    model = _peft_model()
    if patches.is_patched(model, "from_pretrained"):
        return
    for name in PEFT_WEIGHT_MODULES:
        module = sys.modules.get(name) or importlib.import_module(name)
        if getattr(module, "load_peft_weights", None) is not None:
            patches.replace(module, "load_peft_weights", _load_peft_weights)
    orig = model.__dict__["from_pretrained"].__func__
    patches.replace(model, "from_pretrained", classmethod(functools.wraps(orig)(_peft_from_pretrained)))
    patches.replace(model, "load_adapter", functools.wraps(model.__dict__["load_adapter"])(_peft_load_adapter))
    save = functools.wraps(model.__dict__["save_pretrained"])(_peft_save_pretrained)
    patches.replace(model, "save_pretrained", save)
    config_orig = PeftConfigMixin.__dict__["from_pretrained"].__func__
    patches.replace(PeftConfigMixin, "from_pretrained", classmethod(_config_from_pretrained(config_orig)))
    if "transformers" in sys.modules or importlib.util.find_spec("transformers") is not None:
        mixin = _adapter_mixin()
        wrapped = functools.wraps(mixin.__dict__["load_adapter"])(_transformers_load_adapter)
        patches.replace(mixin, "load_adapter", wrapped)
