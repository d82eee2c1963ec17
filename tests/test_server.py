"""The KServe predictor (integrations/server, on the kserve SDK) as a real subprocess on 127.0.0.1.

One server process is shared by the module: a tiny Llama stored on the moto S3 server, reached through a TCP
proxy that stalls the first response for a few seconds, so the tests see the server live but not ready. Outputs
are compared with the same model run in this process (token ids). Overload and hostile clients go through real
sockets: bodies over the cap, clients that hang up mid-generation, a full queue. Loader edge cases (encryption,
a model without an LM head, a pipeline, a stock safetensors checkpoint) run the runner in-process.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch

httpx = pytest.importorskip("httpx")
pytest.importorskip("kserve")
psutil = pytest.importorskip("psutil")
transformers = pytest.importorskip("transformers")

import hf_tensorizer  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from integrations.server import ModelRunner, ServerConfig  # noqa: E402
from integrations.server.model import Cancelled, DeadlineExceeded  # noqa: E402
from integrations.tiny import byte_tokenizer, causal_lm, sd_pipeline  # noqa: E402
from tests.servers.fault_proxy import FaultProxy  # noqa: E402

PROMPTS = ["hello", "The quick brown fox", "tensors!", "a", "zzz", "KServe", "0123456789", "é ü ß"]
IMAGE_ARGS = {"prompt": "a cat", "num_inference_steps": 2, "guidance_scale": 2.0, "height": 16, "width": 16}
BODY_CAP = 1 << 20
MAX_QUEUE = 4
# 64 prompts x 200 new tokens: ~100 s of generation for the tiny model on this machine, if nothing stops it
LONG = {"instances": [f"long request {i}" for i in range(64)], "parameters": {"max_new_tokens": 200}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_env(endpoint: str, cache: Path) -> dict[str, str]:
    """The subprocess environment: moto credentials and endpoint, nothing from the machine's AWS config."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_ACCESS_KEY_ID="testing-key-id", AWS_SECRET_ACCESS_KEY="testing-secret-key",
               AWS_DEFAULT_REGION="us-east-1", AWS_ENDPOINT_URL=endpoint, AWS_EC2_METADATA_DISABLED="true",
               AWS_CONFIG_FILE=str(cache / "no-aws-config"), AWS_SHARED_CREDENTIALS_FILE=str(cache / "no-creds"),
               HF_TENSORIZER_CACHE=str(cache), HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT),
               OMP_NUM_THREADS="1")  # fmt: skip
    return env


