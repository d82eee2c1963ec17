"""Small models built from configs (no download), for tests, notebooks and the cold-start benchmark.

``byte_tokenizer()`` is a real byte-level BPE tokenizer without merges: every UTF-8 byte is one token, so any
text round-trips and nothing has to be fetched. ``causal_lm()`` builds a Llama causal LM of the requested size
with fixed-seed weights, ``sd_pipeline()`` a tiny Stable Diffusion pipeline (UNet, VAE, CLIP text encoder,
CLIP tokenizer, DDIM).
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

import torch

EOS = "<|endoftext|>"
BYTE_VOCAB = 257  # 256 bytes + EOS


def byte_tokenizer() -> Any:
    """A ``PreTrainedTokenizerFast``: byte-level BPE, no merges, ids 0..255 = bytes, 256 = EOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet(), key=_byte_of)
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    vocab[EOS] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=EOS,
                                   model_max_length=4096)  # fmt: skip


def _byte_of(ch: str) -> int:
    # GPT-2's byte <-> unicode map: printable bytes map to themselves, the rest to 256 + n in byte order
    code = ord(ch)
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    if code in printable:
        return code
    others = [b for b in range(256) if b not in printable]
    return others[code - 256]


def causal_lm(
    hidden: int = 64, layers: int = 2, vocab: int = BYTE_VOCAB, intermediate: int | None = None, seed: int = 0
) -> Any:
    """A ``LlamaForCausalLM`` with fixed-seed random weights (eval mode, float32), untied embeddings.

    Args:
        hidden: hidden size; heads of 64 from 64 up (1 head at 64), 4 heads below.
        layers: decoder layers.
        vocab: vocabulary size (>= 257 to cover :func:`byte_tokenizer`).
        intermediate: MLP size, default ``hidden * 8 // 3`` rounded to a multiple of 16.
        seed: torch seed for the weights.
    """
    import transformers

    heads = max(1, hidden // 64) if hidden >= 64 else 4
    inter = intermediate or max(16, (hidden * 8 // 3) // 16 * 16)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                                   num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                                   max_position_embeddings=2048, bos_token_id=256, eos_token_id=256,
                                   pad_token_id=256, tie_word_embeddings=False)  # fmt: skip
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg).eval()


def clip_tokenizer(folder: str | None = None) -> Any:
    """A ``CLIPTokenizer`` over lower-case letters (vocab written to ``folder``, or to a temporary folder)."""
    import transformers

    if folder is None:  # the tokenizer reads its files once: a folder removed again right after
        with tempfile.TemporaryDirectory(prefix="tiny-clip-tok-") as tmp:
            return clip_tokenizer(tmp)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "!": 2}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")
    return transformers.CLIPTokenizer(vocab=os.path.join(folder, "vocab.json"),
                                      merges=os.path.join(folder, "merges.txt"), model_max_length=16)  # fmt: skip


def sd_pipeline(seed: int = 0) -> Any:
    """A tiny ``StableDiffusionPipeline`` (16x16 images, 2-layer CLIP) with fixed-seed weights."""
    import diffusers
    import transformers

    tok = clip_tokenizer()
    torch.manual_seed(seed)
    text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=16, projection_dim=32, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )).eval()  # fmt: skip
    unet = diffusers.UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, norm_num_groups=32,
    )  # fmt: skip
    vae = diffusers.AutoencoderKL(block_out_channels=[32, 64], in_channels=3, out_channels=3, latent_channels=4,
                                  down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                                  norm_num_groups=32, sample_size=16)  # fmt: skip
    scheduler = diffusers.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                        clip_sample=False, set_alpha_to_one=False, steps_offset=1)  # fmt: skip
    return diffusers.StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tok,
                                             scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                             requires_safety_checker=False)  # fmt: skip
