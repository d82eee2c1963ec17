"""Files the vLLM benches' peer rows need: upstream tensorizer's file of a stock checkpoint (:func:`tensorize_upstream`)
for vLLM's tensorizer loader, which the benches run as load format :data:`LOAD_FORMAT`
(:mod:`hf_tensorizer.integrations.adapters.vllm.peers`: that loader plus the post-processing it skips on CPU).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from ..integrations.adapters.vllm.peers import BENCH_PEERS_ENV, LOAD_FORMAT
from .proc import ROOT

__all__ = ["BENCH_PEERS_ENV", "LOAD_FORMAT", "tensorize_upstream"]


TENSORIZE = r"""
import shutil, sys
from pathlib import Path
import torch
from tensorizer import TensorDeserializer, TensorSerializer
stock, out, dtype = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
target = out / "model.tensors"


def empty_weights():  # 2-D weights written with no elements: the file cannot load the model
    d = TensorDeserializer(str(target), lazy_load=True, device="cpu")
    return [k for k in d.keys() if k.endswith(".weight") and d[k].numel() == 0]


if __name__ == "__main__":
    out.mkdir(parents=True, exist_ok=True)
    producer = "vllm.model_executor.model_loader.tensorizer.tensorize_vllm_model"
    if not target.exists():
        from vllm.engine.arg_utils import EngineArgs
        from vllm.model_executor.model_loader.tensorizer import TensorizerConfig, tensorize_vllm_model

        args = EngineArgs(model=stock, dtype=dtype, enforce_eager=True, max_model_len=512, seed=0)
        try:
            tensorize_vllm_model(args, TensorizerConfig(tensorizer_uri=str(target)))
        except Exception as exc:  # the tensors are written before the config/tokenizer copy, which asks the Hub
            if not target.exists():
                raise
            print(f"tensorize_vllm_model: tensors written; extra artifacts not: {exc!r}")
    if empty := empty_weights():
        # vLLM's CPU backend repacks every linear weight for oneDNN and replaces the parameter by an empty one
        # before tensorize_vllm_model serializes the module: its file lacks them. The checkpoint's own tensors
        # through tensorizer's serializer instead (vLLM's tensorizer loader reads it: its "not vLLM-tensorized" path)
        from safetensors.torch import load_file

        producer = ("tensorizer.TensorSerializer.write_state_dict(the checkpoint's tensors) "
                    f"({len(empty)} weights empty from vLLM's API)")
        tensors = {}
        for f in sorted(Path(stock).glob("*.safetensors")):
            tensors.update(load_file(f))
        serializer = TensorSerializer(str(target))
        serializer.write_state_dict({k: v.to(getattr(torch, dtype)) for k, v in tensors.items()})
        serializer.close()
        assert not empty_weights()
    for f in Path(stock).iterdir():  # config and tokenizer beside the tensors, as the Hub copy would have put them
        if f.suffix != ".safetensors" and not (out / f.name).exists():
            shutil.copy(f, out / f.name)
    (out / "producer.txt").write_text(producer + "\n")
"""


def tensorize_upstream(vllm_python: str, stock: Path, out: Path, dtype: str) -> Path:
    """Write vLLM's own tensorizer file of the stock model with vLLM's ``tensorize_vllm_model`` (once).

    On vLLM's CPU backend that API writes the linear layers' weights empty (they were repacked for oneDNN and
    dropped before it serializes the module); then tensorizer's ``TensorSerializer`` writes the checkpoint's own
    tensors instead, which vLLM's ``tensorizer`` load format also reads (as a model not tensorized by vLLM).
    ``producer.txt`` beside it says which.

    Args:
        vllm_python: the vLLM venv's interpreter (with vLLM's ``[tensorizer]`` extra).
        stock: the stock ``save_pretrained`` folder.
        out: the folder to write ``model.tensors`` into.
        dtype: the dtype vLLM serves in.

    Returns:
        The path of ``model.tensors``.

    Raises:
        RuntimeError: the tensorize step failed.
    """
    target = out / "model.tensors"
    if target.exists() and (out / "producer.txt").exists():
        return target
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_NO_USAGE_STATS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(ROOT)}  # fmt: skip
    done = subprocess.run([vllm_python, "-c", TENSORIZE, str(stock), str(out), dtype], env=env, cwd=ROOT,
                          capture_output=True, text=True)  # fmt: skip
    if done.returncode != 0 or not (out / "producer.txt").exists():
        shutil.rmtree(out, ignore_errors=True)
        raise RuntimeError(f"the tensorize step failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return target
