"""Any store fsspec reaches: ``gs://`` (gcsfs), ``az://``/``abfs://`` (adlfs), ``memory://`` and every other protocol
fsspec knows, read and written through the protocol's own filesystem and credentials.

Reading: one ``info`` pins the object (size and its version: GCS ``generation``, a ``VersionId``, an ETag, or the
creation time); large reads split into parts fetched in parallel with ``cat_file(path, start, end)`` (for async
filesystems such as gcsfs those run concurrently on fsspec's event loop) and copied into the caller's buffers.
Before a read returns, a version lookup that started after its requests completed must have found the version
opened: a read never returns bytes of an object replaced meanwhile (:class:`ObjectChangedError`). Versions never
come back (a GCS generation only grows; an ETag names the bytes), so one lookup vouches for every request completed
before it started: reads that finish while a lookup runs wait for the next one, and each lookup confirms a whole
batch of reads (:class:`_Confirmations`), not one read each (``verify_version=False`` skips them). Inside
:meth:`FsspecSource.deferred_checks` (the engine opens one around a load, which hands out its tensors only after
it closed) reads return at once and one lookup at the end vouches for them all: 2 lookups per load, not ~15. On GCS
the requests are also pinned to the generation (real GCS answers 404 once it is gone; the emulator ignores the pin,
which is what the lookups are for). On GCS (gcsfs) a load can also read one streamed GET (:mod:`.gcs_stream`).

Writing is atomic: object stores whose uploads only appear when complete (GCS resumable uploads) are written
straight to the final name and the upload is cancelled on abort; every other protocol is written to a temporary
name beside the target and moved into place on commit (removed on abort).

Credentials: the protocol's own (``storage_options={...}`` passed to the filesystem, or its environment variables:
``GOOGLE_APPLICATION_CREDENTIALS``, ``AZURE_STORAGE_CONNECTION_STRING``...). A ready filesystem may be passed as
``filesystem=``.
"""

from __future__ import annotations

import contextlib
import contextvars
import secrets
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from .. import constants
from ..errors import InvalidURIError, ObjectChangedError, SinkError, SourceError, UsageError
from .azure_pinned import pinned_reader
from .base import Sink
from .gcs_stream import open_gcs_body, supports_stream
from .ranged import Body, Budget, Cursor, RangedSource, RetryPolicy, TransientError
from .sequential import copy_into
from .uri import redact

__all__ = ["DIRECT_UPLOAD_PROTOCOLS", "FsspecSink", "FsspecSource", "resolve_filesystem"]

# the info() field that names an object's version, most specific first (a GCS etag also changes with metadata)
_VERSION_FIELDS = ("generation", "VersionId", "version_id", "ETag", "etag", "created", "mtime", "LastModified")
# protocols whose write files publish the object only when closed, and cancel the upload on discard()
DIRECT_UPLOAD_PROTOCOLS = frozenset({"gs", "gcs"})


def resolve_filesystem(uri: str, storage_options: Mapping[str, Any] | None, filesystem: Any, cls: type) -> tuple:
    """``(filesystem, path, protocol)`` for ``uri``: fsspec's ``url_to_fs`` with ``storage_options``, or the
    given ``filesystem`` with the path stripped of its protocol.

    Raises:
        InvalidURIError: fsspec does not know the protocol or cannot parse the URI.
        ``cls`` (SourceError / SinkError): the protocol's package is not installed, or the filesystem failed.
    """
    try:
        from fsspec.core import url_to_fs
    except ImportError as exc:  # pragma: no cover - fsspec comes with huggingface_hub
        raise cls(f"{redact(uri)}: this scheme needs fsspec: pip install 'hf_tensorizer[fsspec]'") from exc
    protocol = uri.split("://", 1)[0].split("::")[-1].lower()
    try:
        if filesystem is not None:
            return filesystem, filesystem._strip_protocol(uri), protocol
        fs, path = url_to_fs(uri, **dict(storage_options or {}))
    except ImportError as exc:  # fsspec names the package to install ("Install gcsfs to access Google Storage")
        raise cls(f"{redact(uri)}: {exc}") from exc
    except ValueError as exc:
        raise InvalidURIError(f"{redact(uri)}: {exc}") from exc
    except Exception as exc:  # a filesystem's constructor (credentials lookup, bad options)
        raise cls(f"{redact(uri)}: cannot set up the {protocol}:// filesystem: {type(exc).__name__}: {exc}") from exc
    return fs, path, protocol


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _version(info: Mapping[str, Any]) -> tuple[str, Any] | None:
    for field in _VERSION_FIELDS:
        if info.get(field) is not None:
            return field, info[field]
    return None


