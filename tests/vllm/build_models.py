"""Build the tiny Llama the vLLM tests serve, inside the vLLM venv (so its tokenizer files match vLLM's
transformers): ``python tests/vllm/build_models.py OUT [--hidden N --layers N]``.

Writes ``OUT/stock`` (safetensors + config + tokenizer: what vLLM's default loader serves), ``OUT/artifact``
(the same model saved by ``hf_tensorizer.save_pretrained``), ``OUT/encrypted`` (the same, encrypted with the key
in ``OUT/model.key``) and ``OUT/broken`` (the artifact with bytes of one tensor overwritten, digests kept).
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


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--intermediate", type=int, default=None)
    p.add_argument("--vocab", type=int, default=257)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--only", default="stock,artifact,encrypted,broken")
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
    if "broken" in only:
        broken = os.path.join(args.out, "broken")
        shutil.copytree(os.path.join(args.out, "artifact"), broken, dirs_exist_ok=True)
        with open(os.path.join(broken, "model.tensors"), "r+b") as f:
            f.seek(-64, os.SEEK_END)  # inside the last tensor's data
            f.write(b"\xff" * 32)


if __name__ == "__main__":
    main()
