"""Writing an artifact: assembled locally, small files uploaded, the manifest last (so a manifest means complete).

A local destination is written in place; a remote one (``s3://``, ``hf://``) is assembled in a temporary folder
whose small files are uploaded at the end. Weights never touch the temporary folder: the serializer streams them
to their final location. The version each remote file was committed as (S3 ETag / VersionId, Hub commit) goes into
the manifest, so a load can pin every file to it (:mod:`.versions`).
"""

from __future__ import annotations

import contextlib
import inspect
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

from ...errors import FormatError, SourceError, UsageError
from ...sources import open_sink, shared_transport
from ...sources.uri import is_remote, join, local_path
from ..parallel import concurrently
from .layout import is_weights_name, weights_name
from .manifest import MANIFEST_NAME, REMOTE_MARKER, write_manifest


def list_files(folder: str) -> list[str]:
    """Every file under ``folder`` as ``/``-separated relative paths (markers and temporaries skipped)."""
    out = []
    for dirpath, _dirs, names in os.walk(folder):
        for n in names:
            if n in (REMOTE_MARKER, MANIFEST_NAME) or n.endswith(".tmp"):
                continue
            rel = os.path.relpath(os.path.join(dirpath, n), folder)
            out.append(rel.replace(os.sep, "/"))
    return sorted(out)


def write_bytes(uri: str, data: bytes, **options: Any) -> dict[str, str] | None:
    """Write one small object atomically (local file, S3 object, Hub file).

    Returns:
        The version committed (``Sink.committed_version``), None for a local file.

    Raises:
        SinkError: the write failed; nothing partial is left.
    """
    sink = open_sink(uri, **options)
    try:
        sink.write(data)
        sink.commit()
    except BaseException:
        sink.abort()
        raise
    return sink.committed_version


def upload_folder(
    folder: str, dest: str, *, skip: Iterable[str] = (), **options: Any
) -> dict[str, dict[str, str] | None]:
    """Copy every small file of ``folder`` to ``dest`` (local folder or URI).

    Returns:
        relative name -> the version it was committed as (None where the store keeps none).
    """
    names = [n for n in list_files(folder) if n not in set(skip)]
    with shared_transport(dest, options) as shared:

        def upload(name: str) -> dict[str, str] | None:
            with open(os.path.join(folder, name), "rb") as f:
                return write_bytes(join(dest, name), f.read(), **shared)

        return dict(zip(names, concurrently(upload, names)))


class ArtifactWriter:
    """Where an artifact is assembled before it is published to ``dest``.

    Args:
        dest: the artifact root (local folder or ``s3://`` / ``hf://`` prefix).
        transport: transport options for a remote ``dest``.
        variant: the weights are written as ``model.<variant>.tensors``.

    Use as a context manager: within it, :attr:`transport` carries one client shared by every object the save
    writes (weights, small files, manifest: one S3 client, not one per object); at the end the client is closed
    and the temporary folder of a remote ``dest`` removed.
    """

    def __init__(
        self, dest: str | os.PathLike[str], transport: Mapping[str, Any] | None = None, variant: str | None = None
    ) -> None:
        self.dest = os.fspath(dest)
        self.weights_name = weights_name(variant)
        self.versions: dict[str, dict[str, str] | None] = {}  # relative path -> version committed
        self.transport = dict(transport or {})
        self.remote = is_remote(self.dest)
        self._shared = contextlib.ExitStack()
        self.folder = tempfile.mkdtemp(prefix="hf_tensorizer-save-") if self.remote else local_path(self.dest)
        os.makedirs(self.folder, exist_ok=True)

    def weights(self, *subfolder: str) -> str:
        """The final location of ``[subfolder/]model[.<variant>].tensors``."""
        if self.remote:
            return join(self.dest, *subfolder, self.weights_name)
        return os.path.join(self.folder, *subfolder, self.weights_name)

    def record(self, name: str, version: Mapping[str, str] | None) -> None:
        """Remember the version the file ``name`` (relative to the root) was committed as, for the manifest."""
        self.versions[name] = dict(version) if version else None

    def publish(self, weights: Iterable[str], library: str, extra: Mapping[str, Any] | None = None) -> None:
        """Upload the small files (remote ``dest``) and write the manifest listing them and ``weights``, with the
        version each was committed as."""
        files = list_files(self.folder)
        if self.remote:
            files += self._other_variants(set(weights))
            self.versions.update(upload_folder(self.folder, self.dest, **self.transport))
        versions = {n: v for n, v in self.versions.items() if v}
        manifest = write_manifest(sorted(set(files) | set(weights)), library, extra, versions)
        write_bytes(join(self.dest if self.remote else self.folder, MANIFEST_NAME), manifest, **self.transport)

    def _other_variants(self, written: set[str]) -> list[str]:
        """The weights of other variants a remote artifact already lists (saving ``variant="fp16"`` next to the
        full-precision weights keeps both loadable, as in a local folder), with their recorded versions."""
        from .cache import read_manifest

        try:
            previous = read_manifest(self.dest, **self.transport) or {}
        except (SourceError, FormatError):  # none yet, or unreadable: this save's files only
            return []
        kept = [f for f in previous.get("files", []) if is_weights_name(f.rsplit("/", 1)[-1]) and f not in written]
        for name in kept:
            self.versions.setdefault(name, previous.get("versions", {}).get(name))
        return kept

    def __enter__(self) -> ArtifactWriter:
        if self.remote:
            self.transport = self._shared.enter_context(shared_transport(self.dest, self.transport))
        return self

    def __exit__(self, *exc: object) -> None:
        self._shared.close()
        if self.remote:
            shutil.rmtree(self.folder, ignore_errors=True)


# Stock save_pretrained arguments that concern safetensors shards or the Hub call, moot for one .tensors file
_MOOT_SAVE_ARGS = frozenset({
    "is_main_process", "state_dict", "save_function", "push_to_hub", "max_shard_size", "safe_serialization",
    "token", "save_peft_format", "save_original_format",
})  # fmt: skip


def save_options(kwargs: Mapping[str, Any], accepted: Iterable[str] = ()) -> dict[str, Any]:
    """The arguments of a ``save_pretrained(..., tensorized=True)`` call that the tensorized save takes.

    Every :class:`~hf_tensorizer.TensorSerializer` argument (``encryption``, ``digest``, ``metadata``, ...),
    ``variant`` and those in ``accepted`` pass; stock-only ones that make no sense for one file are dropped
    (``max_shard_size`` with a ``UserWarning``: the save writes one file).

    Raises:
        UsageError: an argument that is neither (a typo must not silently drop, say, ``encryption``).
    """
    from ...engine.writer import TensorSerializer

    known = set(inspect.signature(TensorSerializer.__init__).parameters) - {"self", "dest", "sink_options"}
    known |= {"variant", *accepted}
    if kwargs.get("max_shard_size") is not None:
        # one file on purpose: the engine already reads a file with many parallel readers (docs/compat.md, "Sharding")
        warnings.warn(
            f"max_shard_size={kwargs['max_shard_size']!r} is ignored: a tensorized save writes its weights to one "
            ".tensors file, read in parallel within the file (see docs/compat.md, 'Sharding'; the Hub takes files up "
            "to 50 GB)",
            UserWarning,
            stacklevel=3,
        )
    out = {}
    for key, value in kwargs.items():
        if key in known:
            out[key] = value
        elif key not in _MOOT_SAVE_ARGS:
            raise UsageError(f"save_pretrained(tensorized=True) does not take {key!r}")
    return out