# A gs:// load's read unit: against the GCS emulator (one request at a time, a new connection and a copy of the
# range per GET) 16 MiB reads loaded 258 MB in 0.23-0.28 s against 0.27-0.29 s for 8 MiB (4 in flight, fresh
# processes); GCS's own guidance for ranged reads is 8-16 MiB and up, and each read in flight goes straight into
# the tensors (no larger buffer).
GCS_CHUNK_BYTES = 16 << 20


class _Deferred:
    """An open :meth:`FsspecSource.deferred_checks` span: whether a read inside it still needs a lookup."""

    def __init__(self, source: FsspecSource) -> None:
        self.source = source
        self.pending = False


_DEFERRED: contextvars.ContextVar[_Deferred | None] = contextvars.ContextVar("hf_tensorizer_deferred", default=None)


class _Confirmations:
    """Version lookups shared by concurrent reads: :meth:`confirm` returns once a lookup that started after the call
    found the object unchanged (one lookup serves every read waiting when it starts), and raises what it raised.

    Args:
        check: one lookup; raises :class:`ObjectChangedError` when the object is not the version opened.
    """

    def __init__(self, check: Callable[[], None]) -> None:
        self._check = check
        self._cv = threading.Condition()
        self._started = 0  # lookups started so far (numbered 1, 2, ...)
        self._passed = 0  # the latest lookup that found the object unchanged
        self._running = False
        self.lookups = 0

    def confirm(self) -> None:
        with self._cv:
            need = self._started + 1  # the next lookup to start is the first to start after this call
            while self._passed < need:
                if not self._running:
                    self._running = True
                    self._started += 1
                    mine = self._started
                    break
                self._cv.wait()
            else:
                return
        ok = False
        try:
            self.lookups += 1
            self._check()
            ok = True
        finally:
            with self._cv:
                self._running = False
                if ok:
                    self._passed = max(self._passed, mine)
                self._cv.notify_all()  # on a failure a waiter runs its own lookup (and raises what it finds)


