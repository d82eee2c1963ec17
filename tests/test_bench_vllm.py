"""``hf-tensorizer bench vllm`` without vLLM: where each source puts the model folders and what a vLLM process is
given to reach them (the vLLM starts themselves are the benchmark; docs/benchmarks.md)."""

from __future__ import annotations

from pathlib import Path

import boto3
import pytest

from hf_tensorizer.bench.vllm import _serving, load_step_seconds

pytestmark = pytest.mark.timeout(120)


def test_s3_source_uploads_both_folders_and_names_the_endpoint(tmp_path: Path) -> None:
    for folder, files in (("artifact", {"model.tensors": b"t" * 1000, "config.json": b"{}"}),
                          ("stock", {"model.safetensors": b"s" * 500, "config.json": b"{}"})):  # fmt: skip
        (tmp_path / folder).mkdir()
        for name, data in files.items():
            (tmp_path / folder / name).write_bytes(data)
    with _serving("local", tmp_path) as (where, env):
        assert where == str(tmp_path) and env == {}
    with _serving("s3", tmp_path) as (where, env):
        assert where == "s3://bench"
        assert env["AWS_ENDPOINT_URL"].startswith("http://127.0.0.1:")
        assert env["RUNAI_STREAMER_S3_USE_VIRTUAL_ADDRESSING"] == "0"
        client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                              aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                              aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])  # fmt: skip
        listed = {o["Key"]: o["Size"] for o in client.list_objects_v2(Bucket="bench")["Contents"]}
        client.close()
    assert listed == {"artifact/model.tensors": 1000, "artifact/config.json": 2, "stock/model.safetensors": 500,
                      "stock/config.json": 2}  # fmt: skip


def test_load_step_is_read_off_the_same_two_lines_for_every_format() -> None:
    log = ("INFO 12-07 11:10:01.250 pid=1 [gpu_model_runner.py:1] Starting to load model /m...\n"
           "INFO 12-07 11:10:02.000 pid=1 [loader.py:9] Loading weights took 0.31 seconds\n"
           "INFO 12-07 11:10:03.030 pid=1 [kv_cache_utils.py:2] GPU KV cache size: 1000 tokens\n")  # fmt: skip
    assert load_step_seconds(log) == pytest.approx(1.78)
    assert load_step_seconds(log.splitlines()[0]) is None


def test_a_failed_run_is_named_by_its_error_line() -> None:
    from hf_tensorizer.bench.vllm import _cause

    tail = ("runai_streamer run failed (1):\nERROR 12-07 [x.py:1] ValueError: Could not receive response from "
            "libstreamer due to: b'File access error'\nRuntimeError: Engine core initialization failed. See root "
            "cause above.\n")  # fmt: skip
    assert _cause(tail).endswith("ValueError: Could not receive response from libstreamer due to: b'File access error'")
    assert _cause("x run failed (1):\nno error line") == "x run failed (1):"


def test_plot_of_load_steps_writes_a_png(tmp_path: Path) -> None:
    from hf_tensorizer.bench.vllm import plot_load_steps

    runs = {f"{cache} {name}": [{"load_step_s": step, "own_line_s": None} for step in (1.0, 1.1, 1.3)]
            for cache in ("warm", "cold") for name in ("safetensors", "hf_tensorizer", "tensorizer")}  # fmt: skip
    out = tmp_path / "steps.png"
    plot_load_steps(runs, "title", out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
