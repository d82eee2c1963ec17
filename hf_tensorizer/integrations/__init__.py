"""Hugging Face integrations: ``from_pretrained`` / ``save_pretrained`` / ``push_to_hub`` of tensorized artifacts.

Without any switch, :func:`from_pretrained`, :func:`save_pretrained` and :func:`push_to_hub` (:mod:`.api`) do what
the hooks do for one call: the first choice in libraries and notebooks. Nothing in transformers or diffusers
changes until :func:`enable` is called (or inside :func:`enabled`); a single model class can opt in without the
switch through :class:`~.mixin.TensorizerMixin`. Enabled,
``from_pretrained`` of a tensorized artifact (a URI with scheme ``s3``/``http``/``https``/``hf``/``file``, or a
local folder holding ``model.tensors``) loads through hf_tensorizer; every other argument falls through to the
stock implementation unchanged.

Where things live:

- :mod:`.api` — ``from_pretrained`` / ``save_pretrained`` / ``push_to_hub`` for one call, no switch;
- :mod:`.layout`, :mod:`.manifest` — the names inside an artifact (variants too), and its manifest;
- :mod:`.versions` — every file of a load opened at the version its manifest recorded;
- :mod:`.routing` — which calls load through us (:mod:`.hub_ids`: bare Hub ids of artifacts, one cheap request or
  the local HF cache); :mod:`.options` — ``tensorizer_options``, split and checked;
- :mod:`.cache`, :mod:`.probe` — a remote artifact's small files fetched into a local folder;
- :mod:`.weights` — the weight files of a load, opened once and streamed onto their devices;
- :mod:`.publish` — writing an artifact; :mod:`.push` — publishing it to the Hub;
- :mod:`.transformers`, :mod:`.transformers_save`, :mod:`.diffusers`, :mod:`.peft` / :mod:`.peft_save` — the
  libraries' load and save paths; :mod:`.quantized`, :mod:`.diffusers_quantized` — pre-quantized checkpoints and
  quantize-on-load; :mod:`.offload` — ``"disk"`` device-map entries read from the artifact itself;
  :mod:`.extra_files` — the source folder's other files kept in an artifact;
- :mod:`.switch`, :mod:`.hooks`, :mod:`.patches`, :mod:`.import_hooks`, :mod:`.mixin` — the switch and what it
  patches.
"""

from __future__ import annotations

from typing import Any

from .layout import WEIGHTS_NAME
from .manifest import MANIFEST_NAME
from .routing import is_artifact
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
        from .cache import resolve

        return resolve
    if name in ("from_pretrained", "save_pretrained", "push_to_hub"):
        from . import api

        return getattr(api, name)
    if name == "TensorizerMixin":
        from .mixin import TensorizerMixin

        return TensorizerMixin
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
