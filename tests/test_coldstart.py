"""The scale-from-zero benchmark's parsing, summaries, verdicts and row command lines (integrations/coldstart*.py).

No benchmark runs here (that is minutes of vLLM and predictor starts): the log lines are the ones each loader
prints, the verdicts are fed results that meet and miss the targets, and the S3 upload path runs against a real
moto server process with a small folder.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import pytest

from integrations import coldstart, coldstart_report, coldstart_rows
from integrations.coldstart_report import summarize, verdicts, weight_seconds

# log lines as each loader prints them (vLLM 0.32's default loader, ours, vLLM's tensorizer loader, Run:ai)
LOGS = {
    "vllm": "INFO 12-07 03:10:11 [loader.py:200] Loading weights took 3.21 seconds (1.07 GB, 0.33 GB/s, "
    "hf_tensorizer mmap)\n",
    "vllm-default": "INFO 12-07 03:10:11 [default_loader.py:502] Loading weights took 4.50 seconds\n",
    "vllm-tensorizer": "INFO 12-07 03:10:11 [tensorizer.py:521] Deserialized 1.1 GB in 2.75s, 390.2 MB/s\n",
    "vllm-runai": "Loading safetensors using Runai Model Streamer:  57% Completed | 84/147 [00:03<00:05, 11.97it/s]\r"
    "Loading safetensors using Runai Model Streamer: 100% Completed | 147/147 [01:05<00:00, 14.41it/s]\n",
}


@pytest.mark.parametrize(("row", "seconds"), [("vllm", 3.21), ("vllm-default", 4.50), ("vllm-tensorizer", 2.75),
                                              ("vllm-runai", 65.0)])  # fmt: skip
def test_weight_seconds_reads_each_loaders_own_line(row: str, seconds: float) -> None:
    log = "INFO noise\n" + LOGS[row] + "INFO after\n"
    assert weight_seconds(row, log) == pytest.approx(seconds)


def test_weight_seconds_takes_the_last_line_and_tells_ours_from_the_default() -> None:
    # the default loader's line has no "(… hf_tensorizer …)": it is not ours
    assert weight_seconds("vllm", LOGS["vllm-default"]) is None
    assert (
        weight_seconds("vllm-default", LOGS["vllm-default"] * 2 + LOGS["vllm-default"].replace("4.50", "9.00")) == 9.0
    )
    assert weight_seconds("vllm-runai", "no streamer line") is None
    assert weight_seconds("predictor", LOGS["vllm"]) is None  # the predictor's time comes from /metrics


def _run(first: float, load: float | None) -> dict[str, float | None]:
    return {"ready_s": first - 1, "first_s": first, "mean_s": first + 5, "p50_s": first + 4, "p95_s": first + 9,
            "max_s": first + 10, "peak_rss_gb": 2.0, "load_s": load}  # fmt: skip


def test_phase_seconds_same_two_lines_for_every_format() -> None:
    log = ("INFO 12-07 23:59:58.250 pid=7 [cpu_model_runner.py:68] Starting to load model /m...\n"
           + LOGS["vllm-tensorizer"]
           + "INFO 12-08 00:00:09.125 pid=7 [cpu_worker.py:260] Explicitly set 1.0 GiB for KV cache on node 0.\n"
           + "INFO 12-08 00:00:10.000 pid=5 [kv_cache_utils.py:2327] CPU KV cache size: 8,192 tokens\n")  # fmt: skip
    assert coldstart_report.phase_seconds(log) == pytest.approx(10.875)  # across midnight
    # vLLM's stock format (whole seconds) still reads
    assert coldstart_report.phase_seconds(log.replace(".250", "").replace(".125", "")) == 11
    assert coldstart_report.phase_seconds(LOGS["vllm"]) is None


def test_summarize_medians_and_ranges() -> None:
    s = summarize({"vllm local warm": [_run(30, 3), _run(40, 5), _run(20, 4)], "vllm s3 warm": []})
    assert list(s) == ["vllm local warm"]
    assert s["vllm local warm"]["first_s"] == 30 and s["vllm local warm"]["load_s"] == 4
    assert s["vllm local warm"]["range"]["first_s"] == [20, 40] and s["vllm local warm"]["runs"] == 3


def test_verdicts_met() -> None:
    runs = {"vllm local warm": [_run(30, 2.0)], "vllm-default local warm": [_run(35, 2.5)],
            "vllm-runai local warm": [_run(33, 3.0)], "predictor-stock local warm": [_run(60, None)]}  # fmt: skip
    runs["vllm local warm"][0]["model_s"], runs["vllm-default local warm"][0]["model_s"] = 9.0, 7.0
    found = {v["target"]: v for v in verdicts(summarize(runs))}
    assert found["weights"]["verdict"] == "met" and found["weights"]["best_other"] == ("vllm-default", 2.5)
    # the whole load step, one clock for all: ours took longer there
    assert found["load step"]["verdict"] == "not met" and found["load step"]["ratio"] == pytest.approx(7 / 9)
    assert found["weights"]["ratio"] == pytest.approx(1.25)
    assert found["first response"]["verdict"] == "met" and found["first response"]["ours"] == ("vllm", 30)


def test_verdicts_not_met_when_a_peer_is_faster() -> None:
    runs = {"vllm s3 warm": [_run(50, 6.0)], "vllm-runai s3 warm": [_run(45, 4.0)],
            "predictor s3 warm": [_run(70, 9.0)], "predictor-stock s3 warm": [_run(80, 12.0)],
            "vllm local cold": [_run(30, 2.0)]}  # fmt: skip
    found = {(v["target"], v["source"], v["cache"]): v for v in verdicts(summarize(runs))}
    weights, first = found[("weights", "s3", "warm")], found[("first response", "s3", "warm")]
    assert weights["verdict"] == "not met" and weights["ratio"] == pytest.approx(4 / 6)
    assert first["verdict"] == "not met" and first["best_other"] == ("vllm-runai", 45)
    assert "**not met**" in coldstart_report.verdict_table(list(found.values()))
    # from S3 the default loader loads a downloaded copy: not a peer of the S3 weight loads
    runs["vllm-default s3 warm"], runs["vllm-runai s3 warm"] = [_run(60, 1.0)], []
    found.update({(v["target"], v["source"], v["cache"]): v for v in verdicts(summarize(runs))})
    assert found[("weights", "s3", "warm")]["verdict"] == "not measured"
    assert found[("first response", "s3", "warm")]["best_other"] == ("vllm-default", 60)
    # no other vLLM format measured from the local cold cache: no verdict there
    assert found[("weights", "local", "cold")]["verdict"] == "not measured"


def test_verdicts_ignore_non_default_rows() -> None:
    # predictor-mapped is ours with a non-default option: it neither wins nor loses a verdict
    runs = {"predictor-mapped local warm": [_run(10, 1.0)], "predictor local warm": [_run(50, 5.0)],
            "predictor-stock local warm": [_run(40, 4.0)]}  # fmt: skip
    (first,) = [v for v in verdicts(summarize(runs)) if v["target"] == "first response"]
    assert first["ours"] == ("predictor", 50) and first["verdict"] == "not met"


def test_table_and_report_round_trip(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    runs = {"vllm local warm": [_run(30, 2.0), _run(32, 2.2)], "vllm-default local warm": [_run(35, None)]}
    text = coldstart_report.table(summarize(runs))
    assert "| `vllm` | local | warm | 30.0 s | 31.0 s (30.0–32.0) |" in text
    assert "| `vllm-default` | local | warm |" in text and text.rstrip().endswith("| – | – |")
    # --report merges the runs of several JSONs (a vLLM run and a predictor run) and judges them together
    (tmp_path / "a.json").write_text(json.dumps({"runs": runs}))
    (tmp_path / "b.json").write_text(json.dumps({"runs": {"predictor local warm": [_run(20, 9.0)]}}))
    argv = ["--report", f"{tmp_path / 'a.json'},{tmp_path / 'b.json'}", "--plot", str(tmp_path / "m.png")]
    assert coldstart.main(argv) == 0
    out = capsys.readouterr().out
    # ours had a weight-loading time, the peer none: no verdict; the predictor was the first to answer
    assert "| weights | local, warm | `vllm` 2.1 s | – | – | **not measured** |" in out
    assert "| first response | local, warm | `predictor` 20.0 s | `vllm-default` 35.0 s | 1.75× | **met** |" in out
    assert (tmp_path / "m.png").exists()


def test_plot_writes_a_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    runs = {"vllm local warm": [_run(30, 2.0)], "vllm-default local warm": [_run(35, 2.5)],
            "vllm s3 warm": [_run(40, 3.0)]}  # fmt: skip
    coldstart_report.plot(summarize(runs), "t", tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


def test_combos_skip_cold_s3_and_mapped_s3() -> None:
    got = coldstart.combos("vllm,predictor-mapped", "local,s3", "warm,cold")
    assert ("vllm", "s3", "warm") in got and ("predictor-mapped", "local", "cold") in got
    assert not [c for c in got if c[1] == "s3" and (c[2] == "cold" or c[0] == "predictor-mapped")]


def _args(**kw: object) -> argparse.Namespace:
    args = coldstart.parse_args(["--vllm-python", "/venv/bin/python", "--requests", "100"])
    vars(args).update(kw)
    return args


class _FakeMoto:
    url = "http://127.0.0.1:9"

    def __init__(self) -> None:
        self.env = {"AWS_ENDPOINT_URL": self.url}


def test_vllm_rows_command_lines(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # each service's cache and download folders
    paths = {k: tmp_path / k for k in ("tensorized", "safetensors", "vllm-tensorized")}
    for p in paths.values():
        p.mkdir()
        (p / "f").write_bytes(b"x")
    moto = _FakeMoto()
    ours = coldstart_rows.make_service("vllm", "s3", paths, moto, _args())  # type: ignore[arg-type]
    i = ours.argv.index("--model")
    assert ours.argv[i + 1] == "s3://bench/tensorized" and "hf_tensorizer" in ours.argv
    assert json.loads(ours.argv[ours.argv.index("--model-loader-extra-config") + 1]) == {"endpoint_url": moto.url}
    assert ours.engine == "vllm" and ours.evict == [] and ours.env["VLLM_CPU_KVCACHE_SPACE"] == "1"
    tz = coldstart_rows.make_service("vllm-tensorizer", "local", paths, None, _args())
    extra = json.loads(tz.argv[tz.argv.index("--model-loader-extra-config") + 1])
    assert extra == {"tensorizer_uri": str(paths["vllm-tensorized"] / "model.tensors")}
    assert tz.evict == [paths["vllm-tensorized"] / "model.tensors"]
    # vLLM's tensorizer loader with the post-processing it skips, registered by our plugin under the bench's switch
    assert tz.argv[tz.argv.index("--load-format") + 1] == "tensorizer-postprocessed"
    assert tz.env["HF_TENSORIZER_VLLM_BENCH_PEERS"] == "1" and "HF_TENSORIZER_VLLM_BENCH_PEERS" not in ours.env
    # from S3 the endpoint comes from the environment: tensorizer refuses an http:// s3_endpoint option
    tz = coldstart_rows.make_service("vllm-tensorizer", "s3", paths, moto, _args())  # type: ignore[arg-type]
    extra = json.loads(tz.argv[tz.argv.index("--model-loader-extra-config") + 1])
    assert extra == {"tensorizer_uri": "s3://bench/vllm-tensorized/model.tensors"}
    assert tz.env["AWS_ENDPOINT_URL"] == moto.url and tz.evict == []
    runai = coldstart_rows.make_service("vllm-runai", "local", paths, None, _args())
    assert runai.argv[runai.argv.index("--model") + 1] == str(paths["safetensors"]) and "runai_streamer" in runai.argv
    assert runai.evict == [paths["safetensors"] / "f"]
    stock = coldstart_rows.make_service("vllm-default", "s3", paths, moto, _args())  # type: ignore[arg-type]
    assert stock.argv[0] == "sh" and "fetch s3://bench/safetensors" in stock.argv[2] and stock.scratch is not None
    with pytest.raises(SystemExit, match="--vllm-python"):
        coldstart_rows.make_service("vllm", "local", paths, None, _args(vllm_python=None))


def test_moto_uploads_in_one_put_and_fetch_reads_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("moto.server")
    _, transfer = coldstart_rows.upload_config()
    assert transfer.multipart_threshold > 2 << 30  # a ~1 GB model file goes up in one PUT, never multipart
    src = tmp_path / "src"
    src.mkdir()
    (src / "model.tensors").write_bytes(bytes(range(256)) * 4096)
    (src / "config.json").write_text("{}")
    moto = coldstart_rows.Moto()
    try:
        moto.upload(src, "tensorized")
        for k, v in moto.env.items():
            monkeypatch.setenv(k, v)
        coldstart_rows.fetch("s3://bench/tensorized", str(tmp_path / "dst"))
    finally:
        moto.stop()
    assert sorted(p.name for p in (tmp_path / "dst").iterdir()) == ["config.json", "model.tensors"]
    assert (tmp_path / "dst" / "model.tensors").read_bytes() == (src / "model.tensors").read_bytes()


def test_report_rereads_kept_logs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # a run recorded before the parser knew its loader's line: --report --logs reads it again from the kept log
    runs = {"vllm local warm": [_run(30, 2.0)], "vllm-runai local warm": [_run(35, None)]}
    failed = {"row": "vllm-tensorizer local warm", "repeat": 0, "error": "0/100 served"}
    (tmp_path / "r.json").write_text(json.dumps({"runs": runs, "failures": [failed]}))
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "0-vllm-runai-local-warm.log").write_text(LOGS["vllm-runai"])
    (tmp_path / "logs" / "0-vllm-tensorizer-local-warm.log").write_text(LOGS["vllm-tensorizer"])
    out_json = tmp_path / "merged.json"
    argv = ["--report", str(tmp_path / "r.json"), "--logs", str(tmp_path / "logs"), "--json", str(out_json)]
    assert coldstart.main(argv) == 0
    assert (
        "| weights | local, warm | `vllm` 2.0 s | `vllm-runai` 65.0 s | 32.50× | **met** |" in capsys.readouterr().out
    )
    merged = json.loads(out_json.read_text())
    assert merged["runs"]["vllm-runai local warm"][0]["load_s"] == 65.0
    # a format that loaded and then failed to serve keeps its load time beside the failure
    assert merged["failures"][0]["partial"]["load_s"] == 2.75
