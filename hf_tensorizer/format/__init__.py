"""The file format: bytes <-> index, pure functions, no I/O. See docs/format.md."""

from .dtypes import DTYPES, dtype_from_name, dtype_name, element_size
from .index import (
    FEATURE_ENCRYPTED,
    KNOWN_OPTIONAL_FEATURES,
    KNOWN_REQUIRED_FEATURES,
    MAGIC,
    PREAMBLE_SIZE,
    VERSION,
    FileIndex,
    Preamble,
    TensorEntry,
    TensorKind,
    decode_index,
    decode_preamble,
    encode_header,
)

__all__ = [
    "DTYPES",
    "FEATURE_ENCRYPTED",
    "KNOWN_OPTIONAL_FEATURES",
    "KNOWN_REQUIRED_FEATURES",
    "MAGIC",
    "PREAMBLE_SIZE",
    "VERSION",
    "FileIndex",
    "Preamble",
    "TensorEntry",
    "TensorKind",
    "decode_index",
    "decode_preamble",
    "dtype_from_name",
    "dtype_name",
    "element_size",
    "encode_header",
]
