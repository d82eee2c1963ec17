"""``device_map`` entries ``"disk"``: the offloaded weights are read from the artifact itself, never copied.

Stock transformers reads a safetensors checkpoint's offloaded weights in place (accelerate's
``OffloadedWeightsLoader`` with an ``offload_index`` naming the file and key) and copies every other format into
``offload_folder``. For a tensorized load we do what it does for safetensors, with our file:

1. while streaming, a tensor whose module sits on ``"disk"`` is not read: transformers gets a
   :class:`Deferred` placeholder for it, and ``accelerate_disk_offload`` (patched for our loads) answers with an
   index that lists every such tensor, so transformers neither reads nor re-saves it;
2. once accelerate has dispatched the model, the offload hooks' weights loader gets :class:`ArtifactWeights`,
   which returns a tensor when accelerate's hook asks for it before a forward, and drops it after.

A local, unencrypted file is held open from the load on (:class:`_HeldFile`: one descriptor per weight file, its
index checked against the load's) and memory-mapped from that descriptor per request (the tensor is a view of a fresh
private mapping, unmapped when accelerate drops the tensor after the forward: resident memory stays bounded by the
modules in use). The descriptor pins the file the model was loaded from: a file replaced by a rename (the project's
own ``save_pretrained`` into the same folder) or deleted with its folder keeps serving the loaded bytes; a file
rewritten or truncated in place (its size, mtime or ctime changed) raises :class:`ObjectChangedError` before the
next forward reads it, never new weights or SIGBUS. A
remote one is fetched through the engine on first use (verified when ``verify_hash`` is on) into
``cache_root()/offload/`` and mapped from there afterwards. An encrypted file is read and decrypted through the
engine on each use: its plaintext never reaches the disk. Weights that transformers converts on load (fused MoE
experts) are re-saved into ``offload_folder`` as stock does.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import os
import sys
import threading
from collections.abc import Iterator, Mapping
from dataclasses import replace
from typing import Any

import torch

from ...engine import TensorDeserializer
from ...engine.mapping import FileMapping
from ...errors import ObjectChangedError
from ...format.index import FileIndex, TensorEntry
from ...sources.file import FileSource
from ...sources.uri import is_remote, local_path, redact
from .. import patches
from ..artifact.cache import cache_root

# The offload index of the tensorized load running in this context (None: not ours, stock behaviour).
_INDEX: contextvars.ContextVar[dict[str, dict[str, str]] | None] = contextvars.ContextVar(
    "hf_tensorizer_offload_index", default=None
)


class Deferred:
    """What transformers gets for a tensor that stays on disk: it passes through transformers' materialisation
    (``tensor[...]``, ``.to(...)``) untouched and is never stored; anything else fails loudly."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __getitem__(self, _: Any) -> Deferred:
        return self

    def to(self, *_: Any, **__: Any) -> Deferred:
        return self

    def __repr__(self) -> str:
        return f"Deferred({self.name!r})"


