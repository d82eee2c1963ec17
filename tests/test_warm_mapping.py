"""Warm CPU loads map the file and leave its pages to their first access: no populate call, no threads, the
bytes right, and a file truncated since it was opened is a typed error at load time, not a SIGBUS later."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
import torch
from helpers import assert_same, mapped_fraction, random_tensor, write_file

from hf_tensorizer import TensorDeserializer
from hf_tensorizer.engine import mapping, memory
from hf_tensorizer.errors import ObjectChangedError


@pytest.fixture()
def warm_file(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    tensors = {f"t{i}": random_tensor(torch.bfloat16, (1 << 20,), i) for i in range(6)}
    tensors["small"] = random_tensor(torch.int8, (3,), 9)
    path = tmp_path / "warm.tensors"
    write_file(path, tensors)
    path.read_bytes()  # in the page cache
    return path, tensors


def test_a_warm_load_populates_nothing_and_starts_no_thread(
    warm_file: tuple[Path, dict[str, torch.Tensor]], monkeypatch: pytest.MonkeyPatch
) -> None:
    path, tensors = warm_file
    advice: list[int] = []
    real = memory.madvise
    monkeypatch.setattr(mapping, "madvise", lambda a, n, adv: advice.append(adv) or real(a, n, adv))
    started: list[str] = []
    real_start = threading.Thread.start
    monkeypatch.setattr(threading.Thread, "start", lambda self: started.append(self.name) or real_start(self))
    with TensorDeserializer(path) as d:
        assert d.metrics.strategy == "mmap" and d.metrics.resident == 1.0
        got = dict(d)
    assert advice == [] and started == []
    assert mapped_fraction(got["t3"]) < 0.5  # left to the first access
    for name, t in tensors.items():
        assert_same(got[name], t, name)  # the access faults the pages in: bytes right
    assert mapped_fraction(got["t3"]) == 1.0


def test_a_file_truncated_after_opening_is_a_typed_error(warm_file: tuple[Path, dict[str, torch.Tensor]]) -> None:
    path, _ = warm_file
    with TensorDeserializer(path, lazy=True) as d:
        keep = d["t0"]  # mapped, before the truncation
        os.truncate(path, d.index.tensors["t5"].offset + 4096)  # most of the file still cached: the warm path
        with pytest.raises(ObjectChangedError, match="shorter than the"):
            d["t5"]
        assert keep.numel() == 1 << 20


def test_the_first_load_of_a_process_does_not_wait_for_a_thread_to_start(
    warm_file: tuple[Path, dict[str, torch.Tensor]],
) -> None:
    """``threading.Thread.start`` blocks until the new thread has run (2-5 ms on busy cores, as much as a whole warm
    mapped load), and a warm mapped load has nothing slow to report: it starts no thread at all, not even the
    progress bar's drawing thread. A fresh interpreter, so no earlier load or save has started it already."""
    import subprocess
    import sys

    path, _ = warm_file
    code = (
        "import threading, torch\n"
        "from hf_tensorizer import TensorDeserializer\n"
        "started = []\n"
        "real = threading.Thread.start\n"
        "threading.Thread.start = lambda self: started.append(self.name) or real(self)\n"
        f"d = TensorDeserializer({str(path)!r})\n"
        "sd = dict(d)\n"
        "assert d.metrics.strategy == 'mmap', d.metrics.strategy\n"
        "from hf_tensorizer.engine import progress\n"
        "print(sorted(started), progress._drawing)\n"
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")]),
    }
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[] []"


def test_only_the_slow_part_of_a_mapped_load_is_tracked(
    warm_file: tuple[Path, dict[str, torch.Tensor]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A warm mapped load creates no progress bar (nothing to count: page faults are counted nowhere); checking the
    digests of the same mapped file reads every byte and is tracked."""
    from hf_tensorizer.engine import progress

    path, tensors = warm_file
    bars: list[tuple[str, int]] = []
    real = progress.Progress.__init__

    def spy(self: progress.Progress, desc: str, total: int, *args: object, **kwargs: object) -> None:
        bars.append((desc, total))
        real(self, desc, total, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(progress.Progress, "__init__", spy)
    with TensorDeserializer(path) as d:
        assert d.metrics.strategy == "mmap" and len(dict(d)) == len(tensors)
    assert bars == []
    with TensorDeserializer(path, verify_hash=True) as d:
        assert d.metrics.strategy == "mmap"
        for name, t in tensors.items():
            assert_same(d[name], t, name)
    assert bars == [("loading", sum(t.numel() * t.element_size() for t in tensors.values()))]
