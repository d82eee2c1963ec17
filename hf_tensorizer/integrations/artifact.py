"""The tensorized artifact layout, and its small files fetched from any location.

An artifact is a directory (or a prefix of one: ``s3://bucket/prefix``, ``https://host/prefix``,
``hf://org/repo[@revision][/sub]``) that looks like a Hugging Face model folder except that the weights
are one hf_tensorizer file::

    <root>/
        hf_tensorizer.json        manifest: format version, library, every file of the artifact
        config.json               (transformers) / model_index.json (diffusers pipelines)
        generation_config.json    tokenizer / processor files, scheduler configs, ...
        model.tensors             the weights, hub key layout
        unet/config.json          pipelines: one folder per component, each with its own
        unet/model.tensors        model.tensors when the component has weights

The manifest is written last, so an artifact whose manifest exists is complete. Loading fetches the
small files (everything but the weights) into a local cache folder so that ``AutoConfig``,
``AutoTokenizer`` & co. work unchanged; the weights are never copied to disk, they stream through
:class:`~hf_tensorizer.TensorDeserializer` from ``<root>/model.tensors``. A cached folder of a remote
artifact remembers where its weights live in a ``.hf_tensorizer_remote`` file.

A stock model folder given as a URI (``s3://``, ``http(s)://``, ``hf://`` or ``file://``) with
``model.safetensors`` (or sharded ``model.safetensors.index.json``, or the diffusers names) and no
``model.tensors`` is read the same way: its safetensors shards stream through the same engine.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import inspect
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from ..errors import FormatError, SourceError, UsageError
from ..format.index import FileIndex
from ..sources import Source, local_path, open_sink, open_source, redact, scheme_of, shared_transport
from .manifest import (
    MANIFEST_NAME,
    REMOTE_MARKER,
    check_relative,
    parse_manifest,
    write_manifest,
)

T = TypeVar("T")
R = TypeVar("R")

WEIGHTS_NAME = "model.tensors"
SCHEMES = ("file", "http", "https", "s3", "hf")

# Probed when a remote artifact has no manifest (written by hand or by another tool).
KNOWN_FILES = (
    "config.json",
    "generation_config.json",
    "model_index.json",
    "scheduler_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
    "processor_config.json",
    "image_processor_config.json",
    "feature_extractor_config.json",
)


def join(base: str | os.PathLike[str], *parts: str) -> str:
    """Join path parts onto a local path or a URI (``/`` separated, no double slashes)."""
    text = os.fspath(base)
    parts = tuple(p.strip("/") for p in parts if p and p.strip("/"))
    if not parts:
        return text
    if "://" not in text:
        return os.path.join(text, *parts)
    return text.rstrip("/") + "/" + "/".join(parts)


def is_remote(uri: str | os.PathLike[str]) -> bool:
    """True for ``http(s)://``, ``s3://`` and ``hf://`` URIs."""
    return scheme_of(uri) not in ("file",)


def looks_like_uri(value: Any) -> bool:
    """True when ``value`` is a string with one of the schemes we load (``file``, ``s3``, ``http(s)``, ``hf``)."""
    if not isinstance(value, (str, os.PathLike)):
        return False
    text = os.fspath(value)
    return "://" in text and text.split("://", 1)[0].lower() in SCHEMES


# Local folders that the running from_pretrained call reached through a file:// URI: they load through
# hf_tensorizer even when they hold only safetensors (a plain path to the same folder stays stock).
_FILE_URI_ROOTS: contextvars.ContextVar[frozenset[str]] = contextvars.ContextVar("hf_tensorizer_file_uri_roots",
                                                                                 default=frozenset())  # fmt: skip


@contextlib.contextmanager
def reached_through(uri: Any, folder: str) -> Iterator[None]:
    """Within the block, ``folder`` (what :func:`resolve` made of ``uri``) and its subfolders count as
    artifacts when ``uri`` is a ``file://`` URI: Auto classes and pipelines hand their inner loads the folder,
    and the user asked for our engine by writing the URI."""
    if not (looks_like_uri(uri) and scheme_of(uri) == "file"):
        yield
        return
    token = _FILE_URI_ROOTS.set(_FILE_URI_ROOTS.get() | {os.path.abspath(folder)})
    try:
        yield
    finally:
        _FILE_URI_ROOTS.reset(token)


