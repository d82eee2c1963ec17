"""The byte-range interface every location implements: local files, HTTP(S), S3, the Hub.

The engine only ever asks a :class:`Source` for bytes at an offset, written into buffers it owns, so a
new transport plugs in without touching the engine. Sinks are the write-side counterpart.
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Sequence


class Source(abc.ABC):
    """Random-access, read-only bytes of one object.

    Implementations must be safe to call from several threads at once; ``size`` is fixed for the
    lifetime of the source (remote ones pin the object version, see ``ObjectChangedError``).
    """

    #: a display name for messages (credentials removed)
    uri: str
    #: total size in bytes
    size: int
    #: how many concurrent ``read_into`` calls this source serves well
    preferred_concurrency: int = 8
    #: the read unit a load uses when the caller names none (None: the engine's ``CHUNK_BYTES``)
    preferred_chunk_bytes: int | None = None

    @abc.abstractmethod
    def read_into(self, offset: int, buf: memoryview) -> None:
        """Fill ``buf`` entirely with the bytes at ``offset``.

        Raises:
            TruncatedFileError: the object ends before ``offset + len(buf)``.
            SourceError: the read failed after retries.
        """

    def read_into_many(self, offset: int, bufs: Sequence[memoryview]) -> None:
        """Scatter the contiguous range starting at ``offset`` into ``bufs`` in order."""
        for b in bufs:
            self.read_into(offset, b)
            offset += len(b)

    def read(self, offset: int, length: int) -> bytes:
        """Convenience for small reads (the header): a new ``bytes`` of exactly ``length``."""
        buf = bytearray(length)
        self.read_into(offset, memoryview(buf))
        return bytes(buf)

    def deferred_checks(self) -> contextlib.AbstractContextManager[None]:
        """A span in which the after-read checks of this source (the version lookups of stores that cannot pin a
        version per request, see :mod:`.fsspec`) may run once, when it closes without an error, instead of after
        each read. Reads made inside it, by the calling thread or by threads started in a copy of its context
        (the engine's readers), may return before their check; the engine opens one around a load whose tensors
        it hands out only after the span has closed. Default: nothing to defer.

        Raises (on closing):
            ObjectChangedError: the object is no longer the version opened.
        """
        return contextlib.nullcontext()

    def fileno(self) -> int | None:
        """An OS file descriptor when the bytes are a local file (enables mmap and page-cache checks)."""
        return None

    def direct_fileno(self) -> int | None:
        """A second descriptor opened with ``O_DIRECT`` (reads bypass the page cache), when the bytes are a
        local file on a filesystem that supports it; ``None`` otherwise. Owned by the source."""
        return None

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections or descriptors. Idempotent."""

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Sink(abc.ABC):
    """A destination written strictly sequentially, committed atomically.

    ``rewrite_head`` exists because the index sits at the front but digests are known only after the
    data streamed past: seekable sinks (local files) and S3 multipart (parts upload in any order) can
    replace the first bytes at the end; others set ``can_rewrite_head = False`` and the serializer
    computes digests in a first pass instead.
    """

    uri: str
    can_rewrite_head: bool = False
    #: after :meth:`commit`, the version of the object written, as the store names it (``{"etag": ...,
    #: "version_id": ...}`` on S3, ``{"commit": ...}`` on the Hub); None where the store keeps no versions (local
    #: files). Artifact manifests record it so a load can pin every file to what was written.
    committed_version: dict[str, str] | None = None
    #: True where ``write`` copies the bytes before returning (keeps no reference to the caller's buffer), so the
    #: caller may refill that buffer right after; sinks that do not know say False
    copies_writes: bool = False

    @abc.abstractmethod
    def write(self, data: memoryview | bytes) -> None:
        """Append ``data``."""

    def expect_size(self, nbytes: int) -> None:  # noqa: B027 - optional hook, nothing to do by default
        """A hint before the first write: the object will be ``nbytes`` long (a file reserves the space)."""

    def rewrite_head(self, data: bytes) -> None:
        """Replace the first ``len(data)`` bytes already written (same length)."""
        raise NotImplementedError(f"{type(self).__name__} cannot rewrite its head")

    @abc.abstractmethod
    def commit(self) -> None:
        """Make the object visible, complete. Before this, readers never see a partial object."""

    @abc.abstractmethod
    def abort(self) -> None:
        """Discard everything written. Idempotent; never raises for an already-aborted sink."""
