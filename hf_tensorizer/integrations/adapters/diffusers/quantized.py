"""diffusers models quantized on load (``quantization_config=``), streamed a window at a time.

Stock diffusers builds the model, lets the quantizer replace its layers (``preprocess_model``), then hands every
checkpoint tensor to ``load_model_dict_into_meta``, which quantizes the ones the quantizer claims
(``create_quantized_param``). We do the same, feeding it the tensors a window at a time as they stream
(:class:`~.quantized.Window`), so the full-precision model never sits in host memory at once.

Pre-quantized diffusers checkpoints (a ``quantization_config`` in ``config.json``) and saving quantized diffusers
models tensorized are not supported (``UsageError``): diffusers' quantizers read those from files by name.
"""

from __future__ import annotations

from typing import Any

import torch

from ....errors import UsageError
from ...loading.weights import OpenWeights, Target, device_for
from ..transformers.quantized import Window


def quantizer_for(config: dict[str, Any], quantization_config: Any) -> Any:
    """The diffusers quantizer of a quantize-on-load, or None when there is nothing to quantize.

    Raises:
        UsageError: the checkpoint is pre-quantized (its config has a ``quantization_config``).
    """
    if config.get("quantization_config") is not None:
        raise UsageError("pre-quantized diffusers checkpoints cannot be loaded tensorized; load the unquantized "
                         "artifact with quantization_config=... instead")  # fmt: skip
    if quantization_config is None:
        return None
    from diffusers.quantizers import DiffusersAutoQuantizer

    config["quantization_config"] = quantization_config
    return DiffusersAutoQuantizer.from_config(quantization_config, pre_quantized=False)


def prepare(quantizer: Any, dtype: torch.dtype | None, device_map: Any) -> tuple[torch.dtype | None, Any]:
    """The quantizer's checks and its say on ``dtype`` and ``device_map``, as stock asks before building."""
    quantizer.validate_environment(torch_dtype=dtype, device_map=device_map)
    return quantizer.update_torch_dtype(dtype), quantizer.update_device_map(device_map)


def stream(
    model: torch.nn.Module,
    weights: OpenWeights,
    quantizer: Any,
    dtype: torch.dtype | None,
    keep_fp32: list[str],
    device_map: dict[str, Any],
    engine: dict[str, Any],
) -> tuple[list[str], list[str]]:
    """Load ``weights`` into ``model`` through the quantizer, a window at a time; returns (missing, unexpected)."""
    from diffusers.models.model_loading_utils import load_model_dict_into_meta

    expected = list(model.state_dict(keep_vars=True).keys())
    targets: dict[str, Target] = {k: (device_for(device_map, k), None) for k in expected if k in weights.file_of}
    unexpected = sorted(set(weights.file_of).difference(expected))
    metrics: list[Any] = []
    for part in Window(weights, targets, engine, metrics).each():
        load_model_dict_into_meta(model, part, dtype=dtype, hf_quantizer=quantizer, keep_in_fp32_modules=keep_fp32,
                                  device_map=device_map, unexpected_keys=unexpected)  # fmt: skip
        del part
    return [k for k in expected if k not in weights.file_of], unexpected


def finish(model: Any, quantizer: Any, dtype: torch.dtype | None) -> None:
    """What stock does after loading: the quantizer's post-processing, and the record of it on the model."""
    quantizer.postprocess_model(model)
    model.hf_quantizer = quantizer
    model.register_to_config(_pre_quantization_dtype=dtype)