def is_artifact(path_or_uri: Any, subfolder: str = "") -> bool:
    """Whether ``from_pretrained`` should load ``path_or_uri`` through hf_tensorizer.

    URIs with a scheme we serve are artifacts by definition (stock transformers cannot read them); a local
    folder is one when it holds ``model.tensors`` (or is the cached copy of a remote artifact), or when it
    holds safetensors weights and was reached through a ``file://`` URI (:func:`reached_through`).
    """
    from ..compat import SAFETENSORS_NAMES

    if path_or_uri is None:
        return False
    if looks_like_uri(path_or_uri):
        return True
    if not isinstance(path_or_uri, (str, os.PathLike)):
        return False
    root = os.fspath(path_or_uri)
    folder = os.path.join(root, subfolder) if subfolder else root
    if not os.path.isdir(folder):
        return False
    if os.path.isfile(os.path.join(folder, WEIGHTS_NAME)) or os.path.isfile(os.path.join(folder, REMOTE_MARKER)):
        return True
    # within a root (pipelines hand each component its own folder), with safetensors weights
    here = os.path.abspath(folder)
    return any(os.path.commonpath([here, r]) == r for r in _FILE_URI_ROOTS.get()) and any(
        os.path.isfile(os.path.join(folder, name)) for name in SAFETENSORS_NAMES
    )


def weights_uris(local_folder: str | os.PathLike[str], **options: Any) -> list[str]:
    """The weight files of a local (possibly cached) artifact folder, or ``[]`` when it has none:
    ``[.../model.tensors]``, or the safetensors shards of a stock checkpoint (a shard index is read to list
    them; ``options`` are its transport options).

    Raises:
        FormatError: a malformed remote marker or shard index.
        SourceError: a shard index that cannot be read.
    """
    from ..compat import SAFETENSORS_NAMES, safetensors_shards

    folder = os.fspath(local_folder)
    local = os.path.join(folder, WEIGHTS_NAME)
    if os.path.isfile(local):
        return [local]
    marker = os.path.join(folder, REMOTE_MARKER)
    if os.path.isfile(marker):
        root, names = _read_marker(marker)
        out: list[str] = []
        for name in names:
            uri = join(root, name)
            out += safetensors_shards(uri, **options)[0] if name.endswith(".json") else [uri]
        return out
    for name in SAFETENSORS_NAMES:
        if os.path.isfile(os.path.join(folder, name)):
            return safetensors_shards(os.path.join(folder, name))[0]
    return []


