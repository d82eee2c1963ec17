"""One version per artifact: every file of a load opened at the version its manifest recorded when it was written.

A save records what each sink committed (``Sink.committed_version``: the S3 ETag and VersionId, the Hub commit)
in the manifest's ``versions`` map. A load opens each listed file pinned to that record: on a versioned S3 bucket
the recorded VersionId (an overwrite since then does not matter: the recorded version loads), on the Hub the
recorded commit, and everywhere the ETag is compared: a file whose ETag differs from the record (an unversioned
bucket overwritten, an HTTP mirror serving other bytes) fails with :class:`~hf_tensorizer.errors.ObjectChangedError`
naming the file, instead of mixing an old config or tokenizer with new weights. Files without a record (local
artifacts, manifests written before versions existed, ``push_to_hub`` commits) open as before.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from ...errors import ObjectChangedError
from ...sources import Source, open_source
from ...sources.hub_repo import format_hf_uri, parse_hf_uri
from ...sources.uri import redact, scheme_of

Version = Mapping[str, str]


class PinnedURI(str):
    """A weight file's URI that carries the version its artifact's manifest recorded (:attr:`version`).

    It is a ``str`` so every function that takes weight URIs takes it unchanged; :func:`open_pinned` (through
    ``open_weights``) honours the version.
    """

    version: Version | None

    def __new__(cls, uri: str, version: Version | None = None) -> PinnedURI:
        obj = super().__new__(cls, uri)
        obj.version = dict(version) if version else None
        return obj


def _same_etag(a: str, b: str) -> bool:
    return a.removeprefix("W/") == b.removeprefix("W/")


def open_pinned(uri: str | os.PathLike[str], version: Version | None = None, **options: Any) -> Source:
    """Open ``uri`` at ``version`` (a manifest record); ``None`` opens the latest, as ``open_source`` does.

    Args:
        uri: the file (``s3://``, ``http(s)://``, ``hf://``; local files have no versions and open as they are).
        version: ``{"etag": ..., "version_id": ..., "commit": ...}``, any subset.
        **options: transport options.

    Raises:
        ObjectChangedError: the object's ETag is not the recorded one (it was overwritten since it was written).
        SourceError: the object (or the recorded version) cannot be opened.
    """
    text = os.fspath(uri)
    if version is None and isinstance(uri, PinnedURI):
        version = uri.version
    if not version:
        return open_source(text, **options)
    scheme = scheme_of(text)
    if scheme == "s3" and version.get("version_id"):
        options = {**options, "version_id": version["version_id"]}
    if scheme == "hf" and version.get("commit"):
        parsed = parse_hf_uri(text, require_path=True)
        text = format_hf_uri(parsed.repo_id, parsed.path, version["commit"], parsed.repo_type)
    src = open_source(text, **options)
    expected, actual = version.get("etag"), getattr(src, "etag", None)
    if scheme in ("s3", "http", "https") and expected and actual and not _same_etag(expected, actual):
        src.close()
        raise ObjectChangedError(
            f"{redact(text)} changed after its artifact was written (ETag {expected} recorded in the manifest, "
            f"{actual} now): the files of the artifact no longer belong together; save it again"
        )
    return src
