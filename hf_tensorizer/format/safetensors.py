"""safetensors files, bytes -> validated index, no I/O: ``[u64 header length][JSON header][data]``.

The header maps each tensor name to ``{"dtype", "shape", "data_offsets": [begin, end]}`` plus an optional
``"__metadata__"`` map of strings. Everything is validated against the file size (typed
:class:`~hf_tensorizer.errors.FormatError` subclasses) before the engine may read a byte of data.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Generator
from typing import Any

import torch

from ..constants import MAX_INDEX_BYTES
from ..errors import FormatError, HeaderTooLargeError, TruncatedFileError, UnknownDtypeError
from .index import FileIndex, TensorEntry, TensorKind

MAX_HEADER_BYTES = min(MAX_INDEX_BYTES, 100_000_000)  # the cap safetensors itself applies

_NAMES = {
    "BOOL": "bool", "U8": "uint8", "I8": "int8", "I16": "int16", "U16": "uint16", "I32": "int32",
    "U32": "uint32", "I64": "int64", "U64": "uint64", "F16": "float16", "BF16": "bfloat16",
    "F32": "float32", "F64": "float64", "C64": "complex64",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "F8_E8M0": "float8_e8m0fnu",
    "F8_E4M3FNUZ": "float8_e4m3fnuz", "F8_E5M2FNUZ": "float8_e5m2fnuz", "F4": "float4_e2m1fn_x2",
}  # fmt: skip
#: safetensors counts F4 shapes in 4-bit values, torch's ``float4_e2m1fn_x2`` in bytes (pairs): the last dimension
#: is halved on the way in, as ``safe_open`` does
PACKED_PAIRS = frozenset({"F4"})
DTYPES: dict[str, torch.dtype] = {
    k: getattr(torch, v) for k, v in _NAMES.items() if isinstance(getattr(torch, v, None), torch.dtype)
}


def _need(cond: bool, msg: str) -> None:
    if not cond:
        raise FormatError(msg)


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    _need(len(out) == len(pairs), "safetensors header has duplicate keys")
    return out


def _u(v: Any) -> bool:
    return type(v) is int and 0 <= v < 1 << 62


def decode_safetensors(size: int, head: bytes) -> Generator[list[tuple[int, int]], list[bytes], FileIndex]:
    """Parse and validate a safetensors header.

    A generator: when the header is longer than ``head`` it yields the one ``(offset, length)`` range it still
    needs and is sent its bytes; its return value is the index (see ``hf_tensorizer.engine.header``).

    Args:
        size: the file size in bytes.
        head: the first bytes of the file.

    Raises:
        HeaderTooLargeError: the header length exceeds ``MAX_HEADER_BYTES``.
        TruncatedFileError: the file ends inside the header or a tensor.
        UnknownDtypeError: a dtype this reader (or the running torch) does not support (the F6 types, ...).
        FormatError: malformed JSON or inconsistent entries.
    """
    if len(head) < 8:
        raise TruncatedFileError(f"safetensors file is {size} bytes, too short for its header length")
    n = struct.unpack_from("<Q", head)[0]
    if n > MAX_HEADER_BYTES:
        raise HeaderTooLargeError(f"safetensors header of {n} bytes exceeds the cap of {MAX_HEADER_BYTES}")
    if 8 + n > size:
        raise TruncatedFileError(f"safetensors header ends at {8 + n}, file is {size} bytes")
    raw = bytes(head[8 : 8 + n])
    if len(raw) < n:
        raw += (yield [(8 + len(raw), n - len(raw))])[0]
    try:
        doc = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise FormatError(f"safetensors header is not valid UTF-8 JSON: {exc}") from None
    _need(isinstance(doc, dict), "safetensors header must be a JSON object")
    metadata = doc.pop("__metadata__", None)
    metadata = {} if metadata is None else metadata
    _need(isinstance(metadata, dict), "safetensors __metadata__ must be an object")
    _need(all(isinstance(v, str) for v in metadata.values()), "safetensors __metadata__ must map str to str")
    data_start = 8 + n
    data_size = size - data_start
    tensors: dict[str, TensorEntry] = {}
    for name, info in doc.items():
        where = f"tensor {name!r}"
        _need(name != "", "empty tensor name")
        _need(isinstance(info, dict), f"{where}: entry must be an object")
        dtype = DTYPES.get(info.get("dtype")) if isinstance(info.get("dtype"), str) else None
        if dtype is None:
            raise UnknownDtypeError(f"{where}: unsupported safetensors dtype {info.get('dtype')!r}")
        shape, offsets = info.get("shape"), info.get("data_offsets")
        _need(isinstance(shape, list) and len(shape) <= 64 and all(map(_u, shape)), f"{where}: invalid shape")
        _need(math.prod(d for d in shape if d) < 1 << 62, f"{where}: shape is too large")
        if info["dtype"] in PACKED_PAIRS:
            _need(len(shape) > 0 and shape[-1] % 2 == 0, f"{where}: {info['dtype']} needs an even last dimension")
            shape = [*shape[:-1], shape[-1] // 2]
        ok = isinstance(offsets, list) and len(offsets) == 2 and all(map(_u, offsets))
        _need(ok and offsets[0] <= offsets[1], f"{where}: invalid data_offsets {offsets!r}")
        begin, end = offsets
        if end > data_size:
            raise TruncatedFileError(f"{where}: data ends at {data_start + end}, file is {size} bytes")
        nbytes = math.prod(shape) * dtype.itemsize
        _need(end - begin == nbytes, f"{where}: {end - begin} bytes for shape {shape} of {dtype}")
        tensors[name] = TensorEntry(name, dtype, tuple(shape), TensorKind.PLAIN, data_start + begin, nbytes)
    # like the reference reader: in offset order each tensor starts where the previous one ended, and the last
    # ends at the file's end; a gap, an overlap or trailing bytes means shifted tensors, not a valid file
    end_at, prev = data_start, "the header"
    for e in sorted(tensors.values(), key=lambda e: (e.offset, e.length)):
        if e.offset != end_at:
            how = "overlaps" if e.offset < end_at else f"leaves {e.offset - end_at} bytes unaccounted for after"
            raise FormatError(f"tensor {e.name!r} {how} {prev}: data offsets must cover the data contiguously")
        end_at, prev = e.offset + e.length, f"tensor {e.name!r}"
    if end_at != size:
        raise FormatError(f"safetensors data ends at {end_at}, file is {size} bytes: the data section is not covered")
    return FileIndex(
        tensors=tensors,
        metadata={str(k): v for k, v in metadata.items()},
        alignment=1,
        block_size=16 << 20,
        digest="none",
        data_offset=data_start,
        file_size=size,
    )
