"""hf_tensorizer: fast, safe, streamed PyTorch model loading for the Hugging Face ecosystem.

Public API::

    from hf_tensorizer import TensorSerializer, TensorDeserializer
    with TensorSerializer("model.tensors") as s:
        s.write_module(model)
    with TensorDeserializer("s3://bucket/model.tensors", device="cuda") as d:
        d.load_into_module(meta_model)

    # transformers / diffusers, for one call (no global switch)
    model = hf_tensorizer.from_pretrained(AutoModelForCausalLM, "s3://bucket/model", device_map="cuda")
    hf_tensorizer.save_pretrained(model, "s3://bucket/copy")

Names are imported on first use (PEP 562): ``import hf_tensorizer`` does not import torch, so the
``hf-tensorizer`` CLI answers ``--help`` quickly. ``from hf_tensorizer import X`` and ``hf_tensorizer.X``
work as before.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from . import errors
from .version import __version__

# public name -> the submodule that defines it
_LAZY = {
    "LoadInfo": "engine.modules",
    "LoadMetrics": "engine.pipeline",
    "TensorDeserializer": "engine.reader",
    "TensorSerializer": "engine.writer",
    "load_state_dict": "engine.reader",
    "read_index": "engine.header",
    "save_state_dict": "engine.reader",
    "FileIndex": "format",
    "TensorEntry": "format",
    "TensorKind": "format",
    "disable": "integrations",
    "enable": "integrations",
    "enabled": "integrations",
    "TensorizerMixin": "integrations",
    "from_pretrained": "integrations",
    "save_pretrained": "integrations",
    "push_to_hub": "integrations",
}
# subpackages reachable as attributes after a bare ``import hf_tensorizer`` (as when they were imported eagerly)
_SUBMODULES = frozenset(
    {"bench", "cli", "constants", "crypto", "engine", "format", "integrations", "sources", "upstream", "version"}
)

__all__ = [
    "FileIndex",
    "LoadInfo",
    "LoadMetrics",
    "TensorDeserializer",
    "TensorEntry",
    "TensorKind",
    "TensorSerializer",
    "TensorizerMixin",
    "__version__",
    "disable",
    "enable",
    "enabled",
    "errors",
    "from_pretrained",
    "load_state_dict",
    "push_to_hub",
    "read_index",
    "save_pretrained",
    "save_state_dict",
]

if TYPE_CHECKING:
    from .engine import (
        LoadInfo,
        LoadMetrics,
        TensorDeserializer,
        TensorSerializer,
        load_state_dict,
        read_index,
        save_state_dict,
    )
    from .format import FileIndex, TensorEntry, TensorKind
    from .integrations import TensorizerMixin, disable, enable, enabled, from_pretrained, push_to_hub, save_pretrained


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value  # later lookups skip this function
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY, *_SUBMODULES})
