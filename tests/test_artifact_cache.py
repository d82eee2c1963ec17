"""The artifact cache after killed fetches: a remote load killed while it fills ``artifacts/<hash>.<random>`` leaves
that folder behind; the next use of the cache removes it once it is old and no live process holds its lock, and
never touches a fetch still running."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from hf_tensorizer.integrations.artifact.cache import resolve, sweep_stale

transformers = pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parent.parent


def _fetch_in_child(url: str, cache: Path) -> subprocess.Popen[bytes]:
    code = f"from hf_tensorizer.integrations.artifact.cache import resolve; resolve({url!r})"
    env = dict(os.environ, HF_TENSORIZER_CACHE=str(cache),
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))  # fmt: skip
    return subprocess.Popen([sys.executable, "-c", code], env=env, stderr=subprocess.PIPE)


def _temporaries(parent: Path) -> list[Path]:
    return sorted(p for p in parent.iterdir() if "." in p.name) if parent.is_dir() else []


def _wait_for_temporary(parent: Path, child: subprocess.Popen[bytes], known: list[Path]) -> Path:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        new = [p for p in _temporaries(parent) if p not in known]
        if new:
            return new[0]
        assert child.poll() is None, child.stderr.read().decode()[-2000:] if child.stderr else ""
        time.sleep(0.1)
    raise AssertionError("the fetch never started filling its folder")


def test_killed_fetches_leave_nothing_behind_for_long(http_server: Any, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    from hf_tensorizer.integrations.adapters.transformers.save import save_tensorized

    cache = tmp_path / "cache"
    monkeypatch.setenv("HF_TENSORIZER_CACHE", str(cache))
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=2)  # fmt: skip
    save_tensorized(transformers.LlamaForCausalLM(cfg), http_server.dir / "art")
    url = http_server.url("art")
    parent = cache / "artifacts"
    dest = parent / hashlib.sha256(url.encode()).hexdigest()[:20]
    # a fetch killed while it fills its folder (the small files stall: it is inside the swap when killed)
    http_server.fault("stall", "art/config.json", after=-1, seconds=30, count=-1)
    killed = _fetch_in_child(url, cache)
    left = _wait_for_temporary(parent, killed, [])
    killed.send_signal(signal.SIGKILL)
    killed.wait(30)
    assert left.is_dir()  # what a killed fetch leaves
    live = _fetch_in_child(url, cache)  # a fetch still running: locked, never swept, however old
    running = _wait_for_temporary(parent, live, [left])
    try:
        old = time.time() - 3600
        for p in (left, running):
            os.utime(p, (old, old))
        assert sweep_stale(str(parent)) == [str(left)]
        assert running.is_dir() and not left.exists()
    finally:
        live.send_signal(signal.SIGKILL)
        live.wait(30)
    os.utime(running, (time.time() - 3600,) * 2)  # killed too, and old: the next load removes it
    http_server.server.reset()
    assert resolve(url) == str(dest)
    assert _temporaries(parent) == [] and (dest / "config.json").is_file()
    # a recent unlocked folder is left alone (a fetch between mkdtemp and its lock)
    recent = parent / f"{dest.name}.recent"
    recent.mkdir()
    assert sweep_stale(str(parent)) == [] and recent.is_dir()
