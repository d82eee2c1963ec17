#!/usr/bin/env bash
# One entry point for a fresh machine: creates .venv, installs the project with every extra, then runs
#   demo  - build a small model, serialize it, load it back, print a comparison table
#   test  - the full test suite (what CI runs)
#   bench - hf-tensorizer bench with any further arguments
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${HF_TENSORIZER_VENV:-.venv}
PY=${PYTHON:-python3}

setup() {
  local extras=$1  # the project's extras to install: dev for the demo and benchmarks; dev,quant for the tests
  if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
  fi
  local pip=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
  if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
      "${pip[@]}" "torch>=2.4"
    else
      # CPU machine: the pinned CPU build (an unpinned torch would pull a multi-GB CUDA build)
      "${pip[@]}" torch==2.13.0
    fi
  fi
  local stamp="$VENV/.hf_tensorizer-installed-${extras//,/-}"
  if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    "${pip[@]}" -e ".[$extras]"
    touch "$stamp"
  fi
}

cmd=${1:-demo}
shift || true
if [ "$cmd" = test ]; then setup dev,quant; bash scripts/vllm_env.sh; else setup dev; fi  # vLLM tests: own venv
case "$cmd" in
  demo) exec "$VENV/bin/hf-tensorizer" demo "$@" ;;
  test) exec "$VENV/bin/python" -m pytest -q -n 2 --timeout 600 "$@" ;;
  bench) exec "$VENV/bin/hf-tensorizer" bench "$@" ;;
  *) echo "usage: scripts/dev.sh demo|test|bench [args]" >&2; exit 2 ;;
esac
