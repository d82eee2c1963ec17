"""The engine: plan, read, verify/decrypt, stage in pinned memory, copy to the device."""

from .header import read_index
from .pipeline import LoadMetrics
from .reader import LoadInfo, TensorDeserializer, load_state_dict, save_state_dict
from .writer import TensorSerializer

__all__ = [
    "LoadInfo",
    "LoadMetrics",
    "TensorDeserializer",
    "TensorSerializer",
    "load_state_dict",
    "read_index",
    "save_state_dict",
]
