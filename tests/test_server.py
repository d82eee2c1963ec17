"""The inference server (integrations/server) as a real subprocess on 127.0.0.1, weights from the moto S3 server.

Outputs are compared with the same model run in this process: token ids for text generation, pixels for
text-to-image. Readiness-before-load (503) is checked in-process on the real app with loading not started.
"""

from __future__ import annotations

import base64
import io
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
transformers = pytest.importorskip("transformers")

import hf_tensorizer  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from integrations.server import ModelRunner, ServerConfig, create_app  # noqa: E402
from integrations.tiny import byte_tokenizer, causal_lm, sd_pipeline  # noqa: E402

PROMPTS = ["hello", "The quick brown fox", "tensors!", "a", "zzz", "KServe", "0123456789", "é ü ß"]
IMAGE_ARGS = {"prompt": "a cat", "num_inference_steps": 2, "guidance_scale": 2.0, "height": 16, "width": 16}


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
               HF_TENSORIZER_CACHE=str(cache), HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))  # fmt: skip
    return env


class Server:
    """``python -m integrations.server`` in a subprocess."""

    def __init__(self, uri: str, name: str, env: dict[str, str], *extra: str) -> None:
        self.name = name
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "integrations.server", "--model-uri", uri, "--model-name", name,
               "--port", str(self.port), "--precision", "float32", "--log-level", "warning", *extra]  # fmt: skip
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)  # fmt: skip

    def wait_ready(self, timeout: float = 180.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}: {self.proc.stderr.read()}")
            try:
                r = httpx.get(f"{self.base}/v1/models/{self.name}", timeout=5)
                if r.status_code == 200:
                    return r.json()
                assert r.status_code == 503, r.text  # loading: KServe's answer
            except httpx.TransportError:
                pass  # not listening yet
            time.sleep(0.1)
        raise AssertionError("server did not become ready")

    def predict(self, body: Any, **kw: Any) -> Any:
        return httpx.post(f"{self.base}/v1/models/{self.name}:predict", json=body, **{"timeout": 120, **kw})

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


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
def lm_server(s3: tuple[str, str, Path]) -> Iterator[tuple[Server, Any, Any]]:
    """A server for a tiny Llama stored on S3, and the same model loaded from S3 in this process."""
    from hf_tensorizer.integrations.adapters.transformers.save import save_tensorized

    endpoint, bucket, cache = s3
    uri = f"s3://{bucket}/tiny-llama"
    save_tensorized(causal_lm(hidden=64, layers=2), uri, tokenizer=byte_tokenizer())
    server = Server(uri, "tiny-llama", server_env(endpoint, cache))
    try:
        with hf_tensorizer.enabled():
            model = transformers.AutoModelForCausalLM.from_pretrained(uri)
            tok = transformers.AutoTokenizer.from_pretrained(uri)
        server.wait_ready()
        yield server, model, tok
    finally:
        server.stop()


def reference_ids(model: Any, tok: Any, prompt: str, n: int) -> list[int]:
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                             pad_token_id=tok.pad_token_id)  # fmt: skip
    return out[0, ids.shape[1] :].tolist()


def test_generation_matches_in_process(lm_server: tuple[Server, Any, Any]) -> None:
    server, model, tok = lm_server
    status = httpx.get(f"{server.base}/v1/models/{server.name}").json()
    assert status["ready"] and status["task"] == "text-generation" and status["loader"] == "hf_tensorizer"
    assert httpx.get(f"{server.base}/v2/health/live").status_code == 200
    assert httpx.get(f"{server.base}/v1/models").json() == {"models": [server.name]}
    r = server.predict({"instances": ["hello", {"prompt": "The quick brown fox", "max_new_tokens": 5}],
                        "parameters": {"max_new_tokens": 7}})  # fmt: skip
    assert r.status_code == 200, r.text
    preds = r.json()["predictions"]
    assert preds[0]["output_ids"] == reference_ids(model, tok, "hello", 7)
    assert preds[1]["output_ids"] == reference_ids(model, tok, "The quick brown fox", 5)
    assert preds[1]["text"] == tok.decode(preds[1]["output_ids"], skip_special_tokens=True)
    assert preds[1]["prompt_tokens"] == len("The quick brown fox")  # one token per byte


