"""hf_tensorizer: fast, safe, streamed PyTorch model loading for the Hugging Face ecosystem.

Public API::

    from hf_tensorizer import TensorSerializer, TensorDeserializer
    with TensorSerializer("model.tensors") as s:
        s.write_module(model)
    with TensorDeserializer("s3://bucket/model.tensors", device="cuda") as d:
        d.load_into_module(meta_model)
"""

from . import errors
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
from .integrations import disable, enable, enabled
from .version import __version__

__all__ = [
    "FileIndex",
    "LoadInfo",
    "LoadMetrics",
    "TensorDeserializer",
    "TensorEntry",
    "TensorKind",
    "TensorSerializer",
    "__version__",
    "disable",
    "enable",
    "enabled",
    "errors",
    "load_state_dict",
    "read_index",
    "save_state_dict",
]
