"""Upstream's ``TensorDeserializer`` over our engine's (see :mod:`.serialization`)."""

from __future__ import annotations

import dataclasses
import json
import struct
import types
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy
import torch

from ...engine.header import read_index
from ...engine.reader import TensorDeserializer as _Reader
from ...format.dtypes import dtype_from_name
from ...sources import open_source
from ...upstream.format import UpstreamIndex
from ...upstream.loading import verify_upstream
from . import _names
from ._common import (
    ENCRYPTION_TENSORIZER_VERSION,
    LONG_TENSOR_TENSORIZER_VERSION,
    META_KEY,
    META_TENSOR_TENSORIZER_VERSION,
    NON_OPAQUE_TENSORIZER_VERSION,
    OPAQUE_TENSORIZER_VERSION,
    TYPE_OF_KIND,
    FileFeatureFlags,
    FilterFuncType,
    HashType,
    TensorHash,
    TensorType,
    Translated,
    default_device,
    key_for,
    source_of,
)

#: what ``read_numpy_arrays`` yields: ``(module_idx, tensor_type, name, array, is_opaque, torch_dtype)``
NumpyItem = tuple[int, int, str, numpy.ndarray, bool, str | None]


class TensorDeserializer(Mapping):
    """Upstream's ``TensorDeserializer``: a mapping of tensors read by our engine.

    Args:
        file_obj: a path, URI, readable binary file object, file descriptor or ``stream_io.open_stream`` result.
        device: where tensors go (default: the current CUDA device if there is one, else the CPU).
        filter_func: ``(name or path) -> bool``; other tensors are never read.
        dtype: cast floating tensors to this dtype.
        lazy_load: read each tensor on first access.
        plaid_mode, plaid_mode_buffers: accepted and ignored (upstream ignores them too).
        num_readers: reader threads.
        verify_hash: check the stored hashes (our block digests; upstream's per-tensor hashes for its files).
        encryption: :class:`~._keys.DecryptionParams` (or one of our keys).

    Raises:
        CryptographyError: a wrong or missing key, or tampered data.
        HashMismatchError: with ``verify_hash``, bytes that do not match.
        FormatError, SourceError: as our engine's deserializer.
    """

    def __init__(self, file_obj: Any, device: Any = None, filter_func: FilterFuncType | None = None,
                 dtype: torch.dtype | None = None, *, lazy_load: bool = False, plaid_mode: Any = None,
                 plaid_mode_buffers: Any = None, num_readers: int | None = None, verify_hash: bool = False,
                 encryption: Any = None) -> None:  # fmt: skip
        self._device = torch.device(device) if device is not None else default_device()
        src, options = source_of(file_obj)
        source = open_source(src, **options)
        try:
            with Translated():
                self._raw_index = index = read_index(source)
                upstream = isinstance(index, UpstreamIndex)
                if verify_hash:
                    index = _decoded_hashes(index)
                self._filter = filter_func
                self._upstream_names = index.upstream if upstream else {}
                self._key, self._verified = key_for(index, encryption), bool(verify_hash)
                wanted = None if filter_func is None else (lambda n: bool(filter_func(self._public(n))))
                self._reader = _Reader(
                    source, index=index, device=self._device, dtype=dtype, filter=wanted, lazy=lazy_load,
                    num_readers=num_readers, encryption=self._key,
                    verify_hash=bool(verify_hash) and not upstream,
                )  # fmt: skip
                if verify_hash and upstream:
                    verify_upstream(self._reader)
        except BaseException:
            source.close()
            raise
        self._source, self._upstream = source, upstream
        self._meta = self._meta_entries(index, wanted)
        names = list(self._reader.keys()) + [n for n in self._meta if n not in set(self._reader.keys())]
        self._names = names
        self._tree = _names.Node.build(names, self._get, self._path)
        flags = FileFeatureFlags(0)
        if index.encryption is not None or (upstream and index.feature_flags & 1):
            flags |= FileFeatureFlags.encrypted
        version = index.version if upstream else _upstream_version(index, self._meta, flags)
        self._file_header = types.SimpleNamespace(version_number=version, tensor_count=len(index.tensors))
        self._file_flags = flags

    def _path(self, name: str) -> tuple[Any, ...]:
        """The nesting path of a tensor: from our stored name, or from an upstream file's structured raw name."""
        info = self._upstream_names.get(name)
        if info is not None and info.raw_name.startswith(b"\x1e"):
            return _names.decode(info.raw_name.decode("utf-8", "replace"))
        return _names.decode(name)

    def _public(self, name: str) -> Any:
        return _names.public_key(self._path(name))

    def _meta_entries(self, index: Any, wanted: Any) -> dict[str, tuple[torch.dtype, tuple[int, ...], int]]:
        raw = index.metadata.get(META_KEY) if not isinstance(index, UpstreamIndex) else None
        out = {}
        for name, dt, shape, kind in json.loads(raw) if raw else []:
            if wanted is None or wanted(name):
                out[name] = (dtype_from_name(dt), tuple(shape), kind)
        return out

    def _get(self, name: str) -> torch.Tensor:
        if name in self._meta:
            dt, shape, _ = self._meta[name]
            return torch.zeros(shape, dtype=dt, device=self._device)
        with Translated():
            return self._reader[name]

    # ---- Mapping: the first level of the structure ------------------------------------------------
    def __getitem__(self, key: Any) -> Any:
        return self._tree[key]

    def __iter__(self) -> Iterator[Any]:
        return iter(self._tree)

    def __len__(self) -> int:
        return len(self._tree)

    def __contains__(self, key: object) -> bool:
        return key in self._tree

    def tree(self, prefix: Sequence[Any] | None = None, *, default: Any = None,
             filter_func: FilterFuncType | None = None) -> Any:  # fmt: skip
        """The (sub)tree at ``prefix`` as lists and dicts (a leaf: the tensor); ``default`` when nothing matches."""
        node = self._tree.node(tuple(prefix or ()))
        if node is None:
            return default
        if not isinstance(node, _names.Node):
            return self._get(node)
        if filter_func is not None:
            keep = {n for n in node.leaves() if filter_func(self._public(n))}
            if not keep:
                return default
            node = _names.Node.build([n for n in node.leaves() if n in keep], self._get, self._path)
            node = node.node(tuple(prefix or ())) or node
        return _names.as_tree(node, self._get)

    # ---- upstream's methods --------------------------------------------------------------------
    @property
    def total_tensor_bytes(self) -> int:
        """Bytes of the selected tensors' data."""
        return sum(self._reader.index.tensors[n].length for n in self._reader)

    @property
    def total_bytes_read(self) -> int:
        """Bytes read from the source so far."""
        return self._reader.metrics.bytes_read

    def read_tensors(self, filter_func: FilterFuncType | None = None, num_tensors: int = -1,
                     verify_hash: bool | None = None) -> Iterator[tuple[int, int, str, torch.Tensor]]:  # fmt: skip
        """``(module_idx, tensor_type, name, tensor)`` for each tensor, in file order (``module_idx`` is 0).

        ``verify_hash=True`` on a deserializer opened without it checks these tensors' stored bytes first.

        Raises:
            HashMismatchError: with ``verify_hash``, bytes that do not match their hashes.
        """
        names = [n for n in self._names if filter_func is None or filter_func(self._public(n))]
        names = names if num_tensors < 0 else names[:num_tensors]
        if verify_hash:
            self._check_hashes(names)
        for name in names:
            yield 0, int(self._type(name)), name, self._get(name)

    def _check_hashes(self, names: list[str]) -> None:
        """Verify ``names`` now, for a per-call ``verify_hash=True`` when the constructor's was off: their bytes are
        read again by a verifying reader (our block digests, or upstream's per-tensor hashes)."""
        todo = [n for n in names if n not in self._meta]
        if self._verified or not todo:
            return
        with Translated():
            check = _Reader(self._source, index=_decoded_hashes(self._raw_index), device="cpu", filter=todo,
                            encryption=self._key, verify_hash=not self._upstream)  # fmt: skip
            try:
                if self._upstream:
                    verify_upstream(check)
            finally:
                check.close()

    def read_numpy_arrays(self, filter_func: FilterFuncType | None = None, num_tensors: int = -1,
                          allow_raw_data: bool = False,
                          verify_hash: bool | None = None) -> Iterator[NumpyItem]:  # fmt: skip
        """``(module_idx, tensor_type, name, array, is_opaque, torch_dtype)`` per tensor, in file order.

        A dtype numpy lacks (``bfloat16``, the float8s...) is "opaque", as upstream calls it: with ``allow_raw_data``
        its bytes come back as a signed-integer array of the same width, ``is_opaque`` True and ``torch_dtype`` the
        torch name (``"torch.bfloat16"``); without it, a ``ValueError``.

        Raises:
            RuntimeError: the deserializer's device is not the CPU.
            ValueError: an opaque dtype without ``allow_raw_data``.
        """
        if self._device.type != "cpu":
            raise RuntimeError("read_numpy_arrays is only valid when deserializing to the CPU")
        for module_idx, tensor_type, name, tensor in self.read_tensors(filter_func, num_tensors, verify_hash):
            tensor = tensor.detach()
            if tensor.dtype in _NUMPY_DTYPES:
                yield module_idx, tensor_type, name, tensor.numpy(), False, None
                continue
            raw = _OPAQUE_VIEWS.get(tensor.element_size())
            if raw is None or not allow_raw_data:
                raise ValueError(f"{name} has an opaque datatype ({tensor.dtype}): set allow_raw_data=True to read "
                                 "its bytes as a numpy array, or use read_tensors()")  # fmt: skip
            yield module_idx, tensor_type, name, tensor.view(raw).numpy(), True, str(tensor.dtype)

    def _type(self, name: str) -> TensorType:
        if name in self._meta:
            return TensorType(self._meta[name][2])
        return TYPE_OF_KIND[self._reader.kind(name)]

    def load_into_module(self, m: torch.nn.Module, filter_func: FilterFuncType | None = None,
                         verify_hash: bool | None = None) -> int:  # fmt: skip
        """Load the file's tensors into ``m`` in place (meta-built modules included). Returns how many.

        Raises:
            RuntimeError: a tensor of the file that ``m`` lacks, or a shape mismatch.
            HashMismatchError: with ``verify_hash`` (here or in the constructor), bytes that do not match.
        """
        names = [n for n in self._names if filter_func is None or filter_func(self._public(n))]
        if verify_hash:
            self._check_hashes(names)
        count = 0
        for name in names:
            module_path, _, attr = name.rpartition(".")
            try:
                sub = m.get_submodule(module_path) if module_path else m
            except AttributeError:
                raise RuntimeError(f"the module has no submodule for tensor {name!r}") from None
            tensor = self._get(name)
            if attr in sub._parameters:
                old = sub._parameters[attr]
                grad = old.requires_grad if old is not None else False
                sub._parameters[attr] = torch.nn.Parameter(tensor, requires_grad=grad and tensor.is_floating_point())
            elif attr in sub._buffers:
                sub._buffers[attr] = tensor
            else:
                raise RuntimeError(f"the module has no parameter or buffer {name!r}")
            count += 1
        return count

    def verify_module(self, m: torch.nn.Module) -> tuple[bool, list[tuple[str, bool]]]:
        """Compare ``m``'s tensors with this file's, byte for byte: ``(all passed, [(name, passed), ...])``."""
        mine = dict(m.named_parameters(remove_duplicate=False))
        mine.update(m.named_buffers(remove_duplicate=False))
        results = [(name, _same(mine.get(name), self._get(name), name in self._meta)) for name in self._names]
        return all(ok for _, ok in results), results

    def to_redis(self, redis_client: Any, key_prefix: str, force: bool = False) -> None:
        """Not offered: Redis is not a source of ours (docs/compat.md)."""
        raise NotImplementedError("to_redis is not offered by hf_tensorizer's compat layer")

    # ---- lifetime ----------------------------------------------------------------------------
    def close(self) -> None:
        self._reader.close()
        self._source.close()

    def __enter__(self) -> TensorDeserializer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _same(theirs: torch.Tensor | None, ours: torch.Tensor, ours_meta: bool) -> bool:
    """Same shape, dtype and bytes (a meta tensor matches a meta entry of the file)."""
    if theirs is None or theirs.shape != ours.shape or theirs.dtype != ours.dtype:
        return False
    if theirs.is_meta or ours_meta:
        return theirs.is_meta and ours_meta
    a, b = theirs.detach().cpu().contiguous(), ours.detach().cpu().contiguous()
    return a.numel() == 0 or torch.equal(a.view(-1).view(torch.uint8), b.view(-1).view(torch.uint8))


