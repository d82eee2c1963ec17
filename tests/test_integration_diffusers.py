"""diffusers integration: a tiny Stable Diffusion pipeline built from configs, same image after round trips."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from helpers import meta_tensors  # noqa: E402

import hf_tensorizer  # noqa: E402
from hf_tensorizer.integrations.adapters.diffusers.models import save_model, save_pipeline  # noqa: E402
from hf_tensorizer.integrations.artifact.manifest import MANIFEST_NAME  # noqa: E402


def _tokenizer(tmp_path: Path) -> Any:
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "!": 2}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    return transformers.CLIPTokenizer(vocab=str(tmp_path / "vocab.json"), merges=str(tmp_path / "merges.txt"),
                                      model_max_length=16)  # fmt: skip


def _unet() -> Any:
    return diffusers.UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, norm_num_groups=32,
    )  # fmt: skip


def _pipeline(tmp_path: Path) -> Any:
    tok = _tokenizer(tmp_path)
    torch.manual_seed(0)
    text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=16, projection_dim=32, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )).eval()  # fmt: skip
    vae = diffusers.AutoencoderKL(block_out_channels=[32, 64], in_channels=3, out_channels=3, latent_channels=4,
                                  down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                                  norm_num_groups=32, sample_size=16)  # fmt: skip
    scheduler = diffusers.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                        clip_sample=False, set_alpha_to_one=False, steps_offset=1)  # fmt: skip
    return diffusers.StableDiffusionPipeline(unet=_unet(), vae=vae, text_encoder=text_encoder, tokenizer=tok,
                                             scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                             requires_safety_checker=False)  # fmt: skip


def _image(pipe: Any) -> np.ndarray:
    return pipe("a cat", num_inference_steps=2, guidance_scale=2.0, generator=torch.Generator().manual_seed(0),
                output_type="np", height=16, width=16).images  # fmt: skip


pytestmark = pytest.mark.usefixtures("hf_enabled")


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, np.ndarray]:
    pipe = _pipeline(tmp_path_factory.mktemp("tok"))
    return pipe, _image(pipe)


def test_pipeline_local_round_trip(reference: tuple[Any, np.ndarray], tmp_path: Path) -> None:
    pipe, image = reference
    pipe.save_pretrained(tmp_path / "sd", tensorized=True)
    manifest = json.loads((tmp_path / "sd" / MANIFEST_NAME).read_text())
    for comp in ("unet", "vae", "text_encoder"):
        assert f"{comp}/model.tensors" in manifest["files"]
    assert "scheduler/scheduler_config.json" in manifest["files"]
    assert not list((tmp_path / "sd").rglob("*.safetensors"))
    loaded = diffusers.DiffusionPipeline.from_pretrained(tmp_path / "sd")
    assert type(loaded) is type(pipe)
    for comp in ("unet", "vae", "text_encoder"):
        assert not meta_tensors(getattr(loaded, comp))
    assert np.array_equal(_image(loaded), image)


def test_pipeline_s3_round_trip(reference: tuple[Any, np.ndarray], moto_s3: str, s3_bucket: str,
                                monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    pipe, image = reference
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_s3)
    uri = f"s3://{s3_bucket}/pipes/tiny-sd"
    save_pipeline(pipe, uri)
    loaded = diffusers.StableDiffusionPipeline.from_pretrained(uri)
    assert np.array_equal(_image(loaded), image)
    # a component on its own, straight from its subfolder
    unet = diffusers.UNet2DConditionModel.from_pretrained(uri, subfolder="unet")
    assert all(torch.equal(a, b) for a, b in zip(pipe.unet.state_dict().values(), unet.state_dict().values()))


def test_stock_pipeline_streams_from_s3_and_file_uri(reference: tuple[Any, np.ndarray], tmp_path: Path,
                                                     moto_s3: str, s3_client: Any, s3_bucket: str,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """A pipeline saved by stock diffusers (safetensors per component, no model.tensors) loads from S3 and
    from a file:// URI with every component's weights streamed through our engine: the same image."""
    from hf_tensorizer.integrations.loading import weights  # every load of weights, any library, goes through here

    pipe, image = reference
    pipe.save_pretrained(tmp_path / "stock")  # hooks on, but not tensorized: stock safetensors
    assert not list((tmp_path / "stock").rglob("*.tensors")) and list((tmp_path / "stock").rglob("*.safetensors"))
    for p in (tmp_path / "stock").rglob("*"):
        if p.is_file():
            s3_client.upload_file(str(p), s3_bucket, f"stock-sd/{p.relative_to(tmp_path / 'stock').as_posix()}")
    read: list[str] = []

    def spy(module: Any) -> None:
        real = module.TensorDeserializer

        def counting(source: Any, *args: Any, **kwargs: Any) -> Any:
            read.append(str(getattr(source, "uri", source)))
            return real(source, *args, **kwargs)

        monkeypatch.setattr(module, "TensorDeserializer", counting)

    spy(weights)
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_s3)
    for uri in (f"s3://{s3_bucket}/stock-sd", (tmp_path / "stock").as_uri()):
        read.clear()
        loaded = diffusers.DiffusionPipeline.from_pretrained(uri)
        assert np.array_equal(_image(loaded), image), uri
        assert {u.rsplit("/", 2)[-2] for u in read} == {"unet", "vae", "text_encoder"}, read
        assert all(u.endswith(".safetensors") for u in read)
    read.clear()
    diffusers.DiffusionPipeline.from_pretrained(tmp_path / "stock")  # a plain path stays stock
    assert read == []


