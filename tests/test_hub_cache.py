"""Write-through into the Hugging Face cache (``sources/hub_cache.py``): a file appears whole or not at all.

A full read publishes ``blobs/<etag>`` and the snapshot link (huggingface_hub then finds it); a partial read
(a filtered load), a failed load or a killed process leaves nothing visible, and a dead process's temporary file
is swept by the next write-through.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from hf_tensorizer import TensorDeserializer, TensorSerializer
from hf_tensorizer.sources.hub import HubSource

ROOT = Path(__file__).resolve().parent.parent


def _artifact(hub: Any, tmp_path: Path) -> tuple[dict[str, torch.Tensor], bytes]:
    torch.manual_seed(0)
    tensors = {f"layer{i}.weight": torch.randn(64, 64) for i in range(8)}
    path = tmp_path / "model.tensors"
    with TensorSerializer(path) as s:
        s.write_state_dict(tensors)
    data = path.read_bytes()
    hub.create_repo("tester/blob")
    hub.commit("tester/blob", {"model.tensors": data})
    return tensors, data


def _visible(cache: Path) -> list[str]:
    """What huggingface_hub (or a user) sees in the cache: snapshot files and blobs, no hidden temporaries."""
    return sorted(
        str(p.relative_to(cache))
        for p in cache.rglob("*")
        if p.is_file() and not p.name.startswith(".hf_tensorizer-") and ".no_exist" not in p.parts
    )


def _cached(cache: Path) -> str | None:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache("tester/blob", "model.tensors", cache_dir=cache)
    return found if isinstance(found, str) else None


@pytest.fixture
def hub(hub_server: Any) -> Any:
    hub_server.lfs_threshold = 4096  # through the CDN redirect, as on huggingface.co
    return hub_server


def test_full_read_publishes_and_the_next_open_reads_local_disk(hub: Any, tmp_path: Path) -> None:
    tensors, data = _artifact(hub, tmp_path)
    cache = tmp_path / "hf-cache"
    with TensorDeserializer("hf://tester/blob/model.tensors", cache_dir=str(cache), write_through=True) as d:
        assert all(torch.equal(d[k], v) for k, v in tensors.items())
    local = _cached(cache)
    assert local is not None and Path(local).read_bytes() == data
    assert os.path.islink(local)  # snapshots/<commit>/model.tensors -> ../../blobs/<etag>, huggingface_hub's layout
    hub.cdn_log.clear()
    with HubSource(f"hf://tester/blob@{hub.head('tester/blob')}/model.tensors", cache_dir=cache) as src:
        assert src.fileno() is not None and src.read(0, src.size) == data  # a local file, no request
    assert not hub.cdn_log


def test_partial_or_failed_load_leaves_nothing(hub: Any, tmp_path: Path) -> None:
    _artifact(hub, tmp_path)
    cache = tmp_path / "hf-cache"
    uri = "hf://tester/blob/model.tensors"
    with TensorDeserializer(uri, cache_dir=str(cache), write_through=True, filter=["layer0.weight"]) as d:
        assert d["layer0.weight"].shape == (64, 64)
    assert _cached(cache) is None and not any("blobs" in p for p in _visible(cache))
    with pytest.raises(RuntimeError, match="dies"), HubSource(uri, cache_dir=cache, write_through=True) as src:
        src.read(0, src.size // 4)
        raise RuntimeError("the load dies")
    assert _cached(cache) is None and not any("blobs" in p for p in _visible(cache))
    assert not list(cache.rglob(".hf_tensorizer-*"))


def test_padding_the_load_skipped_is_filled(hub: Any, tmp_path: Path) -> None:
    _, data = _artifact(hub, tmp_path)
    cache = tmp_path / "hf-cache"
    with HubSource("hf://tester/blob/model.tensors", cache_dir=cache, write_through=True) as src:
        src.read(0, 1000)
        src.read(1100, src.size - 1100)  # 100 bytes never read: alignment padding, say
    local = _cached(cache)
    assert local is not None and Path(local).read_bytes() == data


def test_killed_load_leaves_nothing_visible_and_is_swept(hub: Any, tmp_path: Path) -> None:
    _, data = _artifact(hub, tmp_path)
    cache = tmp_path / "hf-cache"
    script = (
        "import os, sys\n"
        "from hf_tensorizer.sources.hub import HubSource\n"
        "src = HubSource('hf://tester/blob/model.tensors', cache_dir=sys.argv[1], write_through=True)\n"
        "src.read(0, src.size // 2)\n"
        "os._exit(9)  # killed mid-load: no close, no cleanup\n"
    )
    env = {**os.environ, "HF_ENDPOINT": hub.endpoint, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", script, str(cache)], env=env, capture_output=True, timeout=120)
    assert proc.returncode == 9, proc.stderr.decode()
    assert _cached(cache) is None and not any("blobs" in p for p in _visible(cache))
    assert len(list(cache.rglob(".hf_tensorizer-*"))) == 1  # hidden, and only until the next write-through
    with HubSource("hf://tester/blob/model.tensors", cache_dir=cache, write_through=True) as src:
        src.read(0, src.size)
    assert not list(cache.rglob(".hf_tensorizer-*"))
    local = _cached(cache)
    assert local is not None and Path(local).read_bytes() == data


def test_write_through_off_by_default_and_by_environment(
    hub: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _artifact(hub, tmp_path)
    cache = tmp_path / "hf-cache"
    with HubSource("hf://tester/blob/model.tensors", cache_dir=cache) as src:
        src.read(0, src.size)
    assert _cached(cache) is None
    monkeypatch.setenv("HF_TENSORIZER_HUB_WRITE_THROUGH", "1")
    with HubSource("hf://tester/blob/model.tensors", cache_dir=cache) as src:
        src.read(0, src.size)
    assert _cached(cache) is not None
