"""The Hugging Face cache (huggingface_hub's own layout) as a place Hub files are read from and written into.

Layout, as huggingface_hub writes it::

    <cache>/models--org--name/blobs/<etag>                          the bytes
    <cache>/models--org--name/snapshots/<commit>/<path>             a relative symlink to ../../blobs/<etag>
    <cache>/models--org--name/refs/<branch>                         the commit the branch pointed to

Reading: :func:`cached_copy` finds a file of a pinned commit that is already there (``snapshot_download``, an
earlier load); huggingface_hub links a snapshot only once its blob is complete, so a link means complete bytes.

Writing (write-through, ``write_through=True`` or ``HF_TENSORIZER_HUB_WRITE_THROUGH=1``): a :class:`CacheTee`
copies every chunk a load reads into a hidden temporary file in ``blobs/`` at its offset, as the chunk passes
(no second pass over the data). Only when every byte was read does the temporary file become ``blobs/<etag>``
(fsync, then an atomic rename) and get its snapshot link; a load that reads part of the file (a filter), fails or
dies leaves nothing visible (a dead process's temporary file is removed by the next write-through on the host).
"""

from __future__ import annotations

import os
import socket
import tempfile
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Any

__all__ = ["WRITE_THROUGH_ENV", "CacheTee", "cached_copy", "remember_branch", "write_through_default"]

WRITE_THROUGH_ENV = "HF_TENSORIZER_HUB_WRITE_THROUGH"
_TRUE = ("1", "ON", "YES", "TRUE")
_TMP_PREFIX = ".hf_tensorizer-"
# Bytes a full load never reads (alignment padding where a read chunk ends at a tensor, under 4 KiB each) are
# fetched at the end, concurrently, when each gap is at most 64 KiB and all of them at most 1 MiB or 1 % of the
# file. A larger gap is a partial load (a filter left tensors out): nothing is written.
_MAX_GAP_BYTES = 64 << 10
_FILL_THREADS = 16
_lock = threading.Lock()
_branches: dict[tuple[str, str, str], set[str]] = {}  # (repo_type, repo_id, commit) -> branches seen on it


def write_through_default() -> bool:
    """``HF_TENSORIZER_HUB_WRITE_THROUGH`` as set now (off by default)."""
    return os.environ.get(WRITE_THROUGH_ENV, "").strip().upper() in _TRUE


def _hub_cache(cache_dir: str | os.PathLike[str] | None) -> str:
    if cache_dir:
        return os.fspath(cache_dir)
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def _storage(repo_id: str, repo_type: str, cache_dir: str | os.PathLike[str] | None) -> str:
    from huggingface_hub.file_download import repo_folder_name

    return os.path.join(_hub_cache(cache_dir), repo_folder_name(repo_id=repo_id, repo_type=repo_type))


