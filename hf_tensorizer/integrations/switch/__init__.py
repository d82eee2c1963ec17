"""The switch: what ``hf_tensorizer.enable()`` changes, and how it is undone.

:func:`enable` / :func:`disable` / :func:`enabled` install and remove the patches of :mod:`.hooks` on
transformers' ``PreTrainedModel``, diffusers' ``ModelMixin`` / ``DiffusionPipeline`` and peft's loaders (each
recorded in :mod:`..patches`, so ``disable()`` restores the stock attributes exactly). A library imported later
is patched right after its import (:mod:`.import_hooks`). The patched methods hand artifacts and checkpoint URIs
to the library adapters (:mod:`..adapters`) and everything else to the stock implementation unchanged.
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys
import threading
from collections.abc import Iterator

from .import_hooks import after_import, cancel

_lock = threading.RLock()
_depth = 0  # enable() calls not yet matched by disable(); nested enabled() blocks are fine


def _available(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def enable() -> None:
    """Patch transformers (and diffusers, when installed) to load and save tensorized artifacts.

    Patched: ``PreTrainedModel.from_pretrained`` / ``save_pretrained(..., tensorized=True)`` /
    ``push_to_hub(..., tensorized=True)``; the ``from_pretrained`` of the Auto model classes, configs, tokenizers
    and generation configs (a remote artifact URI is fetched to a local folder first), and of the processor /
    image processor / feature extractor classes; diffusers' ``ModelMixin`` and ``DiffusionPipeline`` likewise;
    peft's adapter loading (``PeftModel.from_pretrained`` / ``load_adapter``, ``PeftConfig.from_pretrained``,
    transformers' ``load_adapter``: :mod:`.peft`).
    Processor classes and diffusers are patched when they are imported, if that happens after ``enable()``
    (importing them costs 1.5 s and 0.3 s, which a program that never uses them should not pay). Calls nest: the
    hooks stay until every ``enable()`` is matched by :func:`disable`.
    """
    global _depth
    with _lock:
        if _available("transformers"):
            from . import hooks

            hooks.patch_transformers()  # incremental: covers processor classes imported since an earlier enable()
            after_import(hooks.LAZY_MODULES, hooks.patch_transformers)
        if _depth == 0 and _available("diffusers"):
            from . import hooks

            if "diffusers" in sys.modules:
                hooks.patch_diffusers()
            else:
                after_import(["diffusers"], hooks.patch_diffusers)
        if _depth == 0 and _available("peft"):
            from ..adapters.peft import load as peft

            if "peft" in sys.modules:
                peft.patch_peft()
            else:
                after_import(["peft"], peft.patch_peft)
        _depth += 1


def disable() -> None:
    """Undo :func:`enable`: every patched attribute gets its original back (once all enables are undone)."""
    global _depth
    with _lock:
        if _depth == 0:
            return
        _depth -= 1
        if _depth:
            return
        cancel()
        from .. import patches

        patches.restore()


def is_enabled() -> bool:
    """Whether the hooks are installed."""
    return _depth > 0


@contextlib.contextmanager
def enabled() -> Iterator[None]:
    """``with hf_tensorizer.enabled(): model = AutoModel.from_pretrained("s3://...")`` — hooks for the block only."""
    enable()
    try:
        yield
    finally:
        disable()
