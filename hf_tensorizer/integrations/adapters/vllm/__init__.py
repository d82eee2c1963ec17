"""vLLM plugin: ``vllm serve ARTIFACT --load-format hf_tensorizer [--model-loader-extra-config '{...}']``.

Installed with the ``[vllm]`` extra; vLLM finds it through the ``vllm.general_plugins`` entry point
(``hf_tensorizer = hf_tensorizer.integrations.adapters.vllm:register``), which vLLM runs in each of its
processes. :func:`register` adds the load format with vLLM's public ``register_model_loader`` and, in the
front-end, resolves a remote ARTIFACT's small files (:mod:`.frontend`) and tensorized LoRA adapters (:mod:`.lora`);
:mod:`.loader` streams the weights, :mod:`.lazy` makes tensor-parallel ranks read only their shards,
:mod:`.options` checks the extra config.
See docs/vllm.md.
"""

from __future__ import annotations

from typing import Any

from ....constants import VLLM_BENCH_PEERS
from .frontend import LOAD_FORMAT, engine_args

__all__ = ["LOAD_FORMAT", "engine_args", "register"]


def register() -> None:
    """vLLM's general-plugin hook: register ``--load-format hf_tensorizer``, then resolve a remote model and
    tensorized ``--lora-modules`` of this command line (front-end process only; vLLM's own processes inherit the
    result), and register the LoRA resolver when ``HF_TENSORIZER_LORA_ROOT`` is set (and the benches' peer load
    format when ``HF_TENSORIZER_VLLM_BENCH_PEERS=1``: :mod:`.peers`).

    Raises:
        UsageError / SourceError / FormatError: a remote artifact that cannot be resolved (vLLM stops).
    """
    from vllm.model_executor.model_loader import register_model_loader

    from .frontend import resolve_command_line, resolve_loras
    from .loader import loader_class

    register_model_loader(LOAD_FORMAT)(loader_class())
    if VLLM_BENCH_PEERS:  # the benches' peer row (.peers)
        from .peers import register as register_bench_peers

        register_bench_peers()
    resolve_command_line()
    resolve_loras()


def __getattr__(name: str) -> Any:
    if name == "HfTensorizerLoader":
        from .loader import loader_class

        return loader_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
