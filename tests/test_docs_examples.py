"""Every code example in README.md and docs/*.md runs verbatim, as a user would run it.

* Each ```` ```python ```` block runs in a fresh interpreter (nothing a hook or a monkeypatch does can leak between
  examples or into this process), in an empty temporary working directory, with a 120 s timeout.
* Each ```` ```bash ```` or plain ```` ``` ```` block with ``hf-tensorizer ...`` lines runs those lines, in order, as
  ``python -m hf_tensorizer ...`` in the same kind of directory, where ``model.safetensors`` (a tiny checkpoint)
  stands for the user's file.

The environment is a user's machine with local stand-ins for every service: moto's S3 server on 127.0.0.1
(``AWS_ENDPOINT_URL``, fake credentials) with an empty bucket literally named ``bucket``, the local Hub
(``HF_ENDPOINT``, ``HF_TOKEN`` accepted for writes, any ``org/name`` such as ``me/...``), and private
``HF_HOME`` / ``HF_TENSORIZER_CACHE`` folders. Nothing reaches beyond 127.0.0.1.

A block opts out only with a marker on its first line, ``# doc-test: skip (reason)``; a skipped Python block is
still compiled. Anything runnable on a CPU must not use it (write ``"cuda" if torch.cuda.is_available() else
"cpu"`` instead of ``"cuda"``).
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
TIMEOUT_S = 120
SKIP_MARKER = re.compile(r"#\s*doc-test:\s*skip\s*\((?P<reason>.+)\)\s*$")
FENCE = re.compile(r"^```(?P<lang>[\w-]*)\s*$")
CLI_PREFIX = "hf-tensorizer "

# Blocks expected to fail for now, keyed on (file, block number, exact first line). strict: once such a block
# passes, the XPASS fails the run and the entry must go.
XFAIL: dict[tuple[str, int, str], str] = {}  # (file, block number, first line) -> why it may fail for now


@dataclass(frozen=True)
class Block:
    """One fenced code block of a Markdown file."""

    file: str  # relative to the repository root
    line: int  # 1-based line of the opening fence
    number: int  # 1-based, among all fenced blocks of this file
    lang: str
    code: str

    @property
    def first_line(self) -> str:
        return self.code.splitlines()[0].strip() if self.code.strip() else ""

    @property
    def skip_reason(self) -> str | None:
        m = SKIP_MARKER.fullmatch(self.first_line)
        return m.group("reason") if m else None

    @property
    def id(self) -> str:
        return f"{self.file}#{self.number}:{self.first_line[:48]}"


def _blocks(path: Path) -> list[Block]:
    blocks: list[tuple[int, str, list[str]]] = []
    current: tuple[int, str, list[str]] | None = None
    for number, text in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if current is None:
            m = FENCE.match(text)
            if m:
                current = (number, m.group("lang"), [])
        elif text.strip() == "```":
            blocks.append(current)
            current = None
        else:
            current[2].append(text)
    rel = str(path.relative_to(ROOT))
    return [
        Block(rel, line, number, lang, "\n".join(lines) + "\n")
        for number, (line, lang, lines) in enumerate(blocks, start=1)
    ]


ALL_BLOCKS = [b for path in DOC_FILES for b in _blocks(path)]
PYTHON_BLOCKS = [b for b in ALL_BLOCKS if b.lang == "python"]
CLI_BLOCKS = [
    b
    for b in ALL_BLOCKS
    if b.lang in ("", "bash", "sh", "console") and any(ln.strip().startswith(CLI_PREFIX) for ln in b.code.splitlines())
]


def test_blocks_found() -> None:
    """The parser sees the examples (a broken fence would silently drop them)."""
    files = {b.file for b in PYTHON_BLOCKS}
    assert {"README.md", "docs/integrations.md", "docs/compat.md", "docs/security.md"} <= files
    assert CLI_BLOCKS


# --- the user's machine ------------------------------------------------------------------------------------

# Loaded by each example's interpreter (``sitecustomize`` on its path): a connection beyond the loopback fails at
# once with a clear message instead of hanging until the timeout. It changes nothing else.
LOOPBACK_ONLY = """
import ipaddress, socket

_connect, _connect_ex = socket.socket.connect, socket.socket.connect_ex


def _check(sock, address):
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        host = address[0]
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = host == "localhost"
        if not loopback:
            raise OSError(f"doc example tried to reach {address!r}: only 127.0.0.1 is available in the tests")


def connect(self, address):
    _check(self, address)
    return _connect(self, address)


def connect_ex(self, address):
    _check(self, address)
    return _connect_ex(self, address)


