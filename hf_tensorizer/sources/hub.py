"""The Hugging Face Hub: ``hf://[datasets/|spaces/]org/repo[@revision]/path/in/repo``.

Reading resolves the file once through ``huggingface_hub`` (size, ETag and the commit the revision points to)
and then streams ranges over HTTP from the ``resolve/<commit>/...`` URL: pinned to the commit, a branch that
moves mid-load cannot mix two versions. Large files redirect to a CDN; the redirect target is remembered and
the token is never sent to it. With ``HF_HUB_OFFLINE=1`` the copy in the local Hugging Face cache is read
instead (or a clear error says it is missing). Online, a file of a pinned commit that the Hugging Face cache
already holds complete (``snapshot_download``, an earlier load) is read from local disk, with no request; with
``write_through`` a file read whole from the Hub is also written into that cache as it streams
(:mod:`.hub_cache`).

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
from collections.abc import Sequence
from typing import Any

from ..errors import SinkError, SourceError, TensorizerError
from .base import Sink, Source
from .file import FileSink, FileSource
from .hub_cache import CacheTee, cached_copy, remember_branch, write_through_default
from .hub_repo import (
    COMMIT_RE,
    format_hf_uri,
    hub_endpoint,
    hub_error,
    hub_offline,
    is_transient,
    parse_hf_uri,
    resolve_commit,
    resolve_token,
)

__all__ = ["HubSink", "HubSource", "pin_revision"]


def _refused(exc: BaseException) -> bool:
    """Whether a connection refusal is somewhere in ``exc``'s chain (whatever HTTP library wrapped it)."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, ConnectionRefusedError) or "Connection refused" in str(e):
            return True
        todo += [e.__cause__, e.__context__, *(a for a in e.args if isinstance(a, BaseException))]
    return False


