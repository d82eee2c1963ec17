"""The source folder's other files, carried into a tensorized artifact so tools that read the folder keep working.

A model folder often holds more than transformers writes: sentence-transformers' ``modules.json``,
``config_sentence_transformers.json`` and ``1_Pooling/``, a README, a license, a chat template. Saving tensorized
copies every file of the folder the model was loaded from (a local folder, or its Hub snapshot), except

- the weight files the artifact's ``model.tensors`` replaces: ``*.safetensors``, ``*.bin``, ``*.pt``, ``*.pth``,
  ``*.ckpt``, ``*.h5``, ``*.msgpack``, ``*.gguf``, ``*.tensors`` and shard indexes, at the top level only
  (a subfolder's weights belong to another module, e.g. sentence-transformers' ``2_Dense/``);
- hidden entries (``.git``, ``.cache``) and an artifact's own manifest and remote marker;
- files the save itself wrote (``config.json``, tokenizer files, ...): those win.
"""

from __future__ import annotations

import fnmatch
import os
import shutil
import warnings
from typing import Any

from .manifest import MANIFEST_NAME, REMOTE_MARKER

#: top-level weight files the artifact's model.tensors replaces
REPLACED_WEIGHTS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.h5", "*.msgpack", "*.gguf", "*.tensors",
                    "*.index.json")  # fmt: skip


def _skipped(rel: str) -> bool:
    parts = rel.split("/")
    if any(p.startswith(".") for p in parts) or rel in (MANIFEST_NAME, REMOTE_MARKER):
        return True
    return len(parts) == 1 and any(fnmatch.fnmatch(rel, pattern) for pattern in REPLACED_WEIGHTS)


def source_folder(model: Any) -> str | None:
    """The local folder ``model`` was loaded from: its ``name_or_path`` when that is a folder, else the Hub
    snapshot of that id at the commit it was loaded from (weights not downloaded); None when there is none (a model
    built from a config) or the Hub cannot be reached (with a warning: the artifact is still written)."""
    name = str(getattr(model, "name_or_path", "") or getattr(model.config, "_name_or_path", "") or "")
    if not name:
        return None
    if os.path.isdir(name):
        return name
    if "://" in name or os.path.isabs(name) or name.count("/") > 1:
        return None  # a remote artifact root: its small files are in our cache, not a source folder to copy
    try:
        from huggingface_hub import snapshot_download

        revision = getattr(model.config, "_commit_hash", None)
        return snapshot_download(name, revision=revision, ignore_patterns=list(REPLACED_WEIGHTS))
    except Exception as exc:  # the save must not fail over files it does not need
        warnings.warn(f"could not fetch the other files of {name!r} to copy alongside: {exc}", stacklevel=3)
        return None


def copy_extra_files(src: str | None, dest: str) -> list[str]:
    """Copy every file of ``src`` into ``dest`` except replaced weights, hidden entries and files ``dest`` has.

    Args:
        src: the source folder (None: nothing to copy).
        dest: the artifact's local staging folder.

    Returns:
        The ``/``-separated relative names copied.
    """
    if src is None or os.path.realpath(src) == os.path.realpath(dest):
        return []
    copied = []
    for dirpath, dirs, names in os.walk(src):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for n in sorted(names):
            rel = os.path.relpath(os.path.join(dirpath, n), src).replace(os.sep, "/")
            target = os.path.join(dest, *rel.split("/"))
            if _skipped(rel) or os.path.exists(target):
                continue
            os.makedirs(os.path.dirname(target), exist_ok=True)
            shutil.copyfile(os.path.join(dirpath, n), target)  # follows the Hub cache's symlinks
            copied.append(rel)
    return copied
