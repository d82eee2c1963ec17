"""What users run stays quiet whatever ran before: the demo's environment never sees the quantization backends.

``scripts/dev.sh test`` runs the suite in ``.venv-test``, an overlay of the demo's ``.venv`` that adds ``[quant]``
(torchao, bitsandbytes, compressed-tensors); it writes the demo interpreter's path to ``.venv-test/base-python``.
Run any other way, the demo's environment is this interpreter's own, and the same checks apply to it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

#: what transformers/diffusers print at import when torchao or bitsandbytes are installed on a CPU machine
NOISE = ("torchao", "bitsandbytes", "gemm_4bit", "register_constant", "Failed to load")


def demo_python() -> str:
    """The interpreter that the demo, the CLI, the server and the notebooks run in."""
    marker = Path(sys.prefix) / "base-python"
    return marker.read_text().strip() if marker.is_file() else sys.executable


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    """``args`` run by the demo's interpreter (a script path first: run as that interpreter's script)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    env.pop("PYTHONWARNINGS", None)
    argv = [demo_python(), *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env)


def test_demo_environment_has_no_quantization_backends() -> None:
    probe = "import importlib.util as u; print([m for m in ('torchao', 'bitsandbytes') if u.find_spec(m)])"
    out = _run("-c", probe)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", f"{demo_python()} has {out.stdout.strip()} installed (belongs in .venv-test)"


def test_demo_prints_no_backend_warnings(tmp_path: Path) -> None:
    script = Path(demo_python()).parent / "hf-tensorizer"  # what `scripts/dev.sh demo` runs
    out = _run(*([str(script)] if script.exists() else ["-m", "hf_tensorizer"]), "demo", "--layers", "1",
               "--hidden", "64", "--repeats", "1", "--device", "cpu", "--dir", str(tmp_path))  # fmt: skip
    assert out.returncode == 0, out.stderr
    noisy = [line for line in out.stderr.splitlines() if any(word in line for word in NOISE)]
    assert not noisy, "\n".join(noisy)
    assert "identical" in out.stdout


@pytest.mark.parametrize("workers", [[], ["-n", "2"]], ids=["plain", "xdist"])
def test_pytest_leaves_no_temp_folders(workers: list[str], tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HOME", "HF_TENSORIZER_CACHE")}
    env["TMPDIR"] = str(tmp_path)
    tests = Path(__file__).resolve().parent
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "--co", "-q", *workers, str(tests / "test_uri.py")],
        capture_output=True, text=True, timeout=300, env=env, cwd=tests.parent,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    left = [p.name for p in tmp_path.iterdir()]
    assert not left, f"pytest left {left} in the temp folder"
