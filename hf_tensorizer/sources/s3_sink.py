"""Streaming multipart uploads to S3 (and S3-compatible stores) through boto3.

``write`` fills part buffers; full parts upload from a small thread pool with a bounded number in flight, so
memory stays under ``(concurrency + 2) × part_size``. The first part is held back until ``commit`` so that
``rewrite_head`` can patch the index at the front (S3 assembles parts by number, not by upload order). Small
objects go up as one ``put_object``. Every part carries its CRC32, as boto3 sends by default. Any failure aborts
the multipart upload: no object appears and no parts are left billed.
"""

from __future__ import annotations

import base64
import threading
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from .. import constants
from ..errors import InvalidURIError, SinkError, SourceError, TensorizerError, UsageError
from ..format.checksum import crc32
from .base import Sink
from .s3 import make_s3_client, parse_s3_uri, translate_error

__all__ = ["S3Sink"]

MIN_PART_SIZE = 5 * constants.MiB  # S3's minimum for every part but the last
MAX_PART_SIZE = 5 * constants.GiB
MAX_PARTS = 10_000
# A first write up to this size goes whole into part 1 (which may then exceed part_size), so that rewrite_head can
# patch an index larger than a part
MAX_HEAD_BYTES = 256 * constants.MiB
CHECKSUMS = ("crc32", "none")


