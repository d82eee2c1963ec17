"""Child processes of the benchmarks: every load runs in a fresh interpreter and prints one result line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

MARK = "@@BENCH "  # a child's one result line
ROOT = Path(__file__).resolve().parents[2]  # the directory that holds the hf_tensorizer package
Log = Callable[[str], None]


def test_servers() -> Path:
    """Put the checkout's ``tests/`` (the loopback test servers) on ``sys.path``; the benchmarks that need them
    run from a source checkout.

    Returns:
        The ``tests`` directory.

    Raises:
        UsageError: ``tests/servers`` is not there (an installed wheel, not a checkout).
    """
    from ..errors import UsageError

    tests = ROOT / "tests"
    if not (tests / "servers").is_dir():
        raise UsageError(f"this benchmark needs the test servers of a source checkout ({tests}/servers is missing)")
    if str(tests) not in sys.path:
        sys.path.insert(0, str(tests))
    return tests


def log(msg: str) -> None:
    print(msg, flush=True)


def popen(args: list[str], *, module: str = "hf_tensorizer.bench.runner",
           env: dict[str, str] | None = None) -> subprocess.Popen[str]:  # fmt: skip
    """``python -m module *args`` in a new session (killable as a group), output piped, this package importable."""
    full = {**os.environ, **(env or {})}
    full["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), full.get("PYTHONPATH", "")) if p)
    full["PYTHONUNBUFFERED"] = "1"
    full.setdefault("TRANSFORMERS_VERBOSITY", "error")
    return subprocess.Popen(
        [sys.executable, "-m", module, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=full,
        start_new_session=True,
    )


def collect(proc: subprocess.Popen[str], timeout: float) -> tuple[dict[str, Any] | None, str]:
    """Wait for a child; (its result line, its output). A child past ``timeout`` is killed: (None, 'timeout')."""
    try:
        out, _ = proc.communicate(timeout=max(1.0, timeout))
    except subprocess.TimeoutExpired:
        kill(proc)
        return None, f"timeout after {timeout:.0f} s"
    except BaseException:
        kill(proc)
        raise
    for line in reversed(out.splitlines()):
        if line.startswith(MARK):
            res: dict[str, Any] = json.loads(line[len(MARK) :])
            return res, out
    return None, out


def kill(proc: subprocess.Popen[str]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the child's own process group (start_new_session)
    except ProcessLookupError:
        pass
    proc.communicate()


def error_line(out: str) -> str:
    lines = [ln.strip() for ln in out.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if "Error" in ln or "Exception" in ln or ln.startswith(("error", "timeout")):
            return ln[:300]
    return (lines[-1] if lines else "no output")[:300]
