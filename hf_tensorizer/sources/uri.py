"""URIs and local paths: which transport a location uses, how to join, show and compare them.

Every location is a local path or a URI with one of the schemes below, or with any other protocol fsspec knows
(``gs://``, ``az://``, ``abfs://``, ``memory://``, chained ``simplecache::gs://``...: :mod:`.fsspec`); these
helpers are the one place that knows their syntax (the Hub's ``hf://org/repo[@revision]/path`` details live in
:mod:`.hub_repo`).
"""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import unquote, urlparse

from ..errors import InvalidURIError

REMOTE_SCHEMES = ("http", "https", "s3", "hf")
SCHEMES = ("file", *REMOTE_SCHEMES)  # our own transports; any other fsspec protocol goes through fsspec


def is_fsspec_protocol(scheme: str) -> bool:
    """True when fsspec knows ``scheme`` (built in, registered, or from an installed package's entry point).

    fsspec is imported only here, for a scheme that is not one of ours.
    """
    try:
        from fsspec.registry import known_implementations, registry
    except ImportError:  # pragma: no cover - fsspec comes with huggingface_hub
        return False
    return scheme in known_implementations or scheme in registry


def _raw_scheme(text: str) -> str:
    """The first protocol of a URI: ``gs`` for ``gs://b/k``, ``simplecache`` for ``simplecache::gs://b/k``."""
    return text.split("://", 1)[0].split("::", 1)[0].lower()


def scheme_of(uri: str | os.PathLike[str]) -> str:
    """``"file"``, ``"http"``, ``"https"``, ``"s3"``, ``"hf"``, or another protocol fsspec knows (``"gs"``...).

    Raises:
        InvalidURIError: an unknown scheme (``nope://...``) or a malformed URI.
    """
    text = os.fspath(uri)
    if "://" not in text:
        return "file"
    scheme = _raw_scheme(text)
    chained = "::" in text.split("://", 1)[0]  # fsspec's chaining: a wrapper protocol first
    if scheme in SCHEMES and not chained:
        return scheme
    if scheme and scheme not in SCHEMES and is_fsspec_protocol(scheme):
        return scheme
    raise InvalidURIError(f"unsupported URI scheme {scheme!r} in {redact(text)!r}")


def is_native(scheme: str) -> bool:
    """True for the schemes our own transports serve (``file``, ``http(s)``, ``s3``, ``hf``), False for fsspec's."""
    return scheme in SCHEMES


def looks_like_uri(value: Any) -> bool:
    """True when ``value`` is a string with a scheme we read (``file``, ``s3``, ``http(s)``, ``hf`` or fsspec's)."""
    if not isinstance(value, (str, os.PathLike)):
        return False
    text = os.fspath(value)
    if "://" not in text:
        return False
    scheme = _raw_scheme(text)
    return scheme in SCHEMES or (bool(scheme) and is_fsspec_protocol(scheme))


def is_remote(uri: str | os.PathLike[str]) -> bool:
    """True for every URI but ``file://`` (``http(s)://``, ``s3://``, ``hf://`` and fsspec's)."""
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
