"""Which ``from_pretrained`` calls load through hf_tensorizer, and which stay stock.

URIs with a scheme we serve are artifacts by definition (stock transformers cannot read them); a local folder is
one when it holds ``model.tensors`` (or is the cached copy of a remote artifact), or when it holds safetensors
weights and was reached through a ``file://`` URI.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Iterator
from typing import Any

from ...errors import SourceError
from ...sources.uri import looks_like_uri, scheme_of

__all__ = ["check_local_path", "is_artifact", "is_pipeline_artifact", "looks_like_uri", "reached_through"]
from .layout import SAFETENSORS_NAMES, is_weights_name
from .manifest import MANIFEST_NAME, REMOTE_MARKER

# Local folders that the running from_pretrained call reached through a file:// URI: they load through
# hf_tensorizer even when they hold only safetensors (a plain path to the same folder stays stock). Auto classes
# and pipelines hand their inner loads the resolved folder, never the URI, so no parameter can carry this.
_FILE_URI_ROOTS: contextvars.ContextVar[frozenset[str]] = contextvars.ContextVar("hf_tensorizer_file_uri_roots",
                                                                                 default=frozenset())  # fmt: skip


@contextlib.contextmanager
def reached_through(uri: Any, folder: str) -> Iterator[None]:
    """Within the block, ``folder`` (what ``resolve`` made of ``uri``) and its subfolders count as artifacts
    when ``uri`` is a ``file://`` URI: the user asked for our engine by writing the URI."""
    if not (looks_like_uri(uri) and scheme_of(uri) == "file"):
        yield
        return
    token = _FILE_URI_ROOTS.set(_FILE_URI_ROOTS.get() | {os.path.abspath(folder)})
    try:
        yield
    finally:
        _FILE_URI_ROOTS.reset(token)


def is_artifact(path_or_uri: Any, subfolder: str = "") -> bool:
    """Whether ``from_pretrained`` should load ``path_or_uri`` (``subfolder`` inside it) through hf_tensorizer."""
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
    if os.path.isfile(os.path.join(folder, REMOTE_MARKER)) or any(is_weights_name(n) for n in os.listdir(folder)):
        return True  # model.tensors, or the weights of a variant (model.fp16.tensors)
    # within a root (pipelines hand each component its own folder), with safetensors weights
    here = os.path.abspath(folder)
    return any(os.path.commonpath([here, r]) == r for r in _FILE_URI_ROOTS.get()) and any(
        os.path.isfile(os.path.join(folder, name)) for name in SAFETENSORS_NAMES
    )


def check_local_path(path: Any) -> None:
    """Refuse, naming where it looked, a local path that does not exist and that no Hub id can be: stock code would
    try it as a Hub repository and say "Repo id must be in the form 'repo_name' or 'namespace/repo_name'".

    Raises:
        SourceError: (an ``OSError``, as stock raises) ``path`` is such a path.
    """
    if not isinstance(path, (str, os.PathLike)) or looks_like_uri(path):
        return
    text = os.fspath(path)
    if not isinstance(text, str) or not text or os.path.exists(text):
        return
    if isinstance(path, str):
        from huggingface_hub.utils import validate_repo_id

        try:
            validate_repo_id(text)
            return  # a Hub id ("org/name"): the Hub says whether it exists
        except Exception:  # HFValidationError
            pass
    where = os.path.abspath(text)
    home = text.startswith("~") and os.path.exists(os.path.expanduser(text))
    tilde = "; ~ is not expanded here: os.path.expanduser() it" if home else ""
    raise SourceError(
        f"{text}: no such local folder (looked at {where}){tilde}; from_pretrained takes a local folder, a Hub "
        "id ('org/name') or a URI (s3://, hf://, https://, file://)"
    )


def is_pipeline_artifact(path: Any) -> bool:
    """A local folder holding a tensorized diffusers pipeline (manifest and ``model_index.json``)."""
    if not isinstance(path, (str, os.PathLike)) or not os.path.isdir(path):
        return False
    folder = os.fspath(path)
    return os.path.isfile(os.path.join(folder, MANIFEST_NAME)) and os.path.isfile(
        os.path.join(folder, "model_index.json")
    )
