"""The load bench treats every loader's file alike in the page cache: the limits evict and re-read a scratch copy,
never a loader's file, and ``--page-cache same`` evicts and reads every file once before the warm runs (mapping a
file costs a fault per page-cache folio, and folio sizes follow how the pages got there)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from hf_tensorizer.bench import peers, runner
from hf_tensorizer.engine.pagecache import resident_fraction

pytest.importorskip("safetensors")
pytest.importorskip("transformers")


def _resident(path: Path) -> float:
    fd = os.open(path, os.O_RDONLY)
    try:
        frac = resident_fraction(fd, path.stat().st_size, samples=256)
    finally:
        os.close(fd)
    assert frac is not None
    return frac


def test_read_once_leaves_every_file_cached(tmp_path: Path) -> None:
    files = []
    for i in range(2):
        p = tmp_path / f"f{i}"
        p.write_bytes(os.urandom(3 << 20))
        files.append(p)
    peers.evict(files)
    assert peers.read_once(files) == 6 << 20
    assert all(_resident(p) == 1.0 for p in files)


def test_scratch_copy_is_byte_identical(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.write_bytes(os.urandom((1 << 20) + 123))
    dst = peers.scratch_copy(src, tmp_path / "dst", chunk=1 << 16)
    assert dst.read_bytes() == src.read_bytes()


def test_limits_run_on_a_scratch_copy_not_on_a_loaders_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d = tmp_path / "ckpt"
    runner.run_bench(d, ["hft"], "cpu", layers=1, hidden=64, vocab=512, warm_runs=1, cold=False,
                     with_limits=False, log=lambda msg: None)  # fmt: skip
    seen: list[Path] = []

    def fake_limits(path: Path, device: str, threads: int = 16) -> dict[str, float]:
        seen.append(path)
        assert path.exists() and path.read_bytes() == (d / "model.tensors").read_bytes()
        return {"read_cold_2t": 1.0}

    monkeypatch.setattr(runner, "limits", fake_limits)
    assert runner.main(["limits", str(d), "cpu", "--threads", "2"]) == 0
    assert len(seen) == 1 and seen[0].name == ".limits.scratch" and not seen[0].exists()


def test_same_page_cache_reads_every_file_once_before_the_warm_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[list[str]] = []
    real = runner.read_once

    def spy(paths: list[Path]) -> int:
        calls.append(sorted(p.name for p in paths))
        return real(paths)

    monkeypatch.setattr(runner, "read_once", spy)
    kw: dict[str, Any] = dict(layers=1, hidden=64, vocab=512, warm_runs=2, cold=False, with_limits=False,
                              log=lambda msg: None)  # fmt: skip
    results = runner.run_bench(tmp_path / "ckpt", ["hft", "st"], "cpu", **kw)
    assert results["page_cache"] == "same"
    assert calls == [["model.safetensors", "model.tensors"]]
    for row in results["rows"]:
        assert row["status"] == "ok" and len(row["warm_runs_faults"]) == 2
        assert all(isinstance(n, int) and n > 0 for n in row["warm_runs_faults"])
    calls.clear()
    results = runner.run_bench(tmp_path / "ckpt", ["hft"], "cpu", page_cache="as-written", **kw)
    assert results["page_cache"] == "as-written" and calls == []
    with pytest.raises(ValueError, match="page_cache"):
        runner.run_bench(tmp_path / "ckpt", ["hft"], "cpu", page_cache="cold", **kw)


def test_ours_imports_nothing_inside_the_timer(tmp_path: Path) -> None:
    """Every loader's modules are imported before its timer: ours imports lazily, so the bench names the load path's
    modules (without them a fresh interpreter compiled and imported ~30 modules inside the timed load)."""
    import json
    import subprocess
    import sys

    from hf_tensorizer import TensorSerializer

    with TensorSerializer(tmp_path / "model.tensors") as s:
        s.write_state_dict({"w": __import__("torch").ones(1000)})
    code = (
        "import importlib, json, sys\n"
        "from hf_tensorizer.bench import peers\n"
        "p = peers.resolve('hft')\n"
        "for m in p.modules: importlib.import_module(m)\n"
        "before = set(sys.modules)\n"
        f"sd = p.fn(peers.Ctx(peers.Path({str(tmp_path)!r})), 'cpu')\n"
        "print(json.dumps(sorted(m for m in set(sys.modules) - before if m.startswith('hf_tensorizer'))))\n"
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")]),
    }
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
