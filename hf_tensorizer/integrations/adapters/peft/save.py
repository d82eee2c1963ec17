"""Saving PEFT adapters tensorized: ``peft_model.save_pretrained(dest, tensorized=True)``.

Stock ``save_pretrained`` does the adapter-specific work (which weights, embedding layers, aliasing, the config
and its auto mapping, one subfolder per non-default adapter) into a temporary folder; each
``adapter_model.safetensors`` it wrote is then rewritten as ``adapter_model.tensors`` at ``dest`` (local folder or
``s3://`` / ``hf://`` prefix), the other files copied, and the manifest written last. Adapters are small (MBs),
so the detour costs little and keeps the saved content exactly stock.
"""

from __future__ import annotations

import inspect
import os
import shutil
import tempfile
from typing import Any

from ....engine import TensorSerializer
from ....sources.uri import join
from ...artifact.publish import ArtifactWriter, list_files
from ...options import transport_only

ADAPTER_TENSORS = "adapter_model.tensors"
ADAPTER_SAFETENSORS = "adapter_model.safetensors"


def save_adapter_tensorized(
    model: Any,
    dest: str | os.PathLike[str],
    stock_save: Any,
    *,
    tensorizer_options: dict[str, Any] | None = None,
    metadata: dict[str, str] | None = None,
    **kwargs: Any,
) -> str:
    """Write the adapters of a ``PeftModel`` as a tensorized adapter artifact.

    Args:
        model: the ``PeftModel``.
        dest: the artifact root.
        stock_save: peft's own ``save_pretrained`` (called into a temporary folder).
        tensorizer_options: transport options for a remote ``dest``.
        metadata: extra string metadata stored in each weights file.
        **kwargs: :class:`~hf_tensorizer.TensorSerializer` arguments (``encryption``, ``digest``, ...) and stock
            ``save_pretrained`` arguments (``selected_adapters``, ``save_embedding_layers``, ...).

    Returns:
        ``dest`` as a string.

    Raises:
        SinkError: writing failed.
    """
    from safetensors.torch import load_file

    dest = os.fspath(dest)
    known = set(inspect.signature(TensorSerializer.__init__).parameters) - {"self", "dest", "sink_options"}
    serializer = {k: kwargs.pop(k) for k in list(kwargs) if k in known}
    kwargs["safe_serialization"] = True
    scratch = tempfile.mkdtemp(prefix="hf_tensorizer-adapter-")
    try:
        stock_save(model, scratch, **kwargs)
        with ArtifactWriter(dest, transport_only(tensorizer_options)) as staging:
            weights = []
            for rel in list_files(scratch):
                folder, _, name = rel.rpartition("/")
                if name != ADAPTER_SAFETENSORS:
                    os.makedirs(os.path.join(staging.folder, folder), exist_ok=True)
                    shutil.copyfile(os.path.join(scratch, rel), os.path.join(staging.folder, rel))
                    continue
                target_rel = f"{folder}/{ADAPTER_TENSORS}" if folder else ADAPTER_TENSORS
                target = join(dest, target_rel) if staging.remote else os.path.join(staging.folder, target_rel)
                meta = {"format": "pt", "hf_tensorizer.layout": "peft", **(metadata or {})}
                with TensorSerializer(target, metadata=meta, **serializer, **staging.transport) as s:
                    s.write_state_dict(load_file(os.path.join(scratch, rel)))
                weights.append(target_rel)
            staging.publish(weights, "peft")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return dest