class ArtifactWeights(Mapping[str, torch.Tensor]):
    """Model key -> its tensor, read from the artifact when asked (accelerate's offload hooks ask before each forward
    of a disk-offloaded module).

    Args:
        where: model key -> (weight file URI, that file's index, key in the file).
        dtypes: model key -> the dtype the model wants (a stored dtype that differs is cast, like stock).
        transport: transport options for remote files; engine: ``TensorDeserializer`` options.
    """

    def __init__(self, where: Mapping[str, tuple[str, FileIndex, str]], dtypes: Mapping[str, torch.dtype],
                 transport: Mapping[str, Any], engine: Mapping[str, Any]) -> None:  # fmt: skip
        self.where, self.dtypes = dict(where), dict(dtypes)
        self.transport, self.engine = dict(transport), dict(engine)
        self.reads = 0  # tensors served, for tests and metrics
        self._held: dict[str, _HeldFile] = {}
        for uri, index, name in self.where.values():  # pinned now: a rewrite after the load is seen as one
            if uri not in self._held and self._local_plain(uri, index, name):
                self._held[uri] = _HeldFile(local_path(uri), index)

    def _local_plain(self, uri: str, index: FileIndex, name: str) -> bool:
        entry = index.tensors[name]
        plain = index.encryption is None and entry.crypt is None
        return plain and not is_remote(uri) and not self.engine.get("verify_hash")

    def __getitem__(self, key: str) -> torch.Tensor:
        uri, index, name = self.where[key]
        entry = index.tensors[name]
        if entry.alias is not None:
            name, entry = entry.alias, index.tensors[entry.alias]
        plain = index.encryption is None and entry.crypt is None
        if entry.numel == 0:
            tensor = torch.empty(entry.shape, dtype=entry.dtype)
        elif uri in self._held:
            tensor = self._held[uri].tensor(entry)
        elif plain and is_remote(uri):  # fetched once (through the engine: verified when asked), then mapped
            path = _cache_path(uri, index, name)
            if not os.path.isfile(path):
                _store(path, self._read(uri, index, name))
            tensor = _mapped(path, replace(entry, offset=0))
        else:  # encrypted: decrypted on each use, never written to disk in the clear
            tensor = self._read(uri, index, name)
        self.reads += 1
        want = self.dtypes.get(key)
        return tensor.to(want) if want is not None and tensor.dtype != want else tensor

    def _read(self, uri: str, index: FileIndex, name: str) -> torch.Tensor:
        """Tensor ``name`` through the engine, from the file as it was at load time.

        Raises:
            ObjectChangedError: the file was rewritten since the load read its index.
        """
        engine = {k: v for k, v in self.engine.items() if k not in ("strategy", "mmap", "lazy")}
        with TensorDeserializer(uri, device="cpu", filter=[name], lazy=True, **engine, **self.transport) as d:
            if d.index.raw_index != index.raw_index:
                raise ObjectChangedError(f"{redact(uri)} changed since the model was loaded; load it again")
            return d[name]

    def __contains__(self, key: object) -> bool:
        return key in self.where

    def __iter__(self) -> Iterator[str]:
        return iter(self.where)

    def __len__(self) -> int:
        return len(self.where)


class _HeldFile:
    """A local weight file held open for the life of the model: each request maps it from this descriptor.

    Args:
        path: the file.
        index: its index as the load read it.

    Raises:
        ObjectChangedError: the file at ``path`` is no longer the one the load read (another index).
        SourceError: it cannot be opened.
    """

    def __init__(self, path: str, index: FileIndex) -> None:
        from ...engine.header import read_index

        self.path = path
        self.source = FileSource(path)  # closed with this object (its finalizer)
        if read_index(self.source).raw_index != index.raw_index:
            raise ObjectChangedError(f"{path} changed since the model was loaded; load it again")
        stamp = self._stamp()
        if stamp is None:  # deleted between the load and now
            raise ObjectChangedError(f"{path} was deleted since the model was loaded; load it again")
        self.stamp = stamp

    def _stamp(self) -> tuple[int, int, int] | None:
        """Size, mtime and ctime (a write with the mtime set back still moves the ctime); None once the file has no
        name left (replaced by a rename, or deleted: unlinking moves the ctime, and nothing can rewrite it by path)."""
        st = os.fstat(self.source.fileno())
        return None if st.st_nlink == 0 else (st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    def tensor(self, entry: TensorEntry) -> torch.Tensor:
        """``entry`` as a view of a fresh private mapping of the held file.

        Raises:
            ObjectChangedError: the file was written or truncated in place since the load.
        """
        now = self._stamp()
        if now is not None and now != self.stamp:
            raise ObjectChangedError(
                f"{self.path} was rewritten in place since the model was loaded (its size or times changed): the "
                "disk-offloaded weights would no longer be the loaded ones; load the model again"
            )
        return FileMapping(self.source.fileno(), self.source.size).tensor(entry)


def _mapped(path: str, entry: TensorEntry) -> torch.Tensor:
    """``entry`` of the file at ``path`` as a view of a fresh private mapping of it: unmapped, and out of the
    process's resident memory, once accelerate drops the tensor after the forward."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        return FileMapping(fd, os.fstat(fd).st_size).tensor(entry)
    finally:
        os.close(fd)


def _cache_path(uri: str, index: FileIndex, name: str) -> str:
    """Where a remote tensor is kept once fetched: keyed by the file's URI and index (a rewritten file has another
    index: its digests, offsets or sizes differ) and the tensor's name."""
    file_key = hashlib.sha256(uri.encode() + b"\0" + hashlib.sha256(index.raw_index).digest()).hexdigest()[:24]
    return os.path.join(cache_root(), "offload", file_key, hashlib.sha256(name.encode()).hexdigest()[:32] + ".bin")


