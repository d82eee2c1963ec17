"""The local copy of a remote artifact's small files, so ``AutoConfig``, ``AutoTokenizer`` & co. work unchanged.

Loading fetches every file but the weights (listed by the manifest, or probed) into
``cache_root()/artifacts/<hash of the URI>``; the weights are never copied to disk, they stream from the remote
root, which a ``.hf_tensorizer_remote`` marker in each cached folder remembers. A fetch goes into a fresh folder
that is swapped in whole, so a reader never sees a half-updated copy. The cache root is ``$HF_TENSORIZER_CACHE``
or ``~/.cache/hf_tensorizer``.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from typing import Any

from ...errors import FormatError, SourceError
from ...sources import shared_transport
from ...sources.hub import pin_revision
from ...sources.uri import is_remote, join, local_path, redact, scheme_of
from ..parallel import concurrently
from .layout import WEIGHTS_NAME, safetensors_names, weights_name
from .manifest import MANIFEST_NAME, REMOTE_MARKER, check_relative, check_versions, parse_manifest
from .probe import probe, read_bytes

CACHE_ENV = "HF_TENSORIZER_CACHE"
VARIANT_STUB = "hf_tensorizer"  # hf_tensorizer.<variant>.remote: an empty file, in folders with remote variant weights


def cache_root() -> str:
    """``$HF_TENSORIZER_CACHE`` or ``~/.cache/hf_tensorizer``."""
    default = os.path.join(os.path.expanduser("~"), ".cache", "hf_tensorizer")
    return os.environ.get(CACHE_ENV, default)


def read_manifest(root: str, **options: Any) -> dict[str, Any] | None:
    """The artifact manifest at ``root``, or None when a local root has none.

    Raises:
        SourceError: a remote manifest cannot be read (missing included: the caller decides).
        FormatError: the manifest is malformed.
    """
    if not is_remote(root):
        path = os.path.join(local_path(root), MANIFEST_NAME)
        if not os.path.isfile(path):
            return None
        with open(path, "rb") as f:
            raw = f.read()
    else:
        raw = read_bytes(join(root, MANIFEST_NAME), **options)
    return parse_manifest(raw, f"{redact(root)}/{MANIFEST_NAME}")


def resolve(uri: str | os.PathLike[str], *, variant: str | None = None, **options: Any) -> str:
    """A local folder holding the small files of the artifact at ``uri``.

    Local paths and ``file://`` URIs are returned as they are. Remote artifacts are fetched (every file except
    the weights) into the cache; each folder whose weights stay remote gets a marker so
    :func:`~hf_tensorizer.integrations.weights.weights_uris` finds them. ``hf://`` roots are first pinned to the
    commit their branch points to, so every file of the load comes from one commit. Files the manifest records a
    version for are fetched at that version (:mod:`.versions`), so a load never mixes files of two saves.

    Args:
        uri: the artifact root.
        variant: without a manifest, also look for the weights of this variant (``model.<variant>.safetensors``).
        **options: transport options (``endpoint_url``, ``token``, ``headers``, ...).

    Returns:
        The local folder.

    Raises:
        SourceError: a listed file could not be fetched, or nothing usable was found at ``uri``.
        ObjectChangedError: a listed file changed since the manifest recorded its version.
        FormatError: the manifest (or a pipeline's ``model_index.json``) is malformed or names paths outside the
            artifact; nothing is written then.
    """
    text = os.fspath(uri)
    if not is_remote(text):
        path = local_path(text)
        if text.startswith("file://") and not os.path.isdir(path):  # a URI is ours: never a Hub id to look up
            raise SourceError(f"{text}: no such folder")
        return path
    text = text.rstrip("/")
    with shared_transport(text, options) as shared:
        if scheme_of(text) == "hf":
            text = pin_revision(text, probe=(MANIFEST_NAME, WEIGHTS_NAME, "config.json"), **shared)
        return _fetch(text, variant, **shared)


def _fetch(root: str, variant: str | None, **options: Any) -> str:
    """:func:`resolve` for a remote root: read the manifest or probe, fetch the small files, mark the weights."""
    try:
        manifest = read_manifest(root, **options)
        first_error: SourceError | None = None
    except SourceError as exc:  # no manifest (or no access): probe well-known names, report this if all fail
        manifest, first_error = None, exc
    weights: dict[str, list[str]] = {}  # folder -> its weight files (model.tensors, or a safetensors checkpoint)
    versions: dict[str, Any] = {}  # file -> the version the manifest recorded
    if manifest is not None:
        versions = manifest.get("versions", {})
        files = [f for f in manifest.get("files", []) if not f.endswith(".tensors")]
        for w in manifest.get("files", []):
            if w.endswith(".tensors"):
                folder, _, name = w.rpartition("/")
                weights.setdefault(folder, []).append(name)
    else:
        files, weights = probe(root, first_error, variant=variant, **options)
    weights.setdefault("", [])  # the root is marked even without weights: a model load then says what is missing
    dest = os.path.join(cache_root(), "artifacts", hashlib.sha256(root.encode()).hexdigest()[:20])
    with swapped_in(dest) as fresh:
        fetched = concurrently(lambda n: read_bytes(join(root, n), version=versions.get(n), **options), files)
        for name, data in zip(files, fetched):
            path = os.path.join(fresh, name)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                f.write(data)
        if manifest is not None:
            with open(os.path.join(fresh, MANIFEST_NAME), "w", encoding="utf-8") as f:
                json.dump(manifest, f)
        for folder, names in weights.items():
            os.makedirs(os.path.join(fresh, folder), exist_ok=True)
            paths = {n: f"{folder}/{n}" if folder else n for n in names}
            pinned = {n: versions[p] for n, p in paths.items() if p in versions}
            write_marker(os.path.join(fresh, folder), join(root, folder), names, pinned)
            if variant and set(names) & {weights_name(variant), *safetensors_names(variant)}:
                # diffusers loads a component's variant only when a file of its folder has a name like x.<variant>.y
                open(os.path.join(fresh, folder, f"{VARIANT_STUB}.{variant}.remote"), "wb").close()
    return dest


STALE_AFTER_S = 60.0  # a temporary folder this old whose lock nobody holds belongs to a killed fetch


@contextlib.contextmanager
def swapped_in(dest: str) -> Iterator[str]:
    """A fresh folder beside ``dest`` to fill; when the block ends without error it replaces ``dest`` whole, so a
    concurrent reader never sees a half-written cache folder; on error it is removed and ``dest`` stays.

    The fresh folder is locked (``flock`` on its descriptor) while it is filled; a process killed meanwhile leaves
    it behind, unlocked, and the next use of the cache folder removes it (:func:`sweep_stale`)."""
    parent = os.path.dirname(dest)
    os.makedirs(parent, exist_ok=True)
    sweep_stale(parent, STALE_AFTER_S)
    fresh = tempfile.mkdtemp(prefix=os.path.basename(dest) + ".", dir=parent)
    lock = os.open(fresh, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the descriptor closes, or the process dies
        yield fresh
        old = dest + ".old." + os.path.basename(fresh)
        if os.path.exists(dest):
            os.replace(dest, old)
        os.replace(fresh, dest)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(fresh, ignore_errors=True)
        raise
    finally:
        os.close(lock)


def sweep_stale(parent: str, older_than: float = STALE_AFTER_S) -> list[str]:
    """Remove the temporary folders that killed fetches left in ``parent`` (``<hash>.<random>`` being filled,
    ``<hash>.old.<random>`` being dropped): those older than ``older_than`` seconds whose lock no live process
    holds. Cache folders themselves (no dot in the name) are never touched.

    Returns:
        The paths removed.
    """
    removed = []
    now = time.time()
    for name in os.listdir(parent) if os.path.isdir(parent) else ():
        path = os.path.join(parent, name)
        try:
            if "." not in name or now - os.lstat(path).st_mtime < older_than or not os.path.isdir(path):
                continue
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_NOFOLLOW", 0))
        except OSError:  # gone meanwhile, or not ours to open
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held: a live fetch is filling it
        except OSError:
            os.close(fd)
            continue
        try:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
        finally:
            os.close(fd)
    return removed


def write_marker(folder: str, root: str, names: list[str], versions: dict[str, Any] | None = None) -> None:
    """Remember in ``folder`` that its weights ``names`` live under the remote ``root``, with the versions the
    manifest recorded for them (name -> version)."""
    # owner-only: the URI may carry credentials (https://user:token@host/...)
    fd = os.open(os.path.join(folder, REMOTE_MARKER), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump({"root": root, "weights": names, "versions": versions or {}}, f)


def read_marker(path: str) -> tuple[str, list[str]]:
    """(remote folder, weight file names in it) from a marker :func:`write_marker` wrote.

    Raises:
        FormatError: the marker is malformed.
    """
    root, names, _ = read_pinned_marker(path)
    return root, names


def read_pinned_marker(path: str) -> tuple[str, list[str], dict[str, Any]]:
    """(remote folder, weight file names in it, their recorded versions) from a marker.

    Raises:
        FormatError: the marker is malformed.
    """
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
        root, names, versions = doc["root"], doc["weights"], doc.get("versions", {})
        if not isinstance(root, str) or not isinstance(names, list) or not isinstance(versions, dict):
            raise TypeError
        names = [check_relative(n, path) for n in names]
        return root, names, check_versions(versions, names, path)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise FormatError(f"{path} is not a valid hf_tensorizer remote marker; delete the cache folder") from exc
