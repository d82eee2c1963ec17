"""The weights of one load: which files, opened once, streamed onto the devices each tensor belongs on.

Weights are ``model.tensors`` or the safetensors shards of a stock checkpoint (local, or remote behind the
cached folder's marker). :func:`open_weights` opens every file once and reads its index (a remote object is
pinned once: ETag, VersionId or commit), and :func:`stream_to_devices` is the one place that turns "these keys,
on these devices, in these dtypes" into deserializers: one per (device, dtype, file), all sharing one pinned
staging block. transformers, diffusers and :func:`load_safetensors_state_dict` all load through it.
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch

from ...constants import KEY_ENV
from ...engine import TensorDeserializer, read_index
from ...engine.decrypt import choose_transform
from ...engine.pipeline import Verifier
from ...engine.staging import reuse_blocks
from ...errors import FormatError, HeaderTooLargeError, MissingKeyError, SourceError, UsageError
from ...format.index import FileIndex
from ...sources import Source, open_source, shared_transport
from ...sources.uri import join, local_path, parent, redact, scheme_of
from ..artifact.cache import read_pinned_marker, resolve
from ..artifact.layout import (
    SAFETENSORS_FILE_NAMES,
    SAFETENSORS_NAMES,
    SHARD_INDEX_NAMES,
    safetensors_names,
    weights_name,
)
from ..artifact.manifest import REMOTE_MARKER
from ..artifact.versions import PinnedURI, open_pinned
from ..options import TensorizerOptions
from ..parallel import concurrently

MAX_SHARD_INDEX_BYTES = 64 << 20

# ---- which files --------------------------------------------------------------------------------------------


def weights_uris(local_folder: str | os.PathLike[str], variant: str | None = None, **options: Any) -> list[str]:
    """The weight files of a local (possibly cached) artifact folder, or ``[]`` when it has none:
    ``[.../model.tensors]``, or the safetensors shards of a stock checkpoint (a shard index is read to list them;
    ``options`` are its transport options); those of ``variant`` (``model.<variant>.tensors``...) when given.
    Remote files the manifest recorded a version for come as :class:`~.versions.PinnedURI`.

    Raises:
        FormatError: a malformed remote marker or shard index.
        SourceError: a shard index that cannot be read.
    """
    folder = os.fspath(local_folder)
    wanted = (weights_name(variant), *safetensors_names(variant))
    local = os.path.join(folder, wanted[0])
    if os.path.isfile(local):
        return [local]
    marker = os.path.join(folder, REMOTE_MARKER)
    if os.path.isfile(marker):
        root, names, versions = read_pinned_marker(marker)
        # a manifest lists the weights of every variant: the one asked for (tensorized first)
        name = next((n for n in wanted if n in names), None)
        if name is None:
            return []
        uri = join(root, name)
        return safetensors_shards(uri, **options)[0] if name.endswith(".json") else [PinnedURI(uri, versions.get(name))]
    for name in wanted[1:]:
        if os.path.isfile(os.path.join(folder, name)):
            return safetensors_shards(os.path.join(folder, name))[0]
    return []


def locate(
    root: str | os.PathLike[str], subfolder: str = "", variant: str | None = None, **transport: Any
) -> tuple[str, list[str]]:
    """The local folder of an artifact (small files fetched for remote ones) and its weight files' URIs (those of
    ``variant`` when given).

    Raises:
        UsageError: the artifact has no weights (of ``variant``).
        SourceError: the artifact cannot be read.
        ObjectChangedError: a file changed since the artifact's manifest recorded its version.
        FormatError: its manifest or shard index is malformed.
    """
    root = os.fspath(root)
    folder = resolve(root, variant=variant, **transport)
    folder = os.path.join(folder, subfolder) if subfolder else folder
    weights = weights_uris(folder, variant, **transport)
    if not weights:
        where = redact(root) + (f" (subfolder {subfolder!r})" if subfolder else "")
        of = f" of variant {variant!r}" if variant else ""
        raise UsageError(f"{where} has no {weights_name(variant)} and no safetensors weights{of}")
    return folder, weights


def _read_json(uri: str, **options: Any) -> Any:
    with open_source(uri, **options) as src:
        if src.size > MAX_SHARD_INDEX_BYTES:
            raise HeaderTooLargeError(f"{uri}: shard index of {src.size} bytes is too large")
        raw = src.read(0, src.size)
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise FormatError(f"{uri}: not valid UTF-8 JSON: {exc}") from None


def _shards_from_index(index_uri: str, **options: Any) -> tuple[list[str], dict[str, str]]:
    doc = _read_json(index_uri, **options)
    weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise FormatError(f"{index_uri}: no valid weight_map")
    base = parent(index_uri)
    files: list[str] = []
    for fname in weight_map.values():
        # shard names are plain file names next to the index: no traversal out of the checkpoint
        if fname in ("", ".", "..") or "/" in fname or "\\" in fname or posixpath.normpath(fname) != fname:
            raise FormatError(f"{index_uri}: invalid shard file name {fname!r}")
        if fname not in files:
            files.append(fname)
    return [join(base, f) for f in files], {k: join(base, v) for k, v in weight_map.items()}


def safetensors_shards(uri_or_dir: str | os.PathLike[str], **options: Any) -> tuple[list[str], dict[str, str]]:
    """The safetensors files of a checkpoint, in order, and the expected ``tensor -> file`` map.

    Accepts a ``.safetensors`` file, a ``*.safetensors.index.json``, or a directory/URI prefix holding
    ``model.safetensors[.index.json]`` (or the diffusers names); a local directory with neither falls back to
    every ``*.safetensors`` in it. The map is empty when there is no shard index.

    Raises:
        FormatError: malformed shard index or nothing to load.
        SourceError: a remote location that has none of the expected files.
    """
    uri = os.fspath(uri_or_dir)
    if uri.endswith(".json"):
        return _shards_from_index(uri, **options)
    if uri.endswith(".safetensors"):
        return [uri], {}
    if scheme_of(uri) == "file":
        uri = local_path(uri)  # a file:// URI of a folder
        for name in SHARD_INDEX_NAMES:
            if os.path.isfile(os.path.join(uri, name)):
                return _shards_from_index(os.path.join(uri, name))
        for name in SAFETENSORS_FILE_NAMES:
            if os.path.isfile(os.path.join(uri, name)):
                return [os.path.join(uri, name)], {}
        found = sorted(f for f in os.listdir(uri) if f.endswith(".safetensors")) if os.path.isdir(uri) else []
        if not found:
            raise FormatError(f"no safetensors files in {uri}")
        return [os.path.join(uri, f) for f in found], {}
    last: Exception | None = None
    for name in SAFETENSORS_NAMES:
        candidate = join(uri, name)
        try:
            if name.endswith(".json"):
                return _shards_from_index(candidate, **options)
            open_source(candidate, **options).close()
            return [candidate], {}
        except SourceError as exc:
            last = exc
    raise SourceError(f"no safetensors checkpoint at {uri}: {last}")


# ---- opening and streaming ----------------------------------------------------------------------------------


class OpenWeights:
    """The weight files of one load, open: their ``sources`` and ``indexes`` (same order), ``file_of`` (tensor name
    -> position in those lists), and the client they share. :meth:`close` (or ``with``) closes them all.

    Raises:
        FormatError: a tensor appears in two weight files.
    """

    def __init__(self, sources: list[Source], indexes: list[FileIndex], stack: contextlib.ExitStack) -> None:
        self.sources, self.indexes, self._stack = sources, indexes, stack
        self.file_of: dict[str, int] = {}
        for i, index in enumerate(indexes):
            for name in index.tensors:
                if name in self.file_of:
                    raise FormatError(f"tensor {name!r} appears in two weight files ({sources[i].uri})")
                self.file_of[name] = i

    def entry(self, name: str) -> Any:
        """The index entry of tensor ``name``."""
        return self.indexes[self.file_of[name]].tensors[name]

    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> OpenWeights:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_weights(uris: list[str], **transport: Any) -> OpenWeights:
    """Open every weight file of a load and read its index, concurrently and with one S3 client for all (a sharded
    remote checkpoint costs a few round trips per shard: one after the other they add up). A
    :class:`~.versions.PinnedURI` opens at its recorded version. Nothing stays open on failure.

    Raises:
        ObjectChangedError: a weight file changed since its artifact's manifest recorded its version.
        SourceError / FormatError: the first file that cannot be opened or parsed, or a tensor in two files.
    """
    stack = contextlib.ExitStack()
    try:
        shared = stack.enter_context(shared_transport(uris[0], transport)) if uris else transport
        sources: list[Source | None] = [None] * len(uris)

        def one(i: int) -> FileIndex:
            sources[i] = src = open_pinned(uris[i], **shared)  # at the manifest's version, if it recorded one
            return read_index(src)

        try:
            indexes = concurrently(one, range(len(uris)))
        finally:  # every source that opened closes with the stack, before the shared client (LIFO)
            for src in sources:
                if src is not None:
                    stack.callback(src.close)
        weights = OpenWeights([s for s in sources if s is not None], indexes, stack)
        return weights
    except BaseException:
        stack.close()
        raise


#: where one tensor goes: its device and, for floating tensors to be cast, a dtype (None: as stored)
Target = tuple[torch.device, torch.dtype | None]


def stream_to_devices(
    weights: OpenWeights, targets: Mapping[str, Target], engine: Mapping[str, Any]
) -> Iterator[TensorDeserializer]:
    """Stream the tensors named in ``targets`` to their devices: one deserializer per (device, dtype, file), each
    yielded loaded (its tensors are ready; take them, or ``load_into_module``) and closed when the caller moves on.

    Every group shares one pinned staging block (``reuse_blocks``); each reads its file's open source with the
    index already read, so every group sees the one pinned version of the file.

    Args:
        weights: the open weight files (:func:`open_weights`).
        targets: tensor name -> (device, dtype or None).
        engine: ``TensorDeserializer`` options (``verify_hash``, ``num_readers``, ``encryption``, ...).
    """
    groups: dict[tuple[torch.device, torch.dtype | None, int], list[str]] = defaultdict(list)
    for name, (device, dtype) in targets.items():
        groups[(device, dtype, weights.file_of[name])].append(name)
    with reuse_blocks():
        for (device, dtype, file), names in groups.items():
            try:
                d = TensorDeserializer(weights.sources[file], device=device, dtype=dtype, filter=names,
                                       index=weights.indexes[file], **engine)  # fmt: skip
            except MissingKeyError as exc:  # the engine's advice names its own encryption= argument
                raise exc.advise(f"pass tensorizer_options={{'encryption': key}} (an EncryptionKey or a "
                                 f"Passphrase) or set {KEY_ENV}") from None  # fmt: skip
            with d:
                yield d


def as_device(value: Any) -> torch.device:
    """A ``device_map`` value as a device (an int is a CUDA ordinal).

    Raises:
        UsageError: ``"disk"`` (no device: callers read those weights through :mod:`.offload`).
    """
    if value == "disk":
        raise UsageError("'disk' is not a device: disk-offloaded weights are read on use (integrations.offload)")
    if isinstance(value, int):
        return torch.device("cuda", value)
    return torch.device(value)


def placement(device_map: Mapping[str, Any], name: str) -> Any:
    """The ``device_map`` value for tensor ``name`` (a device, an ordinal or ``"disk"``): the value of the longest
    module prefix of ``name`` in ``device_map``.

    Raises:
        UsageError: no entry places ``name``.
    """
    parts = name.split(".")
    for i in range(len(parts), -1, -1):
        prefix = ".".join(parts[:i])
        if prefix in device_map:
            return device_map[prefix]
    raise UsageError(f"device_map does not place {name!r}")


def device_for(device_map: Mapping[str, Any], name: str) -> torch.device:
    """The device of tensor ``name`` (:func:`placement`, as a device).

    Raises:
        UsageError: no entry places ``name``, or it is on ``"disk"``.
    """
    return as_device(placement(device_map, name))


def load_safetensors_state_dict(
    uri_or_dir: str | os.PathLike[str],
    *,
    device: str | torch.device | None = None,
    filter: Callable[[str], bool] | None = None,
    **kwargs: Any,
) -> dict[str, torch.Tensor]:
    """Stream every shard of a safetensors checkpoint through ``TensorDeserializer`` into one dict.

    Args:
        uri_or_dir: file, shard index, local directory, or URI prefix (``http(s)://``, ``s3://``, ``hf://``).
        device: target device of every tensor.
        filter: optional predicate on tensor names; other tensors' bytes are never read.
        **kwargs: ``TensorDeserializer`` and transport arguments (``dtype``, ``num_readers``, ``token``...).

    Returns:
        ``name -> tensor``, in shard order.

    Raises:
        FormatError: a malformed shard, a duplicate tensor across shards, or a tensor the shard index promises
            that its shard lacks.
        UsageError: an argument that is neither an engine nor a transport option.
    """
    dtype = kwargs.pop("dtype", None)
    options = TensorizerOptions.parse(kwargs)
    files, weight_map = safetensors_shards(uri_or_dir, **options.transport)
    target = (torch.device(device) if device is not None else torch.device("cpu"), dtype)
    out: dict[str, torch.Tensor] = {}
    with open_weights(files, **options.transport) as opened:
        wanted = {n: target for n in opened.file_of if filter is None or filter(n)}
        loaded = {}
        for d in stream_to_devices(opened, wanted, options.engine):
            loaded.update(d.items())
        out = {n: loaded[n] for n in opened.file_of if n in loaded}  # shard order
    missing = [k for k in weight_map if k not in out and (filter is None or filter(k))]
    if missing:
        raise FormatError(f"tensors listed in the shard index are missing from their shards: {missing[:10]}")
    return out


def iter_safetensors_indexes(uri_or_dir: str | os.PathLike[str], **options: Any) -> Iterator[tuple[str, FileIndex]]:
    """``(shard uri, validated index)`` for every shard of a checkpoint (see :func:`safetensors_shards`)."""
    files, _ = safetensors_shards(uri_or_dir, **options)
    for f in files:
        with open_source(f, **options) as src:
            yield f, read_index(src)


def slice_checks(index: FileIndex, uri: str, engine: Mapping[str, Any]) -> tuple[Any, Verifier | None]:
    """The decrypting transform and the verifier of one weight file, for reads that bypass ``TensorDeserializer``
    (the lazy slices of tensor-parallel loads, transformers' and vLLM's).

    Args:
        index: the file's index.
        uri: the file's location (redacted in messages).
        engine: the load's ``TensorDeserializer`` options (``encryption``, ``transform``, ``verify_hash`` apply).

    Returns:
        ``(transform, verifier)``: the transform authenticated the header with the key (None for a plain file); the
        verifier is None unless ``verify_hash``.

    Raises:
        MissingKeyError / DecryptionError: an encrypted file and no key, a wrong key, a tampered header.
        UsageError: ``verify_hash`` on a file without digests.
    """
    shown = redact(uri)
    transform = choose_transform(index, engine.get("encryption"), engine.get("transform"), shown)
    verify = bool(engine.get("verify_hash"))
    if verify and index.digest == "none" and transform is None:
        raise UsageError(f"{shown} has no digests to verify")
    return transform, (Verifier(index) if verify else None)