def _store(path: str, tensor: torch.Tensor) -> None:
    """Write ``tensor``'s bytes to ``path`` atomically (a concurrent reader sees all of it or nothing)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(memoryview(tensor.contiguous().reshape(-1).view(torch.uint8).numpy()))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def offload_index(where: Mapping[str, tuple[str, FileIndex, str]], model: Any) -> dict[str, dict[str, str]]:
    """The ``disk_offload_index`` transformers and accelerate expect (stock's shape: file, key, dtype), with tied
    weights whose source is offloaded added as stock ``accelerate_disk_offload`` does."""
    meta = model.state_dict()
    index = {
        target: {"safetensors_file": uri, "weight_name": name, "dtype": str(meta[target].dtype).removeprefix("torch.")}
        for target, (uri, _, name) in where.items()
    }
    for target, source in (getattr(model, "all_tied_weights_keys", None) or {}).items():
        if source in index and target not in index:
            index[target] = index[source]
    return index


@contextlib.contextmanager
def providing(index: dict[str, dict[str, str]]) -> Iterator[None]:
    """Within the block, transformers' ``accelerate_disk_offload`` answers ``index`` (see :func:`install`)."""
    token = _INDEX.set(index)
    try:
        yield
    finally:
        _INDEX.reset(token)


def _accelerate_disk_offload(*args: Any, **kwargs: Any) -> Any:
    index = _INDEX.get()
    if index is not None:
        return dict(index)
    return patches.stock(sys.modules["transformers.modeling_utils"], "accelerate_disk_offload")(*args, **kwargs)


def install() -> None:
    """Patch ``transformers.modeling_utils.accelerate_disk_offload`` (undone by ``disable``); idempotent."""
    import transformers.modeling_utils as modeling_utils

    if not patches.is_patched(modeling_utils, "accelerate_disk_offload"):
        patches.replace(modeling_utils, "accelerate_disk_offload", _accelerate_disk_offload)


def attach(model: torch.nn.Module, weights: ArtifactWeights) -> int:
    """Give every offload hook of ``model`` (accelerate's ``OffloadedWeightsLoader``) ``weights`` to read from.

    Returns:
        The number of loaders that now read from the artifact.
    """
    loaders = {}
    for module in model.modules():
        hook = getattr(module, "_hf_hook", None)
        for h in getattr(hook, "hooks", None) or [hook]:
            dataset = getattr(getattr(h, "weights_map", None), "dataset", None)
            if dataset is not None and hasattr(dataset, "state_dict") and hasattr(dataset, "index"):
                loaders[id(dataset)] = dataset
    for loader in loaders.values():
        if isinstance(loader.state_dict, Mapping) and loader.state_dict:
            merged = dict(loader.state_dict)  # tensors accelerate already holds (CPU offload) keep priority
            loader.state_dict = _Chain(merged, weights)
        else:
            loader.state_dict = weights
    return len(loaders)


class _Chain(Mapping[str, torch.Tensor]):
    """Two mappings, the first one winning."""

    def __init__(self, first: Mapping[str, torch.Tensor], second: Mapping[str, torch.Tensor]) -> None:
        self.first, self.second = first, second

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.first[key] if key in self.first else self.second[key]

    def __contains__(self, key: object) -> bool:
        return key in self.first or key in self.second

    def __iter__(self) -> Iterator[str]:
        yield from self.first
        yield from (k for k in self.second if k not in self.first)

    def __len__(self) -> int:
        return len(set(self.first) | set(self.second))
