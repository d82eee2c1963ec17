"""The engine: plan, read, verify/decrypt, stage in pinned memory, copy to the device.

Names are imported on first use (PEP 562), each from the module that defines it: a load imports the reader and
what it needs, not the writer (and the other way round).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_NAMES = {
    "LoadInfo": "modules",
    "LoadMetrics": "pipeline",
    "TensorDeserializer": "reader",
    "TensorSerializer": "writer",
    "load_state_dict": "reader",
    "read_index": "header",
    "save_state_dict": "reader",
}
__all__ = [
    "LoadInfo",
    "LoadMetrics",
    "TensorDeserializer",
    "TensorSerializer",
    "load_state_dict",
    "read_index",
    "save_state_dict",
]

if TYPE_CHECKING:
    from .header import read_index
    from .modules import LoadInfo
    from .pipeline import LoadMetrics
    from .reader import TensorDeserializer, load_state_dict, save_state_dict
    from .writer import TensorSerializer


def __getattr__(name: str) -> Any:
    if name in _NAMES:
        value = getattr(importlib.import_module(f".{_NAMES[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_NAMES})