class FsspecSource(RangedSource):
    """An object on any fsspec filesystem, read in parallel ranged requests.

    Args:
        uri: ``protocol://path`` (``gs://bucket/key``, ``memory://dir/file``, ``simplecache::gs://...``).
        storage_options: the filesystem's options (credentials, endpoint, project...), as for ``fsspec.open``.
        filesystem: a ready ``fsspec.AbstractFileSystem`` to use instead of building one from the URI.
        concurrency: parallel range requests one large read is split into, and the most in flight (default 16;
            the load adapts within it: fsspec reads return whole ranges, so it never switches to one stream).
        part_size: reads larger than 1.5 × this are split into parts.
        retries, backoff, max_backoff: the retry policy for failures the filesystem did not retry itself.
        verify_version: check after every read that the object is still the version opened.

    Raises:
        InvalidURIError: an unknown protocol or a malformed URI.
        SourceError: no such object, a directory, no access, or the protocol's package is missing.
    """

    def __init__(
        self,
        uri: str,
        *,
        storage_options: Mapping[str, Any] | None = None,
        filesystem: Any = None,
        concurrency: int | None = None,
        part_size: int | None = None,
        retries: int = constants.REMOTE_RETRIES,
        backoff: float = 0.25,
        max_backoff: float = 10.0,
        verify_version: bool = True,
    ) -> None:
        policy = RetryPolicy(retries=retries, backoff=backoff, max_backoff=max_backoff)
        fs, path, protocol = resolve_filesystem(uri, storage_options, filesystem, SourceError)
        streams = supports_stream(fs, protocol)  # gcsfs: GETs with a streamed body (sources/gcs_stream.py)
        # ...but the load never switches to one open stream on its own: a store that serves one request at a time
        # (the GCS emulator) would hold a late read's GET, or a version lookup, behind the stream's unread body
        super().__init__(concurrency=concurrency, part_size=part_size, policy=policy, can_stream=False)
        self.uri = redact(uri)
        self.fs, self.path, self.protocol = fs, path, protocol
        self.verify_version = verify_version
        self._ranged_reads = 0  # cat_file calls so far
        self._streams = streams
        if streams:  # fewer, larger GETs: the GCS emulator pays per request (a connection, a copy of the range)
            self.preferred_chunk_bytes = GCS_CHUNK_BYTES
        self._confirmations = _Confirmations(self._check_version)
        t0 = time.monotonic()
        info = self._info()
        self.open_s = time.monotonic() - t0  # the first read's yardstick (sources/tuning.py, step 0)
        if info.get("type", "file") != "file":
            raise SourceError(f"{self.uri} is a {info.get('type')}, not an object")
        size = info.get("size")
        if not isinstance(size, int) or size < 0:
            raise SourceError(f"{self.uri}: the store reports no usable size ({size!r})")
        self.size = size
        self.version = _version(info)
        etag = info.get("etag") or info.get("ETag")
        self._pinned = pinned_reader(fs, path, protocol, etag if isinstance(etag, str) else None, self.uri)

    # --- reads -------------------------------------------------------------------------------------------

    def read_into_many(self, offset: int, bufs: Sequence[memoryview]) -> None:
        before = self._ranged_reads
        super().read_into_many(offset, bufs)
        # every request this read sent has completed: a lookup started from now on vouches for its bytes (GCS GETs,
        # the stream's bytes, cat_file; Azure's pinned reads need none, the service refuses a replaced blob)
        if self.verify_version and any(len(b) for b in bufs) and (self._streams or self._ranged_reads != before):
            span = _DEFERRED.get()
            if span is not None and span.source is self:
                span.pending = True  # confirmed once, when the span closes
            else:
                self._confirmations.confirm()

    @contextlib.contextmanager
    def deferred_checks(self) -> Iterator[None]:
        """Reads inside return without their version lookup; one lookup when the span closes without an error
        vouches for them all (see :meth:`Source.deferred_checks`).

        Raises (on closing):
            ObjectChangedError: the object was replaced or deleted while it was being read.
        """
        span = _Deferred(self)
        token = _DEFERRED.set(span)
        try:
            yield
        finally:
            _DEFERRED.reset(token)
        if span.pending:  # not reached after an error: the load fails with it anyway
            self._confirmations.confirm()

    def _open_body(self, first: int, last: int, budget: Budget) -> Body:
        """One GET with a streamed body (gcsfs only: ranged reads and the one sequential GET), pinned to the
        generation opened (GCS answers 404 once it is gone; for stores that ignore the pin, the read's bytes are
        vouched for by a version lookup after it, :meth:`read_into_many`)."""
        generation = self.version[1] if self.version and self.version[0] == "generation" else None
        return open_gcs_body(self.fs, self.path, generation, first, last, size=self.size, uri=self.uri,
                             timeout=constants.REMOTE_TIMEOUT_S)  # fmt: skip

    def _attempt(self, first: int, last: int, cursor: Cursor) -> None:
        if self._streams:  # GCS: ranged GETs on the same path as the stream, timed to their first byte
            super()._attempt(first, last, cursor)
            return
        if self._pinned is not None:  # Azure: the service refuses a replaced blob; no lookup after the read
            data = self._pinned(first, last)
            copy_into(cursor, memoryview(data)[: last + 1 - first])
            return
        self._ranged_reads += 1
        try:
            data = self.fs.cat_file(self.path, start=first, end=last + 1)
        except FileNotFoundError as exc:
            raise ObjectChangedError(f"{self.uri} was deleted while it was being read") from exc
        except BaseException as exc:
            raise self._classify(exc, f"reading bytes {first}-{last}") from exc
        view = memoryview(data)[: last + 1 - first]
        while len(view):  # scatter into the cursor's buffers
            dest = cursor.next_view(len(view))
            dest[:] = view[: len(dest)]
            cursor.advance(len(dest))
            view = view[len(dest) :]

    def _check_version(self) -> None:
        """Raise :class:`ObjectChangedError` when the object is no longer the size and version opened."""
        info = self._info(ObjectChangedError(f"{self.uri} was deleted while it was being read; reload it"))
        if info.get("size") != self.size or _version(info) != self.version:
            raise ObjectChangedError(f"{self.uri} changed while it was being read (new size or version); reload it")

    def _info(self, missing: SourceError | None = None) -> dict[str, Any]:
        """The object's ``info``, retried; ``missing`` (default: "no such object") when it does not exist."""

        def once(_budget: Budget) -> dict[str, Any]:  # one metadata call: the policy's deadline bounds the retries
            try:
                return self.fs.info(self.path)
            except FileNotFoundError as exc:
                raise missing or SourceError(f"{self.uri}: no such object") from exc
            except BaseException as exc:
                raise self._classify(exc, "looking up the object") from exc

        return self._retrying("looking up the object", once)

    def _classify(self, exc: BaseException, what: str) -> BaseException:
        """A :class:`TransientError` for failures worth retrying (connection, timeout), a SourceError otherwise."""
        if isinstance(exc, (KeyboardInterrupt, SystemExit, SourceError)):
            return exc
        if isinstance(exc, PermissionError):
            return SourceError(f"{self.uri}: access denied ({what}); check the credentials in storage_options")
        if isinstance(exc, (TimeoutError, ConnectionError)) or (
            isinstance(exc, OSError) and not isinstance(exc, (FileNotFoundError, IsADirectoryError))
        ):
            return TransientError(f"{what}: {_describe(exc)}")
        return SourceError(f"{self.uri}: {what} failed: {_describe(exc)}")

    def __repr__(self) -> str:
        return f"FsspecSource({self.uri!r}, size={self.size}, version={self.version})"


