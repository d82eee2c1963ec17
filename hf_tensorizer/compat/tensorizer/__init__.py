"""CoreWeave tensorizer's public API on hf_tensorizer's engine: migrating is one import line.

::

    import hf_tensorizer.compat.tensorizer as tensorizer            # was: import tensorizer
    from hf_tensorizer.compat.tensorizer import TensorSerializer, TensorDeserializer, stream_io, utils

Modules: :mod:`.serialization` (``TensorSerializer``, ``TensorDeserializer``, ``EncryptionParams``,
``DecryptionParams``, ``TensorType``, ``CryptographyError``), :mod:`.stream_io` (``open_stream``), :mod:`.utils`
(``no_init_or_tensor``, ...), :mod:`.torch_compat` (``tensorizer_saving`` / ``tensorizer_loading``). Files written
here are hf_tensorizer files; upstream's files read bit-exact. Differences: docs/compat.md.
"""

from . import serialization, stream_io, torch_compat, utils
from .serialization import (
    CryptographyError,
    DecryptionParams,
    EncryptionParams,
    FilterFuncType,
    TensorDeserializer,
    TensorSerializer,
    TensorType,
)

__version__ = "2.12.1"  # the upstream API version this layer follows

__all__ = [
    "CryptographyError",
    "DecryptionParams",
    "EncryptionParams",
    "FilterFuncType",
    "TensorDeserializer",
    "TensorSerializer",
    "TensorType",
    "serialization",
    "stream_io",
    "torch_compat",
    "utils",
]
