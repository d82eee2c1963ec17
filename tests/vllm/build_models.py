"""Build the tiny Llama the vLLM tests serve, inside the vLLM venv (so its tokenizer files match vLLM's
transformers): ``python tests/vllm/build_models.py OUT [--hidden N --layers N]``.

Writes ``OUT/stock`` (safetensors + config + tokenizer: what vLLM's default loader serves), ``OUT/artifact``
(the same model saved by ``hf_tensorizer.save_pretrained``), ``OUT/encrypted`` (the same, encrypted with the key
in ``OUT/model.key``) and ``OUT/broken`` (the artifact with bytes of one tensor overwritten, digests kept).
``--only quant`` writes ``OUT/quant-stock`` (a compressed-tensors W8A8 int8 checkpoint, the way llm-compressor
writes one) and ``OUT/quant-artifact`` (that checkpoint loaded by transformers and saved tensorized: the quantized
save path); ``--only lora`` writes ``OUT/lora-stock`` (a PEFT LoRA adapter of the stock model, stock safetensors)
and ``OUT/lora-artifact`` (the same adapter saved tensorized).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))  # the repository's integrations.tiny

import hf_tensorizer
from hf_tensorizer.crypto import EncryptionKey
from integrations.tiny import byte_tokenizer, causal_lm


def quantized(model: torch.nn.Module, tok: object, out: str, scheme: str = "w8a8") -> None:
    """``w8a8``: int8 weights with per-channel scales, dynamic per-token int8 activations; ``w4a16``: int4 weights
    in groups of 32, packed (``pack-quantized``). Schemes vLLM's CPU build runs."""
    import transformers
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
        apply_quantization_config,
    )
    from compressed_tensors.quantization.utils import calculate_qparams

    if scheme == "w8a8":
        weights = QuantizationArgs(num_bits=8, type="int", strategy="channel", symmetric=True, dynamic=False)
        acts = QuantizationArgs(num_bits=8, type="int", strategy="token", symmetric=True, dynamic=True)
        form = "int-quantized"
    else:
        weights = QuantizationArgs(num_bits=4, type="int", strategy="group", group_size=32, symmetric=True)
        acts, form = None, "pack-quantized"
    groups = {"g": QuantizationScheme(targets=["Linear"], weights=weights, input_activations=acts)}
    apply_quantization_config(model, QuantizationConfig(config_groups=groups, ignore=["lm_head"]))
    for module in model.modules():
        if getattr(module, "quantization_scheme", None) is None:
            continue
        w = module.weight.data.float()
        w = w.reshape(w.shape[0], -1, 32) if scheme == "w4a16" else w
        lo, hi = (w.amin(-1), w.amax(-1)) if scheme == "w4a16" else (w.amin(1, keepdim=True), w.amax(1, keepdim=True))
        scale, _ = calculate_qparams(lo, hi, weights)
        module.weight_scale.data.copy_(scale.to(module.weight_scale.dtype))
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format=form)
    compressor.compress_model(model)
    stock = os.path.join(out, "quant-stock")
    model.save_pretrained(stock)
    compressor.update_config(stock)
    tok.save_pretrained(stock)  # type: ignore[attr-defined]
    # the tensorized save of the pre-quantized model as transformers loads it (never run: a compressed-tensors
    # forward decompresses the weights in place)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(stock)
    hf_tensorizer.save_pretrained(loaded, os.path.join(out, "quant-artifact"), tokenizer=tok)


def lora(model: torch.nn.Module, out: str) -> None:
    """A LoRA adapter on every attention and MLP projection, non-zero random B (an untrained adapter is a no-op)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                            "up_proj", "down_proj"])  # fmt: skip
    peft_model = get_peft_model(model, config)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    peft_model.save_pretrained(os.path.join(out, "lora-stock"))
    hf_tensorizer.enable()  # peft's save_pretrained takes tensorized=True
    peft_model.save_pretrained(os.path.join(out, "lora-artifact"), tensorized=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--intermediate", type=int, default=None)
    p.add_argument("--vocab", type=int, default=257)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--only", default="stock,artifact,encrypted,broken")
    p.add_argument("--scheme", default="w8a8", choices=["w8a8", "w4a16"])
    args = p.parse_args()
    only = set(args.only.split(","))
    model = causal_lm(hidden=args.hidden, layers=args.layers, vocab=args.vocab, intermediate=args.intermediate)
    model = model.to(getattr(torch, args.dtype))
    tok = byte_tokenizer()
    os.makedirs(args.out, exist_ok=True)
    if "stock" in only:
        model.save_pretrained(os.path.join(args.out, "stock"))
        tok.save_pretrained(os.path.join(args.out, "stock"))
    if only & {"artifact", "broken"}:
        hf_tensorizer.save_pretrained(model, os.path.join(args.out, "artifact"), tokenizer=tok)
    if "encrypted" in only:
        key = EncryptionKey.generate()
        key.save(os.path.join(args.out, "model.key"))
        hf_tensorizer.save_pretrained(model, os.path.join(args.out, "encrypted"), tokenizer=tok, encryption=key)
    if "quant" in only:
        quantized(causal_lm(hidden=args.hidden, layers=args.layers, vocab=args.vocab, intermediate=256), tok,
                  args.out, args.scheme)  # fmt: skip
    if "lora" in only:
        lora(model, args.out)
    if "broken" in only:
        broken = os.path.join(args.out, "broken")
        shutil.copytree(os.path.join(args.out, "artifact"), broken, dirs_exist_ok=True)
        with open(os.path.join(broken, "model.tensors"), "r+b") as f:
            f.seek(-64, os.SEEK_END)  # inside the last tensor's data
            f.write(b"\xff" * 32)


if __name__ == "__main__":
    main()