class Server:
    """``python -m integrations.server`` in a subprocess; its log goes to a file (never a pipe that can fill)."""

    def __init__(self, uri: str, name: str, env: dict[str, str], log: Path, *extra: str) -> None:
        self.name = name
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = log
        cmd = [sys.executable, "-m", "integrations.server", "--model-uri", uri, "--model-name", name,
               "--port", str(self.port), "--precision", "float32", "--log-level", "warning", *extra]  # fmt: skip
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_ready(self, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}: {self.output()[-3000:]}")
            try:
                if httpx.get(f"{self.base}/v1/models/{self.name}", timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                pass  # not listening yet
            time.sleep(0.1)
        raise AssertionError("server did not become ready")

    def predict(self, body: Any, **kw: Any) -> Any:
        return httpx.post(f"{self.base}/v1/models/{self.name}:predict", json=body, **{"timeout": 120, **kw})

    def metric(self, name: str) -> float:
        text = httpx.get(f"{self.base}/metrics", timeout=10).text
        m = re.search(rf'^{name}{{model_name="{self.name}"}} ([0-9.e+-]+)$', text, re.M)
        return float(m.group(1)) if m else 0.0

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def raw_request(port: int, path: str, body: bytes, headers: str = "") -> socket.socket:
    """Send one POST over a plain socket (the caller reads or closes it)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n{headers}"
            f"Content-Length: {len(body)}\r\n\r\n")  # fmt: skip
    s.sendall(head.encode() + body)
    return s


def read_status(s: socket.socket) -> tuple[int, str]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    head = data.split(b"\r\n\r\n", 1)[0].decode("latin-1")
    return int(head.split()[1]), head


def wait_for(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


@pytest.fixture(scope="module")
def s3(_moto_server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str, Path]]:
    """(endpoint, bucket, cache dir) with fake credentials set for this module's uploads."""
    import boto3

    cache = tmp_path_factory.mktemp("server-cache")
    with pytest.MonkeyPatch.context() as mp:
        for k, v in server_env(_moto_server, cache).items():
            if k.startswith("AWS_") or k == "HF_TENSORIZER_CACHE":
                mp.setenv(k, v)
        bucket = f"server-test-{os.getpid()}"
        boto3.client("s3", endpoint_url=_moto_server, region_name="us-east-1").create_bucket(Bucket=bucket)
        yield _moto_server, bucket, cache


@pytest.fixture(scope="module")
def lm_server(s3: tuple[str, str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Any, Any]]:
    """The shared server (tiny Llama on S3, first S3 response stalled 6 s) and the same model in this process.

    Yielded as soon as the server answers liveness: the first test sees it loading."""
    endpoint, bucket, cache = s3
    uri = f"s3://{bucket}/tiny-llama"
    hf_tensorizer.save_pretrained(causal_lm(hidden=64, layers=2), uri, tokenizer=byte_tokenizer())
    with hf_tensorizer.enabled():
        model = transformers.AutoModelForCausalLM.from_pretrained(uri)
        tok = transformers.AutoTokenizer.from_pretrained(uri)
    host, port = endpoint.rsplit("/", 1)[-1].rsplit(":", 1)
    proxy = FaultProxy(host, int(port))
    proxy.arm("stall", after=0, seconds=6)
    log = tmp_path_factory.mktemp("server-log") / "server.log"
    flags = ["--max-queue", str(MAX_QUEUE), "--max-body-bytes", str(BODY_CAP), "--max-request-tokens", "20000",
             "--ready-wait", "120"]  # fmt: skip
    server = Server(uri, "tiny", server_env(proxy.url, cache), log, *flags)
    try:
        wait_for(lambda: _live(server), 120, "liveness")
        yield server, model, tok
    finally:
        server.stop()
        proxy.close()


def _live(server: Server) -> bool:
    assert server.proc.poll() is None, server.output()[-3000:]
    try:
        return httpx.get(f"{server.base}/v2/health/live", timeout=5).status_code == 200
    except httpx.TransportError:
        return False


def reference_ids(model: Any, tok: Any, prompt: str, n: int) -> list[int]:
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                             pad_token_id=tok.pad_token_id)  # fmt: skip
    return out[0, ids.shape[1] :].tolist()


def test_live_before_ready_and_held_request(lm_server: tuple[Server, Any, Any]) -> None:
    """During the load: liveness 200, readiness 503 (V1 and V2); a predict sent then is held (--ready-wait) and
    answered once the weights are in. Runs first: the load is stalled by the proxy."""
    server, model, tok = lm_server
    assert httpx.get(f"{server.base}/v1/models/{server.name}").status_code == 503
    assert httpx.get(f"{server.base}/v2/models/{server.name}/ready").status_code == 503
    assert httpx.get(f"{server.base}/").status_code == 200
    held = server.predict({"instances": [{"prompt": "held", "max_new_tokens": 4}]})
    assert held.status_code == 200, held.text
    assert held.json()["predictions"][0]["output_ids"] == reference_ids(model, tok, "held", 4)
    server.wait_ready()
    assert httpx.get(f"{server.base}/v2/models/{server.name}/ready").json() == {"name": "tiny", "ready": True}
    assert server.metric("hf_tensorizer_load_seconds") > 0


def test_v1_generation_matches_in_process(lm_server: tuple[Server, Any, Any]) -> None:
    server, model, tok = lm_server
    server.wait_ready()
    assert httpx.get(f"{server.base}/v1/models").json() == {"models": [server.name]}
    r = server.predict({"instances": ["hello", {"prompt": "The quick brown fox", "max_new_tokens": 5}],
                        "parameters": {"max_new_tokens": 7}})  # fmt: skip
    assert r.status_code == 200, r.text
    preds = r.json()["predictions"]
    assert preds[0]["output_ids"] == reference_ids(model, tok, "hello", 7)
    assert preds[1]["output_ids"] == reference_ids(model, tok, "The quick brown fox", 5)
    assert preds[1]["text"] == tok.decode(preds[1]["output_ids"], skip_special_tokens=True)
    assert preds[1]["prompt_tokens"] == len("The quick brown fox")  # one token per byte
    # without a JSON content type (curl -d): still the same body
    r = httpx.post(f"{server.base}/v1/models/{server.name}:predict", content=b'{"instances": ["hello"]}',
                   headers={"content-type": "application/x-www-form-urlencoded"}, timeout=60)  # fmt: skip
    assert r.status_code == 200 and r.json()["predictions"][0]["output_ids"] == reference_ids(model, tok, "hello", 16)


