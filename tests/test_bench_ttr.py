"""``hf-tensorizer bench ttr`` end to end on a tiny model, through the CLI: each loader (ours, stock, raw) runs
in a fresh process, every phase is reported and positive, the phases add up to the total, and every loader's
first forward pass gives the same logits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hf_tensorizer.bench.ttr import LOADERS, PHASES
from hf_tensorizer.cli import main
from hf_tensorizer.errors import UsageError

pytest.importorskip("transformers")
pytest.importorskip("accelerate")


def test_ttr_quick_reports_every_phase(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    code = main(["bench", "ttr", "--quick", "--device", "cpu", "--dir", str(tmp_path / "ckpt"), "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    results = json.loads((out / "ttr.json").read_text())
    assert results["device"] == "cpu" and not results["cold"] and results["tensors"] == 21 and results["runs"] == 1
    rows = {r["loader"]: r for r in results["rows"]}
    assert list(rows) == list(LOADERS)
    for name, row in rows.items():
        assert row["status"] == "ok", row
        assert len(row["runs"]) == 1
        run = row["runs"][0]
        assert run["device"] == "cpu"
        for phase in PHASES:
            assert run["phases"][phase] > 0, (name, phase, run)
            assert row["median"][phase] > 0
        assert run["total_s"] == pytest.approx(sum(run["phases"].values()), abs=1e-3)
        assert row["vs_stock"] > 0 and run["extra_imports_s"] >= 0
        assert run["check"] == rows["stock"]["runs"][0]["check"]  # same weights, same logits
    assert rows["stock"]["vs_stock"] == 1.0
    table = (out / "ttr.md").read_text()
    assert all(p in table for p in PHASES) and all(f"| {n} (" in table for n in LOADERS)
    assert table.splitlines()[0] in printed
    # the checkpoint: a stock safetensors folder and a tensorized artifact, reused by a second run
    ckpt = tmp_path / "ckpt"
    assert (ckpt / "stock" / "model.safetensors").is_file() and (ckpt / "artifact" / "model.tensors").is_file()
    assert (ckpt / "artifact" / "hf_tensorizer.json").is_file()


def test_ttr_unknown_loader(tmp_path: Path) -> None:
    from hf_tensorizer.bench.ttr import run_one

    with pytest.raises(UsageError, match="unknown loader"):
        run_one(tmp_path, "nope", "cpu")
