"""Bare Hub ids: ``from_pretrained("me/llama-tz")`` of a repository that holds a tensorized artifact.

A string that is a valid ``org/name`` Hub id (huggingface_hub's validation) and not an existing local path is
an artifact when its repository has, at the requested revision, ``hf_tensorizer.json`` at its root (what
``push_to_hub(..., tensorized=True)`` writes last), or ``<subfolder>/model.tensors`` when ``subfolder=`` is given
(a pipeline's component, or an artifact saved into a folder of the repository). That is told from the local
Hugging Face cache when it knows (a snapshot of the revision holds the file, or huggingface_hub recorded that it
does not exist), else with one ``HEAD`` of the file's ``resolve`` URL; offline (``local_files_only=True`` or
``HF_HUB_OFFLINE=1``) only the cache is asked. The answer is remembered for the process per (endpoint,
repository, revision, file), so an Auto class and the model class it hands over to do not ask twice. An artifact
then loads as ``hf://org/name[@revision][/subfolder]``, with the call's ``token``, ``cache_dir`` and
``local_files_only`` as transport options; anything else (a stock repository, a missing or private one, a Hub
that cannot be reached) stays on the stock path, untouched, which reports its own errors.
"""

from __future__ import annotations

import os
import threading
from typing import Any

from ...sources.hub_repo import format_hf_uri, hub_endpoint, hub_offline, resolve_token
from ...sources.uri import looks_like_uri
from ..options import KWARG, TensorizerOptions
from .layout import WEIGHTS_NAME
from .manifest import MANIFEST_NAME
from .routing import check_local_path

__all__ = ["forget", "is_hub_artifact", "route_hub_id"]

_lock = threading.Lock()
_decided: dict[tuple[str, str, str, str], bool] = {}  # (endpoint, repo id, revision, file) -> holds an artifact


def forget() -> None:
    """Drop the remembered decisions (tests; a process that republished a repository as another kind)."""
    with _lock:
        _decided.clear()


def _hub_id(path: Any) -> str | None:
    """``path`` when it can only mean a Hub model repository ``org/name``."""
    if not isinstance(path, str) or looks_like_uri(path) or path.count("/") != 1 or os.path.exists(path):
        return None  # one-word ids are the Hub's legacy canonical repos (gpt2): never a tensorized artifact
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(path)
    except Exception:  # HFValidationError: a path that does not exist, not a Hub id
        return None
    return path


def _from_cache(repo_id: str, name: str, revision: str, cache_dir: Any) -> bool | None:
    """What the Hugging Face cache knows of ``name``: True (cached), False (recorded missing) or None."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, name, cache_dir=cache_dir, revision=revision)
    except Exception:
        return None
    if found is None:
        return None
    return isinstance(found, str)  # else huggingface_hub's "known not to exist" sentinel


def _ask_hub(repo_id: str, name: str, revision: str, token: Any, endpoint: str) -> bool | None:
    """One HEAD of ``name``: True (there), False (the repository has no such file) or None (cannot tell)."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import EntryNotFoundError, GatedRepoError, RepositoryNotFoundError

    url = hf_hub_url(repo_id, name, revision=revision, endpoint=endpoint)
    resolved = resolve_token(token)
    try:
        get_hf_file_metadata(url, token=resolved if resolved else False, endpoint=endpoint, timeout=10)
    except EntryNotFoundError:
        return False
    except (RepositoryNotFoundError, GatedRepoError):  # missing, private or gated: stock code says so better
        return None
    except Exception:  # unreachable Hub, a revision that does not exist...: stock code reports it
        return None
    return True


def is_hub_artifact(
    repo_id: str,
    *,
    revision: str | None = None,
    subfolder: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    local_files_only: bool = False,
) -> bool:
    """Whether the Hub repository ``repo_id`` holds a tensorized artifact at ``revision`` (see the module doc).

    Args:
        repo_id: ``org/name``.
        revision: a branch, tag or commit; default ``main``.
        subfolder: the artifact's folder in the repository (default its root).
        token: a Hub token (default ``HF_TOKEN`` or the saved login).
        cache_dir: the Hugging Face cache to consult (default huggingface_hub's).
        local_files_only: ask only the cache (also when ``HF_HUB_OFFLINE`` is set).

    Returns:
        True for an artifact; False for a stock repository or when it cannot be told.
    """
    rev = revision or "main"
    sub = (subfolder or "").strip("/")
    name = f"{sub}/{WEIGHTS_NAME}" if sub else MANIFEST_NAME
    endpoint = hub_endpoint()
    key = (endpoint, repo_id, rev, name)
    with _lock:
        if key in _decided:
            return _decided[key]
    known = _from_cache(repo_id, name, rev, cache_dir)
    if known is None and not (local_files_only or hub_offline()):
        known = _ask_hub(repo_id, name, rev, token, endpoint)
    if known is not None:  # an offline "not in the cache" is no answer about the repository: asked again online
        with _lock:
            _decided[key] = known
    return bool(known)


def route_hub_id(path: Any, kwargs: dict[str, Any]) -> Any:
    """``path``, or the ``hf://`` URI of the tensorized artifact the Hub id ``path`` names.

    When it is an artifact, ``kwargs[KWARG]`` (``tensorizer_options``) gains the call's ``token``, ``cache_dir``
    and ``local_files_only`` as transport options (options given there win); ``revision`` and ``subfolder`` go
    into the URI (``subfolder`` leaves ``kwargs``). The other stock keyword arguments stay as they are.
    """
    check_local_path(path)  # a missing local folder: say so, not stock's "Repo id must be in the form ..."
    repo_id = _hub_id(path)
    if repo_id is None:
        return path
    revision = kwargs.get("revision") or None
    token = kwargs.get("token", kwargs.get("use_auth_token"))
    cache_dir = kwargs.get("cache_dir")
    offline = bool(kwargs.get("local_files_only"))
    sub = (kwargs.get("subfolder") or "").strip("/")
    if not is_hub_artifact(
        repo_id, revision=revision, subfolder=sub, token=token, cache_dir=cache_dir, local_files_only=offline
    ):
        return path
    kwargs.pop("subfolder", None)
    implied: dict[str, Any] = {}
    if token is not None:
        implied["token"] = token
    if cache_dir is not None:
        implied["cache_dir"] = os.fspath(cache_dir)
    if offline:
        implied["offline"] = True
    given = TensorizerOptions.parse(kwargs.get(KWARG))
    kwargs[KWARG] = TensorizerOptions(given.engine, {**implied, **given.transport})
    return format_hf_uri(repo_id, sub, revision)