def test_v2_infer_matches_in_process(lm_server: tuple[Server, Any, Any]) -> None:
    server, model, tok = lm_server
    server.wait_ready()
    body = {"id": "r1", "inputs": [{"name": "prompt", "shape": [2], "datatype": "BYTES", "data": ["hello", "zz"]}],
            "parameters": {"max_new_tokens": 5}}  # fmt: skip
    r = httpx.post(f"{server.base}/v2/models/{server.name}/infer", json=body, timeout=60)
    assert r.status_code == 200, r.text
    out = {o["name"]: o for o in r.json()["outputs"]}
    assert r.json()["id"] == "r1" and out["output_ids"]["shape"] == [2, 5]
    ids = out["output_ids"]["data"]
    assert ids[:5] == reference_ids(model, tok, "hello", 5) and ids[5:] == reference_ids(model, tok, "zz", 5)
    assert out["text"]["data"][0] == tok.decode(ids[:5], skip_special_tokens=True)
    assert out["prompt_tokens"]["data"] == [5, 2]
    meta = httpx.get(f"{server.base}/v2/models/{server.name}").json()
    assert meta["inputs"] == [{"name": "prompt", "datatype": "BYTES", "shape": [-1]}]
    bad = dict(body, inputs=[{"name": "promt", "shape": [1], "datatype": "BYTES", "data": ["x"]}])
    r = httpx.post(f"{server.base}/v2/models/{server.name}/infer", json=bad, timeout=30)
    assert r.status_code == 400 and "unknown input 'promt'" in r.json()["error"]
    assert server.metric("request_predict_seconds_count") >= 2  # the SDK's histogram, on /metrics


def test_concurrent_requests(lm_server: tuple[Server, Any, Any]) -> None:
    server, model, tok = lm_server
    server.wait_ready()
    with ThreadPoolExecutor(MAX_QUEUE) as pool:  # not over --max-queue: nothing is shed
        responses = list(pool.map(lambda p: server.predict({"instances": [{"prompt": p, "max_new_tokens": 6}]}),
                                  PROMPTS))  # fmt: skip
    for prompt, r in zip(PROMPTS, responses, strict=True):
        assert r.status_code == 200, r.text
        assert r.json()["predictions"][0]["output_ids"] == reference_ids(model, tok, prompt, 6), prompt


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"instances": [{"promt": "typo"}]}, "unknown fields ['promt']"),
        ({"instances": []}, "non-empty list"),
        ({"inputs": ["x"]}, '"instances"'),
        ({"instances": [{"prompt": "x", "max_new_tokens": 10**6}]}, "max_new_tokens"),
        ({"instances": [{"prompt": "x", "max_new_tokens": "4"}]}, "max_new_tokens"),
        ({"instances": [""]}, "zero tokens"),
        ({"instances": [42]}, "string or an object"),
        ({"instances": ["x"] * 64, "parameters": {"max_new_tokens": 400}}, "25,600 max_new_tokens in total"),
        ({"instances": ["x"] * 65}, "at most 64 instances"),
    ],
)
def test_bad_requests(lm_server: tuple[Server, Any, Any], body: Any, needle: str) -> None:
    server, _, _ = lm_server
    server.wait_ready()
    r = server.predict(body)
    assert r.status_code == 400 and needle in r.json()["error"], r.text


def test_hostile_requests(lm_server: tuple[Server, Any, Any]) -> None:
    """Oversized prompts never reach the model thread; odd JSON is a 400, a wrong method 405, another model 404."""
    server, _, _ = lm_server
    server.wait_ready()
    url = f"{server.base}/v1/models/{server.name}:predict"
    cases = [  # (body, needle); the tiny Llama has 2048 positions, the byte tokenizer one token per byte
        ({"instances": ["x" * 40_000]}, "40,000 characters"),  # refused before tokenizing
        ({"instances": ["x" * 3000]}, "prompt is 3000 tokens; at most 2048"),
        ({"instances": [{"prompt": "x" * 2040, "max_new_tokens": 16}]}, "exceed the model's 2048 positions"),
        ({"instances": ["x"], "parameters": []}, '"parameters" must be an object'),
    ]
    for body, needle in cases:
        r = server.predict(body, timeout=30)
        assert r.status_code == 400 and needle in r.json()["error"], r.text
    raw = [b'{"instances": ["\\ud800"]}', b"[" * 50_000 + b"]" * 50_000, b"{not json"]
    for content in raw:
        r = httpx.post(url, content=content, headers={"content-type": "application/json"}, timeout=30)
        assert r.status_code == 400 and r.json()["error"], r.text
    r = httpx.get(url)
    assert r.status_code == 405 and r.headers["allow"] == "POST", r.text
    assert httpx.get(f"{server.base}/v1/models/other").status_code == 404
    assert httpx.post(f"{server.base}/v1/models/other:predict", json={"instances": ["x"]}).status_code == 404
    assert httpx.post(f"{server.base}/v2/repository/models/{server.name}/unload").status_code == 404
    assert server.predict({"instances": ["still fine"]}).status_code == 200


