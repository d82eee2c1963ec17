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
"""

from __future__ import annotations

WEIGHTS_NAME = "model.tensors"
SHARD_INDEX_NAMES = ("model.safetensors.index.json", "diffusion_pytorch_model.safetensors.index.json")
SAFETENSORS_FILE_NAMES = ("model.safetensors", "diffusion_pytorch_model.safetensors")
# The names a stock transformers / diffusers folder keeps its weights under, in the order they are looked for.
SAFETENSORS_NAMES = SHARD_INDEX_NAMES + SAFETENSORS_FILE_NAMES

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
