"""What an ``hf://`` URI names on the Hugging Face Hub, and which commit it is at.

``hf://[datasets/|spaces/]org/repo[@revision]/path/in/repo``: parsing and formatting, the endpoint, token and
offline settings (read when used, as ``huggingface_hub`` does), listing a repository in one request, and pinning
a branch to the commit it points to now, so that every file of one load comes from one commit.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote

from ..errors import InvalidURIError, TensorizerError

__all__ = [
    "HfURI", "format_hf_uri", "hub_api", "hub_endpoint", "hub_error", "hub_offline", "is_transient",
    "list_repo_paths", "parse_hf_uri", "resolve_commit", "resolve_token",
]  # fmt: skip

_TYPE_PREFIXES = {"models": "model", "datasets": "dataset", "spaces": "space"}
_NAME_RE = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,94}[A-Za-z0-9_])?")
# Revisions that contain "/" (pull-request and conversion refs), as huggingface_hub's own URI parser
_SPECIAL_REF_RE = re.compile(r"refs/(?:convert/[\w.-]+|pr/\d+)(?=/|$)")
_TRUE = ("1", "ON", "YES", "TRUE")


@dataclass(frozen=True)
class HfURI:
    """A parsed ``hf://`` URI. Unpacks as ``(repo_id, revision, path)``.

    Attributes:
        repo_id: ``"org/name"``.
        revision: a branch, tag or commit (percent-decoded), or None for the default branch.
        path: the file's path in the repo; ``""`` for the repo itself.
        repo_type: ``"model"`` (default), ``"dataset"`` or ``"space"``.
    """

    repo_id: str
    revision: str | None
    path: str
    repo_type: str = "model"

    def __iter__(self) -> Iterator[Any]:
        return iter((self.repo_id, self.revision, self.path))


def parse_hf_uri(uri: str, *, require_path: bool = False) -> HfURI:
    """Parse ``hf://[<type>s/]<org>/<name>[@<revision>][/<path>]`` (huggingface_hub's canonical syntax).

    The revision is percent-decoded (write ``refs%2Fheads%2Fx`` for a branch with slashes); ``refs/pr/N`` and
    ``refs/convert/<name>`` may be written as they are. The path is taken literally and must not contain empty,
    ``.`` or ``..`` segments.

    Args:
        uri: the URI.
        require_path: reject URIs that name a repository but no file.

    Returns:
        The parsed URI; ``tuple(parse_hf_uri(u)) == (repo_id, revision, path)``.

    Raises:
        InvalidURIError: anything malformed, with the reason.
    """
    if not isinstance(uri, str) or uri[:5].lower() != "hf://":
        raise InvalidURIError(f"not an hf:// URI: {uri!r}")
    body = uri[5:]
    if "?" in body or "#" in body:
        raise InvalidURIError(f"hf:// URIs take no query or fragment: {uri!r}")
    repo_type = "model"
    head, sep, rest = body.partition("/")
    if head in _TYPE_PREFIXES and sep:
        repo_type = _TYPE_PREFIXES[head]
        body = rest
    elif head == "buckets":
        raise InvalidURIError(f"Hub buckets are not supported, only model, dataset and space repos: {uri!r}")
    org, sep, rest = body.partition("/")
    if not sep:
        raise InvalidURIError(f"expected hf://org/repo[@revision]/path, got {uri!r}")
    name, at, after = rest.partition("@")
    revision: str | None = None
    if at and "/" not in name:
        special = _SPECIAL_REF_RE.match(after)
        if special:
            revision, path = special.group(), after[special.end() :].removeprefix("/")
        else:
            rev_text, _, path = after.partition("/")
            revision = unquote(rev_text)
        if not revision:
            raise InvalidURIError(f"empty revision after '@' in {uri!r}")
    else:
        name, _, path = rest.partition("/")
    for part, what in ((org, "organization"), (name, "repository name")):
        if not _NAME_RE.fullmatch(part) or "--" in part or ".." in part:
            raise InvalidURIError(
                f"invalid {what} {part!r} in {uri!r}: use letters, digits, '-', '_', '.', not at the ends, no "
                "'--' or '..', at most 96 characters"
            )
    repo_id = f"{org}/{name}"
    if len(repo_id) > 96 or repo_id.endswith(".git"):
        raise InvalidURIError(f"invalid repository id {repo_id!r} in {uri!r}")
    if path:
        if any(seg in ("", ".", "..") for seg in path.split("/")) or "\\" in path:
            raise InvalidURIError(f"invalid path {path!r} in {uri!r}: empty, '.' or '..' segment")
    elif require_path:
        raise InvalidURIError(f"{uri!r} names a repository, not a file; expected hf://org/repo[@revision]/path")
    return HfURI(repo_id, revision, path, repo_type)


def format_hf_uri(repo_id: str, path: str = "", revision: str | None = None, repo_type: str = "model") -> str:
    """The ``hf://`` URI of a file (inverse of :func:`parse_hf_uri`)."""
    prefix = {"model": "", "dataset": "datasets/", "space": "spaces/"}[repo_type]
    text = f"hf://{prefix}{repo_id}"
    if revision is not None:
        text += "@" + (revision if _SPECIAL_REF_RE.fullmatch(revision) else quote(revision, safe=""))
    return f"{text}/{path}" if path else text


