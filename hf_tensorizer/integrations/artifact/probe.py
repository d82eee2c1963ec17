"""What a remote folder without a manifest holds: a hand-made artifact, or a stock model or pipeline folder.

The well-known small file names and weight names are probed (one request each, concurrently; the Hub lists a
repository in one request instead); a pipeline's components are found through its ``model_index.json``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from ... import constants
from ...errors import FormatError, ObjectTooLargeError, SourceError
from ...sources import open_source
from ...sources.uri import join, redact, scheme_of
from ..parallel import concurrently
from .layout import KNOWN_FILES, safetensors_names, weights_name
from .manifest import MANIFEST_NAME, check_relative
from .versions import open_pinned


def read_bytes(uri: str, version: Mapping[str, str] | None = None, **options: Any) -> bytes:
    """The whole content of one small object at ``uri`` (at most ``HF_TENSORIZER_MAX_SMALL_FILE_BYTES``), at
    ``version`` when given (a manifest's record, see :func:`~.versions.open_pinned`).

    Raises:
        SourceError: the object is missing or cannot be read.
        ObjectChangedError: it changed since ``version`` was recorded.
        ObjectTooLargeError: it is larger than the cap (a manifest may list any file: never read GBs whole).
    """
    cap = constants.MAX_SMALL_FILE_BYTES
    with open_pinned(uri, version, **options) as src:
        if src.size > cap:
            raise ObjectTooLargeError(
                f"{redact(uri)} is {src.size} bytes, more than the {cap} bytes an artifact's small file may have "
                "(raise HF_TENSORIZER_MAX_SMALL_FILE_BYTES if it is meant to be this large)"
            )
        return src.read(0, src.size)


def probe(
    root: str, first_error: SourceError | None, *, variant: str | None = None, **options: Any
) -> tuple[list[str], dict[str, list[str]]]:
    """The small files and the weights of each folder of a remote artifact without a manifest.

    Args:
        root: the remote folder.
        first_error: why the manifest could not be read; reported when nothing is found either.
        variant: look for the weights of this variant (``model.<variant>.tensors``, ``.safetensors``...).
        **options: transport options.

    Returns:
        ``(small files, {folder: weight file names})``, paths relative to ``root``; weights are ``model.tensors``
        or else a safetensors checkpoint (shard index before single file).

    Raises:
        SourceError: nothing usable at ``root``.
        FormatError: a malformed ``model_index.json``.
    """
    found, weights = _probe_folders(root, [""], variant, **options)
    if "model_index.json" in found:  # a diffusers pipeline: its components live in subfolders
        where = f"{redact(root)}/model_index.json"
        try:
            index = json.loads(read_bytes(join(root, "model_index.json"), **options))
        except (ValueError, RecursionError) as exc:
            raise FormatError(f"{where} is not valid JSON: {exc}") from exc
        if not isinstance(index, dict):
            raise FormatError(f"{where} is not a JSON object")
        comps = [c for c, spec in index.items() if not c.startswith("_") and isinstance(spec, list)]
        for comp in comps:
            if "/" in comp:
                raise FormatError(f"{where} names a component that is not a plain folder name: {comp!r}")
            check_relative(comp, where)
        more, comp_weights = _probe_folders(root, comps, variant, **options)
        found += more
        weights.update(comp_weights)
    if not found and not weights:
        nothing = f"no tensorized artifact at {redact(root)} (no {MANIFEST_NAME}, config or weights)"
        if first_error is not None and not _MISSING.search(str(first_error)):
            # what kept every request out (no credentials, no access, no such bucket, offline) is what to fix:
            # it leads; the chain below it (botocore's own exceptions) adds nothing a user can act on
            raise SourceError(f"{first_error} (so: {nothing})") from None
        raise SourceError(nothing) from None
    return found, weights


# the manifest simply is not there (then "no tensorized artifact" is the news), as each transport says it
_MISSING = re.compile(r": (no such object|not found \(HTTP 404\)|no such file in the repository at that revision)$")


def _probe_folders(
    root: str, folders: list[str], variant: str | None, **options: Any
) -> tuple[list[str], dict[str, list[str]]]:
    """The well-known small files that exist in each of ``folders`` (relative to ``root``) and each folder's
    weights: ``model[.<variant>].tensors``, else the first safetensors name of ``variant`` present."""
    weight_names = (weights_name(variant), *safetensors_names(variant))
    paths = [f"{d}/{n}" if d else n for d in folders for n in (*KNOWN_FILES, *weight_names)]
    listing = None
    if scheme_of(root) == "hf":  # the Hub lists a repository in one request
        from ...sources.hub_repo import list_repo_paths

        listing = list_repo_paths(root, **options)
    if listing is not None:
        present = set(paths).intersection(listing)
    else:
        present = {p for p, ok in zip(paths, concurrently(lambda p: exists(join(root, p), **options), paths)) if ok}
    found = [p for p in paths if p in present and p.rsplit("/", 1)[-1] in KNOWN_FILES]
    weights: dict[str, list[str]] = {}
    for d in folders:
        name = next((n for n in weight_names if (f"{d}/{n}" if d else n) in present), None)
        if name is not None:
            weights[d] = [name]
    return found, weights


def exists(uri: str, **options: Any) -> bool:
    """Whether an object can be opened at ``uri``."""
    try:
        with open_source(uri, **options):
            return True
    except SourceError:
        return False
