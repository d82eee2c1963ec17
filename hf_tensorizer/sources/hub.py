"""The Hugging Face Hub: ``hf://[datasets/|spaces/]org/repo[@revision]/path/in/repo``.

Reading resolves the file once through ``huggingface_hub`` (size, ETag and the commit the revision points to)
and then streams ranges over HTTP from the ``resolve/<commit>/...`` URL: pinned to the commit, a branch that
moves mid-load cannot mix two versions. Large files redirect to a CDN; the redirect target is remembered and
the token is never sent to it. With ``HF_HUB_OFFLINE=1`` the copy in the local Hugging Face cache is read
instead (or a clear error says it is missing).

Writing stages the bytes in a temporary file and uploads it with ``HfApi.upload_file`` on commit (from a path, so
Xet storage and large-file handling apply). The repository must exist: creating one is an explicit decision.

Configuration follows ``huggingface_hub``: ``HF_TOKEN`` (or the saved login), ``HF_ENDPOINT`` and
``HF_HUB_OFFLINE`` are read when a source or sink is opened (not only when ``huggingface_hub`` was imported).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote

from .. import constants
from ..errors import InvalidURIError, SinkError, SourceError, TensorizerError
from .base import Sink, Source
from .file import FileSink, FileSource

__all__ = [
    "HfURI", "HubSink", "HubSource", "format_hf_uri", "hub_endpoint", "hub_offline", "list_repo_paths", "parse_hf_uri",
    "resolve_commit",
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


def _api(token: str | bool | None, endpoint: str | None, offline: bool | None) -> Any:
    """An ``HfApi`` for the metadata calls below, or None offline."""
    if hub_offline(offline):
        return None
    from huggingface_hub import HfApi

    resolved = _resolve_token(token)
    return HfApi(endpoint=hub_endpoint(endpoint), token=resolved if resolved else False)


def list_repo_paths(
    uri: str, *, token: str | bool | None = None, endpoint: str | None = None, offline: bool | None = None, **_: Any
) -> list[str] | None:
    """Every file under the ``hf://`` folder ``uri`` (paths relative to it), from one listing request: what
    probing a dozen well-known names one request each would find. None when no listing can be had (offline,
    no access, an old server): callers then ask for files one by one. Other transport options are ignored.
    """
    parsed = parse_hf_uri(uri)
    api = _api(token, endpoint, offline)
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
    api = _api(token, endpoint, offline)
    if api is None:
        return None
    try:
        sha = api.repo_info(parsed.repo_id, revision=parsed.revision, repo_type=parsed.repo_type).sha
    except Exception:  # callers fall back to a file's commit, or to no pin
        return None
    return sha if isinstance(sha, str) and re.fullmatch(r"[0-9a-f]{40}", sha) else None


def _resolve_token(token: str | bool | None) -> str | None:
    if token is False:
        return None
    if isinstance(token, str) and token:
        return token
    from huggingface_hub import get_token

    return get_token()


def _transient(exc: BaseException) -> bool:
    """A Hub failure worth retrying: 429, 5xx, or a network error (whatever HTTP library huggingface_hub uses)."""
    from huggingface_hub.errors import HfHubHTTPError

    if isinstance(exc, HfHubHTTPError):
        status = exc.response.status_code if exc.response is not None else 0
        return status == 429 or 500 <= status < 600
    names = {cls.__name__ for cls in type(exc).__mro__}
    return bool(names & {"TransportError", "ConnectionError", "Timeout", "TimeoutError"})


def _hub_error(exc: BaseException, uri: str, cls: type[TensorizerError]) -> TensorizerError:
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


class HubSource(Source):
    """A file in a Hub repository, read with ranged GETs pinned to the commit its revision resolves to.

    Args:
        uri: ``hf://org/repo[@revision]/path`` (``hf://datasets/...`` and ``hf://spaces/...`` too).
        token: a Hub token; default ``HF_TOKEN`` or the saved login; ``False`` sends none.
        endpoint: the Hub URL; default ``HF_ENDPOINT`` or https://huggingface.co.
        revision: used when the URI has no ``@revision``; default ``"main"``.
        cache_dir: the Hugging Face cache to read in offline mode (default: huggingface_hub's).
        offline: force offline (True) or online (False); default ``HF_HUB_OFFLINE``.
        **http_options: passed to :class:`~hf_tensorizer.sources.http.HTTPSource` (``concurrency``,
            ``part_size``, ``retries``, ``timeout``, ``headers``, ``ca_bundle``...).

    Attributes:
        commit_hash: the commit read (None offline when the cache does not say).

    Raises:
        InvalidURIError: malformed URI.
        SourceError: repository, revision or file not found, gated or private without access, offline without
            a cached copy, Hub unreachable.
    """

    def __init__(
        self,
        uri: str,
        *,
        token: str | bool | None = None,
        endpoint: str | None = None,
        revision: str | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        offline: bool | None = None,
        **http_options: Any,
    ) -> None:
        parsed = parse_hf_uri(uri, require_path=True)
        self.repo_id, self.path, self.repo_type = parsed.repo_id, parsed.path, parsed.repo_type
        self.revision = parsed.revision or revision or "main"
        self.uri = format_hf_uri(self.repo_id, self.path, parsed.revision or revision, self.repo_type)
        self.commit_hash: str | None = None
        self.etag: str | None = None
        self._inner: Source
        if hub_offline(offline):
            self._inner = self._open_cached(cache_dir)
        else:
            self._inner = self._open_remote(_resolve_token(token), hub_endpoint(endpoint), http_options)
        self.size = self._inner.size
        self.preferred_concurrency = self._inner.preferred_concurrency

    def _open_cached(self, cache_dir: str | os.PathLike[str] | None) -> Source:
        from huggingface_hub import hf_hub_download

        try:
            local = hf_hub_download(
                self.repo_id,
                self.path,
                revision=self.revision,
                repo_type=self.repo_type,
                cache_dir=cache_dir,
                local_files_only=True,
            )
        except Exception as exc:  # LocalEntryNotFoundError and friends: all mean "not usable offline"
            raise SourceError(
                f"{self.uri}: offline mode (HF_HUB_OFFLINE) is on and the file is not in the local Hugging Face "
                f"cache{f' at {os.fspath(cache_dir)}' if cache_dir else ''}; download it once online or turn "
                "offline mode off"
            ) from exc
        match = re.search(r"[/\\]snapshots[/\\]([0-9a-f]{40})[/\\]", local)
        self.commit_hash = match.group(1) if match else None
        return FileSource(local)

    def _open_remote(self, token: str | None, endpoint: str, http_options: dict[str, Any]) -> Source:
        from huggingface_hub import get_hf_file_metadata, hf_hub_url

        from .http import HTTPSource
        from .ranged import RetryPolicy

        url = hf_hub_url(self.repo_id, self.path, revision=self.revision, repo_type=self.repo_type, endpoint=endpoint)
        policy = RetryPolicy(
            retries=http_options.get("retries", constants.REMOTE_RETRIES),
            backoff=http_options.get("backoff", 0.25),
            max_backoff=http_options.get("max_backoff", 10.0),
        )
        failures = 0
        while True:  # our retry policy, not huggingface_hub's fixed one (same knobs as the data requests)
            try:
                meta = get_hf_file_metadata(url, token=token if token else False, endpoint=endpoint)
                break
            except Exception as exc:
                failures += 1
                if not _transient(exc) or failures > policy.retries:
                    raise _hub_error(exc, self.uri, SourceError) from exc
                time.sleep(policy.delay(failures))
        if not meta.commit_hash:
            raise SourceError(
                f"{self.uri}: {endpoint} answered without an X-Repo-Commit header; is HF_ENDPOINT a Hub endpoint?"
            )
        self.commit_hash = meta.commit_hash
        self.etag = meta.etag
        pinned = hf_hub_url(
            self.repo_id, self.path, revision=meta.commit_hash, repo_type=self.repo_type, endpoint=endpoint
        )
        name = format_hf_uri(self.repo_id, self.path, meta.commit_hash, self.repo_type)
        inner = HTTPSource(pinned, token=token, name=name, **http_options)
        if meta.size is not None and meta.size != inner.size:
            inner.close()
            raise SourceError(f"{self.uri}: the Hub reports {meta.size} bytes but the download has {inner.size}")
        return inner

    def read_into(self, offset: int, buf: memoryview) -> None:
        self._inner.read_into(offset, buf)

    def read_into_many(self, offset: int, bufs: Sequence[memoryview]) -> None:
        self._inner.read_into_many(offset, bufs)

    def read(self, offset: int, length: int) -> bytes:
        return self._inner.read(offset, length)

    def fileno(self) -> int | None:
        return self._inner.fileno()

    def direct_fileno(self) -> int | None:
        return self._inner.direct_fileno()

    def close(self) -> None:
        self._inner.close()

    def __repr__(self) -> str:
        return f"HubSource({self.uri!r}, commit={self.commit_hash}, size={self.size})"


class HubSink(Sink):
    """Writes a file into an existing Hub repository: staged in a temporary file, uploaded on commit.

    Args:
        uri: ``hf://org/repo[@branch]/path``.
        token: a Hub token with write access; default ``HF_TOKEN`` or the saved login.
        endpoint: the Hub URL; default ``HF_ENDPOINT`` or https://huggingface.co.
        revision: the branch when the URI has no ``@branch``; default the repository's default branch.
        commit_message: default ``"Upload <path> with hf_tensorizer"``.
        commit_description: optional longer description.
        create_pr: open a pull request instead of committing to the branch.
        tmp_dir: where to stage the file (default: the system temporary directory).

    Attributes:
        commit_info: huggingface_hub's ``CommitInfo`` after :meth:`commit`.

    Raises:
        InvalidURIError: malformed URI or no path.
        SinkError: offline mode, repository or branch missing (never created implicitly), no access.
    """

    can_rewrite_head = True

    def __init__(
        self,
        uri: str,
        *,
        token: str | bool | None = None,
        endpoint: str | None = None,
        revision: str | None = None,
        commit_message: str | None = None,
        commit_description: str | None = None,
        create_pr: bool = False,
        tmp_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        parsed = parse_hf_uri(uri, require_path=True)
        self.repo_id, self.path, self.repo_type = parsed.repo_id, parsed.path, parsed.repo_type
        self.revision = parsed.revision or revision
        self.uri = format_hf_uri(self.repo_id, self.path, self.revision, self.repo_type)
        if hub_offline(None):
            raise SinkError(f"{self.uri}: cannot upload to the Hub with HF_HUB_OFFLINE set")
        from huggingface_hub import HfApi

        self._api = HfApi(endpoint=hub_endpoint(endpoint), token=_resolve_token(token) or False)
        self._commit_message = commit_message or f"Upload {self.path} with hf_tensorizer"
        self._commit_description = commit_description
        self._create_pr = create_pr
        self.commit_info: Any = None
        # Check up front: failing after gigabytes were serialized would waste the whole write.
        try:
            self._api.repo_info(self.repo_id, repo_type=self.repo_type, revision=self.revision)
        except Exception as exc:
            from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

            if isinstance(exc, RevisionNotFoundError):
                raise SinkError(
                    f"{self.uri}: branch {self.revision!r} does not exist; create it first with "
                    f"HfApi().create_branch({self.repo_id!r}, branch={self.revision!r})"
                ) from exc
            if isinstance(exc, RepositoryNotFoundError) and not isinstance(exc, GatedRepoError):
                kind = "" if self.repo_type == "model" else f", repo_type={self.repo_type!r}"
                raise SinkError(
                    f"{self.uri}: repository {self.repo_id!r} not found (or no access with this token); it is not "
                    f"created implicitly: create it first, e.g. HfApi().create_repo({self.repo_id!r}{kind})"
                ) from exc
            raise _hub_error(exc, self.uri, SinkError) from exc
        try:
            self._dir = tempfile.mkdtemp(prefix="hf_tensorizer-upload-", dir=tmp_dir)
        except OSError as exc:
            raise SinkError(f"{self.uri}: cannot create a staging file: {exc.strerror}") from exc
        # the bytes are staged in a local file (upload_file takes a path, so Xet and LFS work)
        self._staging = FileSink(os.path.join(self._dir, os.path.basename(self.path) or "upload"))
        self._state = "open"

    def write(self, data: memoryview | bytes) -> None:
        self._check_open()
        try:
            self._staging.write(data)
        except SinkError:
            self.abort()
            raise

    def rewrite_head(self, data: bytes) -> None:
        self._check_open()
        self._staging.rewrite_head(data)

    def commit(self) -> None:
        self._check_open()
        try:
            self._staging.commit()
            self.commit_info = self._api.upload_file(
                path_or_fileobj=self._staging.path,
                path_in_repo=self.path,
                repo_id=self.repo_id,
                repo_type=self.repo_type,
                revision=self.revision,
                commit_message=self._commit_message,
                commit_description=self._commit_description,
                create_pr=self._create_pr,
            )
        except Exception as exc:
            self.abort()
            if isinstance(exc, TensorizerError):
                raise
            raise _hub_error(exc, self.uri, SinkError) from exc
        self._state = "committed"
        shutil.rmtree(self._dir, ignore_errors=True)

    def abort(self) -> None:
        if self._state != "open":
            return
        self._state = "aborted"
        try:
            self._staging.abort()
        finally:
            shutil.rmtree(self._dir, ignore_errors=True)

    def _check_open(self) -> None:
        if self._state != "open":
            raise SinkError(f"{self.uri}: sink already {self._state}")

    def __repr__(self) -> str:
        return f"HubSink({self.uri!r}, state={self._state})"