def test_concurrent_requests(lm_server: tuple[Server, Any, Any]) -> None:
    server, model, tok = lm_server
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        responses = list(pool.map(lambda p: server.predict({"instances": [{"prompt": p, "max_new_tokens": 6}]}),
                                  PROMPTS))  # fmt: skip
    for prompt, r in zip(PROMPTS, responses, strict=True):
        assert r.status_code == 200, r.text
        assert r.json()["predictions"][0]["output_ids"] == reference_ids(model, tok, prompt, 6), prompt


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        ({"instances": [{"promt": "typo"}]}, 400, "unknown fields ['promt']"),
        ({"instances": []}, 400, "non-empty list"),
        ({"inputs": ["x"]}, 400, '"instances"'),
        ({"instances": [{"prompt": "x", "max_new_tokens": 10**6}]}, 400, "max_new_tokens"),
        ({"instances": [{"prompt": "x", "max_new_tokens": "4"}]}, 400, "max_new_tokens"),
        ({"instances": [""]}, 400, "zero tokens"),
        ({"instances": [42]}, 400, "string or an object"),
    ],
)
def test_bad_requests(lm_server: tuple[Server, Any, Any], body: Any, status: int, needle: str) -> None:
    server, _, _ = lm_server
    r = server.predict(body)
    assert r.status_code == status and needle in r.json()["error"], r.text


def test_hostile_requests(lm_server: tuple[Server, Any, Any]) -> None:
    """Oversized prompts never reach the model thread; odd JSON is a 400, a wrong method a 405."""
    server, _, _ = lm_server
    url = f"{server.base}/v1/models/{server.name}:predict"
    cases = [  # (body, needle); the tiny Llama has 2048 positions, the byte tokenizer one token per byte
        ({"instances": ["x" * 100_000]}, "100,000 characters"),  # refused before tokenizing: never 114 s
        ({"instances": ["x" * 3000]}, "prompt is 3000 tokens; at most 2048"),
        ({"instances": [{"prompt": "x" * 2040, "max_new_tokens": 16}]}, "exceed the model's 2048 positions"),
        ({"instances": ["x"], "parameters": []}, '"parameters" must be an object'),
    ]
    for body, needle in cases:
        r = server.predict(body, timeout=30)
        assert r.status_code == 400 and needle in r.json()["error"], r.text
    raw = {b'{"instances": ["\\ud800"]}': "lone surrogate", b"[" * 50_000 + b"]" * 50_000: "nested too deep"}
    for content, needle in raw.items():
        r = httpx.post(url, content=content, headers={"content-type": "application/json"}, timeout=30)
        assert r.status_code == 400 and needle in r.json()["error"], r.text
    r = httpx.get(url)
    assert r.status_code == 405 and r.headers["allow"] == "POST", r.text
    assert server.predict({"instances": ["still fine"]}).status_code == 200


