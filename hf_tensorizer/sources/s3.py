"""S3 (and S3-compatible) sources through boto3, and the client both directions share.

Reading: one HEAD pins the object (size, ETag, VersionId); every range is a GET with ``Range``, ``If-Match``
and, on versioned buckets, ``versionId``, streamed straight into the caller's buffers. By default the GETs go
through a presigned URL on the shared HTTP pools (:mod:`.s3_presigned`: boto3 signs, our HTTP path sends,
~5× less CPU per request); when that cannot serve the object, or with ``HF_TENSORIZER_S3_PRESIGNED=0``, each
range is a boto3 ``get_object``, whose request phase botocore retries (5xx, throttling, connection errors).
A body that breaks mid-stream (dropped connection, read timeout) is retried by :class:`RangedSource`, resuming
at the first byte not yet received.

Writing is :mod:`.s3_sink` (streaming multipart uploads), with the client and errors made here.

Credentials come from boto3's chain (env vars, shared config and profiles, session tokens, SSO, container and
instance roles); ``anonymous=True`` sends unsigned requests for public buckets. Errors and messages never include
credentials.
"""

from __future__ import annotations

import http.client
import logging
import re
import threading
import time
from collections.abc import Callable
from typing import Any

from .. import constants
from ..errors import (
    InvalidURIError,
    ObjectChangedError,
    SourceError,
    TensorizerError,
    UsageError,
)
from .ranged import Body, Budget, RangedSource, RetryPolicy, TransientError, describe_error, readinto1
from .s3_presigned import Fallback, PresignedReader, check_range_response, usable

logger = logging.getLogger(__name__)

__all__ = ["S3Source", "make_s3_client", "parse_s3_uri", "shared_client", "translate_error"]

