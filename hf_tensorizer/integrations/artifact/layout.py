"""The names inside an artifact or a stock model folder: where the weights are, which small files to look for.

An artifact is a directory (or a prefix of one: ``s3://bucket/prefix``, ``https://host/prefix``,
``hf://org/repo[@revision][/sub]``) that looks like a Hugging Face model folder except that the weights are one
hf_tensorizer file::

    <root>/
        hf_tensorizer.json        manifest: format version, library, every file of the artifact
        config.json               (transformers) / model_index.json (diffusers pipelines)
        generation_config.json    tokenizer / processor files, scheduler configs, ...
        model.tensors             the weights, hub key layout
        unet/config.json          pipelines: one folder per component, each with its own
        unet/model.tensors        model.tensors when the component has weights

A stock folder keeps its weights as ``model.safetensors`` (or shards listed in ``model.safetensors.index.json``;
diffusers' ``diffusion_pytorch_model.*`` names); those stream through the same engine.

A variant (``variant="fp16"``) names its weights as transformers and diffusers do: the variant before the last
extension, ``model.fp16.tensors``, ``model.fp16.safetensors``, ``model.safetensors.index.fp16.json``,
``diffusion_pytorch_model.fp16.safetensors``; the small files are shared by every variant.
"""

from __future__ import annotations

WEIGHTS_NAME = "model.tensors"
SHARD_INDEX_NAMES = ("model.safetensors.index.json", "diffusion_pytorch_model.safetensors.index.json")
SAFETENSORS_FILE_NAMES = ("model.safetensors", "diffusion_pytorch_model.safetensors")
# The names a stock transformers / diffusers folder keeps its weights under, in the order they are looked for.
SAFETENSORS_NAMES = SHARD_INDEX_NAMES + SAFETENSORS_FILE_NAMES


def add_variant(name: str, variant: str | None) -> str:
    """``name`` with ``variant`` before its last extension (transformers' and diffusers' ``_add_variant``)."""
    if not variant:
        return name
    stem, ext = name.rsplit(".", 1)
    return f"{stem}.{variant}.{ext}"


def weights_name(variant: str | None = None) -> str:
    """The tensorized weights file of a folder: ``model.tensors``, or ``model.<variant>.tensors``."""
    return add_variant(WEIGHTS_NAME, variant)


def safetensors_names(variant: str | None = None) -> tuple[str, ...]:
    """:data:`SAFETENSORS_NAMES` of ``variant``, in the order they are looked for."""
    return tuple(add_variant(n, variant) for n in SAFETENSORS_NAMES)


def is_weights_name(name: str) -> bool:
    """Whether a file name is tensorized weights of some variant (``model.tensors``, ``model.fp16.tensors``)."""
    return name == WEIGHTS_NAME or (name.startswith("model.") and name.endswith(".tensors") and name.count(".") == 2)


# Probed when a remote artifact has no manifest (written by hand or by another tool).
KNOWN_FILES = (
    "config.json",
    "generation_config.json",
    "model_index.json",
    "scheduler_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
    "processor_config.json",
    "image_processor_config.json",
    "feature_extractor_config.json",
)