def _own_tensor_hash() -> Callable[..., Any]:
    return TensorHash


#: the record type stored hashes are decoded through, asked for on each open: :mod:`.serialization` points this at
#: its own ``TensorHash`` name, so code that patches ``serialization.TensorHash`` (upstream's tests do) is heard
hash_record: Callable[[], Callable[..., Any]] = _own_tensor_hash


def _decoded_hashes(index: Any) -> Any:
    """``index`` with every stored hash decoded through :data:`hash_record`, as upstream's reader decodes its
    headers' hashes into ``TensorHash`` records. Our block digests and upstream's CRC32/SHA-256 alike round-trip
    unchanged unless the record type is patched."""
    cls = hash_record()

    def record(kind: HashType, value: bytes) -> bytes:
        return bytes(cls(type=kind, hash=value).hash)

    if isinstance(index, UpstreamIndex):
        infos = {}
        for name, info in index.upstream.items():
            crc = info.crc32
            if crc is not None:
                crc = struct.unpack("<I", record(HashType.CRC32, struct.pack("<I", crc)))[0]
            sha = record(HashType.SHA256, info.sha256) if info.sha256 is not None else None
            infos[name] = dataclasses.replace(info, crc32=crc, sha256=sha)
        return dataclasses.replace(index, upstream=infos)
    if index.digest == "none":
        return index
    kind = HashType.SHA256 if index.digest == "sha256" else HashType.CRC32

    def digest(stored: str) -> str:
        value = bytes.fromhex(stored)
        decoded = record(kind, value)
        return stored if decoded == value else decoded.hex()  # unchanged: keep the stored spelling

    tensors = {name: dataclasses.replace(e, digests=tuple(map(digest, e.digests))) for name, e in index.tensors.items()}
    return dataclasses.replace(index, tensors=tensors)


_NUMPY_DTYPES = {torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.uint16,
                 torch.uint32, torch.uint64, torch.float16, torch.float32, torch.float64, torch.complex64,
                 torch.complex128}  # fmt: skip


#: the integer dtype upstream views an opaque element of each width as (``_NumpyTensor._intermediate_type``)
_OPAQUE_VIEWS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _upstream_version(index: Any, meta: dict[str, Any], flags: FileFeatureFlags) -> int:
    """The upstream format version a file of ours corresponds to: the lowest one with every feature it uses, the
    number upstream writes (long dims 5, meta tensors 4, encryption 3, dtypes numpy lacks 2, else 1)."""
    entries = index.tensors.values()
    if any(d >= 1 << 32 for e in entries for d in e.shape) or any(d >= 1 << 32 for m in meta.values() for d in m[1]):
        return LONG_TENSOR_TENSORIZER_VERSION
    if meta:
        return META_TENSOR_TENSORIZER_VERSION
    if FileFeatureFlags.encrypted in flags:
        return ENCRYPTION_TENSORIZER_VERSION
    if any(e.dtype not in _NUMPY_DTYPES for e in entries):
        return OPAQUE_TENSORIZER_VERSION
    return NON_OPAQUE_TENSORIZER_VERSION
