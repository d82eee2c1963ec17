"""Tiny transformers models: ``write_module`` then ``load_into_module`` into a meta-device (or CPU) instance
gives bit-identical logits, with parameters, buffers, persistence, ties and ``requires_grad`` preserved."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import assert_same

from hf_tensorizer import TensorDeserializer, TensorKind, TensorSerializer, read_index
from hf_tensorizer.errors import UsageError
from hf_tensorizer.sources import FileSource

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()


def llama() -> tuple[type, Any]:
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   bos_token_id=0, eos_token_id=1, pad_token_id=2)  # fmt: skip
    return transformers.LlamaForCausalLM, cfg


def gpt2() -> tuple[type, Any]:
    cfg = transformers.GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                  bos_token_id=0, eos_token_id=1, tie_word_embeddings=True)  # fmt: skip
    return transformers.GPT2LMHeadModel, cfg


def bert() -> tuple[type, Any]:
    cfg = transformers.BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=64, pad_token_id=0)  # fmt: skip
    return transformers.BertModel, cfg


MODELS: dict[str, Callable[[], tuple[type, Any]]] = {"llama": llama, "gpt2": gpt2, "bert": bert}
INPUT = torch.tensor([[3, 17, 42, 99, 5, 64, 1, 127, 0, 8]])


def reference(name: str) -> tuple[torch.nn.Module, type, Any]:
    cls, cfg = MODELS[name]()
    torch.manual_seed(1234)
    model = cls(cfg).eval()
    with torch.no_grad():  # make every weight distinct from its init (norms and biases are constant at init)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    return model, cls, cfg


def outputs(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=INPUT)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def structure(model: torch.nn.Module) -> dict[str, Any]:
    return {
        "params": [n for n, _ in model.named_parameters(remove_duplicate=False)],
        "buffers": [n for n, _ in model.named_buffers(remove_duplicate=False)],
        "non_persistent": {n: sorted(m._non_persistent_buffers_set) for n, m in model.named_modules()},
        "state_dict": list(model.state_dict().keys()),
    }


@pytest.fixture(scope="module", params=list(MODELS))
def saved(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    name = request.param
    ref, cls, cfg = reference(name)
    path = tmp_path_factory.mktemp(name) / "model.tensors"
    with TensorSerializer(path) as s:
        s.write_module(ref)
    return {"name": name, "ref": ref, "cls": cls, "cfg": cfg, "path": path, "logits": outputs(ref)}


def test_file_holds_the_state_dict(saved: dict[str, Any]) -> None:
    ref: torch.nn.Module = saved["ref"]
    with FileSource(saved["path"]) as src:
        idx = read_index(src)
    sd = ref.state_dict()
    assert list(idx.tensors) == list(sd)  # exact keys, in order
    params = {n for n, _ in ref.named_parameters(remove_duplicate=False)}
    for name, e in idx.tensors.items():
        assert e.kind == (TensorKind.PARAMETER if name in params else TensorKind.BUFFER), name
    with TensorDeserializer(saved["path"], verify_hash=True) as d:
        for k, v in sd.items():
            assert_same(d[k], v, k)


@pytest.mark.parametrize("mode", [{}, {"lazy": True}, {"mmap": True}, {"strategy": "odirect", "verify_hash": True}])
def test_meta_model_gets_identical_logits(saved: dict[str, Any], mode: dict[str, Any]) -> None:
    name, cls, cfg, ref = saved["name"], saved["cls"], saved["cfg"], saved["ref"]
    with torch.device("meta"):
        model = cls(cfg)
    model.eval()
    before = structure(model)
    frozen = next(n for n, _ in model.named_parameters())
    model.get_parameter(frozen).requires_grad_(False)
    with TensorDeserializer(saved["path"], **mode) as d:
        info = d.load_into_module(model)
    assert info.missing_keys == [] and info.unexpected_keys == []

    assert structure(model) == before  # parameters, buffers, persistence: all as they were
    for n, p in model.named_parameters():
        assert isinstance(p, torch.nn.Parameter) and not p.is_meta, n
        assert p.requires_grad == (n != frozen), n
    for n, b in model.named_buffers():
        assert not isinstance(b, torch.nn.Parameter) and not b.is_meta, n
    for k, v in ref.state_dict().items():
        assert_same(model.state_dict()[k], v, k)
    if name == "gpt2":
        assert model.lm_head.weight is model.transformer.wte.weight
    assert_same(outputs(model), saved["logits"])


def test_cpu_model_loaded_in_place(saved: dict[str, Any]) -> None:
    """A model constructed on CPU (other seed) keeps its own non-persistent buffers and gets the weights."""
    cls, cfg = saved["cls"], saved["cfg"]
    torch.manual_seed(999)
    model = cls(cfg).eval()
    assert not torch.equal(outputs(model), saved["logits"])
    with TensorDeserializer(saved["path"]) as d:
        d.load_into_module(model)
    assert_same(outputs(model), saved["logits"])
    if saved["name"] == "gpt2":
        assert model.lm_head.weight is model.transformer.wte.weight


def test_dtype_cast_into_meta_model(saved: dict[str, Any]) -> None:
    cls, cfg = saved["cls"], saved["cfg"]
    with torch.device("meta"):
        model = cls(cfg)
    model.eval()
    with TensorDeserializer(saved["path"], dtype=torch.bfloat16) as d:
        d.load_into_module(model)
    for n, p in model.named_parameters():
        assert p.dtype == torch.bfloat16, n
    for n, b in model.named_buffers():
        assert not b.is_floating_point() or b.dtype in (torch.bfloat16, torch.float32), n
    ref = copy.deepcopy(saved["ref"]).to(torch.bfloat16)  # a copy: the module-scoped reference stays fp32
    assert_same(outputs(model), outputs(ref))


def test_strict_key_and_shape_checks(saved: dict[str, Any], tmp_path: Path) -> None:
    cls, cfg = saved["cls"], saved["cfg"]
    with torch.device("meta"):
        model = cls(cfg)
    with TensorDeserializer(saved["path"], filter=lambda n: not n.endswith("bias")) as d:
        expected_missing = [k for k in model.state_dict() if k.endswith("bias")]
        if expected_missing:
            with pytest.raises(UsageError, match="missing"):
                d.load_into_module(model)
            info = d.load_into_module(model, strict=False)
            assert info.missing_keys == expected_missing
    extra = dict(saved["ref"].state_dict())
    extra["not.in.model"] = torch.zeros(1)
    with TensorSerializer(tmp_path / "extra") as s:
        s.write_state_dict(extra)
    with TensorDeserializer(tmp_path / "extra") as d, pytest.raises(UsageError, match="unexpected"):
        d.load_into_module(model)
    wrong = {k: (torch.zeros(3) if i == 0 else v) for i, (k, v) in enumerate(saved["ref"].state_dict().items())}
    with TensorSerializer(tmp_path / "wrong") as s:
        s.write_state_dict(wrong)
    with torch.device("meta"):
        model = cls(cfg)
    with TensorDeserializer(tmp_path / "wrong") as d, pytest.raises(UsageError, match="shape"):
        d.load_into_module(model)


class WithBuffers(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 3)
        self.frozen = torch.nn.Parameter(torch.randn(2), requires_grad=False)
        self.register_buffer("persistent", torch.arange(5.0))
        self.register_buffer("scratch", torch.ones(2), persistent=False)
        self.register_buffer("nothing", None)
        self.shared = self.lin  # the same module twice: state_dict keys both, one set of tensors

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) + self.persistent[:3]


def test_plain_module_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    ref = WithBuffers()
    with TensorSerializer(tmp_path / "m") as s:
        s.write_module(ref)
    idx = read_index(FileSource(tmp_path / "m"))
    assert "scratch" not in idx.tensors  # non-persistent buffers are not written by default
    assert idx.tensors["shared.weight"].alias == "lin.weight"
    with torch.device("meta"):
        model = WithBuffers()
    # a plain module has no init hook to rebuild its non-persistent buffer: refused, named, with the way out
    with TensorDeserializer(tmp_path / "m") as d, pytest.raises(UsageError, match=r"\['scratch'\].*init_empty_weights"):
        d.load_into_module(model)
    accelerate = pytest.importorskip("accelerate")
    with accelerate.init_empty_weights():  # parameters on meta, buffers real
        model = WithBuffers()
    with TensorDeserializer(tmp_path / "m") as d:
        d.load_into_module(model)
    assert model.shared is model.lin and model.lin.weight is model.shared.weight
    assert not model.frozen.requires_grad and isinstance(model.frozen, torch.nn.Parameter)
    assert "persistent" in model._buffers and "scratch" in model._non_persistent_buffers_set
    assert not model.scratch.is_meta and model._buffers["nothing"] is None
    x = torch.randn(2, 4)
    assert_same(model(x), ref(x))

    with TensorSerializer(tmp_path / "all") as s:
        s.write_module(ref, include_non_persistent_buffers=True)
    with TensorDeserializer(tmp_path / "all") as d:
        assert_same(d["scratch"], ref.scratch)
        assert d.kind("scratch") == TensorKind.BUFFER
        with torch.device("meta"):
            model = WithBuffers()
        info = d.load_into_module(model)  # the file holds the non-persistent buffer: taken from it
    assert info.unexpected_keys == [] and "scratch" in model._non_persistent_buffers_set
    assert_same(model.scratch, ref.scratch)
    assert_same(model(x), ref(x))
