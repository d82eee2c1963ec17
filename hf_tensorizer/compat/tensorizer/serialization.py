"""Upstream tensorizer's ``serialization`` API (``TensorSerializer``, ``TensorDeserializer``, ...) on our engine.

Files written here are hf_tensorizer files (streamed, digested, optionally encrypted); files written by upstream
tensorizer read bit-exact. What upstream code calls maps as follows (docs/compat.md lists every difference):

- nested state dicts (lists, dicts of dicts) are stored under upstream's structured names and come back as nested
  read-only mappings (``d[0]["a"]``) or, with :meth:`TensorDeserializer.tree`, as lists and dicts;
- meta tensors (no data) are recorded in the file's metadata and load as zeros of their shape and dtype;
- ``EncryptionParams`` / ``DecryptionParams`` are our key sources (``_keys``); upstream-file keys are converted;
- ``verify_hash=True`` checks our block digests, or upstream's per-tensor CRC32/SHA-256 for upstream files.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy
import torch

from ...engine.writer import TensorSerializer as _Writer
from ...format.dtypes import dtype_name
from . import _deserializer, _names
from ._common import (
    ENCRYPTION_TENSORIZER_VERSION,
    KIND_OF_TYPE,
    LONG_TENSOR_TENSORIZER_VERSION,
    META_KEY,
    META_TENSOR_TENSORIZER_VERSION,
    NON_OPAQUE_TENSORIZER_VERSION,
    OPAQUE_TENSORIZER_VERSION,
    TENSORIZER_VERSION,
    CryptographyError,
    FileFeatureFlags,
    FilterFuncType,
    HashMismatchError,
    HashType,
    TensorHash,
    TensorType,
    dest_of,
)
from ._deserializer import TensorDeserializer
from ._keys import DecryptionParams, EncryptionParams

__all__ = ["CryptographyError", "DecryptionParams", "EncryptionParams", "FilterFuncType", "TensorDeserializer",
           "TensorSerializer", "TensorType"]  # fmt: skip

logger = logging.getLogger(__name__)


class TensorSerializer:
    """Upstream's ``TensorSerializer``: collects tensors, writes an hf_tensorizer file on :meth:`close`.

    Args:
        file_obj: a path, URI (``s3://``), writable binary file object, file descriptor or ``open_stream`` result.
        compress_tensors: accepted and ignored, as upstream does.
        encryption: :class:`EncryptionParams` (or one of our keys).
        limit_cpu_concurrency: accepted and ignored (our writer streams on one thread).
    """

    def __init__(self, file_obj: Any, compress_tensors: bool = False, *, encryption: Any = None,
                 limit_cpu_concurrency: int | None = None) -> None:  # fmt: skip
        dest, options = dest_of(file_obj)
        self._writer = _Writer(dest, encryption=encryption, **options)
        self._meta: list[list[Any]] = []
        self._modules: list[torch.nn.Module] = []
        self._bytes = 0
        self.compress_tensors = compress_tensors

    @property
    def total_tensor_bytes(self) -> int:
        """Bytes of tensor data written so far."""
        return self._bytes

    def write_tensor(self, idx: int, name: str | Sequence[str | int], tensor_type: TensorType,
                     tensor: torch.Tensor | numpy.ndarray) -> None:  # fmt: skip
        """Add one tensor (``idx`` is upstream's module index, unused); a meta tensor is recorded, not written.

        Raises:
            UsageError: a name written twice, an unsupported dtype or layout.
        """
        if isinstance(tensor, numpy.ndarray):
            tensor = torch.from_numpy(tensor)
        key = name if isinstance(name, str) else _names.encode(tuple(name))
        kind = KIND_OF_TYPE[TensorType(tensor_type)]
        if isinstance(tensor, torch.Tensor) and tensor.is_meta:
            dtype_name(tensor.dtype)
            self._meta.append([key, dtype_name(tensor.dtype), list(tensor.shape), int(TensorType(tensor_type))])
            return
        self._writer.write_tensor(key, tensor, kind)
        self._bytes += tensor.numel() * tensor.element_size()

    def write_state_dict(self, state_dict: Mapping | list | tuple) -> None:
        """Add every tensor of a (possibly nested) mapping, list or tuple."""
        for path, tensor in _names.flatten(state_dict):
            self.write_tensor(0, _names.encode(path), TensorType.STATE_DICT, tensor)

    def write_module(self, m: torch.nn.Module, remove_tensors: bool = False, *,
                     include_non_persistent_buffers: bool = True) -> None:  # fmt: skip
        """Add a module's parameters and buffers (non-persistent ones too unless told otherwise).

        ``remove_tensors``: the module's tensors are moved to the meta device after :meth:`close` (upstream frees
        them while writing; ours are streamed on close).
        """
        persistent = set(m.state_dict(keep_vars=True))
        seen: set[str] = set()
        for name, p in m.named_parameters(remove_duplicate=False):
            seen.add(name)
            self.write_tensor(0, name, TensorType.PARAM, p)
        for name, b in m.named_buffers(remove_duplicate=False):
            if b is not None and name not in seen and (include_non_persistent_buffers or name in persistent):
                self.write_tensor(0, name, TensorType.BUFFER, b)
        if remove_tensors:
            self._modules.append(m)

    def close(self) -> None:
        """Write the file and commit it."""
        if self._meta:
            self._writer.metadata[META_KEY] = json.dumps(self._meta, separators=(",", ":"))
        self._writer.close()
        for m in self._modules:
            m.to("meta")
        self._modules.clear()

    def __enter__(self) -> TensorSerializer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _tensor_hash() -> type[TensorHash]:
    return TensorHash  # this module's name, read on each call: a patch of serialization.TensorHash takes effect


_deserializer.hash_record = _tensor_hash
_FileFeatureFlags = FileFeatureFlags  # upstream's (private) name, which its tests use
_ = (ENCRYPTION_TENSORIZER_VERSION, LONG_TENSOR_TENSORIZER_VERSION, META_TENSOR_TENSORIZER_VERSION,
     NON_OPAQUE_TENSORIZER_VERSION, OPAQUE_TENSORIZER_VERSION, TENSORIZER_VERSION, CryptographyError, HashMismatchError,
     HashType, TensorHash)  # upstream's names, re-exported here  # fmt: skip
