"""The benchmark harness on the CPU with a tiny model: every loader runs in its own process and loads
exactly the checkpoint's tensors; the report has a row, speeds and ratios for each."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from hf_tensorizer.bench import checkpoint, report, runner
from hf_tensorizer.bench.peers import PEERS, hft_kwargs, resolve

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

LOADERS = ["hft", "hft-pread2-c1", "st", "pt", "hf", "tz", "fst", "runai", "itbuf"]


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    d = tmp_path_factory.mktemp("bench")
    results = runner.run_bench(
        d / "ckpt",
        LOADERS,
        "cpu",
        layers=2,
        hidden=64,
        vocab=512,
        warm_runs=1,
        timeout=120,
        threads=2,
        log=lambda msg: None,
    )
    return results, d


@pytest.mark.slow
def test_every_loader_loads_the_checkpoint(bench: tuple[dict[str, Any], Path]) -> None:
    results, _ = bench
    rows = {r["loader"]: r for r in results["rows"]}
    assert list(rows) == LOADERS
    assert rows["itbuf"]["status"] == "skipped"  # CUDA only (or not installed)
    for name in ("hft", "hft-pread2-c1", "st", "pt", "hf"):
        assert rows[name]["status"] == "ok", rows[name]
    for r in rows.values():
        if r["status"] == "skipped":
            assert r["note"] and r["warm_gbps"] is None
            continue
        assert r["status"] == "ok" and r["ok"] is True, r
        assert r["warm_gbps"] > 0 and r["cold_gbps"] > 0 and r["warm_s"] > 0 and r["cold_s"] > 0
    assert results["tensors"] == 21 and results["bytes"] > 0
    assert {"read_pagecache_1t", "read_pagecache_2t", "read_cold_2t"} <= set(results["limits"])
    assert "h2d_pinned" not in results["limits"]
    assert rows["hft"]["metrics"]["bytes"] == results["bytes"]


@pytest.mark.slow
def test_report_has_ratios_table_json_and_plot(bench: tuple[dict[str, Any], Path]) -> None:
    results, d = bench
    table = report.write_report(results, d / "out")
    assert results["best_peer"]["warm"] in PEERS and results["limit_used"]["warm"] == "read_pagecache_2t"
    for r in results["rows"]:
        assert f"| {r['loader']} |" in table or f"| **{r['loader']}** |" in table
        if r["status"] == "ok":
            for key in ("vs_peer_warm", "vs_peer_cold", "of_limit_warm", "of_limit_cold"):
                assert r[key] is not None and r[key] > 0, (r["loader"], key)
    saved = json.loads((d / "out" / "results.json").read_text())
    assert [r["loader"] for r in saved["rows"]] == LOADERS
    assert (d / "out" / "table.md").read_text() == table
    assert (d / "out" / "bench.png").stat().st_size > 1000


@pytest.mark.slow
def test_verify_catches_wrong_data(bench: tuple[dict[str, Any], Path]) -> None:
    from safetensors.torch import load_file

    _, d = bench
    meta = checkpoint.read_meta(d / "ckpt")
    assert meta is not None
    sd = load_file(str(d / "ckpt" / "hf" / "model.safetensors"))
    assert checkpoint.verify(sd, meta, "cpu") is None
    name = "model.layers.1.mlp.down_proj.weight"
    swapped = dict(sd, **{name: sd[name].flip(0)})  # same sum, shifted data
    assert "differs" in (checkpoint.verify(swapped, meta, "cpu") or "")
    assert "missing" in (checkpoint.verify({k: v for k, v in sd.items() if k != name}, meta, "cpu") or "")
    assert "float32" in (checkpoint.verify(dict(sd, **{name: sd[name].float()}), meta, "cpu") or "")


def test_loader_names() -> None:
    assert hft_kwargs("hft") == {"strategy": "auto"}
    assert hft_kwargs("hft-pread16-c32-s256") == {
        "strategy": "pread",
        "num_readers": 16,
        "chunk_bytes": 32 << 20,
        "staging_bytes": 256 << 20,
    }
    assert hft_kwargs("hft-mmap") == {"mmap": True}
    assert resolve("hft-register").cuda_only and resolve("hft-odirect8").ours
    assert resolve("fst").fmt == "st" and not resolve("fst").ours
    with pytest.raises(KeyError):
        resolve("nope")


def test_checkpoint_generation_is_deterministic() -> None:
    spec = [("a", [3, 5]), ("b", [7])]
    (sd1, c1), (sd2, c2) = checkpoint.generate(spec, "cpu"), checkpoint.generate(spec, "cpu")
    assert c1 == c2 and all(torch.equal(sd1[k], sd2[k]) for k in sd1)
    assert sd1["a"].dtype == torch.bfloat16