class S3Sink(Sink):
    """A streaming multipart upload to ``s3://bucket/key``, committed atomically.

    Memory: at most ``(concurrency + 2) × part_size`` (the held first part, the part being filled and the parts
    in flight; defaults 8 × 8 MiB uploading, 80 MiB in all), or more by the size of a first write larger than a
    part (the serializer's index: it stays whole in the held-back first part). Objects that fit in one part are
    sent with one ``put_object``. After 1000 parts the part size doubles (every 1000 parts) so the 10,000-part
    limit is not reached before S3's 5 TiB object limit.

    Args:
        uri: ``s3://bucket/key``.
        part_size: bytes per part (≥ 5 MiB).
        concurrency: parts uploading at once.
        endpoint_url, region, profile, anonymous, addressing_style, retries, timeout: as for :class:`S3Source`.
        content_type: the object's Content-Type.
        extra_args: extra ``create_multipart_upload`` / ``put_object`` parameters (``ServerSideEncryption``,
            ``SSEKMSKeyId``, ``StorageClass``, ``Metadata``, ``ACL``...).
        client: a ready boto3 S3 client, e.g. the one :func:`~hf_tensorizer.sources.shared_transport` builds for a
            root: its connection pool is reused, and it is left open (its owner closes it).
        checksum: ``"crc32"`` sends each part's CRC32 (``ChecksumCRC32``; the upload is created with
            ``ChecksumAlgorithm="CRC32"``, so the object keeps a composite CRC32), as boto3's ``upload_file`` does
            by default: the store checks every part on receipt. ``"none"`` sends no checksum. Default
            ``HF_TENSORIZER_S3_UPLOAD_CHECKSUM``, else ``"none"`` where ``AWS_REQUEST_CHECKSUM_CALCULATION`` is
            ``when_required``, else ``"crc32"``.

    Raises:
        InvalidURIError: malformed URI or no key.
        UsageError: ``part_size`` below 5 MiB, ``concurrency`` below 1, an unknown ``checksum``, or checksum
            parameters in ``extra_args``.
    """

    can_rewrite_head = True
    copies_writes = True  # see Sink.copies_writes

    def __init__(
        self,
        uri: str,
        *,
        part_size: int = constants.S3_UPLOAD_PART_BYTES,
        concurrency: int = constants.S3_UPLOAD_CONCURRENCY,
        endpoint_url: str | None = None,
        region: str | None = None,
        profile: str | None = None,
        anonymous: bool = False,
        addressing_style: str | None = None,
        retries: int = constants.REMOTE_RETRIES,
        timeout: float = constants.REMOTE_TIMEOUT_S,
        content_type: str = "application/octet-stream",
        extra_args: Mapping[str, Any] | None = None,
        client: Any = None,
        checksum: str = constants.S3_UPLOAD_CHECKSUM,
    ) -> None:
        self.bucket, self.key = parse_s3_uri(uri)
        if not self.key or self.key.endswith("/"):
            raise InvalidURIError(f"no object key in {uri!r}; expected s3://bucket/key")
        self.uri = f"s3://{self.bucket}/{self.key}"
        if part_size < MIN_PART_SIZE or part_size > MAX_PART_SIZE:
            raise UsageError(f"part_size must be between 5 MiB and 5 GiB (S3 limits), got {part_size}")
        if concurrency < 1:
            raise UsageError(f"concurrency must be >= 1, got {concurrency}")
        if checksum not in CHECKSUMS:
            raise UsageError(
                f"checksum must be one of {CHECKSUMS} (HF_TENSORIZER_S3_UPLOAD_CHECKSUM), got {checksum!r}"
            )
        if any(k.startswith("Checksum") for k in extra_args or {}):
            raise UsageError(
                f"pass checksum= instead of extra_args {sorted(extra_args or {})}: each part needs its own"
            )
        self.checksum = checksum
        self._owns_client = client is None  # a client handed in (the root's, shared) belongs to the caller
        try:
            self._client = client or make_s3_client(
                endpoint_url=endpoint_url,
                region=region,
                profile=profile,
                anonymous=anonymous,
                addressing_style=addressing_style,
                max_pool_connections=concurrency + 2,
                retries=retries,
                timeout=timeout,
            )
        except SourceError as exc:
            raise SinkError(str(exc)) from exc
        self.part_size = part_size
        self.concurrency = concurrency
        self._extra = {"ContentType": content_type, **(extra_args or {})}
        self._first: bytearray | None = None  # part 1, held until commit so rewrite_head can patch it
        # The part being filled. From part 2 on a buffer of part_size, reused from part to part (fresh memory costs a
        # page fault per 4 KiB: ~0.1 s per 0.6 GB uploaded); part 1 grows as written, so a small object stays small
        self._buf: bytearray | None = None
        self._fill = 0  # bytes of _buf filled
        self._free: list[bytearray] = []  # uploaded parts' buffers, ready for reuse
        self._part_number = 1  # number of the part being filled
        self._written = 0
        self.upload_id: str | None = None
        self._etags: dict[int, str] = {}
        self._crcs: dict[int, str] = {}  # part number -> its CRC32 as S3 states it (base64, big-endian)
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(concurrency)
        self._futures: list[Future[None]] = []
        self._executor: ThreadPoolExecutor | None = None
        self._error: BaseException | None = None
        self._state = "open"

    # --- Sink API ----------------------------------------------------------------------------------------

    def write(self, data: memoryview | bytes) -> None:
        self._check_open()
        view = memoryview(data).cast("B")
        try:
            while len(view):
                if self._part_number == 1:  # held back until commit, never reused: grown as written
                    if self._buf is None:
                        self._buf = bytearray()
                    take = min(self.part_size - self._fill, len(view))
                    if not self._fill and len(view) <= MAX_HEAD_BYTES:
                        take = len(view)  # the first write (a serializer's index) lands whole in the held-back part
                    self._buf += view[:take]
                else:
                    if self._buf is None:
                        self._buf = self._new_buffer()
                    take = min(self.part_size - self._fill, len(view))
                    self._buf[self._fill : self._fill + take] = view[:take]
                self._fill += take
                view = view[take:]
                self._written += take
                if self._fill >= self.part_size:
                    self._seal()
        except BaseException as exc:
            self.abort()
            if isinstance(exc, TensorizerError):
                raise
            if isinstance(exc, Exception):
                raise SinkError(f"{self.uri}: upload failed: {exc}") from exc
            raise

    def rewrite_head(self, data: bytes) -> None:
        self._check_open()
        head, held = (self._first, len(self._first)) if self._first is not None else (self._buf, self._fill)
        if len(data) > held:
            self.abort()
            raise SinkError(
                f"{self.uri}: cannot rewrite {len(data)} head bytes; only the first part ({held} bytes) is held "
                "back (use a larger part_size)"
            )
        if data:
            assert head is not None
            head[: len(data)] = data

    def commit(self) -> None:
        self._check_open()
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            if self.upload_id is None:  # under two parts: the held first part and the rest in one PUT
                body = bytes(self._first or b"") + bytes(memoryview(self._buf or b"")[: self._fill])
                resp = self._client.put_object(
                    Bucket=self.bucket, Key=self.key, Body=body, **self._part_checksum(body), **self._extra
                )
            else:
                if self._fill:
                    last, self._buf = self._buf, None
                    assert last is not None
                    del last[self._fill :]  # the last part is shorter: trimmed in place
                    self._fill = 0
                    self._submit(self._part_number, last)
                assert self._first is not None
                self._submit(1, self._first)
                self._first = None
                self._wait_all()
                parts = [{"PartNumber": n, "ETag": self._etags[n], **self._crc_field(n)} for n in sorted(self._etags)]
                resp = self._client.complete_multipart_upload(
                    Bucket=self.bucket, Key=self.key, UploadId=self.upload_id, MultipartUpload={"Parts": parts}
                )
        except BaseException as exc:
            self.abort()
            if isinstance(exc, TensorizerError):
                raise
            if isinstance(exc, (BotoCoreError, ClientError)):
                raise translate_error(exc, self.uri, SinkError, client=self._client, bucket=self.bucket) from exc
            if isinstance(exc, Exception):
                raise SinkError(f"{self.uri}: commit failed: {exc}") from exc
            raise
        self._state = "committed"
        version = {"etag": resp.get("ETag"), "version_id": resp.get("VersionId")}
        # "null" is what an unversioned (or suspended) bucket reports: no version to pin
        self.committed_version = {k: v for k, v in version.items() if isinstance(v, str) and v and v != "null"} or None
        self._shutdown()
        self._release_client()

    def abort(self) -> None:
        if self._state != "open":
            return
        self._state = "aborted"
        # Let running part uploads finish first: aborting while a part is still uploading can leave that part
        # stored (and billed) after the abort.
        for fut in list(self._futures):
            fut.cancel()
        for fut in list(self._futures):
            if not fut.cancelled():
                fut.exception()
        self._shutdown()
        self._first = None
        self._buf, self._fill = None, 0
        self._free.clear()
        if self.upload_id is not None:
            try:
                self._client.abort_multipart_upload(Bucket=self.bucket, Key=self.key, UploadId=self.upload_id)
            except Exception:  # abort must not raise; a bucket lifecycle rule is the backstop
                pass
        self._release_client()

    # --- internals ---------------------------------------------------------------------------------------

    def _release_client(self) -> None:
        """Close the client's connections when this sink made it; a passed-in client stays open for its owner."""
        if self._owns_client:
            self._client.close()

    def _check_open(self) -> None:
        if self._state != "open":
            raise SinkError(f"{self.uri}: sink already {self._state}")

    def _seal(self) -> None:
        """The current buffer is a full part: hold it (part 1) or upload it."""
        buf, self._buf, self._fill = self._buf, None, 0
        assert buf is not None
        number = self._part_number
        self._part_number += 1
        if number % 1000 == 0:  # keep far below the 10,000-part limit for very large objects
            self.part_size = min(self.part_size * 2, MAX_PART_SIZE)
        if number == 1:
            self._first = buf
            return
        if self.upload_id is None:
            from botocore.exceptions import BotoCoreError, ClientError

            try:
                algorithm = {"ChecksumAlgorithm": "CRC32"} if self.checksum == "crc32" else {}
                resp = self._client.create_multipart_upload(
                    Bucket=self.bucket, Key=self.key, **algorithm, **self._extra
                )
            except (BotoCoreError, ClientError) as exc:
                raise translate_error(exc, self.uri, SinkError, client=self._client, bucket=self.bucket) from exc
            self.upload_id = resp["UploadId"]
        self._submit(number, buf)

    def _submit(self, number: int, buf: bytearray) -> None:
        if number > MAX_PARTS:
            raise SinkError(f"{self.uri}: more than {MAX_PARTS} parts; use a larger part_size")
        self._raise_background_error()
        self._slots.acquire()  # backpressure: at most `concurrency` parts in memory in flight
        self._raise_background_error_and_release()
        if self._executor is None:
            self._executor = ThreadPoolExecutor(self.concurrency, thread_name_prefix="hf-tensorizer-s3-upload")
        try:
            fut = self._executor.submit(self._upload_part, number, buf)
        except BaseException:
            self._slots.release()
            raise
        fut.add_done_callback(self._part_done)
        self._futures.append(fut)

    def _part_checksum(self, body: bytes | bytearray) -> dict[str, str]:
        """The checksum parameter of a part (or a single PUT) of ``body``: the store recomputes it on receipt and
        refuses a part whose bytes changed on the way."""
        if self.checksum == "none":
            return {}
        # crc32 releases the GIL: the upload threads checksum their parts in parallel, 4.7 GB/s a core with ISA-L
        crc = base64.b64encode((crc32(body) & 0xFFFFFFFF).to_bytes(4, "big")).decode("ascii")
        return {"ChecksumAlgorithm": "CRC32", "ChecksumCRC32": crc}  # the value given, botocore computes none

    def _crc_field(self, number: int) -> dict[str, str]:
        return {"ChecksumCRC32": self._crcs[number]} if number in self._crcs else {}

    def _new_buffer(self) -> bytearray:
        """A part buffer: an uploaded part's, or a new one (at most ``concurrency + 1`` exist: the one filling and
        those in flight)."""
        with self._lock:
            while self._free:
                buf = self._free.pop()
                if len(buf) == self.part_size:  # not one from before the part size doubled
                    return buf
        return bytearray(self.part_size)

    def _upload_part(self, number: int, buf: bytearray) -> None:
        checksum = self._part_checksum(buf)
        resp = self._client.upload_part(
            Bucket=self.bucket, Key=self.key, UploadId=self.upload_id, PartNumber=number, Body=buf, **checksum
        )
        with self._lock:
            self._etags[number] = resp["ETag"]
            if checksum:
                self._crcs[number] = checksum["ChecksumCRC32"]
            if number != 1 and len(buf) == self.part_size and self._state == "open":
                self._free.append(buf)  # botocore is done with it (retries happen inside upload_part)

    def _part_done(self, fut: Future[None]) -> None:
        self._slots.release()
        if not fut.cancelled() and fut.exception() is not None:
            with self._lock:
                if self._error is None:
                    self._error = fut.exception()

    def _raise_background_error(self) -> None:
        with self._lock:
            error = self._error
        if error is not None:
            from botocore.exceptions import BotoCoreError, ClientError

            if isinstance(error, (BotoCoreError, ClientError)):
                raise translate_error(error, self.uri, SinkError, client=self._client, bucket=self.bucket) from error
            raise SinkError(f"{self.uri}: uploading a part failed: {error}") from error

    def _raise_background_error_and_release(self) -> None:
        try:
            self._raise_background_error()
        except BaseException:
            self._slots.release()
            raise

    def _wait_all(self) -> None:
        for fut in self._futures:
            fut.exception()
        self._raise_background_error()

    def _shutdown(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        self._futures = []

    def __repr__(self) -> str:
        return f"S3Sink({self.uri!r}, state={self._state})"
