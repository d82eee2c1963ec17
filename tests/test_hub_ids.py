"""Bare Hub ids and the Hugging Face cache (issue 15), against the local Hub server.

``from_pretrained("org/name")`` of a repository holding a tensorized artifact loads through hf_tensorizer (one
``HEAD`` decides, remembered for the process, or the local cache); a stock repository stays stock; ``revision=``,
``subfolder=``, ``token=``, ``cache_dir=`` and ``local_files_only=`` / ``HF_HUB_OFFLINE`` keep their meaning; an
artifact in the Hugging Face cache loads from local disk, offline included.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("hf_enabled")

X = torch.tensor([[1, 5, 9, 13]])


def _gpt2(seed: int = 0) -> Any:
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32,
                                  bos_token_id=0, eos_token_id=1)  # fmt: skip
    return transformers.GPT2LMHeadModel(cfg).eval()


def _same(a: Any, b: Any) -> bool:
    with torch.no_grad():
        return torch.equal(a(X).logits, b(X).logits)


def _requests(hub: Any, what: str) -> list[dict[str, Any]]:
    return [e for e in hub.log if what in e["path"]]


def test_bare_id_of_an_artifact_loads_through_us_deciding_once(hub_server: Any, monkeypatch: Any) -> None:
    monkeypatch.setenv("HF_TOKEN", hub_server.token)
    model = _gpt2()
    model.push_to_hub("tester/tz", tensorized=True)
    hub_server.log.clear()
    auto = transformers.AutoModelForCausalLM.from_pretrained("tester/tz")
    direct = transformers.GPT2LMHeadModel.from_pretrained("tester/tz")
    config = transformers.AutoConfig.from_pretrained("tester/tz")
    assert _same(model, auto) and _same(model, direct)
    assert auto.lm_head.weight is auto.transformer.wte.weight
    assert auto.name_or_path == direct.name_or_path == config.name_or_path == "tester/tz"
    # one HEAD of the manifest at the branch for the three calls; no stock file was asked for
    assert len(_requests(hub_server, "/resolve/main/hf_tensorizer.json")) == 1
    assert not _requests(hub_server, ".safetensors") and not _requests(hub_server, ".bin")


def test_stock_repo_stays_stock(hub_server: Any, monkeypatch: Any) -> None:
    monkeypatch.setenv("HF_TOKEN", hub_server.token)
    model = _gpt2(1)
    model.push_to_hub("tester/stock")  # no tensorized=True: stock safetensors
    hub_server.log.clear()
    for _ in range(2):
        loaded = transformers.AutoModelForCausalLM.from_pretrained("tester/stock")
        assert _same(model, loaded)
        assert not hasattr(loaded, "hf_tensorizer_metrics")
    assert len(_requests(hub_server, "hf_tensorizer.json")) == 1  # the one request, remembered
    assert _requests(hub_server, "model.safetensors")


def test_revision_token_and_subfolder(hub_server: Any) -> None:
    from huggingface_hub import HfApi

    api = HfApi(endpoint=hub_server.endpoint, token=hub_server.token)
    api.create_repo("tester/private", private=True)
    first, second = _gpt2(2), _gpt2(3)
    one = first.push_to_hub("tester/private", tensorized=True, token=hub_server.token)
    second.push_to_hub("tester/private", tensorized=True, token=hub_server.token)
    cls = transformers.AutoModelForCausalLM
    assert _same(second, cls.from_pretrained("tester/private", token=hub_server.token))
    assert _same(first, cls.from_pretrained("tester/private", revision=one.oid, token=hub_server.token))
    with pytest.raises(OSError):  # no token: the stock path says the repository cannot be found
        cls.from_pretrained("tester/private")
    # an artifact saved into a folder of a repository
    api.create_repo("tester/multi")
    first.save_pretrained("hf://tester/multi/small", tensorized=True, tensorizer_options={"token": hub_server.token})
    loaded = cls.from_pretrained("tester/multi", subfolder="small", token=hub_server.token)
    assert _same(first, loaded) and loaded.name_or_path == "tester/multi"


def test_snapshot_download_loads_from_local_disk_online_and_offline(
    hub_server: Any, monkeypatch: Any, tmp_path: Path
) -> None:
    from huggingface_hub import constants, snapshot_download

    model = _gpt2(4)
    model.push_to_hub("tester/cached", tensorized=True, token=hub_server.token)
    cache = tmp_path / "hf-cache"
    snapshot_download("tester/cached", cache_dir=cache, endpoint=hub_server.endpoint)
    hub_server.log.clear()
    hub_server.cdn_log.clear()
    online = transformers.AutoModelForCausalLM.from_pretrained("tester/cached", cache_dir=cache)
    assert _same(model, online)
    assert not _requests(hub_server, "/resolve/")  # decided from the cache; every file read from local disk
    assert not hub_server.cdn_log
    hub_server.stop()
    offline = transformers.AutoModelForCausalLM.from_pretrained("tester/cached", cache_dir=cache,
                                                                local_files_only=True)  # fmt: skip
    assert _same(model, offline)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert _same(model, transformers.GPT2LMHeadModel.from_pretrained("tester/cached", cache_dir=cache))


def test_write_through_then_offline_bit_identical(hub_server: Any, monkeypatch: Any, tmp_path: Path) -> None:
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    hub_server.lfs_threshold = 4096  # model.tensors through the CDN, as on huggingface.co
    model = _gpt2(5)
    model.push_to_hub("tester/wt", tensorized=True, token=hub_server.token)
    cache = tmp_path / "hf-cache"
    first = transformers.AutoModelForCausalLM.from_pretrained(
        "tester/wt", cache_dir=cache, tensorizer_options={"write_through": True}
    )
    assert _same(model, first)
    snap = cache / repo_folder_name(repo_id="tester/wt", repo_type="model") / "snapshots"
    (commit,) = [p.name for p in snap.iterdir()]
    assert commit == hub_server.head("tester/wt")
    assert (snap / commit / "model.tensors").read_bytes() == hub_server.read("tester/wt", "model.tensors")
    assert not list(cache.rglob(".hf_tensorizer-*"))  # no temporary file left
    hub_server.log.clear()
    hub_server.cdn_log.clear()
    again = transformers.AutoModelForCausalLM.from_pretrained("tester/wt", cache_dir=cache)
    assert _same(model, again)
    assert not hub_server.cdn_log and not _requests(hub_server, "model.tensors")  # no range request the 2nd time
    hub_server.stop()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    offline = transformers.AutoModelForCausalLM.from_pretrained("tester/wt", cache_dir=cache)
    for a, b in zip(first.state_dict().values(), offline.state_dict().values()):
        assert torch.equal(a, b)


def test_pushed_card_is_discoverable_and_its_snippet_runs(hub_server: Any, tmp_path: Path) -> None:
    import os
    import re
    import subprocess
    import sys

    from huggingface_hub import ModelCard, hf_hub_download

    from hf_tensorizer.integrations.push import CARD_SECTION, push_to_hub

    model = _gpt2(6)
    push_to_hub(model, "tester/card", token=hub_server.token)
    readme = Path(hf_hub_download("tester/card", "README.md", cache_dir=tmp_path / "dl")).read_text()
    card = ModelCard(readme)
    assert card.data.library_name == "transformers"
    assert {"hf_tensorizer", "tensorized"} <= set(card.data.tags)
    (snippet,) = re.findall(r"```python\n(.*?)```", readme, re.S)
    assert 'AutoModelForCausalLM.from_pretrained("tester/card"' in snippet
    check = "\nimport torch\nx = torch.tensor([[1, 5, 9, 13]])\nprint(model(x).logits.sum().item())\n"
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN")}
    env.update(
        HF_ENDPOINT=hub_server.endpoint,
        HF_HOME=str(tmp_path / "home"),
        HF_TENSORIZER_CACHE=str(tmp_path / "cache"),
        PYTHONPATH=str(Path(__file__).resolve().parents[1]),
    )
    argv = [sys.executable, "-c", snippet + check]
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with torch.no_grad():
        assert abs(float(proc.stdout.split()[-1]) - model(X).logits.sum().item()) < 1e-3
    # a second push keeps the card (and its one section)
    push_to_hub(model, "tester/card", token=hub_server.token, tags=["tiny"])
    again = Path(hf_hub_download("tester/card", "README.md", cache_dir=tmp_path / "dl2")).read_text()
    assert again.count(CARD_SECTION) == 1 and "tiny" in ModelCard(again).data.tags
