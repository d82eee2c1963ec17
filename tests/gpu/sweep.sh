#!/usr/bin/env bash
# Second GPU-machine run: CUDA tests, then the staging-pool sweep (tests/gpu/sweep.py). Log: $OUT/sweep.log
#   device tool: run(command="bash tests/gpu/sweep.sh", carry=[".whl"], timeout_s=300)
set -u
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore TRANSFORMERS_VERBOSITY=error
OUT=${OUT:-/tmp/hft-sweep-out}
mkdir -p "$OUT"
exec > >(tee "$OUT/sweep.log") 2>&1
T0=$(date +%s)
ls .whl/*.whl >/dev/null 2>&1 && timeout 90 python3 -m pip install -q --no-index --no-deps --no-compile \
  --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD
timeout 90 python3 -m pytest -q -p no:cacheprovider --noconftest tests/test_cuda.py 2>&1 | tail -8
echo "== [$(( $(date +%s) - T0 )) s] sweep"
timeout 200 python3 tests/gpu/sweep.py "${SWEEP_DIR:-$HOME/hftsweep}"
echo "== [$(( $(date +%s) - T0 )) s] done"