_SLICE = 1 << 20  # slow path (no http.client response underneath): bounds what a failure makes us fetch twice
_BUCKET_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,254}")  # permissive: legacy and S3-compatible names
_NO_CREDENTIALS = (
    "no AWS credentials found; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN), select a "
    "profile with AWS_PROFILE, run on an instance or container with a role, or send unsigned requests to a public "
    "bucket (anonymous=True; --anonymous in the CLI)"
)


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/key`` → ``(bucket, key)``; the key is taken literally (no percent-decoding), may be empty.

    Raises:
        InvalidURIError: not an ``s3://`` URI, or a missing or malformed bucket name.
    """
    if not isinstance(uri, str) or uri[:5].lower() != "s3://":
        raise InvalidURIError(f"not an s3:// URI: {uri!r}")
    bucket, _, key = uri[5:].partition("/")
    if not bucket:
        raise InvalidURIError(f"no bucket in {uri!r}; expected s3://bucket/key")
    if not _BUCKET_RE.fullmatch(bucket):
        raise InvalidURIError(f"malformed bucket name {bucket!r} in s3:// URI")
    return bucket, key


# The S3Source / S3Sink options that configure the client itself (the rest are per object).
CLIENT_OPTIONS = ("endpoint_url", "region", "profile", "anonymous", "addressing_style", "retries", "timeout")


def shared_client(options: dict[str, Any]) -> Any:
    """One ready client built from transport ``options``, for opening many objects with the same settings: a
    boto3 client costs ~0.1 s of CPU to build, which each of dozens of small files would pay again. The caller
    closes it once the sources using it are closed.

    Raises:
        SourceError / UsageError: as :func:`make_s3_client`.
    """
    settings = {k: options[k] for k in CLIENT_OPTIONS if k in options}
    pool = max(constants.REMOTE_CONCURRENCY, int(options.get("concurrency", 0))) * 2
    return make_s3_client(max_pool_connections=pool, **settings)


def make_s3_client(
    *,
    endpoint_url: str | None = None,
    region: str | None = None,
    profile: str | None = None,
    anonymous: bool = False,
    addressing_style: str | None = None,
    max_pool_connections: int = constants.REMOTE_CONCURRENCY,
    retries: int = constants.REMOTE_RETRIES,
    timeout: float = constants.REMOTE_TIMEOUT_S,
) -> Any:
    """A thread-safe boto3 S3 client configured for large parallel transfers.

    Args:
        endpoint_url: an S3-compatible endpoint; default: ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` (read by
            botocore itself) or AWS.
        region: the region; default from the environment or profile.
        profile: a named profile of the shared config files.
        anonymous: send unsigned requests (public buckets); no credentials are looked up.
        addressing_style: ``"path"``, ``"virtual"`` or ``"auto"`` (botocore's default).
        max_pool_connections: keep-alive connections (should be ≥ the number of concurrent requests).
        retries: botocore retry attempts (standard mode) for the request phase.
        timeout: connect and read timeout in seconds.

    Raises:
        UsageError: an unknown addressing style.
        SourceError: the profile does not exist or boto3 is not installed.
    """
    try:
        import boto3  # noqa: F401 - fail early with the install hint
        from botocore import UNSIGNED
        from botocore.config import Config
        from botocore.exceptions import ProfileNotFound
    except ImportError as exc:  # pragma: no cover - boto3 is an optional extra
        raise SourceError("s3:// needs boto3: pip install 'hf_tensorizer[s3]'") from exc
    if addressing_style not in (None, "auto", "path", "virtual"):
        raise UsageError(f"addressing_style must be 'path', 'virtual' or 'auto', got {addressing_style!r}")
    options: dict[str, Any] = {
        "max_pool_connections": max(10, max_pool_connections),
        "retries": {"max_attempts": max(1, retries), "mode": "standard"},
        "connect_timeout": timeout,
        "read_timeout": timeout,
        "tcp_keepalive": True,
        # Checksums of our own protect the data; "when_required" keeps S3-compatible stores that predate the
        # 2025 default integrity headers working, and keeps ranged bodies unwrapped for zero-copy reads.
        "request_checksum_calculation": "when_required",
        "response_checksum_validation": "when_required",
        "user_agent_extra": "hf_tensorizer",
    }
    # SigV4 everywhere: botocore would presign with the legacy SigV2 query auth in some setups, which buckets made
    # since 2020 refuse (the presigned reads would then fall back to get_object for nothing).
    options["signature_version"] = UNSIGNED if anonymous else "s3v4"
    if addressing_style:
        options["s3"] = {"addressing_style": addressing_style}
    try:
        session = _boto3_session(profile)
        return session.client("s3", endpoint_url=endpoint_url or None, region_name=region, config=Config(**options))
    except ProfileNotFound as exc:
        raise SourceError(f"AWS profile {profile!r} not found in the shared config files") from exc


_LOADER: list[Any] = []  # the process-wide botocore data loader (service models), made on first use
_HOOKS: list[Any] = []  # botocore's built-in event handlers, registered once (the template every session copies)
_LOADER_LOCK = threading.Lock()


def _builtin_hooks() -> Any:
    """An event emitter holding botocore's built-in handlers, registered as ``botocore.session.Session`` registers
    them (through the aliasing layer, first/last where marked): ~130 registrations, ~8 ms of CPU that every new
    session would pay again; a copy of the result costs ~1 ms."""
    from botocore import handlers
    from botocore.hooks import EventAliaser, HierarchicalEmitter

    template = HierarchicalEmitter()
    events = EventAliaser(template)
    for spec in handlers.BUILTIN_HANDLERS:
        event_name, handler = spec[0], spec[1]
        if len(spec) == 2:
            events.register(event_name, handler)
        elif spec[2] is handlers.REGISTER_FIRST:
            events.register_first(event_name, handler)
        elif spec[2] is handlers.REGISTER_LAST:
            events.register_last(event_name, handler)
    return template


def _boto3_session(profile: str | None) -> Any:
    """A new boto3 session (credentials, config and initializers resolved afresh) whose botocore session shares
    what never changes within a process: the data loader (parsing botocore's S3 model and endpoint data costs
    ~0.15 s of CPU, paid by the first client of a process only) and a copy of the built-in event handlers
    (:func:`_builtin_hooks`). A client then takes ~10 ms instead of ~16."""
    import copy

    import boto3
    import botocore.loaders
    import botocore.session

    with _LOADER_LOCK:
        if not _LOADER:
            _LOADER.append(botocore.loaders.create_loader())
            _HOOKS.append(_builtin_hooks())
        loader = _LOADER[0]
        core = botocore.session.Session(event_hooks=copy.copy(_HOOKS[0]), include_builtin_handlers=False)
        core.register_component("data_loader", loader)
        session = boto3.session.Session(profile_name=profile, botocore_session=core)
        loader.search_paths[:] = list(dict.fromkeys(loader.search_paths))  # boto3 appends its data path each time
    return session


def _error_code(exc: BaseException) -> tuple[str, int]:
    response = getattr(exc, "response", None) or {}
    code = str(response.get("Error", {}).get("Code", ""))
    status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    return code, status


def translate_error(
    exc: BaseException, uri: str, cls: type[TensorizerError], *, client: Any = None, bucket: str | None = None
) -> TensorizerError:
    """A clear error for a botocore exception; never includes credentials."""
    from botocore.exceptions import (
        ClientError,
        EndpointConnectionError,
        NoCredentialsError,
        PartialCredentialsError,
    )

    if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
        return cls(f"{uri}: {_NO_CREDENTIALS}")
    if isinstance(exc, EndpointConnectionError):
        return cls(f"{uri}: cannot reach the S3 endpoint ({exc})")
    if not isinstance(exc, ClientError):
        return cls(f"{uri}: S3 request failed: {type(exc).__name__}: {exc}")
    code, status = _error_code(exc)
    if code in ("PreconditionFailed",) or status == 412:
        return ObjectChangedError(f"{uri} changed while it was being read (ETag no longer matches); reload it")
    if code == "InvalidRange" or status == 416:
        return ObjectChangedError(f"{uri} is now shorter than when it was opened; reload it")
    if code == "NoSuchBucket":
        return cls(f"{uri}: bucket {bucket!r} does not exist")
    if code in ("NoSuchKey", "NotFound", "404") or status == 404:
        if client is not None and bucket is not None and _bucket_missing(client, bucket):
            return cls(f"{uri}: bucket {bucket!r} does not exist")
        return cls(f"{uri}: no such object")
    if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken", "TokenRefreshRequired"):
        return cls(f"{uri}: the AWS credentials were rejected ({code}); check the access key, secret and session token")
    if code in ("AccessDenied", "Forbidden", "403", "AllAccessDisabled") or status == 403:
        return cls(
            f"{uri}: access denied; check the credentials and the bucket policy "
            "(a public bucket: anonymous=True; --anonymous in the CLI)"
        )
    return cls(f"{uri}: S3 error {code or status}: {exc.response.get('Error', {}).get('Message', '')}".rstrip(": "))


def _bucket_missing(client: Any, bucket: str) -> bool:
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        client.head_bucket(Bucket=bucket)
    except ClientError as exc:
        code, status = _error_code(exc)
        return code in ("NoSuchBucket", "404", "NotFound") or status == 404
    except BotoCoreError:
        return False
    return False


def _body_reader(body: Any) -> tuple[Callable[[memoryview, bool], int], Callable[[bool], None]]:
    """``(readinto(view, first), finish(ok))`` for a botocore StreamingBody.

    botocore never decodes bodies (whatever the object's Content-Encoding), so the bytes under urllib3 are the
    object's bytes. The fast path reads from the ``http.client`` response straight into the caller's buffer, one socket
    read at a time (:func:`~.ranged.readinto1`: exact progress for resumption; urllib3's own ``readinto`` reads into a
    new ``bytes`` and copies). ``finish(True)`` returns a fully read connection to botocore's pool, ``finish(False)``
    drops it.
    """
    raw = getattr(body, "_raw_stream", None)
    fp = getattr(raw, "_fp", None)
    if isinstance(fp, http.client.HTTPResponse) and hasattr(raw, "release_conn"):

        def finish(ok: bool) -> None:
            if ok and fp.isclosed():
                raw.release_conn()
            else:
                raw.close()

        return lambda view, first: readinto1(fp, view, first), finish

    def finish_slow(ok: bool) -> None:
        body.close()

    return lambda view, first: body.readinto(view[:_SLICE]), finish_slow


class S3Source(RangedSource):
    """An S3 object read with ranged ``get_object`` calls, pinned by ETag (and VersionId).

    Args:
        uri: ``s3://bucket/key``.
        endpoint_url: an S3-compatible endpoint (MinIO, R2, Ceph, moto...); default from ``AWS_ENDPOINT_URL_S3`` /
            ``AWS_ENDPOINT_URL`` or AWS.
        region: AWS region.
        profile: shared-config profile name.
        anonymous: unsigned requests, for public buckets.
        addressing_style: ``"path"``, ``"virtual"`` or ``"auto"``.
        version_id: read this version instead of the latest.
        concurrency: the most range requests in flight, and keep-alive connections (default 16; the load adapts
            within it, see docs/remote.md "Adaptive transfers"); given, it holds the transfer as set.
        part_size: reads larger than 1.5 × this are split into concurrent ranged GETs (default 16 MiB).
        retries: consecutive failed attempts per range (and botocore's request-phase attempts).
        backoff: first retry delay in seconds for broken bodies (doubles, jittered).
        max_backoff: cap of one retry delay.
        timeout: connect and read timeout in seconds.
        deadline: seconds each read call may take in all (body retries and waits included); 0: none.
        min_rate: bytes per second a response body must keep up over ``rate_window`` seconds; 0: no minimum.
        rate_window: seconds over which ``min_rate`` is measured.
        client: a ready boto3 S3 client (the options above that configure one are then ignored).

    Raises:
        InvalidURIError: malformed URI or no key.
        SourceError: no credentials, no such bucket or key, access denied, endpoint unreachable.
    """

    def __init__(
        self,
        uri: str,
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        profile: str | None = None,
        anonymous: bool = False,
        addressing_style: str | None = None,
        version_id: str | None = None,
        concurrency: int | None = None,
        part_size: int | None = None,
        retries: int = constants.REMOTE_RETRIES,
        backoff: float = 0.25,
        max_backoff: float = 10.0,
        timeout: float = constants.REMOTE_TIMEOUT_S,
        deadline: float = constants.REMOTE_DEADLINE_S,
        min_rate: float = constants.REMOTE_MIN_RATE,
        rate_window: float = constants.REMOTE_RATE_WINDOW_S,
        client: Any = None,
    ) -> None:
        super().__init__(
            concurrency=concurrency,
            part_size=part_size,
            policy=RetryPolicy(
                retries=retries,
                backoff=backoff,
                max_backoff=max_backoff,
                deadline=deadline,
                min_rate=min_rate,
                rate_window=rate_window,
            ),
        )
        self.bucket, self.key = parse_s3_uri(uri)
        if not self.key:
            raise InvalidURIError(f"no key in {uri!r}; expected s3://bucket/key")
        self.uri = f"s3://{self.bucket}/{self.key}"
        self._owns_client = client is None  # a client handed in belongs to the caller (shared by many sources)
        self._client = client or make_s3_client(
            endpoint_url=endpoint_url,
            region=region,
            profile=profile,
            anonymous=anonymous,
            addressing_style=addressing_style,
            max_pool_connections=self.concurrency * 2,
            retries=retries,
            timeout=timeout,
        )
        from botocore.exceptions import BotoCoreError, ClientError

        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Key": self.key}
        if version_id:
            kwargs["VersionId"] = version_id
        try:
            t0 = time.monotonic()
            head = self._client.head_object(**kwargs)
            self.open_s = time.monotonic() - t0
        except (BotoCoreError, ClientError) as exc:
            error = translate_error(exc, self.uri, SourceError, client=self._client, bucket=self.bucket)
            self.close()
            raise error from exc
        self.size = int(head["ContentLength"])
        self.etag: str | None = head.get("ETag")
        vid = head.get("VersionId")
        self.version_id: str | None = vid if vid and vid != "null" else None
        self._presigned: PresignedReader | None = None
        if constants.S3_PRESIGNED and usable(self._client, self._client.meta.endpoint_url):
            params = {"Bucket": self.bucket, "Key": self.key}
            if self.version_id:
                params["VersionId"] = self.version_id
            try:
                self._presigned = PresignedReader(self._client, params, uri=self.uri, size=self.size, etag=self.etag,
                                                  concurrency=self.concurrency, timeout=timeout)  # fmt: skip
            except Fallback as exc:
                logger.debug("%s: ranged reads through boto3 (%s)", self.uri, exc)

    @property
    def transport(self) -> str:
        """How ranges are read now: ``"presigned"`` (presigned URLs on the shared HTTP pools) or ``"boto3"``."""
        return "presigned" if self._presigned is not None else "boto3"

    def close(self) -> None:
        """Stop the range reads' executor and, when this source made its client, close the client's connections."""
        super().close()
        reader, self._presigned = getattr(self, "_presigned", None), None
        if reader is not None:
            reader.close()
        if self._owns_client:
            self._client.close()

    def _open_body(self, first: int, last: int, budget: Budget) -> Body:
        reader = self._presigned
        if reader is not None:
            try:
                return reader.open(first, last, budget)
            except Fallback as exc:  # nothing was written: this request goes through boto3, and every later one
                logger.debug("%s: presigned GETs refused (%s); ranged reads through boto3", self.uri, exc)
                self._presigned = None
                reader.close()
        from botocore.exceptions import BotoCoreError, ClientError

        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Key": self.key, "Range": f"bytes={first}-{last}"}
        if self.etag:
            kwargs["IfMatch"] = self.etag
        if self.version_id:
            kwargs["VersionId"] = self.version_id
        try:
            resp = self._client.get_object(**kwargs)
        except ClientError as exc:
            code, status = _error_code(exc)
            if code in ("SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout") or status >= 500:
                raise TransientError(f"get_object: {code or status}") from exc
            if code in ("NoSuchKey", "NotFound", "404") or status == 404:
                raise ObjectChangedError(f"{self.uri} was deleted while it was being read") from exc
            raise translate_error(exc, self.uri, SourceError) from exc
        except BotoCoreError as exc:  # connection errors botocore already retried: count them as ours too
            raise TransientError(f"get_object: {exc}") from exc
        readinto, finish = _body_reader(resp["Body"])
        try:
            expected = check_range_response(self.uri, self.etag, self.size, resp.get("ETag"), resp.get("ContentRange"),
                                            first, last)  # fmt: skip
        except BaseException:
            finish(False)
            raise

        def read(view: memoryview, first_read: bool) -> int:
            try:
                return readinto(view, first_read)
            except TensorizerError:
                raise
            except (OSError, http.client.HTTPException, BotoCoreError) as exc:
                raise TransientError(f"reading bytes {first}-{last}: {describe_error(exc)}") from exc

        return Body(expected, read, finish)

    def __repr__(self) -> str:
        return f"S3Source({self.uri!r}, size={self.size})"
