"""LoRA adapters from tensorized PEFT artifacts in vLLM: ``--lora-modules NAME=ADAPTER`` and a LoRA resolver.

vLLM's LoRA loading takes no loader: its worker reads ``adapter_model.safetensors`` (or ``.bin`` / ``.pt``) from a
local folder itself (``LoRAModel.from_local_checkpoint``, ``vllm/lora/lora_model.py``), in a process no plugin
hook reaches. Adapters are small (MBs), so the front-end turns a tensorized adapter (a local folder holding
``adapter_model.tensors``, or any URI of one) into a folder vLLM reads: its ``adapter_config.json`` and its tensors,
read through the engine (decrypted and verified as a model load is), written as ``adapter_model.safetensors`` into
the artifact cache (``cache_root()/vllm-lora/<hash>``, owner-only). Two ways in, both public vLLM interfaces:

- ``--lora-modules NAME=ADAPTER`` (or its JSON form): the front-end rewrites ADAPTER to that folder before vLLM
  parses its command line (:func:`resolve_lora_modules`).
- ``HF_TENSORIZER_LORA_ROOT=URI``: a ``LoRAResolver`` registered with vLLM's ``LoRAResolverRegistry`` serves a
  request for an unknown model name ``NAME`` with the adapter at ``URI/NAME`` (:class:`Resolver`; vLLM asks
  resolvers only with ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=1``).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
from collections.abc import Mapping
from typing import Any

import torch

from ....errors import SourceError, UsageError
from ....sources.uri import join, looks_like_uri, redact
from ...artifact.cache import cache_root, read_pinned_marker, resolve, swapped_in
from ...artifact.manifest import REMOTE_MARKER
from ...artifact.versions import PinnedURI
from ...loading.weights import open_weights, stream_to_devices
from .options import LoaderOptions, parse_extra_config

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_TENSORS = "adapter_model.tensors"  # what ``peft_model.save_pretrained(dest, tensorized=True)`` writes
ADAPTER_SAFETENSORS = "adapter_model.safetensors"  # what vLLM's LoRA loader reads
LORA_FLAG = "--lora-modules"
ROOT_ENV = "HF_TENSORIZER_LORA_ROOT"
RESOLVER_NAME = "hf_tensorizer"


def _weights(folder: str) -> list[str] | None:
    """The weight URIs of a tensorized adapter folder (local ``adapter_model.tensors``, or the remote weights a
    cached folder's marker names, at their recorded versions), or None for a folder vLLM reads as it is."""
    local = os.path.join(folder, ADAPTER_TENSORS)
    if os.path.isfile(local):
        return [local]
    marker = os.path.join(folder, REMOTE_MARKER)
    if not os.path.isfile(marker):
        return None
    root, names, versions = read_pinned_marker(marker)
    name = next((n for n in (ADAPTER_TENSORS, ADAPTER_SAFETENSORS) if n in names), None)
    if name is None:
        raise SourceError(f"{redact(root)} has no {ADAPTER_TENSORS} or {ADAPTER_SAFETENSORS}")
    return [PinnedURI(join(root, name), versions.get(name))]


def is_tensorized_adapter(path: str) -> bool:
    """Whether vLLM cannot read the adapter at ``path`` itself: a URI, or a folder with ``adapter_model.tensors``."""
    return looks_like_uri(path) or os.path.isfile(os.path.join(path, ADAPTER_TENSORS))


def adapter_folder(adapter: str, options: LoaderOptions | None = None) -> str:
    """A local folder vLLM's LoRA loader reads for ``adapter``: the folder itself when it is a stock local one,
    else ``adapter_config.json`` + ``adapter_model.safetensors`` written into the cache from the tensorized adapter.

    Args:
        adapter: a local adapter folder or a URI of one (``s3://``, ``http(s)://``, ``hf://``, fsspec).
        options: transport and engine options (``--model-loader-extra-config``): endpoint, key, ``verify_hash``.

    Returns:
        The local folder.

    Raises:
        SourceError / ObjectChangedError: the adapter cannot be read, or changed since its manifest.
        FormatError / HashMismatchError / MissingKeyError / DecryptionError: as for a model load.
    """
    from safetensors.torch import save_file

    options = options or LoaderOptions()
    folder = resolve(adapter, **options.transport)  # a remote adapter's small files, and a marker of its weights
    uris = _weights(folder)
    if uris is None:
        return folder
    if not os.path.isfile(os.path.join(folder, ADAPTER_CONFIG)):
        raise SourceError(f"{redact(adapter)}: no {ADAPTER_CONFIG}")
    tensors: dict[str, torch.Tensor] = {}
    with open_weights(uris, **options.transport) as opened:
        cpu = (torch.device("cpu"), None)
        for d in stream_to_devices(opened, dict.fromkeys(opened.file_of, cpu), options.engine):
            tensors.update((name, t.contiguous()) for name, t in d.items())
    key = hashlib.sha256(f"{adapter}\0{uris[0]}".encode()).hexdigest()[:20]
    dest = os.path.join(cache_root(), "vllm-lora", key)
    with swapped_in(dest) as fresh:  # vLLM's worker never sees half a folder
        os.chmod(fresh, 0o700)  # the tensors of an encrypted adapter, decrypted: owner-only
        shutil.copyfile(os.path.join(folder, ADAPTER_CONFIG), os.path.join(fresh, ADAPTER_CONFIG))
        save_file(tensors, os.path.join(fresh, ADAPTER_SAFETENSORS), metadata={"format": "pt"})
    return dest


def _lora_values(argv: list[str]) -> list[int]:
    """Positions in ``argv`` of the values of every ``--lora-modules`` (``nargs="+"``) and ``--lora-modules=V``."""
    out: list[int] = []
    i = 0
    while i < len(argv):
        if argv[i].startswith(LORA_FLAG + "="):
            out.append(i)
        elif argv[i] == LORA_FLAG:
            j = i + 1
            while j < len(argv) and not argv[j].startswith("-"):
                out.append(j)
                j += 1
            i = j - 1
        i += 1
    return out


def _rewrite(value: str, options: LoaderOptions) -> str | None:
    """``value`` (``NAME=PATH`` or vLLM's JSON form) with a tensorized PATH replaced by its local folder, or None
    when vLLM reads PATH itself."""
    if value.lstrip().startswith("{"):
        try:
            doc = json.loads(value)
        except json.JSONDecodeError:
            return None  # vLLM's own parser says what is wrong with it
        if not isinstance(doc, dict) or not isinstance(doc.get("path"), str) or not is_tensorized_adapter(doc["path"]):
            return None
        return json.dumps({**doc, "path": adapter_folder(doc["path"], options)})
    name, sep, path = value.partition("=")
    if not sep or not is_tensorized_adapter(path):
        return None
    return f"{name}={adapter_folder(path, options)}"


def resolve_lora_modules(argv: list[str], extra_config: Any = None) -> list[str]:
    """Rewrite, in ``argv``, every ``--lora-modules`` entry whose path is a tensorized adapter to the local folder
    vLLM reads (:func:`adapter_folder`). Returns the names of the adapters rewritten.

    Raises:
        UsageError: a bad extra config. SourceError / FormatError / MissingKeyError / DecryptionError /
            HashMismatchError: an adapter cannot be read; vLLM's front-end stops with it.
    """
    positions = _lora_values(argv)
    if not positions:
        return []
    options = parse_extra_config(extra_config)
    done = []
    for i in positions:
        arg = argv[i]
        prefix = LORA_FLAG + "=" if arg.startswith(LORA_FLAG + "=") else ""
        new = _rewrite(arg[len(prefix) :], options)
        if new is not None:
            argv[i] = prefix + new
            done.append(new.partition("=")[0] if not new.startswith("{") else json.loads(new)["name"])
    return done


def resolver_class() -> type:
    """A vLLM ``LoRAResolver`` (imported only where vLLM runs) serving ``HF_TENSORIZER_LORA_ROOT/<name>``."""
    from vllm.lora.request import LoRARequest
    from vllm.lora.resolver import LoRAResolver

    class Resolver(LoRAResolver):  # type: ignore[misc]
        """Resolves a LoRA name to the tensorized adapter ``root/name``."""

        def __init__(self, root: str, options: LoaderOptions) -> None:
            self.root, self.options = root.rstrip("/"), options

        async def resolve_lora(self, base_model_name: str, lora_name: str) -> Any:
            if not lora_name or "/" in lora_name or lora_name in (".", ".."):
                return None  # a name, not a path: nothing outside the root
            uri = join(self.root, lora_name) if looks_like_uri(self.root) else os.path.join(self.root, lora_name)
            try:
                folder = await asyncio.to_thread(adapter_folder, uri, self.options)
            except SourceError:
                return None  # no such adapter: vLLM answers 404 (or asks its next resolver)
            if not os.path.isfile(os.path.join(folder, ADAPTER_CONFIG)):
                return None
            return LoRARequest(lora_name=lora_name, lora_int_id=1, lora_path=folder)  # vLLM sets the id

    Resolver.__module__, Resolver.__qualname__ = __name__, "Resolver"
    return Resolver


def register_resolver(extra_config: Mapping[str, Any] | str | None = None) -> bool:
    """Register the resolver with vLLM when ``HF_TENSORIZER_LORA_ROOT`` is set. Returns whether it was.

    Raises:
        UsageError: a bad extra config.
    """
    root = os.environ.get(ROOT_ENV)
    if not root:
        return False
    if not looks_like_uri(root) and not os.path.isdir(root):
        raise UsageError(f"{ROOT_ENV}={root!r} is neither a URI nor a folder")
    from vllm.lora.resolver import LoRAResolverRegistry

    LoRAResolverRegistry.register_resolver(RESOLVER_NAME, resolver_class()(root, parse_extra_config(extra_config)))
    return True