def hub_endpoint(endpoint: str | None = None) -> str:
    """The Hub URL: ``endpoint``, else ``HF_ENDPOINT`` as set now, else huggingface_hub's default."""
    if endpoint:
        return endpoint.rstrip("/")
    env = os.environ.get("HF_ENDPOINT", "").strip()
    if env:
        return env.rstrip("/")
    from huggingface_hub import constants

    return constants.ENDPOINT.rstrip("/")


def hub_offline(offline: bool | None = None) -> bool:
    """Whether to stay off the network: ``offline``, else ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) now."""
    if offline is not None:
        return offline
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        value = os.environ.get(name, "").strip()
        if value:
            return value.upper() in _TRUE
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def hub_api(token: str | bool | None, endpoint: str | None, offline: bool | None) -> Any:
    """An ``HfApi`` for the metadata calls below, or None offline."""
    if hub_offline(offline):
        return None
    from huggingface_hub import HfApi

    resolved = resolve_token(token)
    return HfApi(endpoint=hub_endpoint(endpoint), token=resolved if resolved else False)


def list_repo_paths(
    uri: str, *, token: str | bool | None = None, endpoint: str | None = None, offline: bool | None = None, **_: Any
) -> list[str] | None:
    """Every file under the ``hf://`` folder ``uri`` (paths relative to it), from one listing request: what
    probing a dozen well-known names one request each would find. None when no listing can be had (offline,
    no access, an old server): callers then ask for files one by one. Other transport options are ignored.
    """
    parsed = parse_hf_uri(uri)
    api = hub_api(token, endpoint, offline)
    if api is None:
        return None
    try:
        files = api.list_repo_files(parsed.repo_id, revision=parsed.revision, repo_type=parsed.repo_type)
    except Exception:  # any failure only costs the fallback's extra requests
        return None
    prefix = f"{parsed.path.strip('/')}/" if parsed.path else ""
    return [f[len(prefix) :] for f in files if f.startswith(prefix)]


def resolve_commit(
    uri: str, *, token: str | bool | None = None, endpoint: str | None = None, offline: bool | None = None, **_: Any
) -> str | None:
    """The commit the revision of the ``hf://`` URI points to now (one request), or None when it cannot be told
    (offline, no access). Other transport options are ignored."""
    parsed = parse_hf_uri(uri)
    api = hub_api(token, endpoint, offline)
    if api is None:
        return None
    try:
        sha = api.repo_info(parsed.repo_id, revision=parsed.revision, repo_type=parsed.repo_type).sha
    except Exception:  # callers fall back to a file's commit, or to no pin
        return None
    return sha if isinstance(sha, str) and re.fullmatch(r"[0-9a-f]{40}", sha) else None


def resolve_token(token: str | bool | None) -> str | None:
    if token is False:
        return None
    if isinstance(token, str) and token:
        return token
    from huggingface_hub import get_token

    return get_token()


def is_transient(exc: BaseException) -> bool:
    """A Hub failure worth retrying: 429, 5xx, or a network error (whatever HTTP library huggingface_hub uses)."""
    from huggingface_hub.errors import HfHubHTTPError

    if isinstance(exc, HfHubHTTPError):
        status = exc.response.status_code if exc.response is not None else 0
        return status == 429 or 500 <= status < 600
    names = {cls.__name__ for cls in type(exc).__mro__}
    return bool(names & {"TransportError", "ConnectionError", "Timeout", "TimeoutError"})


def hub_error(exc: BaseException, uri: str, cls: type[TensorizerError]) -> TensorizerError:
    """A clear error for a huggingface_hub exception (no token, no signed URL)."""
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        OfflineModeIsEnabled,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if isinstance(exc, GatedRepoError):
        return cls(f"{uri}: the repository is gated; accept its terms on the Hub and use a token with access")
    if isinstance(exc, RepositoryNotFoundError):
        return cls(f"{uri}: repository not found, or private and the token (HF_TOKEN) gives no access to it")
    if isinstance(exc, RevisionNotFoundError):
        return cls(f"{uri}: revision not found in the repository")
    if isinstance(exc, RemoteEntryNotFoundError):
        return cls(f"{uri}: no such file in the repository at that revision")
    if isinstance(exc, OfflineModeIsEnabled):
        return cls(f"{uri}: HF_HUB_OFFLINE is set; the Hub cannot be reached")
    if isinstance(exc, HfHubHTTPError):
        status = exc.response.status_code if exc.response is not None else "?"
        if status in (401, 403):
            return cls(f"{uri}: access denied (HTTP {status}); check HF_TOKEN")
        return cls(f"{uri}: the Hub answered HTTP {status}")
    return cls(f"{uri}: cannot reach the Hub ({type(exc).__name__}: {exc})")


COMMIT_RE = re.compile(r"[0-9a-f]{40}")
