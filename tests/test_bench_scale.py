"""``hf-tensorizer bench scale`` end to end on tiny sizes, through the CLI: every (size, source) has runs with a
positive load time and memory fields, the tensors each fresh process loaded are the checkpoint's (the harness
checks every load), and the fits are reported; plus the fit's arithmetic on known data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hf_tensorizer.bench.scale_report import fit, t_pvalue
from hf_tensorizer.cli import main
from hf_tensorizer.errors import UsageError

pytest.importorskip("transformers")

SIZES = (0.0003, 0.0006, 0.001)  # GB: 1, 4 and 7 layers of hidden 64, vocab 512


def test_scale_cli_reports_every_size_and_source(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    argv = ["bench", "scale", "--sizes", ",".join(map(str, SIZES)), "--sources", "local,http", "--hidden", "64",
            "--vocab", "512", "--runs", "1", "--warmup", "0", "--server", "stdlib", "--dir", str(tmp_path / "ckpt"),
            "--out", str(out), "--clean"]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    res = json.loads((out / "scale.json").read_text())
    points = {(p["size_gb"], p["source"]): p for p in res["points"]}
    assert set(points) == {(s, src) for s in SIZES for src in ("local", "http")}
    layers = {s: points[s, "local"]["layers"] for s in SIZES}
    assert layers[SIZES[0]] < layers[SIZES[1]] < layers[SIZES[2]]
    for (size, src), p in points.items():
        assert p["bytes"] == pytest.approx(size * 1e9, rel=0.35), p
        assert len(p["runs"]) == 1 and p["median_s"] > 0
        run = p["runs"][0]
        assert run["why"] is None and run["seconds"] > 0 and run["tensor_bytes"] == p["bytes"]
        assert run["rss_peak"] >= run["rss_before"] + run["tensor_bytes"] > 0
        assert run["overhead"] > 0 and run["overhead"] < 64 * 2**20  # libraries' pages first touched, a few MiB
        assert p["strategy"] == ("mmap" if src == "local" else "pread")
    for src in ("local", "http"):
        f = res["fits"][src]
        assert f["time"]["quad"] is not None and len(f["time"]["residuals"]) == len(SIZES)
        assert {"a", "b", "change", "constant"} <= set(f["overhead"])
        assert f"**{src}**: " in printed
    assert (out / "scale.png").stat().st_size > 0 and "| size GB |" in (out / "scale.md").read_text()
    assert not (tmp_path / "ckpt").exists()  # --clean


def test_fit_finds_linear_and_quadratic() -> None:
    xs = [0.1, 0.25, 0.5, 1, 2] * 3
    noise = [0.01, -0.01, 0.0] * 5
    lin = fit(xs, [0.05 + 0.5 * x + e * 0.01 for x, e in zip(xs, noise)])
    assert lin["a"] == pytest.approx(0.05, abs=1e-3) and lin["b"] == pytest.approx(0.5, abs=1e-3)
    assert lin["linear"] and not lin["superlinear"] and lin["r2"] > 0.999
    quad = fit(xs, [0.05 + 0.5 * x + 0.3 * x * x + e * 0.01 for x, e in zip(xs, noise)])
    assert quad["quad"]["c"] == pytest.approx(0.3, abs=1e-3) and quad["quad"]["p"] < 1e-6
    assert quad["superlinear"] and not quad["linear"]


def test_t_pvalue() -> None:
    assert t_pvalue(0.0, 12) == pytest.approx(1.0)
    assert t_pvalue(2.179, 12) == pytest.approx(0.05, abs=1e-3)  # the two-sided 5 % point for 12 dof
    assert t_pvalue(-2.179, 12) == pytest.approx(0.05, abs=1e-3)
    assert t_pvalue(4.303, 2) == pytest.approx(0.05, abs=1e-3) and t_pvalue(12.706, 1) == pytest.approx(0.05, abs=1e-3)
    assert 0 < t_pvalue(50.0, 12) < 1e-12


def test_bad_options(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from hf_tensorizer.bench.scale import run_scale, shape_for

    with pytest.raises(UsageError, match="unknown source"):
        run_scale(tmp_path, [0.001], ["ftp"])
    with pytest.raises(UsageError, match="positive"):
        shape_for(0)
    assert main(["bench", "scale", "--sizes", "1,x", "--dir", str(tmp_path)]) != 0
    assert "--sizes" in capsys.readouterr().err
