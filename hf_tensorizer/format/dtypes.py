"""Dtype names stored in the index and their torch dtypes.

Names are torch's own without the ``torch.`` prefix. Every dtype that has byte storage is listed; dtypes
that the running torch lacks (older versions) are skipped, and reading a file that uses one raises
:class:`~hf_tensorizer.errors.UnknownDtypeError`.
"""

from __future__ import annotations

import torch

from ..errors import UnknownDtypeError

_NAMES = (
    "float64", "float32", "float16", "bfloat16",
    "float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz", "float8_e8m0fnu",
    "float4_e2m1fn_x2",
    "int8", "int16", "int32", "int64",
    "uint8", "uint16", "uint32", "uint64",
    "bool",
    "complex32", "complex64", "complex128",
)  # fmt: skip

DTYPES: dict[str, torch.dtype] = {
    n: getattr(torch, n) for n in _NAMES if isinstance(getattr(torch, n, None), torch.dtype)
}
_BY_DTYPE: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    """The index name of ``dtype``.

    Raises:
        UnknownDtypeError: the dtype has no byte storage this format can hold (e.g. quantized types).
    """
    try:
        return _BY_DTYPE[dtype]
    except KeyError:
        raise UnknownDtypeError(f"dtype {dtype} cannot be stored (no plain byte storage)") from None


def dtype_from_name(name: str) -> torch.dtype:
    """The torch dtype for an index name.

    Raises:
        UnknownDtypeError: the name is not a dtype this reader knows.
    """
    try:
        return DTYPES[name]
    except (KeyError, TypeError):
        raise UnknownDtypeError(f"unknown dtype {name!r} in index") from None


def element_size(dtype: torch.dtype) -> int:
    """Bytes per stored element (``float4_e2m1fn_x2`` packs two values in one byte element)."""
    return dtype.itemsize


_NOT_CAST = {getattr(torch, n, None) for n in ("float4_e2m1fn_x2", "float8_e8m0fnu")}


def is_floating(dtype: torch.dtype) -> bool:
    """True for real floating dtypes that ``dtype=`` casting applies to.

    Never ints, bools or complex; packed fp4 pairs and e8m0 scale factors are kept as stored too.
    """
    return dtype.is_floating_point and dtype not in _NOT_CAST
