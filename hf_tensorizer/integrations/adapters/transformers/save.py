"""Saving transformers models as tensorized artifacts: the hub key layout, config, generation config, weights.

The weights are written under the keys stock ``save_pretrained`` writes: the same
``remove_tied_weights_from_state_dict`` and ``revert_weight_conversion``, so fused runtime keys never reach a
file. :func:`write_model` is also used for the text encoders of diffusers pipelines.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from ....engine import TensorSerializer
from ....errors import UsageError
from ...artifact.extra_files import copy_extra_files, source_folder
from ...artifact.publish import ArtifactWriter
from ...options import transport_only
from .quantized import quantized_state_dict, without_load_operations


def hub_state_dict(model: Any) -> dict[str, torch.Tensor]:
    """``model``'s weights under the keys stock ``save_pretrained`` writes (hub layout, ties removed).

    Raises:
        UsageError: the model has weights on the meta device (disk offload), or is quantized with a method that
            cannot be saved (see :func:`hub_state_dict_and_metadata`).
    """
    return hub_state_dict_and_metadata(model)[0]


def hub_state_dict_and_metadata(model: Any) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """:func:`hub_state_dict` and the weights file metadata stock writes (a quantizer's, e.g. torchao's).

    Raises:
        UsageError: weights on the meta device, or a quantization that cannot be saved.
    """
    from transformers.core_model_loading import revert_weight_conversion
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    metadata: dict[str, str] = {}
    if getattr(model, "hf_quantizer", None) is not None:
        state_dict, metadata = quantized_state_dict(model)
    else:
        state_dict = model.state_dict()
    for key in getattr(model, "_keys_to_ignore_on_save", None) or []:
        state_dict.pop(key, None)
    meta = [k for k, v in state_dict.items() if isinstance(v, torch.Tensor) and v.is_meta]
    if meta:
        raise UsageError(f"model has weights on the meta device (offloaded?): {meta[:5]}; load it fully first")
    state_dict = remove_tied_weights_from_state_dict(state_dict, model)
    with without_load_operations(model):  # a quantizer's load converters have no reverse
        return revert_weight_conversion(model, state_dict), metadata


def save_tensorized(
    model: Any,
    dest: str | os.PathLike[str],
    *,
    tokenizer: Any = None,
    processor: Any = None,
    metadata: dict[str, str] | None = None,
    tensorizer_options: dict[str, Any] | None = None,
    variant: str | None = None,
    **serializer_options: Any,
) -> str:
    """Write ``model`` as a tensorized artifact to a local folder or ``s3://`` / ``hf://`` prefix.

    Writes config.json, generation_config.json (generative models), the tokenizer/processor files when given,
    ``model.tensors`` (hub key layout), every other file of the folder the model was loaded from (sentence-transformers'
    ``modules.json``, ``1_Pooling/``, ...; see :mod:`.extra_files`) and, last, the ``hf_tensorizer.json`` manifest.

    Args:
        model: a ``PreTrainedModel``.
        dest: the artifact root.
        tokenizer: optional tokenizer saved alongside (so ``AutoTokenizer.from_pretrained(dest)`` works).
        processor: optional processor / image processor / feature extractor saved alongside.
        metadata: extra string metadata stored in the weights file.
        tensorizer_options: transport options for remote destinations (``endpoint_url``, ``token``, ...).
        variant: write the weights as ``model.<variant>.tensors`` (load with ``from_pretrained(..., variant=)``).
        **serializer_options: :class:`~hf_tensorizer.TensorSerializer` arguments (``digest``, ``block_size``, ...).

    Returns:
        ``dest`` as a string.

    Raises:
        UsageError: the model cannot be saved this way; SinkError: writing failed.
    """
    dest = os.fspath(dest)
    transport = transport_only(tensorizer_options)
    with ArtifactWriter(dest, transport, variant) as staging:
        if model.is_remote_code():
            from transformers.dynamic_module_utils import custom_object_save

            custom_object_save(model, staging.folder, config=model.config)
        version = write_model(model, staging.folder, staging.weights(), staging.transport, metadata=metadata,
                              **serializer_options)  # fmt: skip
        staging.record(staging.weights_name, version)
        for extra in (tokenizer, processor):
            if extra is not None:
                extra.save_pretrained(staging.folder)
        copy_extra_files(source_folder(model), staging.folder)  # modules.json, 1_Pooling/, README, ...
        staging.publish([staging.weights_name], "transformers", {"architectures": model.config.architectures})
    return dest


def write_model(
    model: Any,
    folder: str,
    weights: str,
    transport: dict[str, Any],
    *,
    metadata: dict[str, str] | None = None,
    **serializer_options: Any,
) -> dict[str, str] | None:
    """A transformers model's config, generation config (into ``folder``) and weights (to ``weights``).

    Also used for the text encoders of diffusers pipelines.

    Returns:
        The version the weights were committed as (``Sink.committed_version``).
    """
    state_dict, quant_meta = hub_state_dict_and_metadata(model)  # raises before anything is written
    config = model.config
    config.dtype = str(model.dtype).split(".")[1]
    config.architectures = [type(model).__name__]
    config.save_pretrained(folder)
    if model.can_generate():
        model.generation_config.save_pretrained(folder)
    meta = {**quant_meta, "format": "pt", "hf_tensorizer.layout": "transformers", **(metadata or {})}
    with TensorSerializer(weights, metadata=meta, **serializer_options, **transport) as s:
        s.write_state_dict(state_dict)
    return s.committed_version