class HubSource(Source):
    """A file in a Hub repository, read with ranged GETs pinned to the commit its revision resolves to.

    Args:
        uri: ``hf://org/repo[@revision]/path`` (``hf://datasets/...`` and ``hf://spaces/...`` too).
        token: a Hub token; default ``HF_TOKEN`` or the saved login; ``False`` sends none.
        endpoint: the Hub URL; default ``HF_ENDPOINT`` or https://huggingface.co.
        revision: used when the URI has no ``@revision``; default ``"main"``.
        cache_dir: the Hugging Face cache (default: huggingface_hub's): read offline, and online for a pinned
            commit it holds; written into with ``write_through``.
        offline: force offline (True) or online (False); default ``HF_HUB_OFFLINE``.
        write_through: copy the file into the Hugging Face cache as it is read from the Hub (published only
            when every byte was read; nothing visible otherwise); default ``HF_TENSORIZER_HUB_WRITE_THROUGH``.
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
        write_through: bool | None = None,
        **http_options: Any,
    ) -> None:
        parsed = parse_hf_uri(uri, require_path=True)
        self.repo_id, self.path, self.repo_type = parsed.repo_id, parsed.path, parsed.repo_type
        self.revision = parsed.revision or revision or "main"
        self.uri = format_hf_uri(self.repo_id, self.path, parsed.revision or revision, self.repo_type)
        self.commit_hash: str | None = None
        self.etag: str | None = None
        self._inner: Source
        self._tee: CacheTee | None = None
        local = None if not COMMIT_RE.fullmatch(self.revision) else self._local(self.revision, cache_dir)
        if local is not None:  # a pinned commit already in the HF cache: no request at all
            self._inner = local
        elif hub_offline(offline):
            self._inner = self._open_cached(cache_dir)
        else:
            self._inner = self._open_remote(resolve_token(token), hub_endpoint(endpoint), cache_dir, http_options)
            wanted = write_through if write_through is not None else write_through_default()
            if wanted and not isinstance(self._inner, FileSource) and self.etag and self.commit_hash:
                self._tee = self._open_tee(cache_dir)
        self.size = self._inner.size
        self.preferred_concurrency = self._inner.preferred_concurrency

    def _local(self, commit: str, cache_dir: str | os.PathLike[str] | None) -> Source | None:
        path = cached_copy(self.repo_id, self.path, commit, self.repo_type, cache_dir)
        if path is None:
            return None
        self.commit_hash = commit
        return FileSource(path)

    def _open_tee(self, cache_dir: str | os.PathLike[str] | None) -> CacheTee | None:
        assert self.commit_hash and self.etag
        try:
            return CacheTee(self.repo_id, self.repo_type, self.path, self.commit_hash, self.etag, self._inner.size,
                            cache_dir)  # fmt: skip
        except OSError as exc:  # a read-only or full cache: load anyway, uncached
            import warnings

            warnings.warn(f"hf_tensorizer: not caching {self.uri}: {exc}", stacklevel=3)
            return None

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

    def _open_remote(
        self, token: str | None, endpoint: str, cache_dir: str | os.PathLike[str] | None, http_options: dict[str, Any]
    ) -> Source:
        from huggingface_hub import get_hf_file_metadata, hf_hub_url

        from .http import HTTPSource
        from .ranged import Budget, RetryPolicy

        url = hf_hub_url(self.repo_id, self.path, revision=self.revision, repo_type=self.repo_type, endpoint=endpoint)
        knobs = ("retries", "backoff", "max_backoff", "max_retry_after", "deadline", "connect_retries")
        policy = RetryPolicy(**{k: http_options[k] for k in knobs if k in http_options})
        budget = Budget(self.uri, policy, "resolving the revision")
        failures = refused = 0
        while True:  # our retry policy, not huggingface_hub's fixed one (same knobs as the data requests)
            try:
                meta = get_hf_file_metadata(url, token=token if token else False, endpoint=endpoint)
                break
            except Exception as exc:
                failures += 1
                refused += _refused(exc)  # nothing listens: a restarting server at most, a few quick retries
                if not is_transient(exc) or failures > policy.retries or refused > policy.connect_retries:
                    raise hub_error(exc, self.uri, SourceError) from exc
                delay = 0.25 * 2 ** (refused - 1) if refused else policy.delay(failures)
                time.sleep(max(0.0, min(delay, budget.remaining())))
                budget.check(exc)
        if not meta.commit_hash:
            raise SourceError(
                f"{self.uri}: {endpoint} answered without an X-Repo-Commit header; is HF_ENDPOINT a Hub endpoint?"
            )
        self.etag = meta.etag
        remember_branch(self.repo_id, self.repo_type, self.revision, meta.commit_hash)
        local = self._local(meta.commit_hash, cache_dir)
        if local is not None:  # the metadata request told the commit, and the cache holds it: no download
            return local
        self.commit_hash = meta.commit_hash
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
        if self._tee is not None:  # the chunk passes through on its way to the engine: no second pass
            self._tee.write(offset, buf)

    def read_into_many(self, offset: int, bufs: Sequence[memoryview]) -> None:
        self._inner.read_into_many(offset, bufs)
        if self._tee is not None:
            for b in bufs:
                self._tee.write(offset, b)
                offset += len(b)

    def read(self, offset: int, length: int) -> bytes:
        data = self._inner.read(offset, length)
        if self._tee is not None:
            self._tee.write(offset, data)
        return data

    @property
    def tuning(self) -> dict[str, object] | None:
        """The HTTP transfer's adaptation (see ``RangedSource.tuning``); None for a file read from the cache."""
        return getattr(self._inner, "tuning", None)

    def hold_transfer(self, why: str) -> None:
        """Stop the HTTP transfer adapting (see ``RangedSource.hold_transfer``); nothing for a cached file."""
        hold = getattr(self._inner, "hold_transfer", None)
        if hold is not None:
            hold(why)

    def fileno(self) -> int | None:
        return self._inner.fileno()

    def direct_fileno(self) -> int | None:
        return self._inner.direct_fileno()

    def close(self) -> None:
        tee, self._tee = self._tee, None
        try:
            if tee is not None:  # published only when the whole file went through
                tee.finish(lambda offset, length: self._inner.read(offset, length))
        finally:
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
        committed_version: ``{"commit": <oid>}`` after :meth:`commit`.

    Raises:
        InvalidURIError: malformed URI or no path.
        SinkError: offline mode, repository or branch missing (never created implicitly), no access.
    """

    can_rewrite_head = True
    copies_writes = True  # see Sink.copies_writes

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

        self._api = HfApi(endpoint=hub_endpoint(endpoint), token=resolve_token(token) or False)
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
            raise hub_error(exc, self.uri, SinkError) from exc
        try:
            self._dir = tempfile.mkdtemp(prefix="hf_tensorizer-upload-", dir=tmp_dir)
        except OSError as exc:
            raise SinkError(f"{self.uri}: cannot create a staging file: {exc.strerror}") from exc
        # the bytes are staged in a local file (upload_file takes a path, so Xet and LFS work)
        # direct=False: upload_file reads the file again right after the commit, from the page cache
        self._staging = FileSink(os.path.join(self._dir, os.path.basename(self.path) or "upload"), direct=False)
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
            raise hub_error(exc, self.uri, SinkError) from exc
        self._state = "committed"
        oid = getattr(self.commit_info, "oid", None)
        self.committed_version = {"commit": oid} if isinstance(oid, str) and oid else None
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


def pin_revision(root: str, *, probe: Sequence[str] = (), **options: Any) -> str:
    """``hf://org/repo[@branch][/path]`` rewritten to the commit the branch points to now.

    Small files, the index and every device group's weights are then read from one commit: a push that lands
    mid-load cannot mix two versions. Offline, or when the commit cannot be told, ``root`` is returned.

    Args:
        root: an ``hf://`` URI.
        probe: names of files under ``root`` whose commit tells the revision when the repository cannot be
            asked directly (no ``repo_info`` access).
        **options: transport options (``token``, ``endpoint``, ...).
    """
    parsed = parse_hf_uri(root)
    if parsed.revision is not None and COMMIT_RE.fullmatch(parsed.revision):
        return root
    commit = resolve_commit(root, **options)  # one request; else a known file's commit
    if commit:
        remember_branch(parsed.repo_id, parsed.repo_type, parsed.revision or "main", commit)
        return format_hf_uri(parsed.repo_id, parsed.path, commit, parsed.repo_type)
    for name in probe:
        try:
            with HubSource(root.rstrip("/") + "/" + name, **options) as src:
                commit = src.commit_hash
        except SourceError:
            continue
        if commit:
            remember_branch(parsed.repo_id, parsed.repo_type, parsed.revision or "main", commit)
        return format_hf_uri(parsed.repo_id, parsed.path, commit, parsed.repo_type) if commit else root
    return root
