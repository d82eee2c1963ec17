"""First use in a fresh process imports only what the path needs (side effects, never timings): loading a file
does not import the writer, the upstream decoder, the CUDA prewarm or ISA-L; the switch-free API with a
transformers model never imports diffusers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _modules_after(code: str, tmp_path: Path) -> set[str]:
    """The modules imported by ``code`` in a fresh interpreter (this checkout first on the path)."""
    script = code + "\nimport sys, json\nprint('@@' + json.dumps(sorted(sys.modules)))\n"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith("@@"))
    return set(json.loads(line[2:]))


def test_loading_a_file_imports_only_the_read_path(tmp_path: Path) -> None:
    from hf_tensorizer import TensorSerializer

    with TensorSerializer(tmp_path / "m.tensors") as s:
        s.write_state_dict({"w": torch.arange(4096, dtype=torch.float32), "b": torch.ones(3)})
    mods = _modules_after(
        "from hf_tensorizer import TensorDeserializer\n"
        "d = TensorDeserializer('m.tensors')\n"
        "assert float(d['w'].sum()) == 4095 * 4096 / 2\n",
        tmp_path,
    )
    assert "hf_tensorizer.engine.reader" in mods
    for unneeded in ("hf_tensorizer.engine.writer", "hf_tensorizer.upstream.format", "hf_tensorizer.engine.layout",
                     "hf_tensorizer.engine.prewarm", "isal", "hf_tensorizer.engine.distributed",
                     "hf_tensorizer.engine.rankwatch", "hf_tensorizer.engine.modules", "hf_tensorizer.engine.slices",
                     "hf_tensorizer.engine.staging", "hf_tensorizer.format.safetensors"):  # fmt: skip
        assert unneeded not in mods, unneeded
    # 30 before issue 24's first-use work, 27 after, 25, then 26 with format.checksum (the CRC32 that verification
    # and the S3 sink share, one small module): a new module on this path should be a choice
    ours = sorted(m for m in mods if m == "hf_tensorizer" or m.startswith("hf_tensorizer."))
    assert len(ours) <= 26, ours


def test_get_slice_and_safetensors_files_import_what_they_need(tmp_path: Path) -> None:
    """What a plain load leaves out is imported on first use: get_slice's slices, the safetensors header decoder."""
    from safetensors.torch import save_file

    save_file({"w": torch.arange(12, dtype=torch.float32).reshape(3, 4)}, str(tmp_path / "m.safetensors"))
    mods = _modules_after(
        "import torch\n"
        "from hf_tensorizer import TensorDeserializer\n"
        "from hf_tensorizer.engine.handle import HandleSlice\n"
        "d = TensorDeserializer('m.safetensors')\n"
        "s = d.get_slice('w')\n"
        "assert isinstance(s, HandleSlice) and torch.equal(s[1:, 2], torch.tensor([6.0, 10.0]))\n"
        "assert d.slice_metrics.requests >= 1\n",
        tmp_path,
    )
    assert {"hf_tensorizer.engine.slices", "hf_tensorizer.format.safetensors"} <= mods


def test_load_info_is_still_exported_where_it_was() -> None:
    import hf_tensorizer
    from hf_tensorizer.engine import modules, reader

    assert hf_tensorizer.LoadInfo is reader.LoadInfo is modules.LoadInfo


def test_upstream_magic_is_the_upstream_decoders() -> None:
    from hf_tensorizer.format import sniff
    from hf_tensorizer.upstream import format as upstream

    assert sniff.UPSTREAM_MAGIC == upstream.UPSTREAM_MAGIC
    assert sniff.sniff(upstream.UPSTREAM_MAGIC + b"\0" * 8) == sniff.UPSTREAM


def test_transformers_from_pretrained_does_not_import_diffusers(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    pytest.importorskip("diffusers")  # where it is not installed the check below proves nothing
    mods = _modules_after(
        "import torch, transformers, hf_tensorizer\n"
        "cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,\n"
        "                               num_attention_heads=4, num_key_value_heads=2)\n"
        "torch.manual_seed(0)\n"
        "ref = transformers.LlamaForCausalLM(cfg).eval()\n"
        "hf_tensorizer.save_pretrained(ref, 'art')\n"
        "m = hf_tensorizer.from_pretrained(transformers.AutoModelForCausalLM, 'art')\n"
        "assert all(torch.equal(a, b) for a, b in zip(ref.state_dict().values(), m.state_dict().values()))\n",
        tmp_path,
    )
    assert "hf_tensorizer.integrations.adapters.transformers.load" in mods
    assert not {m for m in mods if m == "diffusers" or m.startswith("diffusers.")}


def test_a_cpu_load_naming_its_device_does_not_import_the_cuda_prewarm(tmp_path: Path) -> None:
    from hf_tensorizer import TensorSerializer

    with TensorSerializer(tmp_path / "m.tensors") as s:
        s.write_state_dict({"w": torch.ones(8)})
    mods = _modules_after(
        "import torch\nfrom hf_tensorizer import TensorDeserializer\n"
        "for dev in ('cpu', torch.device('cpu')):\n"
        "    assert float(TensorDeserializer('m.tensors', device=dev)['w'].sum()) == 8\n",
        tmp_path,
    )
    assert "hf_tensorizer.engine.prewarm" not in mods