def test_max_input_tokens_flag(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``max_input_tokens`` (``--max-input-tokens``) lowers the cap below the model's positions."""
    from hf_tensorizer.integrations.adapters.transformers.save import save_tensorized

    monkeypatch.setenv("HF_TENSORIZER_CACHE", str(tmp_path / "cache"))
    save_tensorized(causal_lm(hidden=32, layers=1), tmp_path / "lm", tokenizer=byte_tokenizer())
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
    import json

    from hf_tensorizer.integrations.adapters.transformers.save import save_tensorized

    monkeypatch.setenv("HF_TENSORIZER_CACHE", str(tmp_path / "cache"))
    config = transformers.BertConfig(vocab_size=300, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=37)  # fmt: skip
    torch.manual_seed(0)
    save_tensorized(transformers.BertModel(config).eval(), tmp_path / "bert", tokenizer=byte_tokenizer())
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


def test_wrong_model_and_invalid_json(lm_server: tuple[Server, Any, Any]) -> None:
    server, _, _ = lm_server
    assert httpx.get(f"{server.base}/v1/models/other").status_code == 404
    assert httpx.post(f"{server.base}/v1/models/other:predict", json={"instances": ["x"]}).status_code == 404
    r = httpx.post(f"{server.base}/v1/models/{server.name}:predict", content=b"{not json",
                   headers={"content-type": "application/json"})  # fmt: skip
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]


def test_503_until_loaded(tmp_path: Path) -> None:
    """The real app before its weights are loaded (lifespan not run, so the load never starts)."""
    import asyncio

    runner = ModelRunner(ServerConfig(model_uri=str(tmp_path), model_name="m"))
    app = create_app(runner)

    async def calls() -> list[Any]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            return [await c.get("/v1/models/m"), await c.post("/v1/models/m:predict", json={"instances": ["x"]}),
                    await c.get("/v2/health/ready"), await c.get("/v2/health/live"), await c.get("/")]  # fmt: skip

    ready, predict, ready2, live, root = asyncio.run(calls())
    assert ready.status_code == 503 and ready.json()["ready"] is False
    assert predict.status_code == 503 and "not ready" in predict.json()["error"]
    assert ready2.status_code == 503
    assert live.status_code == 200 and root.status_code == 200