def cached_copy(
    repo_id: str, path: str, commit: str, repo_type: str = "model", cache_dir: str | os.PathLike[str] | None = None
) -> str | None:
    """The local file holding ``path`` at ``commit`` in the Hugging Face cache, or None when it is not there."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, path, cache_dir=cache_dir, revision=commit, repo_type=repo_type)
    except Exception:  # an unusual name or a broken cache folder: read from the Hub instead
        return None
    return found if isinstance(found, str) else None


def remember_branch(repo_id: str, repo_type: str, branch: str, commit: str) -> None:
    """Record that ``branch`` pointed to ``commit``: a file written through for that commit also writes
    ``refs/<branch>``, so an offline load of the branch finds the snapshot (as huggingface_hub's downloads do)."""
    if branch != commit:
        with _lock:
            _branches.setdefault((repo_type, repo_id, commit), set()).add(branch)


def _atomic_text(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX, dir=os.path.dirname(path))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        _unlink(tmp)
        raise


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _host() -> str:
    return socket.gethostname().replace("-", "_")


def _sweep(blobs: str) -> None:
    """Remove temporary files that processes of this host which no longer run left behind."""
    host = _host()
    try:
        names = os.listdir(blobs)
    except OSError:
        return
    for name in names:
        parts = name.split("-")  # .hf_tensorizer-<host>-<pid>-<random>.tmp
        if not name.startswith(_TMP_PREFIX) or len(parts) < 4 or parts[1] != host or not parts[2].isdigit():
            continue
        try:
            os.kill(int(parts[2]), 0)
        except ProcessLookupError:
            _unlink(os.path.join(blobs, name))
        except OSError:  # alive, another user's: not ours to judge
            pass


class CacheTee:
    """Copies what a Hub source reads into the Hugging Face cache; the file appears only once complete.

    Args:
        repo_id, repo_type, path, commit: the file (at a commit).
        etag: the Hub's ETag of the file (the blob's name).
        size: its size in bytes.
        cache_dir: the Hugging Face cache (default: huggingface_hub's).

    Thread-safe: the engine's readers call :meth:`write` concurrently. Any local write failure (a full disk)
    turns the tee off and drops the temporary file; the load itself is never failed by it.
    """

    def __init__(
        self,
        repo_id: str,
        repo_type: str,
        path: str,
        commit: str,
        etag: str,
        size: int,
        cache_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        self.repo_id, self.repo_type, self.path, self.commit = repo_id, repo_type, path, commit
        self.etag, self.size = etag, size
        self._storage = _storage(repo_id, repo_type, cache_dir)
        self._blobs = os.path.join(self._storage, "blobs")
        self._lock = threading.Lock()
        self._covered: list[list[int]] = []  # sorted, disjoint, non-adjacent [start, end) ranges
        os.makedirs(self._blobs, exist_ok=True)
        _sweep(self._blobs)
        prefix = f"{_TMP_PREFIX}{_host()}-{os.getpid()}-"
        self._fd: int | None
        self._fd, self.tmp = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=self._blobs)

    @property
    def active(self) -> bool:
        return self._fd is not None

    def write(self, offset: int, data: memoryview | bytes) -> None:
        """Copy ``data``, the bytes at ``offset``, into the temporary file."""
        fd = self._fd
        if fd is None:
            return
        view = memoryview(data).cast("B")
        try:
            done = 0
            while done < len(view):
                done += os.pwrite(fd, view[done:], offset + done)
        except OSError as exc:
            self._drop(f"writing {self.tmp}: {exc}")
            return
        with self._lock:
            self._add(offset, offset + len(view))

    def _add(self, start: int, end: int) -> None:
        merged: list[list[int]] = []
        for a, b in self._covered:
            if b < start or a > end:
                merged.append([a, b])
            else:
                start, end = min(a, start), max(b, end)
        merged.append([start, end])
        merged.sort()
        self._covered = merged

    def gaps(self) -> list[tuple[int, int]]:
        """The ``(offset, length)`` ranges not read yet."""
        with self._lock:
            out, pos = [], 0
            for a, b in self._covered:
                if a > pos:
                    out.append((pos, a - pos))
                pos = max(pos, b)
            if pos < self.size:
                out.append((pos, self.size - pos))
            return out

    def finish(self, fill: Any) -> bool:
        """Publish the file into the cache when it was read whole (padding the load skipped is read with
        ``fill(offset, length) -> bytes`` when it is little); otherwise drop it. Returns whether it was published.
        """
        if self._fd is None:
            return False
        gaps = self.gaps()
        missing = sum(n for _, n in gaps)
        if any(n > _MAX_GAP_BYTES for _, n in gaps) or missing > max(1 << 20, self.size // 100):
            self._drop(None)  # a partial load: the rest was never wanted
            return False
        try:
            if len(gaps) == 1:
                self.write(gaps[0][0], fill(*gaps[0]))
            elif gaps:
                with ThreadPoolExecutor(min(_FILL_THREADS, len(gaps)), "hf_tensorizer-fill") as pool:
                    for (offset, _), data in zip(gaps, pool.map(lambda g: fill(*g), gaps)):
                        self.write(offset, data)
        except Exception as exc:  # the padding could not be read: the cache simply stays cold
            self._drop(f"reading the bytes between tensors: {exc}")
            return False
        if self._fd is None or self.gaps():
            self._drop(None)
            return False
        try:
            self._publish()
        except OSError as exc:
            self._drop(f"publishing {self.tmp}: {exc}")
            return False
        return True

    def _publish(self) -> None:
        fd, self._fd = self._fd, None
        assert fd is not None
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(self.tmp, 0o644)  # mkstemp made it owner-only; blobs are world-readable like huggingface_hub's
        blob = os.path.join(self._blobs, self.etag)
        os.replace(self.tmp, blob)  # atomic: readers see all of the blob or none of it
        snap = os.path.join(self._storage, "snapshots", self.commit, *self.path.split("/"))
        os.makedirs(os.path.dirname(snap), exist_ok=True)
        link = snap + f".{os.getpid()}.link"
        try:
            os.symlink(os.path.relpath(blob, os.path.dirname(snap)), link)
        except OSError:  # no symlinks here (some network filesystems): a hard link is as good
            os.link(blob, link)
        os.replace(link, snap)
        with _lock:
            branches = sorted(_branches.get((self.repo_type, self.repo_id, self.commit), ()))
        for branch in branches:
            _atomic_text(os.path.join(self._storage, "refs", *branch.split("/")), self.commit)

    def _drop(self, why: str | None) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        os.close(fd)
        _unlink(self.tmp)
        if why:
            warnings.warn(f"hf_tensorizer: not caching {self.repo_id}/{self.path}: {why}", stacklevel=3)

    def abort(self) -> None:
        """Drop the temporary file (nothing becomes visible)."""
        self._drop(None)
