"""The artifact manifest (``hf_tensorizer.json``): what it holds, and the checks that make a hostile one harmless.

The manifest lists every file of an artifact and is written last, so an artifact whose manifest exists is
complete. It is data from a server: every path in it is checked before anything is written (no ``..``, no
absolute paths, no names reserved for hf_tensorizer, no path both a file and a folder).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from typing import Any

from ...errors import FormatError

MANIFEST_NAME = "hf_tensorizer.json"
REMOTE_MARKER = ".hf_tensorizer_remote"
ARTIFACT_FORMAT = "hf_tensorizer-artifact"
ARTIFACT_VERSION = 1


def parse_manifest(raw: bytes, where: str = MANIFEST_NAME) -> dict[str, Any]:
    """The manifest in ``raw``, checked: a JSON object of our format whose ``files`` is a list of distinct
    relative paths inside the artifact (a hostile manifest must not make a load write outside its cache folder).

    Raises:
        FormatError: anything else; ``where`` names the manifest in the message.
    """
    try:
        manifest = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise FormatError(f"{where} is not valid JSON: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != ARTIFACT_FORMAT:
        raise FormatError(f"{where} is not an hf_tensorizer artifact manifest")
    files = manifest.get("files", [])
    if not isinstance(files, list):
        raise FormatError(f"{where}: 'files' must be a list of relative paths")
    for name in files:
        check_relative(name, where)
        if name.rsplit("/", 1)[-1] in (MANIFEST_NAME, REMOTE_MARKER):
            raise FormatError(f"{where} lists a file name reserved for hf_tensorizer: {name!r}")
    if len(set(files)) != len(files):
        raise FormatError(f"{where}: 'files' lists a path twice")
    folders = {"/".join(f.split("/")[:i]) for f in files for i in range(1, f.count("/") + 1)}
    if folders & set(files):
        raise FormatError(f"{where} lists a path both as a file and as a folder: {sorted(folders & set(files))[0]!r}")
    check_versions(manifest.get("versions", {}), files, where)
    return manifest


VERSION_KEYS = ("etag", "version_id", "commit")


def check_versions(versions: Any, files: list[str], where: str = MANIFEST_NAME) -> dict[str, dict[str, str]]:
    """``versions`` if it maps listed files to version records (``etag`` / ``version_id`` / ``commit`` strings).

    Raises:
        FormatError: otherwise.
    """
    if not isinstance(versions, dict):
        raise FormatError(f"{where}: 'versions' must map file paths to version records")
    for name, record in versions.items():
        if name not in files:
            raise FormatError(f"{where}: 'versions' names a file the artifact does not list: {name!r}")
        if (
            not isinstance(record, dict)
            or not record
            or not all(k in VERSION_KEYS and isinstance(v, str) and v for k, v in record.items())
        ):
            raise FormatError(
                f"{where}: the version of {name!r} must be an object of non-empty strings under {list(VERSION_KEYS)}"
            )
    return versions


_PLAIN_PART = re.compile(r"[^\x00-\x1f\x7f\\]+")  # no control characters, no backslash (a separator elsewhere)


def check_relative(name: Any, where: str = MANIFEST_NAME) -> str:
    """``name`` if it is a ``/``-separated relative path of plain parts (no ``..``, ``.`` or empty parts, no
    control characters or backslashes); it then stays inside any folder it is joined to.

    Raises:
        FormatError: otherwise.
    """
    parts = name.split("/") if isinstance(name, str) else []
    if not parts or any(p in ("", ".", "..") or not _PLAIN_PART.fullmatch(p) for p in parts):
        raise FormatError(f"{where} names a path that is not a plain relative path inside the artifact: {name!r}")
    return name


def write_manifest(
    files: Iterable[str],
    library: str,
    extra: Mapping[str, Any] | None = None,
    versions: Mapping[str, Mapping[str, str]] | None = None,
) -> bytes:
    """The manifest bytes for an artifact holding ``files`` (each a path :func:`parse_manifest` accepts), with
    the version each was committed as (``versions``: path -> ``Sink.committed_version``) where the store has one.

    Raises:
        FormatError: a file name a reader would refuse.
    """
    from ...version import __version__

    files = sorted(set(files))
    for name in files:
        check_relative(name, "the artifact being written")

    manifest = {
        "format": ARTIFACT_FORMAT,
        "version": ARTIFACT_VERSION,
        "library": library,
        "writer": f"hf_tensorizer {__version__}",
        "files": files,
        **(extra or {}),
    }
    recorded = {n: dict(v) for n, v in sorted((versions or {}).items()) if v and n in files}
    if recorded:
        manifest["versions"] = check_versions(recorded, files, "the artifact being written")
    return (json.dumps(manifest, indent=2) + "\n").encode()