socket.socket.connect, socket.socket.connect_ex = connect, connect_ex
"""


@pytest.fixture
def user_env(moto_s3: str, s3_client: Any, hub_server: Any, tmp_path: Path) -> dict[str, str]:
    """Environment of a fresh interpreter: local S3 with ``bucket``, the local Hub, private caches."""
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto logs every request: not a failure's story
    existing = {b["Name"] for b in s3_client.list_buckets().get("Buckets", [])}
    if "bucket" in existing:  # moto is shared by the session: empty the bucket a previous example filled
        for page in s3_client.get_paginator("list_objects_v2").paginate(Bucket="bucket"):
            for obj in page.get("Contents", []):
                s3_client.delete_object(Bucket="bucket", Key=obj["Key"])
    else:
        s3_client.create_bucket(Bucket="bucket")
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(LOOPBACK_ONLY, encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "COV_"))}
    env.update(
        AWS_ENDPOINT_URL=moto_s3,
        AWS_DEFAULT_REGION="us-east-1",
        HF_ENDPOINT=hub_server.endpoint,
        HF_TOKEN=hub_server.token,
        HF_HOME=str(tmp_path / "hf-home"),
        HF_TENSORIZER_CACHE=str(tmp_path / "hf-tensorizer-cache"),
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONPATH=os.pathsep.join(p for p in (str(site), str(ROOT), env.get("PYTHONPATH", "")) if p),
    )
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TENSORIZER_KEY"):
        env.pop(name, None)
    return env


def _run(argv: list[str], env: dict[str, str], cwd: Path, what: str) -> None:
    try:
        proc = subprocess.run(
            argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S, stdin=subprocess.DEVNULL
        )
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{what}: no result after {TIMEOUT_S} s\n{e.stdout or ''}\n{e.stderr or ''}")
    if proc.returncode != 0:
        pytest.fail(f"{what}: exit status {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}")


def _skip_or_xfail(block: Block, request: pytest.FixtureRequest) -> None:
    reason = block.skip_reason
    if reason is not None:
        pytest.skip(f"{block.id}: {reason}")
    xfail = XFAIL.get((block.file, block.number, block.first_line))
    if xfail is not None:
        request.applymarker(pytest.mark.xfail(reason=xfail, strict=True))


# --- Python examples ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("block", PYTHON_BLOCKS, ids=lambda b: b.id)
def test_python_example(block: Block, request: pytest.FixtureRequest) -> None:
    compile(block.code, f"{block.file}:{block.line}", "exec")  # even a skipped example must be valid Python
    _skip_or_xfail(block, request)
    env = request.getfixturevalue("user_env")
    workdir = request.getfixturevalue("tmp_path") / "work"
    workdir.mkdir()
    script = workdir.parent / "example.py"
    script.write_text(block.code, encoding="utf-8")
    _run([sys.executable, str(script)], env, workdir, f"{block.file}:{block.line} ({block.first_line})")


# --- command lines -----------------------------------------------------------------------------------------


def _commands(block: Block) -> list[list[str]]:
    """The ``hf-tensorizer`` lines of a block (continuations joined, comments dropped) as argv lists."""
    joined = re.sub(r"\\\n\s*", " ", block.code)
    out: list[list[str]] = []
    for text in joined.splitlines():
        text = text.strip()
        if not text.startswith(CLI_PREFIX):
            continue
        argv = shlex.split(text, comments=True)
        out.append([sys.executable, "-m", "hf_tensorizer", *argv[1:]])
    return out


def _tiny_checkpoint(path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    save_file({"embed.weight": torch.randn(16, 8, generator=g), "norm.weight": torch.ones(8)}, str(path))


@pytest.mark.parametrize("block", CLI_BLOCKS, ids=lambda b: b.id)
def test_cli_example(block: Block, request: pytest.FixtureRequest) -> None:
    _skip_or_xfail(block, request)
    env = request.getfixturevalue("user_env")
    workdir = request.getfixturevalue("tmp_path") / "work"
    workdir.mkdir()
    _tiny_checkpoint(workdir / "model.safetensors")
    for argv in _commands(block):
        _run(argv, env, workdir, f"{block.file}:{block.line}: hf-tensorizer {shlex.join(argv[3:])}")


def test_examples_stay_on_the_loopback(user_env: dict[str, str], tmp_path: Path) -> None:
    """The harness itself: an example that reaches for the internet fails at once, naming the address."""
    code = "import socket\nsocket.create_connection(('192.0.2.1', 80), timeout=30)\n"
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=user_env, capture_output=True, text=True, timeout=TIMEOUT_S
    )
    assert proc.returncode != 0
    assert "only 127.0.0.1 is available" in proc.stderr