def test_body_cap_before_reading(lm_server: tuple[Server, Any, Any]) -> None:
    """A 300 MB Content-Length is refused (413) after the headers: the server's memory does not grow. A chunked
    body with no length is cut at the cap."""
    server, _, _ = lm_server
    server.wait_ready()
    proc = psutil.Process(server.proc.pid)
    before = proc.memory_info().rss
    s = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    with s:
        s.sendall(b"POST /v1/models/tiny:predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 314572800\r\n\r\n" + b'{"instances": ["' + b"x" * (1 << 20))  # fmt: skip
        status, head = read_status(s)
        sent = 0
        with pytest.raises(OSError):  # the server closed the connection: the rest cannot be sent
            while sent < 300 << 20:
                s.sendall(b"x" * (4 << 20))
                sent += 4 << 20
    assert status == 413 and "connection: close" in head.lower(), head
    assert proc.memory_info().rss - before < 32 << 20
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
        s.sendall(b"POST /v1/models/tiny:predict HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        chunk = b"y" * 65536
        for _ in range(BODY_CAP // len(chunk) + 2):  # just over the cap, then wait for the answer
            s.sendall(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
        status, _ = read_status(s)
    assert status == 413
    assert server.predict({"instances": ["after"]}).status_code == 200


def test_abandoned_requests_are_cancelled(lm_server: tuple[Server, Any, Any]) -> None:
    """Three 64 x 200-token requests whose clients hang up do not make a small request wait (issue 26): their
    work stops at the next token (the running one) or never starts (the queued ones)."""
    server, model, tok = lm_server
    server.wait_ready()
    cancelled = server.metric("hf_tensorizer_requests_cancelled_total")
    body = json.dumps(LONG).encode()
    sockets = [raw_request(server.port, f"/v1/models/{server.name}:predict", body) for _ in range(3)]
    wait_for(lambda: server.metric("hf_tensorizer_requests_admitted") == 3, 30, "three admitted requests")
    time.sleep(0.5)  # the first is generating now
    for s in sockets:
        s.close()
    start = time.monotonic()
    r = server.predict({"instances": [{"prompt": "small", "max_new_tokens": 4}]}, timeout=60)
    waited = time.monotonic() - start
    assert r.status_code == 200 and r.json()["predictions"][0]["output_ids"] == reference_ids(model, tok, "small", 4)
    assert waited < 30, f"the small request waited {waited:.1f} s behind abandoned work"
    wait_for(lambda: server.metric("hf_tensorizer_requests_cancelled_total") == cancelled + 3, 30, "3 cancellations")


def test_full_queue_sheds_and_readiness_says_so(lm_server: tuple[Server, Any, Any]) -> None:
    """With --max-queue requests admitted, one more is a 503 with Retry-After (its body unread) and readiness is
    503; once those clients hang up, the server is ready again."""
    server, _, _ = lm_server
    server.wait_ready()
    shed = server.metric("hf_tensorizer_requests_shed_total")
    body = json.dumps(LONG).encode()
    sockets = [raw_request(server.port, f"/v1/models/{server.name}:predict", body) for _ in range(MAX_QUEUE)]
    try:
        wait_for(lambda: server.metric("hf_tensorizer_requests_admitted") == MAX_QUEUE, 30, "a full queue")
        r = server.predict({"instances": ["one more"]}, timeout=30)
        assert r.status_code == 503 and r.headers["retry-after"] == "1" and "--max-queue" in r.json()["error"]
        assert httpx.get(f"{server.base}/v1/models/{server.name}").status_code == 503
        assert httpx.get(f"{server.base}/v2/health/live").status_code == 200
        assert server.metric("hf_tensorizer_requests_shed_total") == shed + 1
    finally:
        for s in sockets:
            s.close()
    wait_for(lambda: httpx.get(f"{server.base}/v1/models/{server.name}").status_code == 200, 30, "readiness")


def test_request_timeout_and_cancel_stop_the_model_thread(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The runner's stop conditions: a deadline ends a long generation within a token; a set cancel flag
    before the work starts means no work at all."""
    monkeypatch.setenv("HF_TENSORIZER_CACHE", str(tmp_path / "cache"))
    hf_tensorizer.save_pretrained(causal_lm(hidden=32, layers=1), tmp_path / "lm", tokenizer=byte_tokenizer())
    runner = ModelRunner(ServerConfig(model_uri=str(tmp_path / "lm")))
    try:
        runner.load()
        work = runner.parse({"instances": ["x"] * 8, "parameters": {"max_new_tokens": 500}})
        start = time.monotonic()
        with pytest.raises(DeadlineExceeded):
            runner.submit(work, deadline=time.monotonic() + 0.5).result(timeout=60)
        assert time.monotonic() - start < 5
        cancel = threading.Event()
        cancel.set()
        with pytest.raises(Cancelled):
            runner.submit(work, cancel=cancel).result(timeout=5)
    finally:
        hf_tensorizer.disable()
        runner.shutdown()


def test_max_input_tokens_flag(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``max_input_tokens`` (``--max-input-tokens``) lowers the cap below the model's positions."""
    monkeypatch.setenv("HF_TENSORIZER_CACHE", str(tmp_path / "cache"))
    hf_tensorizer.save_pretrained(causal_lm(hidden=32, layers=1), tmp_path / "lm", tokenizer=byte_tokenizer())
    runner = ModelRunner(ServerConfig(model_uri=str(tmp_path / "lm"), max_input_tokens=8))
    try:
        runner.load()
        assert (runner.max_input_tokens, runner.max_positions) == (8, 2048)
        with pytest.raises(ValueError, match="129 characters; at most 128"):
            runner.parse({"instances": ["y" * 129]})
        with pytest.raises(ValueError, match="prompt is 9 tokens; at most 8"):
            runner.submit(runner.parse({"instances": ["12345678", "123456789"]})).result()
        assert len(runner.submit(runner.parse({"instances": ["12345678"]})).result()) == 1
    finally:
        hf_tensorizer.disable()
        runner.shutdown()


def test_refuses_model_without_lm_head(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A ``BertModel`` artifact is refused at load with the reason, not served with a random LM head."""
    monkeypatch.setenv("HF_TENSORIZER_CACHE", str(tmp_path / "cache"))
    config = transformers.BertConfig(vocab_size=300, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=37)  # fmt: skip
    torch.manual_seed(0)
    hf_tensorizer.save_pretrained(transformers.BertModel(config).eval(), tmp_path / "bert", tokenizer=byte_tokenizer())
    runner = ModelRunner(ServerConfig(model_uri=str(tmp_path / "bert")))
    try:
        with pytest.raises(hf_tensorizer.errors.UsageError, match="BertModel, not a causal language model"):
            runner.load()
        assert not runner.ready.is_set() and "not a causal language model" in (runner.error or "")
        # a config naming no architecture: the missing weights (the head) are what gives it away
        cfg_path = tmp_path / "bert" / "config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg.pop("architectures")
        cfg_path.write_text(json.dumps(cfg))
        monkeypatch.setenv("HF_TENSORIZER_CACHE", str(tmp_path / "cache2"))
        second = ModelRunner(ServerConfig(model_uri=str(tmp_path / "bert")))
        with pytest.raises(hf_tensorizer.errors.UsageError, match=r"lacks weights the model needs.*cls"):
            second.load()
        second.shutdown()
    finally:
        hf_tensorizer.disable()
        runner.shutdown()


def test_encrypted_artifact_with_key_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``--key-file``: the runner decrypts while loading; without the key the load fails with the reason."""
    pytest.importorskip("nacl")
    from hf_tensorizer.crypto import EncryptionKey
    from hf_tensorizer.errors import MissingKeyError

    monkeypatch.setenv("HF_TENSORIZER_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("HF_TENSORIZER_KEY", raising=False)
    key = EncryptionKey.generate()
    key.save(tmp_path / "model.key")
    model, tok = causal_lm(hidden=32, layers=1), byte_tokenizer()
    hf_tensorizer.save_pretrained(model, tmp_path / "enc", tokenizer=tok, encryption=key)
    runner = ModelRunner(ServerConfig(model_uri=str(tmp_path / "enc"), key_file=str(tmp_path / "model.key")))
    try:
        runner.load()
        (pred,) = runner.submit(runner.parse({"instances": [{"prompt": "secret", "max_new_tokens": 4}]})).result()
        assert pred["output_ids"] == reference_ids(model, tok, "secret", 4)
        keyless = ModelRunner(ServerConfig(model_uri=str(tmp_path / "enc")))
        with pytest.raises(MissingKeyError, match="start the server with --key-file"):
            keyless.load()
        assert keyless.error and "MissingKeyError" in keyless.error and not keyless.ready.is_set()
        assert "encryption=" not in keyless.error  # the library's Python advice does not fit a server
    finally:
        hf_tensorizer.disable()
        runner.shutdown()


def test_stock_safetensors_model_on_s3(s3: tuple[str, str, Path], tmp_path: Path) -> None:
    """A model saved by stock ``save_pretrained`` (sharded safetensors) loads straight from S3, its shards
    streamed by our engine: nothing converted, same tokens as the model in this process."""
    import boto3

    endpoint, bucket, _ = s3
    model, tok = causal_lm(hidden=64, layers=2, seed=3), byte_tokenizer()
    model.save_pretrained(tmp_path / "stock", max_shard_size="200KB")  # hooks off here: stock safetensors
    tok.save_pretrained(tmp_path / "stock")
    assert len(list((tmp_path / "stock").glob("*.safetensors"))) > 1
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    for p in (tmp_path / "stock").iterdir():
        client.upload_file(str(p), bucket, f"stock-llama/{p.name}")
    runner = ModelRunner(ServerConfig(model_uri=f"s3://{bucket}/stock-llama"))
    try:
        runner.load()
        (pred,) = runner.submit(runner.parse({"instances": [{"prompt": "hello", "max_new_tokens": 6}]})).result()
        assert pred["output_ids"] == reference_ids(model, tok, "hello", 6)
    finally:
        hf_tensorizer.disable()
        runner.shutdown()


def test_load_failure_exits_nonzero(s3: tuple[str, str, Path], tmp_path: Path) -> None:
    endpoint, bucket, cache = s3
    server = Server(f"s3://{bucket}/no-such-model", "missing", server_env(endpoint, cache), tmp_path / "log")
    try:
        server.proc.wait(timeout=180)
    finally:
        server.stop()
    assert server.proc.returncode == 1
    err = server.output()
    assert "could not load s3://" in err and "no-such-model" in err


def test_text_to_image_matches_in_process(s3: tuple[str, str, Path]) -> None:
    pytest.importorskip("diffusers")
    import diffusers
    import numpy as np
    from PIL import Image

    _, bucket, _ = s3
    uri = f"s3://{bucket}/tiny-sd"
    hf_tensorizer.save_pretrained(sd_pipeline(), uri)
    runner = ModelRunner(ServerConfig(model_uri=uri))
    try:
        runner.load()
        assert runner.task == "text-to-image"
        with hf_tensorizer.enabled():
            pipe = diffusers.DiffusionPipeline.from_pretrained(uri)
        pipe.set_progress_bar_config(disable=True)
        expected = pipe(**IMAGE_ARGS, generator=torch.Generator().manual_seed(3), output_type="pil").images[0]
        (pred,) = runner.submit(runner.parse({"instances": [{**IMAGE_ARGS, "seed": 3}]})).result()
        got = Image.open(io.BytesIO(base64.b64decode(pred["image_b64"])))
        assert got.format == "PNG" and (pred["width"], pred["height"]) == (16, 16)
        assert np.array_equal(np.asarray(got), np.asarray(expected))
        with pytest.raises(ValueError, match="max_new_tokens"):
            runner.parse({"instances": [{"prompt": "x", "max_new_tokens": 3}]})
        cancel = threading.Event()
        cancel.set()
        with pytest.raises(Cancelled):  # the pipeline's step callback stops it too
            runner._images(runner.parse({"instances": [IMAGE_ARGS]}), _stop_after(runner, cancel))
    finally:
        hf_tensorizer.disable()
        runner.shutdown()


def _stop_after(runner: ModelRunner, cancel: threading.Event) -> Any:
    """A stop condition that passes the first check (the queue) and trips on the first denoising step."""
    from integrations.server.model import _Stop

    class FirstStep(_Stop):
        calls = 0

        def check(self) -> None:
            self.calls += 1
            if self.calls > 2:
                super().check()

    return FirstStep(cancel, None)