def test_ready_wait_holds_early_requests(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With ``--ready-wait`` a predict sent before the load starts is held, then answered (not 503)."""
    import asyncio
    import threading

    from hf_tensorizer.integrations.adapters.transformers.save import save_tensorized

    monkeypatch.setenv("HF_TENSORIZER_CACHE", str(tmp_path / "cache"))
    model, tok = causal_lm(hidden=32, layers=1), byte_tokenizer()
    save_tensorized(model, tmp_path / "lm", tokenizer=tok)
    runner = ModelRunner(ServerConfig(model_uri=str(tmp_path / "lm"), model_name="m", ready_wait_s=120))
    app = create_app(runner)

    async def calls() -> tuple[int, Any]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c:
            body = {"instances": [{"prompt": "held", "max_new_tokens": 4}]}
            pending = asyncio.ensure_future(c.post("/v1/models/m:predict", json=body, timeout=120))
            await asyncio.sleep(0.2)  # let it reach the wait
            before = (await c.get("/v1/models/m")).status_code
            threading.Thread(target=runner.load, daemon=True).start()
            return before, await pending

    try:
        before, r = asyncio.run(calls())
    finally:
        hf_tensorizer.disable()  # runner.load() enabled the hooks in this process
        runner.shutdown()
    assert before == 503
    assert r.status_code == 200, r.text
    assert r.json()["predictions"][0]["output_ids"] == reference_ids(model, tok, "held", 4)


def test_encrypted_artifact_with_key_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``--key-file``: the runner decrypts while loading; without the key the load fails with the reason."""
    pytest.importorskip("nacl")
    from hf_tensorizer.crypto import EncryptionKey
    from hf_tensorizer.errors import MissingKeyError
    from hf_tensorizer.integrations.adapters.transformers.save import save_tensorized

    monkeypatch.setenv("HF_TENSORIZER_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("HF_TENSORIZER_KEY", raising=False)
    key = EncryptionKey.generate()
    key.save(tmp_path / "model.key")
    model, tok = causal_lm(hidden=32, layers=1), byte_tokenizer()
    save_tensorized(model, tmp_path / "enc", tokenizer=tok, encryption=key)
    runner = ModelRunner(ServerConfig(model_uri=str(tmp_path / "enc"), key_file=str(tmp_path / "model.key")))
    runner.load()
    (pred,) = runner.submit(runner.parse({"instances": [{"prompt": "secret", "max_new_tokens": 4}]})).result()
    assert pred["output_ids"] == reference_ids(model, tok, "secret", 4)
    runner.shutdown()
    keyless = ModelRunner(ServerConfig(model_uri=str(tmp_path / "enc")))
    with pytest.raises(MissingKeyError, match="start the server with --key-file"):
        keyless.load()
    assert keyless.error and "MissingKeyError" in keyless.error and not keyless.ready.is_set()
    assert "encryption=" not in keyless.error  # the library's Python advice does not fit a server


def test_stock_safetensors_model_on_s3(s3: tuple[str, str, Path], tmp_path: Path) -> None:
    """A model saved by stock ``save_pretrained`` (sharded safetensors) serves straight from S3, its shards
    streamed by our engine: nothing converted, same tokens as the model in this process."""
    import boto3

    endpoint, bucket, cache = s3
    model, tok = causal_lm(hidden=64, layers=2, seed=3), byte_tokenizer()
    model.save_pretrained(tmp_path / "stock", max_shard_size="200KB")  # hooks off here: stock safetensors
    tok.save_pretrained(tmp_path / "stock")
    assert len(list((tmp_path / "stock").glob("*.safetensors"))) > 1
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    for p in (tmp_path / "stock").iterdir():
        client.upload_file(str(p), bucket, f"stock-llama/{p.name}")
    server = Server(f"s3://{bucket}/stock-llama", "stock", server_env(endpoint, cache))
    try:
        assert server.wait_ready()["loader"] == "hf_tensorizer"
        r = server.predict({"instances": [{"prompt": "hello", "max_new_tokens": 6}]})
        assert r.status_code == 200, r.text
        assert r.json()["predictions"][0]["output_ids"] == reference_ids(model, tok, "hello", 6)
    finally:
        server.stop()


def test_load_failure_exits_nonzero(s3: tuple[str, str, Path]) -> None:
    endpoint, bucket, cache = s3
    server = Server(f"s3://{bucket}/no-such-model", "missing", server_env(endpoint, cache))
    try:
        _, err = server.proc.communicate(timeout=180)
    finally:
        server.stop()
    assert server.proc.returncode == 1
    assert "could not load s3://" in err and "no-such-model" in err


def test_text_to_image_matches_in_process(s3: tuple[str, str, Path]) -> None:
    pytest.importorskip("diffusers")
    import diffusers
    import numpy as np
    from PIL import Image

    from hf_tensorizer.integrations.adapters.diffusers.models import save_pipeline

    endpoint, bucket, cache = s3
    uri = f"s3://{bucket}/tiny-sd"
    save_pipeline(sd_pipeline(), uri)
    server = Server(uri, "tiny-sd", server_env(endpoint, cache))
    try:
        with hf_tensorizer.enabled():
            pipe = diffusers.DiffusionPipeline.from_pretrained(uri)
        pipe.set_progress_bar_config(disable=True)
        expected = pipe(**IMAGE_ARGS, generator=torch.Generator().manual_seed(3), output_type="pil").images[0]
        assert server.wait_ready()["task"] == "text-to-image"
        r = server.predict({"instances": [{**IMAGE_ARGS, "seed": 3}]})
        assert r.status_code == 200, r.text
        pred = r.json()["predictions"][0]
        got = Image.open(io.BytesIO(base64.b64decode(pred["image_b64"])))
        assert got.format == "PNG" and (pred["width"], pred["height"]) == (16, 16)
        assert np.array_equal(np.asarray(got), np.asarray(expected))
        bad = server.predict({"instances": [{"prompt": "x", "max_new_tokens": 3}]})
        assert bad.status_code == 400 and "max_new_tokens" in bad.json()["error"]
    finally:
        server.stop()
