"""``hf-tensorizer --help`` (and every verb's) and ``import hf_tensorizer`` answer without importing torch,
transformers or numpy; the public names still import on first use."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "numpy", "safetensors", "diffusers", "boto3", "huggingface_hub")
VERBS = ("serialize", "inspect", "verify", "bench", "demo", "keygen", "encrypt", "decrypt")

# Runs the console script's entry point (hf_tensorizer.cli:main) or ``python -m hf_tensorizer``, then reports the
# exit code and which heavy modules ended up imported.
PROBE = f"""
import runpy, sys
entry, argv = sys.argv[1], sys.argv[2:]
sys.argv = ["hf-tensorizer", *argv]
code = 0
try:
    if entry == "module":
        runpy.run_module("hf_tensorizer", run_name="__main__")
    else:
        from hf_tensorizer.cli import main
        code = main()
except SystemExit as exc:
    code = exc.code
heavy = [m for m in {HEAVY!r} if m in sys.modules]
print("RESULT", code, ",".join(heavy) or "-")
"""


def _probe(*args: str) -> tuple[int, str, str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, *args], capture_output=True, text=True, env=env, timeout=60, check=False
    )
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert line is not None, proc.stdout + proc.stderr
    _, code, heavy = line.split(" ")
    return int(code), heavy, proc.stdout


@pytest.mark.parametrize("entry", ["script", "module"])
def test_top_level_help_imports_no_torch(entry: str) -> None:
    code, heavy, out = _probe(entry, "--help")
    assert code == 0 and heavy == "-", (code, heavy)
    assert all(v in out for v in VERBS)


@pytest.mark.parametrize("verb", VERBS)
def test_verb_help_imports_no_torch(verb: str) -> None:
    code, heavy, out = _probe("script", verb, "--help")
    assert code == 0 and heavy == "-", (verb, code, heavy)
    assert f"hf-tensorizer {verb}" in out


def test_bench_ttr_help_imports_no_torch() -> None:
    code, heavy, out = _probe("script", "bench", "ttr", "--help")
    assert code == 0 and heavy == "-", (code, heavy)
    assert "--runs" in out


def test_version_imports_no_torch() -> None:
    code, heavy, out = _probe("module", "--version")
    assert code == 0 and heavy == "-" and "hf-tensorizer 0." in out


def test_package_is_lazy_and_complete() -> None:
    code = """
import sys
import hf_tensorizer
assert "torch" not in sys.modules, "import hf_tensorizer imported torch"
names = set(dir(hf_tensorizer))
assert set(hf_tensorizer.__all__) <= names, set(hf_tensorizer.__all__) - names
assert hf_tensorizer.errors.TensorizerError
from hf_tensorizer import TensorDeserializer, TensorSerializer, enable, FileIndex, read_index
assert "torch" in sys.modules
assert hf_tensorizer.TensorDeserializer is TensorDeserializer and hf_tensorizer.enable is enable
assert hf_tensorizer.engine.TensorDeserializer is TensorDeserializer  # subpackages as attributes, as before
assert hf_tensorizer.integrations.enable is enable
ns = {}
exec("from hf_tensorizer import *", ns)
assert set(hf_tensorizer.__all__) <= set(ns), set(hf_tensorizer.__all__) - set(ns)
try:
    hf_tensorizer.no_such_name
except AttributeError:
    pass
else:
    raise AssertionError("no AttributeError")
print("OK")
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stdout + proc.stderr