def _write_marker(folder: str, root: str, names: list[str]) -> None:
    # owner-only: the URI may carry credentials (https://user:token@host/...)
    fd = os.open(os.path.join(folder, REMOTE_MARKER), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump({"root": root, "weights": names}, f)


def _read_marker(path: str) -> tuple[str, list[str]]:
    """(remote folder, weight file names in it) from a marker :func:`resolve` wrote."""
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
        root, names = doc["root"], doc["weights"]
        if not isinstance(root, str) or not isinstance(names, list):
            raise TypeError
        return root, [check_relative(n, path) for n in names]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise FormatError(f"{path} is not a valid hf_tensorizer remote marker; delete the cache folder") from exc


def cache_root() -> str:
    """``$HF_TENSORIZER_CACHE`` or ``~/.cache/hf_tensorizer``."""
    default = os.path.join(os.path.expanduser("~"), ".cache", "hf_tensorizer")
    return os.environ.get("HF_TENSORIZER_CACHE", default)


def read_bytes(uri: str, **options: Any) -> bytes:
    """The whole content of one small object at ``uri``.

    Raises:
        SourceError: the object is missing or cannot be read.
    """
    with open_source(uri, **options) as src:
        return src.read(0, src.size)


def read_manifest(root: str, **options: Any) -> dict[str, Any] | None:
    """The artifact manifest at ``root``, or None when there is none."""
    if not is_remote(root):
        path = os.path.join(local_path(root), MANIFEST_NAME)
        if not os.path.isfile(path):
            return None
        with open(path, "rb") as f:
            raw: bytes | None = f.read()
    else:
        raw = read_bytes(join(root, MANIFEST_NAME), **options)  # errors propagate: resolve() decides
    if raw is None:
        return None
    return parse_manifest(raw, f"{redact(root)}/{MANIFEST_NAME}")


def resolve(uri: str | os.PathLike[str], **options: Any) -> str:
    """A local folder holding the small files of the artifact at ``uri``.

    Local paths and ``file://`` URIs are returned as they are. Remote artifacts are fetched (every file
    except the weights) into ``cache_root()/artifacts/<hash of the URI>``; each folder whose weights stay
    remote gets a ``.hf_tensorizer_remote`` marker so :func:`weights_uris` finds them.

    Args:
        uri: the artifact root.
        **options: transport options (``endpoint_url``, ``token``, ``headers``, ...).

    Returns:
        The local folder.

    Raises:
        SourceError: a listed file could not be fetched, or nothing usable was found at ``uri``.
        FormatError: the manifest (or a pipeline's ``model_index.json``) is malformed or names paths outside
            the artifact; nothing is written then.
    """
    text = os.fspath(uri)
    if not is_remote(text):
        return local_path(text)
    text = text.rstrip("/")
    with shared_transport(text, options) as shared:
        return _fetch(text, **shared)


def _fetch(text: str, **options: Any) -> str:
    """:func:`resolve` for a remote root: probe or read the manifest, fetch the small files, mark the weights."""
    if scheme_of(text) == "hf":
        text = pin_hub_revision(text, **options)
    try:
        manifest = read_manifest(text, **options)
        first_error: SourceError | None = None
    except SourceError as exc:  # no manifest (or no access): probe well-known names, report this if all fail
        manifest, first_error = None, exc
    weights: dict[str, list[str]] = {}  # folder -> its weight files (model.tensors, or a safetensors checkpoint)
    if manifest is not None:
        files = [f for f in manifest.get("files", []) if not f.endswith(".tensors")]
        for w in manifest.get("files", []):
            if w.endswith(".tensors"):
                folder, _, name = w.rpartition("/")
                weights.setdefault(folder, []).append(name)
    else:
        files, weights = _probe(text, first_error, **options)
    weights.setdefault("", [])  # the root is marked even without weights: a model load then says what is missing
    digest = hashlib.sha256(text.encode()).hexdigest()[:20]
    dest = os.path.join(cache_root(), "artifacts", digest)
    # Fetch into a fresh folder and swap it in: a reader never sees a half-updated cache folder.
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    staging = tempfile.mkdtemp(prefix=digest + ".", dir=os.path.dirname(dest))
    try:
        for name, data in zip(files, concurrently(lambda n: read_bytes(join(text, n), **options), files)):
            path = os.path.join(staging, name)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                f.write(data)
        if manifest is not None:
            with open(os.path.join(staging, MANIFEST_NAME), "w", encoding="utf-8") as f:
                json.dump(manifest, f)
        for folder, names in weights.items():
            os.makedirs(os.path.join(staging, folder), exist_ok=True)
            _write_marker(os.path.join(staging, folder), join(text, folder), names)
        old = dest + ".old." + os.path.basename(staging)
        if os.path.exists(dest):
            os.replace(dest, old)
        os.replace(staging, dest)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return dest


def pin_hub_revision(root: str, **options: Any) -> str:
    """``hf://org/repo[@branch]`` rewritten to the commit the branch points to now.

    Small files, the index and every device group's weights are then read from one commit: a push that
    lands mid-load cannot mix two versions. Offline, or when the commit cannot be told, ``root`` is returned.
    """
    from ..sources.hub import format_hf_uri, parse_hf_uri, resolve_commit

    parsed = parse_hf_uri(root)
    if parsed.revision is not None and _COMMIT_RE.fullmatch(parsed.revision):
        return root
    commit = resolve_commit(root, **options)  # one request; else a known file's commit
    if commit:
        return format_hf_uri(parsed.repo_id, parsed.path, commit, parsed.repo_type)
    for name in (MANIFEST_NAME, WEIGHTS_NAME, "config.json"):
        try:
            with open_source(join(root, name), **options) as src:
                commit = getattr(src, "commit_hash", None)
        except SourceError:
            continue
        return format_hf_uri(parsed.repo_id, parsed.path, commit, parsed.repo_type) if commit else root
    return root


_COMMIT_RE = re.compile(r"[0-9a-f]{40}")


def _probe(root: str, first_error: SourceError | None, **options: Any) -> tuple[list[str], dict[str, list[str]]]:
    """Files of a remote artifact without a manifest (a hand-made artifact, or a stock model folder): the
    well-known names, one request each, concurrently; weights are ``model.tensors`` or else a safetensors
    checkpoint (shard index before single file)."""
    found, weights = _probe_folders(root, [""], **options)
    if "model_index.json" in found:  # a diffusers pipeline: its components live in subfolders
        where = f"{redact(root)}/model_index.json"
        try:
            index = json.loads(read_bytes(join(root, "model_index.json"), **options))
        except (ValueError, RecursionError) as exc:
            raise FormatError(f"{where} is not valid JSON: {exc}") from exc
        if not isinstance(index, dict):
            raise FormatError(f"{where} is not a JSON object")
        comps = [c for c, spec in index.items() if not c.startswith("_") and isinstance(spec, list)]
        for comp in comps:
            if "/" in comp:
                raise FormatError(f"{where} names a component that is not a plain folder name: {comp!r}")
            check_relative(comp, where)
        more, comp_weights = _probe_folders(root, comps, **options)
        found += more
        weights.update(comp_weights)
    if not found and not weights:
        raise SourceError(
            f"no tensorized artifact at {redact(root)} (no {MANIFEST_NAME}, config or weights): {first_error}"
        ) from first_error
    return found, weights


def _probe_folders(root: str, folders: list[str], **options: Any) -> tuple[list[str], dict[str, list[str]]]:
    """The well-known small files that exist in each of ``folders`` (relative to ``root``) and each folder's
    weights: ``model.tensors``, else the first safetensors name present."""
    from ..compat import SAFETENSORS_NAMES

    weight_names = (WEIGHTS_NAME, *SAFETENSORS_NAMES)
    paths = [f"{d}/{n}" if d else n for d in folders for n in (*KNOWN_FILES, *weight_names)]
    listing = None
    if scheme_of(root) == "hf":  # the Hub lists a repository in one request
        from ..sources.hub import list_repo_paths

        listing = list_repo_paths(root, **options)
    if listing is not None:
        present = set(paths).intersection(listing)
    else:
        present = {p for p, ok in zip(paths, concurrently(lambda p: _exists(join(root, p), **options), paths)) if ok}
    found = [p for p in paths if p in present and p.rsplit("/", 1)[-1] in KNOWN_FILES]
    weights: dict[str, list[str]] = {}
    for d in folders:
        name = next((n for n in weight_names if (f"{d}/{n}" if d else n) in present), None)
        if name is not None:
            weights[d] = [name]
    return found, weights


def concurrently(fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
    """``[fn(x) for x in items]`` on up to 16 threads, in order: remote round trips overlap. The first error
    is raised (after the others finished)."""
    if len(items) <= 1:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(min(16, len(items)), thread_name_prefix="hf_tensorizer-fetch") as pool:
        return list(pool.map(fn, items))


def _exists(uri: str, **options: Any) -> bool:
    try:
        with open_source(uri, **options):
            return True
    except SourceError:
        return False


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


def upload_folder(staging: str, dest: str, *, skip: Iterable[str] = (), **options: Any) -> list[str]:
    """Copy every small file of ``staging`` to ``dest`` (local folder or URI). Returns the relative names."""
    names = [n for n in list_files(staging) if n not in set(skip)]
    with shared_transport(dest, options) as shared:

        def upload(name: str) -> None:
            with open(os.path.join(staging, name), "rb") as f:
                write_bytes(join(dest, name), f.read(), **shared)

        concurrently(upload, names)
    return names


def write_bytes(uri: str, data: bytes, **options: Any) -> None:
    """Write one small object atomically (local file, S3 object, Hub file)."""
    sink = open_sink(uri, **options)
    try:
        sink.write(data)
        sink.commit()
    except BaseException:
        sink.abort()
        raise


class Staging:
    """Where an artifact is assembled before it is published to ``dest``.

    A local ``dest`` is written in place; a remote one is assembled in a temporary folder, its small files
    uploaded at the end. Weights never touch the temporary folder: :meth:`weights` names their final
    location, and the serializer streams there directly. The manifest goes last, so an artifact whose
    manifest exists is complete.
    """

    def __init__(self, dest: str | os.PathLike[str], transport: Mapping[str, Any] | None = None) -> None:
        self.dest = os.fspath(dest)
        self.transport = dict(transport or {})
        self.remote = is_remote(self.dest)
        self.folder = tempfile.mkdtemp(prefix="hf_tensorizer-save-") if self.remote else local_path(self.dest)
        os.makedirs(self.folder, exist_ok=True)

    def weights(self, *subfolder: str) -> str:
        """The final location of ``[subfolder/]model.tensors``."""
        if self.remote:
            return join(self.dest, *subfolder, WEIGHTS_NAME)
        return os.path.join(self.folder, *subfolder, WEIGHTS_NAME)

    def publish(self, weights: Iterable[str], library: str, extra: Mapping[str, Any] | None = None) -> None:
        """Upload the small files (remote ``dest``) and write the manifest listing them and ``weights``."""
        files = list_files(self.folder)
        if self.remote:
            upload_folder(self.folder, self.dest, **self.transport)
        manifest = write_manifest(sorted(set(files) | set(weights)), library, extra)
        write_bytes(join(self.dest if self.remote else self.folder, MANIFEST_NAME), manifest, **self.transport)

    def __enter__(self) -> Staging:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.remote:
            shutil.rmtree(self.folder, ignore_errors=True)


def locate(root: str | os.PathLike[str], subfolder: str = "", **transport: Any) -> tuple[str, list[str]]:
    """The local folder of an artifact (small files fetched for remote ones) and its weight files' URIs:
    ``model.tensors``, or the shards of a safetensors checkpoint.

    Raises:
        UsageError: the artifact has no weights.
        SourceError: the artifact cannot be read.
        FormatError: its manifest or shard index is malformed.
    """
    root = os.fspath(root)
    folder = resolve(root, **transport)
    folder = os.path.join(folder, subfolder) if subfolder else folder
    weights = weights_uris(folder, **transport)
    if not weights:
        where = redact(root) + (f" (subfolder {subfolder!r})" if subfolder else "")
        raise UsageError(f"{where} has no {WEIGHTS_NAME} and no safetensors weights")
    return folder, weights


class OpenWeights:
    """The weight files of one load, open: their ``sources`` and ``indexes`` (same order), ``file_of`` (tensor
    name -> position in those lists), and the client they share. :meth:`close` (or ``with``) closes them all.

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

    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> OpenWeights:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_weights(uris: list[str], **transport: Any) -> OpenWeights:
    """Open every weight file of a load (:func:`locate`'s list) and read its index, concurrently and with one S3
    client for all (a sharded remote checkpoint costs a few round trips per shard: one after the other they add
    up). Nothing stays open on failure.

    Raises:
        SourceError / FormatError: the first file that cannot be opened or parsed, or a tensor in two files.
    """
    from ..engine.header import read_index

    stack = contextlib.ExitStack()
    try:
        shared = stack.enter_context(shared_transport(uris[0], transport)) if uris else transport
        sources: list[Source | None] = [None] * len(uris)

        def one(i: int) -> FileIndex:
            sources[i] = src = open_source(uris[i], **shared)
            return read_index(src)

        try:
            indexes = concurrently(one, range(len(uris)))
        finally:  # every source that opened closes with the stack, before the shared client (LIFO)
            for src in sources:
                if src is not None:
                    stack.callback(src.close)
        return OpenWeights([s for s in sources if s is not None], indexes, stack)
    except BaseException:
        stack.close()
        raise


# Stock save_pretrained arguments that concern safetensors shards or the Hub call, moot for one .tensors file
_MOOT_SAVE_ARGS = frozenset({
    "is_main_process", "state_dict", "save_function", "push_to_hub", "max_shard_size", "safe_serialization",
    "variant", "token", "save_peft_format", "save_original_format",
})  # fmt: skip


def save_options(kwargs: Mapping[str, Any], accepted: Iterable[str] = ()) -> dict[str, Any]:
    """The arguments of a ``save_pretrained(..., tensorized=True)`` call that the tensorized save takes.

    Every :class:`~hf_tensorizer.TensorSerializer` argument (``encryption``, ``digest``, ``metadata``, ...) and
    those in ``accepted`` pass; stock-only ones that make no sense for one file are dropped.

    Raises:
        UsageError: an argument that is neither (a typo must not silently drop, say, ``encryption``).
    """
    from ..engine.writer import TensorSerializer

    known = set(inspect.signature(TensorSerializer.__init__).parameters) - {"self", "dest", "sink_options"}
    known |= set(accepted)
    out = {}
    for key, value in kwargs.items():
        if key in known:
            out[key] = value
        elif key not in _MOOT_SAVE_ARGS:
            raise UsageError(f"save_pretrained(tensorized=True) does not take {key!r}")
    return out
