"""push_to_hub of tensorized artifacts against the local Hub server, and loading them back from hf://."""

from __future__ import annotations

from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")

from hf_tensorizer.errors import UsageError  # noqa: E402
from hf_tensorizer.integrations.push import TAG, push_to_hub  # noqa: E402

pytestmark = pytest.mark.usefixtures("hf_enabled")


@pytest.fixture
def hub(hub_server: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    """The local Hub; README metadata validation (``/api/validate-yaml``) skipped only if the server lacks it."""
    import httpx
    from huggingface_hub import HfApi

    status = httpx.post(
        hub_server.endpoint + "/api/validate-yaml", json={"content": "", "repoType": "model"}
    ).status_code
    if status == 404:  # TODO(lead): add the endpoint to tests/servers/hub.py; then this branch is dead
        monkeypatch.setattr(HfApi, "_validate_yaml", lambda self, content, **kw: None)
    return hub_server


def _gpt2() -> Any:
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32,
                                  bos_token_id=0, eos_token_id=1)  # fmt: skip
    return transformers.GPT2LMHeadModel(cfg).eval()


def test_push_and_load_back(hub: Any) -> None:
    from huggingface_hub import HfApi, ModelCard

    model = _gpt2()
    info = model.push_to_hub("tester/tiny-gpt2", tensorized=True, token=hub.token)
    api = HfApi(endpoint=hub.endpoint, token=hub.token)
    files = set(api.list_repo_files("tester/tiny-gpt2"))
    assert {"model.tensors", "config.json", "hf_tensorizer.json", "README.md"} <= files
    assert not any(f.endswith(".safetensors") for f in files)
    card = ModelCard.load("tester/tiny-gpt2", token=hub.token)
    assert TAG in card.data.tags
    x = torch.tensor([[1, 5, 9, 13]])
    for uri in ("hf://tester/tiny-gpt2", f"hf://tester/tiny-gpt2@{info.oid}"):
        loaded = transformers.AutoModelForCausalLM.from_pretrained(uri)
        with torch.no_grad():
            assert torch.equal(model(x).logits, loaded(x).logits)
        assert loaded.lm_head.weight is loaded.transformer.wte.weight


def test_push_keeps_existing_card_and_rejects_unknown(hub: Any) -> None:
    model = _gpt2()
    push_to_hub(model, "tester/again", token=hub.token, tags=["tiny"])
    push_to_hub(model, "tester/again", token=hub.token, commit_message="second")
    from huggingface_hub import ModelCard

    tags = ModelCard.load("tester/again", token=hub.token).data.tags
    assert TAG in tags and "tiny" in tags
    with pytest.raises(UsageError):
        push_to_hub(torch.nn.Linear(2, 2), "tester/nope", token=hub.token)


def test_branch_loads_are_pinned_to_one_commit(hub: Any) -> None:
    """A load from a branch reads every file (configs, index, weights) from the commit it pointed to."""
    from hf_tensorizer.integrations.artifact.cache import resolve
    from hf_tensorizer.integrations.loading.weights import weights_uris
    from hf_tensorizer.sources.hub import pin_revision

    model = _gpt2()
    first = model.push_to_hub("tester/pinned", tensorized=True, token=hub.token)
    pinned = pin_revision("hf://tester/pinned")
    assert pinned == f"hf://tester/pinned@{first.oid}"
    assert pin_revision(pinned) == pinned  # already a commit: no request, no change
    folder = resolve("hf://tester/pinned")
    assert weights_uris(folder) == [f"hf://tester/pinned@{first.oid}/model.tensors"]
    torch.manual_seed(1)
    second = _gpt2().push_to_hub("tester/pinned", tensorized=True, token=hub.token)  # the branch moves on
    assert pin_revision("hf://tester/pinned") == f"hf://tester/pinned@{second.oid}"
