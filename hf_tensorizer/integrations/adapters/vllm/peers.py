"""A peer load format for the vLLM benches: vLLM's own ``tensorizer`` loader plus the post-processing step it skips.

vLLM 0.32's ``TensorizerLoader.load_model`` returns the model without running ``process_weights_after_loading``,
the step every other load format's ``load_model`` ends with (``BaseModelLoader``). On vLLM's CPU backend that step
gives each linear layer its ``cpu_linear`` (the oneDNN repacking), so a model loaded by ``--load-format
tensorizer`` loads, then fails its first request (``'QKVParallelLinear' object has no attribute 'cpu_linear'``),
and its load step is ~1.2 s shorter than the others' because it skipped the repacking.

:data:`LOAD_FORMAT` (``tensorizer-postprocessed``) is that loader, unchanged, followed by the same post-processing
call the other formats make, so the benches' ``vllm-tensorizer`` rows serve and their load steps compare
(``hf_tensorizer/bench/vllm.py``, ``integrations/coldstart.py``). It takes vLLM's ``tensorizer`` options
(``tensorizer_uri``, ``num_readers``, ...) as top-level keys of ``--model-loader-extra-config``, as
``--load-format tensorizer`` does. Our vLLM plugin registers it in every vLLM process only when
``HF_TENSORIZER_VLLM_BENCH_PEERS=1`` (:data:`~hf_tensorizer.constants.VLLM_BENCH_PEERS`).
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

LOAD_FORMAT = "tensorizer-postprocessed"
BENCH_PEERS_ENV = "HF_TENSORIZER_VLLM_BENCH_PEERS"  # =1: our vLLM plugin registers LOAD_FORMAT (constants.py)


def register() -> None:
    """Register :data:`LOAD_FORMAT` with vLLM's public ``register_model_loader`` (inside a vLLM process)."""
    import torch
    from vllm.model_executor.model_loader import register_model_loader
    from vllm.model_executor.model_loader.tensorizer import TensorizerConfig
    from vllm.model_executor.model_loader.tensorizer_loader import TensorizerLoader
    from vllm.model_executor.model_loader.utils import process_weights_after_loading
    from vllm.utils.torch_utils import set_default_torch_dtype

    class PostprocessedTensorizerLoader(TensorizerLoader):  # type: ignore[misc]
        def __init__(self, load_config: Any) -> None:
            # what vLLM's argument parsing does for --load-format tensorizer only: the options under one key
            extra = dict(load_config.model_loader_extra_config or {})
            options = {k: v for k, v in extra.items() if k in TensorizerConfig._fields}
            load_config = copy.copy(load_config)
            load_config.model_loader_extra_config = {"tensorizer_config": options}
            super().__init__(load_config)

        def load_model(self, vllm_config: Any, model_config: Any, prefix: str = "") -> torch.nn.Module:
            model = super().load_model(vllm_config, model_config, prefix)
            load_device = vllm_config.load_config.device or vllm_config.device_config.device
            target = torch.device(load_device)
            with set_default_torch_dtype(model_config.dtype), target:  # as BaseModelLoader.load_model runs it
                process_weights_after_loading(model, model_config, target)
            return model.eval()

    register_model_loader(LOAD_FORMAT)(PostprocessedTensorizerLoader)
