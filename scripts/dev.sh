#!/usr/bin/env bash
# One entry point for a fresh machine: creates .venv, installs the project with every extra, then runs
#   demo  - build a small model, serialize it, load it back, print a comparison table
#   test  - the full test suite (what CI runs)
#   bench - hf-tensorizer bench with any further arguments
# Two environments: .venv ([dev]) is what the demo, the CLI, the server and the notebooks use; .venv-test is .venv
# plus the quantization backends ([quant]), which the tests need and everything else must not see (transformers
# imports torchao at import time when it is installed: 0.3-0.7 s and warnings about its CUDA kernels on CPU).
# .venv-test is an overlay, not a copy: a .pth file puts .venv's packages after its own, so it holds only [quant].
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${HF_TENSORIZER_VENV:-.venv}
TEST_VENV=${HF_TENSORIZER_TEST_VENV:-.venv-test}
PY=${PYTHON:-python3}
pip_install() { "$1/bin/python" -m pip install -q --disable-pip-version-check "${@:2}"; }

setup() {
  if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
  fi
  if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
      pip_install "$VENV" "torch>=2.4"
    else
      # CPU machine: the pinned CPU build (an unpinned torch would pull a multi-GB CUDA build)
      pip_install "$VENV" torch==2.13.0
    fi
  fi
  if [ -f "$VENV/.hf_tensorizer-installed-dev-quant" ]; then
    # made by an older dev.sh, which installed [quant] into the demo's venv: take it out again
    "$VENV/bin/python" -m pip uninstall -q -y torchao bitsandbytes compressed-tensors 2>/dev/null || true
    rm -f "$VENV/.hf_tensorizer-installed-dev-quant"
  fi
  local stamp="$VENV/.hf_tensorizer-installed-dev"
  if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    pip_install "$VENV" -e ".[dev]"
    touch "$stamp"
  fi
}

setup_test() {
  if [ ! -x "$TEST_VENV/bin/python" ]; then
    "$VENV/bin/python" -m venv "$TEST_VENV"
  fi
  local purelib="import sysconfig; print(sysconfig.get_paths()['purelib'])"
  # addsitedir (not a bare path line) so that .venv's own .pth files (the editable install) are processed too
  echo "import site; site.addsitedir('$("$VENV/bin/python" -c "$purelib")')" \
    >"$("$TEST_VENV/bin/python" -c "$purelib")/_hf_tensorizer_base_venv.pth"
  echo "$(cd "$VENV" && pwd)/bin/python" >"$TEST_VENV/base-python"  # tests/test_environments.py keeps it quiet
  local stamp="$TEST_VENV/.hf_tensorizer-installed-quant"
  if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    # the [quant] requirements as .venv's installed metadata lists them (pyproject.toml stays the one list)
    local quant
    quant=$("$VENV/bin/python" -c "import importlib.metadata as m
print(' '.join(r.split(';')[0].replace(' ', '') for r in m.requires('hf_tensorizer') if 'extra == \"quant\"' in r))")
    # shellcheck disable=SC2086
    pip_install "$TEST_VENV" $quant
    touch "$stamp"
  fi
}

cmd=${1:-demo}
shift || true
setup
case "$cmd" in
  demo) exec "$VENV/bin/hf-tensorizer" demo "$@" ;;
  test) setup_test
        bash scripts/vllm_env.sh  # the vLLM tests drive vllm serve in its own venv
        bash scripts/azurite.sh >/dev/null || echo "azurite not installed: the Azure tests will skip" >&2
        exec "$TEST_VENV/bin/python" -m pytest -q -n 2 --timeout 600 "$@" ;;
  bench) exec "$VENV/bin/hf-tensorizer" bench "$@" ;;
  *) echo "usage: scripts/dev.sh demo|test|bench [args]" >&2; exit 2 ;;
esac
