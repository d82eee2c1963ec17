"""URIs and local paths: which transport a location uses, how to join, show and compare them.

Every location is a local path or a URI with one of the schemes below; these helpers are the one place that
knows their syntax (the Hub's ``hf://org/repo[@revision]/path`` details live in :mod:`.hub_repo`).
"""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import unquote, urlparse

from ..errors import InvalidURIError

REMOTE_SCHEMES = ("http", "https", "s3", "hf")
SCHEMES = ("file", *REMOTE_SCHEMES)


def scheme_of(uri: str | os.PathLike[str]) -> str:
    """``"file"``, ``"http"``, ``"https"``, ``"s3"`` or ``"hf"``.

    Raises:
        InvalidURIError: an unknown scheme (``ftp://...``) or a malformed URI.
    """
    text = os.fspath(uri)
    if "://" not in text:
        return "file"
    scheme = text.split("://", 1)[0].lower()
    if scheme in SCHEMES:
        return scheme
    raise InvalidURIError(f"unsupported URI scheme {scheme!r} in {redact(text)!r}")


def looks_like_uri(value: Any) -> bool:
    """True when ``value`` is a string with one of the schemes we read (``file``, ``s3``, ``http(s)``, ``hf``)."""
    if not isinstance(value, (str, os.PathLike)):
        return False
    text = os.fspath(value)
    return "://" in text and text.split("://", 1)[0].lower() in SCHEMES


def is_remote(uri: str | os.PathLike[str]) -> bool:
    """True for ``http(s)://``, ``s3://`` and ``hf://`` URIs."""
    return scheme_of(uri) != "file"


def local_path(uri: str | os.PathLike[str]) -> str:
    """The filesystem path of a local path or ``file://`` URI.

    Raises:
        InvalidURIError: a ``file://`` URI naming another host.
    """
    text = os.fspath(uri)
    if text.startswith("file://"):
        parsed = urlparse(text)
        if parsed.netloc not in ("", "localhost"):
            raise InvalidURIError(f"file URI with a remote host is not supported: {text!r}")
        return unquote(parsed.path)
    return text


def join(base: str | os.PathLike[str], *parts: str) -> str:
    """Join path parts onto a local path or a URI (``/`` separated, no double slashes)."""
    text = os.fspath(base)
    parts = tuple(p.strip("/") for p in parts if p and p.strip("/"))
    if not parts:
        return text
    if "://" not in text:
        return os.path.join(text, *parts)
    return text.rstrip("/") + "/" + "/".join(parts)


def parent(uri: str | os.PathLike[str]) -> str:
    """The folder (or URI prefix) holding ``uri``."""
    text = os.fspath(uri)
    return os.path.dirname(text) if scheme_of(text) == "file" else text.rsplit("/", 1)[0]


def redact(uri: str) -> str:
    """``uri`` without user info or query string, for messages and logs."""
    if "://" not in uri:
        return uri
    p = urlparse(uri)
    host = p.hostname or ""
    if p.port:
        host += f":{p.port}"
    return f"{p.scheme}://{host}{p.path}"