class FsspecSink(Sink):
    """One object written atomically to any fsspec filesystem (see the module docstring for the two ways).

    Args:
        uri: ``protocol://path``.
        storage_options: the filesystem's options (credentials...).
        filesystem: a ready ``fsspec.AbstractFileSystem``.
        block_size: the write file's buffer / upload chunk size (the protocol's default when None).

    Raises:
        InvalidURIError: an unknown protocol or a malformed URI.
        SinkError: the object cannot be created (no access, missing package).
    """

    def __init__(
        self,
        uri: str,
        *,
        storage_options: Mapping[str, Any] | None = None,
        filesystem: Any = None,
        block_size: int | None = None,
    ) -> None:
        self.uri = redact(uri)
        self.fs, self.path, self.protocol = resolve_filesystem(uri, storage_options, filesystem, SinkError)
        if not self.path or self.path.endswith("/"):
            raise InvalidURIError(f"no object name in {self.uri!r}")
        self.direct = self.protocol in DIRECT_UPLOAD_PROTOCOLS
        # a temporary sibling, moved into place on commit; direct uploads appear only when complete
        self._target = self.path if self.direct else f"{self.path}.{secrets.token_hex(6)}.tmp"
        extra = {"block_size": block_size} if block_size else {}
        try:
            self._file = self.fs.open(self._target, "wb", **extra)
        except BaseException as exc:
            raise _sink_error(exc, self.uri, "cannot create the object") from exc
        try:  # one pass when the temporary file can seek back (memory://, local-like stores)
            self.can_rewrite_head = not self.direct and bool(self._file.seekable())
        except (OSError, ValueError, AttributeError):
            self.can_rewrite_head = False
        self._state = "open"

    def write(self, data: memoryview | bytes) -> None:
        self._check_open()
        try:
            self._file.write(memoryview(data).cast("B"))
        except BaseException as exc:
            self.abort()
            raise _sink_error(exc, self.uri, "write failed") from exc

    def rewrite_head(self, data: bytes) -> None:
        self._check_open()
        if not self.can_rewrite_head:
            raise SinkError(f"{self.uri}: this upload cannot rewrite its head")
        try:
            end = self._file.tell()
            self._file.seek(0)
            self._file.write(data)
            self._file.seek(end)
        except BaseException as exc:
            self.abort()
            raise _sink_error(exc, self.uri, "rewriting the head failed") from exc

    def commit(self) -> None:
        self._check_open()
        try:
            self._file.close()  # a direct upload becomes the object here
            if not self.direct:
                self.fs.mv(self._target, self.path)
        except BaseException as exc:
            self.abort()
            raise _sink_error(exc, self.uri, "commit failed") from exc
        self._state = "committed"

    def abort(self) -> None:
        if self._state != "open":
            return
        self._state = "aborted"
        try:
            if self.direct:
                self._file.discard()  # cancels the resumable upload; nothing was published
            else:
                self._file.close()
        except Exception:  # abort must not raise; leftovers are the protocol's (unfinished uploads expire)
            pass
        finally:
            if self.direct:  # never close() it, nor let its finalizer: that would publish what was written so far
                self._file.closed = True
        if not self.direct:
            try:
                self.fs.rm(self._target)
            except Exception:
                pass

    def _check_open(self) -> None:
        if self._state != "open":
            raise SinkError(f"{self.uri}: sink already {self._state}")

    def __repr__(self) -> str:
        return f"FsspecSink({self.uri!r}, state={self._state})"


def _sink_error(exc: BaseException, uri: str, what: str) -> BaseException:
    if isinstance(exc, (KeyboardInterrupt, SystemExit, SinkError, UsageError)):
        return exc
    if isinstance(exc, PermissionError):
        return SinkError(f"{uri}: access denied ({what}); check the credentials in storage_options")
    return SinkError(f"{uri}: {what}: {_describe(exc)}")
