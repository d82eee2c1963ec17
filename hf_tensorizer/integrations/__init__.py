"""Hugging Face integrations: the explicit switch that makes ``from_pretrained`` read tensorized artifacts.

Nothing in transformers or diffusers changes until :func:`enable` is called (or inside :func:`enabled`).
Enabled, ``from_pretrained`` of a tensorized artifact (a URI with scheme ``s3``/``http``/``https``/``hf``/
``file``, or a local folder holding ``model.tensors``) loads through hf_tensorizer; every other argument
falls through to the stock implementation unchanged.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Iterator

from ._after_import import after_import, cancel
from .artifact import MANIFEST_NAME, WEIGHTS_NAME, is_artifact, resolve

__all__ = ["MANIFEST_NAME", "WEIGHTS_NAME", "disable", "enable", "enabled", "is_artifact", "is_enabled", "resolve"]

_lock = threading.RLock()
_depth = 0  # enable() calls not yet matched by disable(); nested enabled() blocks are fine


def _available(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def enable() -> None:
    """Patch transformers (and diffusers, when installed) to load and save tensorized artifacts.

    Patched: ``PreTrainedModel.from_pretrained`` / ``save_pretrained(..., tensorized=True)`` /
    ``push_to_hub(..., tensorized=True)``; the ``from_pretrained`` of the Auto model classes, configs,
    tokenizers and generation configs (a remote artifact URI is fetched to a local folder first), and of the
    processor / image processor / feature extractor classes; diffusers' ``ModelMixin`` and
    ``DiffusionPipeline`` likewise. Processor classes and diffusers are patched when they are imported, if
    that happens after ``enable()`` (importing them costs 1.5 s and 0.3 s, which a program that never uses
    them should not pay). Calls nest: the hooks stay until every ``enable()`` is matched by :func:`disable`.
    """
    global _depth
    with _lock:
        if _available("transformers"):
            from . import transformers as _tf

            _tf.patch()  # incremental: covers processor classes imported since an earlier enable()
            after_import(_tf.LAZY_MODULES, _tf.patch)
        if _depth == 0 and _available("diffusers"):
            from . import diffusers as _df

            if "diffusers" in sys.modules:
                _df.patch()
            else:
                after_import(["diffusers"], _df.patch)
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
        if _available("diffusers"):
            from . import diffusers as _df

            _df.unpatch()
        if _available("transformers"):
            from . import transformers as _tf

            _tf.unpatch()


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
