#!/usr/bin/env bash
# safetensors' own torch tests (v0.8.0) with safetensors' torch readers swapped for hf_tensorizer's
# (hf_tensorizer.compat.safetensors): safe_open (framework="pt"), safetensors.torch.load_file and .load. Writers stay
# safetensors'. Needs the network once (git clone of the pinned tag), so CI does not run it; CI runs
# tests/test_compat_safetensors.py. Result and every remaining difference: docs/compat.md.
#
#   scripts/safetensors_suite.sh            # through our reader
#   scripts/safetensors_suite.sh --stock    # the same tests against safetensors itself (the baseline)
# Extra arguments go to pytest.
# SAFETENSORS_SRC=/path/to/a/safetensors/checkout uses that checkout instead of cloning.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
TAG="${SAFETENSORS_TAG:-v0.8.0}"
WORK="${WORK_DIR:-$(mktemp -d)}"
MODE=ours
if [[ "${1:-}" == "--stock" ]]; then MODE=stock; shift; fi
if [[ -n "${SAFETENSORS_SRC:-}" ]]; then
  git -C "$SAFETENSORS_SRC" archive "$TAG" bindings/python/tests | tar -x -C "$WORK"
else
  git clone -q --depth 1 --branch "$TAG" https://github.com/huggingface/safetensors "$WORK/src"
  cp -r "$WORK/src/bindings" "$WORK/"
fi
cd "$WORK/bindings/python"
if [[ "$MODE" == ours ]]; then
  cat > tests/conftest.py <<'PYEOF'
# swap safetensors' torch readers for hf_tensorizer's before the test modules import them
import safetensors
import safetensors.torch

from hf_tensorizer.compat import safetensors as ours

_stock_open = safetensors.safe_open


def safe_open(filename, framework="pt", device="cpu", **kw):
    if framework in ("pt", "torch", "pytorch"):
        return ours.safe_open(filename, framework, device, **kw)
    return _stock_open(filename, framework=framework, device=device, **kw)  # numpy etc.: not ours to serve


safetensors.safe_open = safetensors.torch.safe_open = safe_open
safetensors.torch.load_file = ours.load_file
safetensors.torch.load = ours.load
PYEOF
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -m pytest -q -p no:cacheprovider -o addopts="" -n 0 -rfE \
  tests/test_pt_comparison.py tests/test_pt_model.py tests/test_simple.py tests/test_threadable.py \
  tests/test_multithreaded.py "$@" || true
