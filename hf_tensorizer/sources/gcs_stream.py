"""One streamed GET of a Google Cloud Storage object through gcsfs's own session and credentials: the body that
:class:`~hf_tensorizer.sources.fsspec.FsspecSource` needs to read a ``gs://`` load as one sequential GET (see
:mod:`.tuning`). ``cat_file`` returns whole ranges, so without this a GCS load could only ever send ranged GETs;
on a store that pays per request for the whole object (the GCS emulator reads the object's file for every GET)
ranges are then several times slower than the one GET gcsfs's own ``cat_file`` sends.

The request is gcsfs's media download URL pinned to the generation opened (``&generation=``: GCS answers 404 once
that generation is gone, so a replaced object fails instead of mixing), with gcsfs's auth headers, on gcsfs's
aiohttp session and event loop. The body is checked like a ranged response (``Content-Range``, size, the
``x-goog-generation`` header when sent); the body is read in slices of up to :data:`SLICE` bytes per hop onto
the event loop, so the hops cost nothing next to the bytes.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

from ..errors import ObjectChangedError, SourceError
from .wire import Body, TransientError

__all__ = ["READ_BUFSIZE", "SLICE", "open_gcs_body", "supports_stream"]

SLICE = 4 << 20  # bytes gathered per hop onto fsspec's event loop
# aiohttp's per-response buffer (its default, 64 KiB, pauses the socket every 128 KiB: a 258 MB body then took
# thousands of event-loop turns, 12 % of a load against the GCS emulator); it holds at most twice this per connection
READ_BUFSIZE = 1 << 20
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


def supports_stream(fs: Any, protocol: str) -> bool:
    """Whether ``fs`` is a gcsfs filesystem whose session this module can drive."""
    return protocol in ("gs", "gcs") and all(
        hasattr(fs, a) for a in ("url", "_get_headers", "_set_session", "loop", "requests_timeout")
    )


def open_gcs_body(fs: Any, path: str, generation: Any, first: int, last: int, *, size: int, uri: str,
                  timeout: float) -> Body:  # fmt: skip
    """Send one GET for bytes ``first..last`` of ``path`` pinned to ``generation`` and return its checked body;
    ``timeout`` bounds the answer and each slice of the body (a stalled server is retried, as for HTTP).

    Raises:
        TransientError: a connection failure, a timeout, 429 or 5xx (worth a retry).
        ObjectChangedError: the generation is gone (404 on a pinned read), or the response is another size or
            generation.
        SourceError: any other refusal (401/403...), or a response for other bytes.
    """
    from fsspec.asyn import sync

    url = fs.url(path, generation=generation)

    async def start() -> Any:
        await fs._set_session()
        return await fs.session.get(
            url,
            headers=fs._get_headers({"Range": f"bytes={first}-{last}"}),
            timeout=fs.requests_timeout,
            read_bufsize=READ_BUFSIZE,
        )

    try:
        resp = sync(fs.loop, start, timeout=timeout)
    except (OSError, asyncio.TimeoutError) as exc:
        raise TransientError(f"GET bytes={first}-{last}: {type(exc).__name__}: {exc}") from exc
    except Exception as exc:  # aiohttp.ClientError and friends: the connection, not the object
        if type(exc).__module__.startswith("aiohttp"):
            raise TransientError(f"GET bytes={first}-{last}: {type(exc).__name__}: {exc}") from exc
        raise

    def close(ok: bool) -> None:
        async def done() -> None:
            if ok:
                resp.release()
            else:
                resp.close()

        try:
            sync(fs.loop, done, timeout=timeout)
        except Exception:  # closing a broken response must not hide the error that broke it
            pass

    try:
        _check(resp, first, last, size, generation, uri)
    except BaseException:
        close(False)
        raise
    expected = last - first + 1

    async def gather(n: int) -> list[bytes]:
        parts: list[bytes] = []
        got = 0
        while got < n:
            data = await resp.content.read(n - got)
            if not data:
                break
            parts.append(data)
            got += len(data)
        return parts

    def read(view: memoryview, _first_read: bool) -> int:
        try:
            parts = sync(fs.loop, gather, min(len(view), SLICE), timeout=timeout)
        except (OSError, asyncio.TimeoutError) as exc:
            raise TransientError(f"GET bytes={first}-{last}: {type(exc).__name__}: {exc}") from exc
        except Exception as exc:
            if type(exc).__module__.startswith("aiohttp"):
                raise TransientError(f"GET bytes={first}-{last}: {type(exc).__name__}: {exc}") from exc
            raise
        at = 0
        for data in parts:
            view[at : at + len(data)] = data
            at += len(data)
        return at

    return Body(expected, read, close)


def _check(resp: Any, first: int, last: int, size: int, generation: Any, uri: str) -> None:
    status = resp.status
    if status == 404 and generation is not None:
        raise ObjectChangedError(f"{uri} was replaced or deleted while it was being read; reload it")
    if status == 429 or status >= 500:
        raise TransientError(f"HTTP {status} to GET bytes={first}-{last}")
    if status not in (200, 206):
        raise SourceError(f"{uri}: HTTP {status} to GET bytes={first}-{last}")
    got_gen = resp.headers.get("x-goog-generation")
    if generation is not None and got_gen is not None and str(got_gen) != str(generation):
        raise ObjectChangedError(f"{uri} changed while it was being read (generation {got_gen}); reload it")
    if status == 200:
        length = resp.headers.get("Content-Length")
        if first != 0 or last != size - 1 or length is None or int(length) != size:
            raise SourceError(f"{uri}: the server ignored the Range header (HTTP 200 to bytes={first}-{last})")
        return
    match = _CONTENT_RANGE.fullmatch((resp.headers.get("Content-Range") or "").strip())
    if match is None:
        raise SourceError(f"{uri}: a 206 without a usable Content-Range")
    got_first, got_last, total = int(match.group(1)), int(match.group(2)), match.group(3)
    if total != "*" and int(total) != size:
        raise ObjectChangedError(f"{uri} changed while it was being read (size {size} became {total}); reload it")
    if got_first != first or got_last != last:
        raise SourceError(f"{uri}: asked for bytes {first}-{last}, the server sent {got_first}-{got_last}")
