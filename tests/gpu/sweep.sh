#!/usr/bin/env bash
# Second GPU-machine run: CUDA tests, then the staging-pool sweep (tests/gpu/sweep.py). Log: $OUT/sweep.log
#   device tool: run(command="bash tests/gpu/sweep.sh", carry=[".whl"], timeout_s=300)
source "$(dirname "$0")/common.sh"
start_log sweep.log /tmp/hft-sweep-out
install_wheels "InstantTensor (SWEEP_MODE=confirm) will be missing"
timeout 90 python3 -m pytest -q -p no:cacheprovider --noconftest tests/test_cuda.py 2>&1 | tail -8
step sweep
timeout 200 python3 tests/gpu/sweep.py "${SWEEP_DIR:-$HOME/hftsweep}"
step done
