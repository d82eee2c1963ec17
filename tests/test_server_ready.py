"""The predictor's readiness as a load balancer sees it, through a real server process on 127.0.0.1.

* While the weights load, readiness (V1 and V2) and predicts answer a quiet 503: the log says "not ready" once
  and "ready" once, with no traceback per probe (the SDK's ``ModelNotReady`` handler logged one for each 20 ms
  poll). The load is held by the test itself: the artifact is served over HTTP by the range server, whose
  ``hold`` fault keeps the weights' requests waiting until the test creates a gate file — no timing involved.
* A load that never ends (a source that accepts the connection and never answers) ends the process with status 1
  and a ``LoadTimeoutError`` after ``--load-timeout`` seconds, instead of a pod unready forever.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("kserve")
pytest.importorskip("transformers")

import hf_tensorizer  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from integrations.tiny import byte_tokenizer, causal_lm  # noqa: E402
from tests.servers.http_range import RangeServer  # noqa: E402
from tests.test_server import Server, server_env, wait_for  # noqa: E402

STALL = """
import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
s.listen(64)
print(s.getsockname()[1], flush=True)
held = []
while True:  # accept every connection, answer none
    held.append(s.accept()[0])
"""


def env(tmp_path: Path) -> dict[str, str]:
    e = server_env("http://127.0.0.1:9", tmp_path / "cache")
    e["HF_TENSORIZER_REMOTE_TIMEOUT"] = "900"  # the library's own read timeout never ends these loads first
    return e


def status(url: str) -> int:
    try:
        return httpx.get(url, timeout=10).status_code
    except httpx.TransportError:
        return 0  # not listening yet


def test_not_ready_is_a_quiet_503_until_the_weights_are_in(tmp_path: Path) -> None:
    hf_tensorizer.save_pretrained(causal_lm(hidden=64, layers=2), tmp_path / "www" / "art", tokenizer=byte_tokenizer())
    gate = tmp_path / "gate"
    http = RangeServer(tmp_path / "www")
    http.fault("hold", path="/art/model.tensors", until=str(gate), count=-1, methods=["GET", "HEAD"])
    server = Server(http.url("art"), "tiny", env(tmp_path), tmp_path / "server.log", "--log-level", "info")
    ready_v1, ready_v2 = f"{server.base}/v1/models/tiny", f"{server.base}/v2/models/tiny/ready"
    try:
        wait_for(lambda: server.proc.poll() is None and status(f"{server.base}/v2/health/live") == 200, 180, "live")
        not_ready = 0
        while not_ready < 50:  # a load balancer's 20 ms polls, V1 and V2, while the load is held
            assert server.proc.poll() is None, server.output()[-3000:]
            assert (status(ready_v1), status(ready_v2)) == (503, 503)
            not_ready += 2
            time.sleep(0.02)
        held = server.predict({"instances": ["hello"]})
        assert held.status_code == 503 and held.headers["retry-after"] == "1"
        assert "not ready: loading" in held.json()["error"]
        gate.write_text("open")
        wait_for(lambda: status(ready_v1) == 200, 180, "readiness 200 once the weights are in")
        assert status(ready_v2) == 200
        assert server.predict({"instances": ["hello"]}).status_code == 200
    finally:
        server.stop()
        http.stop()
    log = server.output()
    assert log.count("model tiny not ready: loading") == 1, log[-3000:]
    assert log.count("model tiny ready: readiness answers 200") == 1, log[-3000:]
    assert "Traceback" not in log and "ModelNotReady" not in log, log[-3000:]
    assert '" 503' not in log  # no access-log line per not-ready probe either
    assert log.count('GET /v1/models/tiny HTTP/1.1" 200') >= 1  # the access log still runs


def test_load_timeout_exits_1_with_a_typed_error(tmp_path: Path) -> None:
    stall = subprocess.Popen([sys.executable, "-c", STALL], stdout=subprocess.PIPE, text=True)
    try:
        assert stall.stdout is not None
        port = int(stall.stdout.readline())
        server = Server(f"http://127.0.0.1:{port}/art", "stuck", env(tmp_path), tmp_path / "server.log",
                        "--load-timeout", "3")  # fmt: skip
        try:
            server.proc.wait(timeout=300)
        finally:
            server.stop()
    finally:
        stall.kill()
        stall.wait()
    out = server.output()
    assert server.proc.returncode == 1, out[-3000:]
    assert "error: could not load http://127.0.0.1" in out
    assert "LoadTimeoutError: the model was still loading after 3 s (--load-timeout)" in out


def test_load_timeout_flag() -> None:
    from integrations.server.__main__ import build_parser

    args = build_parser().parse_args(["--model-uri", "x"])
    assert args.load_timeout == 1800 and args.snapshot
    args = build_parser().parse_args(["--model-uri", "x", "--load-timeout", "0", "--no-snapshot"])
    assert args.load_timeout == 0 and not args.snapshot


def test_cli_imports_nothing_heavy_before_the_snapshot() -> None:
    """The snapshot starts before torch, transformers and kserve are imported: parsing the flags and the snapshot
    module need none of them."""
    code = ("import sys; import integrations.server.__main__ as m; m.build_parser(); "
            "print(sorted(k for k in ('torch', 'transformers', 'kserve') if k in sys.modules))")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stderr[-2000:]


@pytest.mark.parametrize("guard", ["lease", "snapshot"])
def test_server_serves_a_local_artifact_under_its_guard(tmp_path: Path, guard: str) -> None:
    """The CLI takes a read lease on a local artifact's weights (default) or, with --no-lease, a snapshot (started
    before its imports), and serves from it: the answer does not change when model.tensors is then rewritten in
    place and truncated by another process."""
    folder = tmp_path / "art"
    hf_tensorizer.save_pretrained(causal_lm(hidden=64, layers=2, seed=9), folder, tokenizer=byte_tokenizer())
    flags = ["--no-lease"] if guard == "snapshot" else []
    server = Server(str(folder), "local", env(tmp_path), tmp_path / "server.log", "--log-level", "info", *flags)
    body = {"instances": [{"prompt": "served from a sealed snapshot", "max_new_tokens": 8}]}
    try:
        server.wait_ready()
        first = server.predict(body)
        assert first.status_code == 200, first.text
        weights = folder / "model.tensors"
        with open(weights, "r+b") as f:
            f.write(b"\xff" * weights.stat().st_size)
            f.truncate(4096)
        again = server.predict(body)
        assert again.status_code == 200 and again.json() == first.json()
        assert server.proc.poll() is None
    finally:
        server.stop()
    log = server.output()
    if guard == "lease":
        assert "mapped under a read lease" in log and "moved into private memory" in log, log[-3000:]
        assert "weights snapshot of" not in log, log[-3000:]
    else:
        assert "weights snapshot of" in log and "no read lease" in log and "--no-lease" in log, log[-3000:]