def test_model_dtype_device_and_loading_info(tmp_path: Path) -> None:
    torch.manual_seed(0)
    ref = _unet()
    save_model(ref, tmp_path / "unet")
    half, info = diffusers.UNet2DConditionModel.from_pretrained(tmp_path / "unet", torch_dtype=torch.bfloat16,
                                                                device_map="cpu", output_loading_info=True)  # fmt: skip
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    assert not meta_tensors(half)
    for a, b in zip(ref.state_dict().values(), half.state_dict().values()):
        assert torch.equal(a.to(torch.bfloat16) if a.is_floating_point() else a, b)


def test_model_save_pretrained_hook_and_errors(tmp_path: Path) -> None:
    torch.manual_seed(0)
    ref = diffusers.AutoencoderKL(block_out_channels=[32], down_block_types=["DownEncoderBlock2D"],
                                  up_block_types=["UpDecoderBlock2D"], norm_num_groups=32, sample_size=8)  # fmt: skip
    ref.save_pretrained(tmp_path / "vae", tensorized=True)
    loaded = diffusers.AutoencoderKL.from_pretrained(tmp_path / "vae")
    x = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(ref(x).sample, loaded(x).sample)
    (tmp_path / "vae" / "model.tensors").unlink()
    with pytest.raises(OSError):  # no weights at all: stock diffusers takes over and says so
        diffusers.AutoencoderKL.from_pretrained(tmp_path / "vae")


def test_save_options_reach_the_serializer(reference: tuple[Any, np.ndarray], tmp_path: Path) -> None:
    """Serializer arguments given to save_pretrained (a key, metadata) are used, never silently dropped."""
    from hf_tensorizer.crypto import EncryptionKey
    from hf_tensorizer.errors import MissingKeyError, UsageError

    pipe, image = reference
    key = EncryptionKey.generate()
    pipe.save_pretrained(tmp_path / "enc", tensorized=True, encryption=key, metadata={"note": "x"},
                         safe_serialization=True)  # fmt: skip
    index = hf_tensorizer.read_index(str(tmp_path / "enc" / "unet" / "model.tensors"))
    assert index.encrypted and index.metadata["note"] == "x"
    with pytest.raises(MissingKeyError):
        diffusers.DiffusionPipeline.from_pretrained(tmp_path / "enc")
    loaded = diffusers.DiffusionPipeline.from_pretrained(tmp_path / "enc", tensorizer_options={"encryption": key})
    assert np.array_equal(_image(loaded), image)
    save_model(pipe.unet, tmp_path / "unet", metadata={"note": "y"})
    assert hf_tensorizer.read_index(str(tmp_path / "unet" / "model.tensors")).metadata["note"] == "y"
    with pytest.raises(UsageError, match="encrpytion"):
        pipe.unet.save_pretrained(tmp_path / "typo", tensorized=True, encrpytion=key)


def test_cli_serializes_a_pipeline_folder(reference: tuple[Any, np.ndarray], tmp_path: Path) -> None:
    from hf_tensorizer.cli import main

    pipe, image = reference
    pipe.save_pretrained(tmp_path / "stock")  # a plain diffusers folder (safetensors)
    assert main(["serialize", "--hf-model-id", str(tmp_path / "stock"), "--dest", str(tmp_path / "art")]) == 0
    loaded = diffusers.DiffusionPipeline.from_pretrained(tmp_path / "art")
    assert np.array_equal(_image(loaded), image)
