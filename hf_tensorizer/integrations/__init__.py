"""Hugging Face integrations: ``from_pretrained`` / ``save_pretrained`` / ``push_to_hub`` of tensorized artifacts.

Without any switch, :func:`from_pretrained`, :func:`save_pretrained` and :func:`push_to_hub` (:mod:`.api`) do what
the hooks do for one call: the first choice in libraries and notebooks. Nothing in transformers or diffusers
changes until :func:`enable` is called (or inside :func:`enabled`); a single model class can opt in without the
switch through :class:`~.mixin.TensorizerMixin`. Enabled,
``from_pretrained`` of a tensorized artifact (a URI with scheme ``s3``/``http``/``https``/``hf``/``file``, or a
local folder holding ``model.tensors``) loads through hf_tensorizer; every other argument falls through to the
stock implementation unchanged.

The folders follow a load (see docs/architecture.md):

- entry points: :mod:`.api` (``from_pretrained`` / ``save_pretrained`` for one call, no switch), :mod:`.push`
  (``push_to_hub``), :mod:`.mixin` (one class opts in), :mod:`.switch` (``enable()``: what it patches, in
  :mod:`.switch.hooks`);
- :mod:`.adapters` — one package per library (``transformers``, ``diffusers``, ``peft``): where a library's load
  or save starts, e.g. :func:`.adapters.transformers.load.load_pretrained`;
- :mod:`.artifact` — the artifact's rules: names, manifest, versions, routing, the cache of small files, writing;
- :mod:`.loading` — what every adapter's load shares: the weight files opened once and streamed onto devices
  (:mod:`.loading.weights`), ``"disk"`` device-map entries (:mod:`.loading.offload`);
- base helpers every layer may use: :mod:`.options` (``tensorizer_options``), :mod:`.patches` (the one registry
  of replaced attributes), :mod:`.parallel` (overlapping small remote requests).
"""

from __future__ import annotations

from typing import Any

from .artifact.layout import WEIGHTS_NAME
from .artifact.manifest import MANIFEST_NAME
from .artifact.routing import is_artifact
from .switch import disable, enable, enabled, is_enabled

__all__ = [
    "MANIFEST_NAME",
    "WEIGHTS_NAME",
    "TensorizerMixin",
    "disable",
    "enable",
    "enabled",
    "from_pretrained",
    "is_artifact",
    "is_enabled",
    "push_to_hub",
    "resolve",
    "save_pretrained",
]


def __getattr__(name: str) -> Any:  # the heavier parts load on first use
    if name == "resolve":
        from .artifact.cache import resolve

        return resolve
    if name in ("from_pretrained", "save_pretrained", "push_to_hub"):
        from . import api

        return getattr(api, name)
    if name == "TensorizerMixin":
        from .mixin import TensorizerMixin

        return TensorizerMixin
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
