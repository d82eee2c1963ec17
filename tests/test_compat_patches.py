"""Every function hf_tensorizer patches keeps the stock signature, and stock code paths keep stock behaviour."""

from __future__ import annotations

import inspect
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")

import hf_tensorizer  # noqa: E402
from hf_tensorizer.integrations import patches  # noqa: E402


def _signature(owner: type | ModuleType, value: Any) -> inspect.Signature:
    """The signature a caller sees: ``Cls.attr`` (bound for a classmethod) or ``module.attr``."""
    if isinstance(owner, type) and hasattr(value, "__get__"):
        value = value.__get__(None, owner)
    return inspect.signature(value)


def _fn(value: Any) -> Any:
    return value.__func__ if isinstance(value, (classmethod, staticmethod)) else value


@pytest.fixture
def enabled(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    import peft  # noqa: F401  (so its hooks are installed too)

    monkeypatch.setenv("HF_TENSORIZER_CACHE", str(tmp_path / "cache"))
    hf_tensorizer.enable()
    yield
    hf_tensorizer.disable()


def test_every_patched_function_keeps_the_stock_signature(enabled: None) -> None:
    saved = list(patches._saved)
    assert len(saved) >= 10, "enable() patched less than expected: is the registry bypassed?"
    libraries = {patches._module_of(owner).split(".")[0] for owner, _, _ in saved}
    assert {"transformers", "diffusers", "peft"} <= libraries
    checked = 0
    for owner, name, orig in saved:
        now = owner.__dict__[name]
        assert now is not orig, f"{owner.__name__}.{name} is in the registry but not replaced"
        assert type(now) is type(orig), f"{owner.__name__}.{name}: {type(orig).__name__} became {type(now).__name__}"
        if not callable(_fn(orig)):
            continue
        assert _signature(owner, now) == _signature(owner, orig), f"{owner.__name__}.{name} lost its signature"
        fn = _fn(now)
        assert fn.__name__ == _fn(orig).__name__ and fn.__doc__ == _fn(orig).__doc__
        checked += 1
    assert checked >= 10


def test_the_replacement_functions_themselves_are_not_changed() -> None:
    class Owner:
        def method(self, a: int, *, b: str = "x") -> str:
            """stock"""
            return f"{a}{b}"

    def ours(self: Any, *args: Any, extra: bool = False, **kwargs: Any) -> str:
        return "ours:" + patches.stock(Owner, "method")(self, *args, **kwargs)

    patches.replace(Owner, "method", ours)
    try:
        assert inspect.signature(Owner.method) == inspect.signature(patches.stock(Owner, "method"))
        assert Owner.method.__doc__ == "stock" and Owner().method(1, b="y") == "ours:1y"
        assert Owner().method(2, extra=True) == "ours:2x"  # still our code, our keywords still accepted
        assert ours.__name__ == "ours" and "__signature__" not in ours.__dict__
    finally:
        patches.restore(__name__)
    assert Owner().method(1) == "1x"


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_diffusers_variant_save_writes_stock_file_names(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from test_integration_diffusers import _pipeline

    pipe = _pipeline(tmp_path)
    pipe.save_pretrained(tmp_path / "stock", variant="fp16", safe_serialization=False)
    monkeypatch.setenv("HF_TENSORIZER_CACHE", str(tmp_path / "cache"))
    hf_tensorizer.enable()
    try:
        pipe.save_pretrained(tmp_path / "enabled", variant="fp16", safe_serialization=False)
    finally:
        hf_tensorizer.disable()
    stock = _files(tmp_path / "stock")
    assert "text_encoder/model.fp16.safetensors" in stock  # transformers 5 writes safetensors whatever it is told
    assert _files(tmp_path / "enabled") == stock


def test_max_shard_size_warns_and_the_save_writes_one_file(enabled: None, tmp_path: Path) -> None:
    import warnings

    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64))
    with pytest.warns(UserWarning, match=r"max_shard_size='1MB' is ignored: .* one \.tensors file"):
        model.save_pretrained(tmp_path / "art", tensorized=True, max_shard_size="1MB")
    assert len(list((tmp_path / "art").rglob("*.tensors"))) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        model.save_pretrained(tmp_path / "quiet", tensorized=True)  # not given: nothing to warn about


def test_mixin_subclasses_show_the_stock_signatures(tmp_path: Path) -> None:
    from hf_tensorizer.integrations.mixin import TensorizerMixin

    base = transformers.GPT2LMHeadModel

    class Tiny(TensorizerMixin, base):
        pass

    class Own(TensorizerMixin, base):
        def save_pretrained(self, save_directory: Any, **kwargs: Any) -> Any:  # the user's override stays theirs
            return super().save_pretrained(save_directory, **kwargs)

    for name in ("from_pretrained", "save_pretrained", "push_to_hub"):
        assert inspect.signature(getattr(Tiny, name)) == inspect.signature(getattr(base, name)), name
    assert list(inspect.signature(Own.save_pretrained).parameters) == ["self", "save_directory", "kwargs"]
    model = Tiny(transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32))
    model.save_pretrained(tmp_path / "art", tensorized=True)  # still the mixin's code
    assert (tmp_path / "art" / "model.tensors").is_file()
    assert type(Tiny.from_pretrained(tmp_path / "art")) is Tiny
