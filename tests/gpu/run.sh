#!/usr/bin/env bash
# The one prepared GPU-machine run: our loader (a few configurations) against its peers, warm and cold,
# plus the machine's limits, each load in a fresh process. Finishes in under 6 minutes; table printed last.
#
#   here, once:  scripts/fetch_wheels.sh            (the peers' wheels into .whl/, git-ignored)
#   device tool: run(command="bash tests/gpu/run.sh", carry=[".whl"], timeout_s=420)
#
# Log and results come back under $OUT: run.log, bench/{results.json,table.md,bench.png}.
# Knobs (environment): HFT_BENCH_DIR, HFT_BENCH_LAYERS (10 = 6.46 GB), HFT_BENCH_LOADERS, HFT_BENCH_LIMIT (s),
# HFT_BENCH_DEVICE (cuda:0), HFT_BENCH_ARGS (more bench options, e.g. "--hidden 1024 --vocab 32000").
source "$(dirname "$0")/common.sh"
start_log run.log /tmp/hft-bench-out
LIMIT=${HFT_BENCH_LIMIT:-340}  # seconds for the whole script (≤ 360 with the report)
D=${HFT_BENCH_DIR:-$HOME/hftbench}  # on disk, not tmpfs: cold runs must be able to drop the page cache
LAYERS=${HFT_BENCH_LAYERS:-10}
DEVICE=${HFT_BENCH_DEVICE:-cuda:0}
LOADERS=${HFT_BENCH_LOADERS:-hft,hft-pread32-c8,hft-pread16-c32-s1024,hft-register,hft-odirect,itbuf,fst,hf,st,runai,tz}
step "install the peers' wheels"
install_wheels "the peers will show as not installed / error"

step "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version,pcie.link.gen.max,pcie.link.width.max --format=csv,noheader
echo "cpus $(nproc); $(free -g | awk '/Mem:/{print "mem GiB total " $2 ", available " $7}')"
df -h "$(dirname "$D")" | tail -1
versions torch transformers safetensors accelerate tensorizer fastsafetensors runai-model-streamer instanttensor \
  libnacl boto3 redis

step "CUDA correctness: tests/test_cuda.py (streams, events, pinned pool, page registration, O_DIRECT)"
timeout 90 python3 -m pytest -q -p no:cacheprovider --noconftest tests/test_cuda.py 2>&1 | tail -15

ELAPSED=$(( $(date +%s) - T0 ))
BUDGET=$(( LIMIT - ELAPSED - 10 ))
step "bench: prepare + limits + loads, budget ${BUDGET} s (later runs are skipped when it runs out)"
timeout -k 10 $(( BUDGET + 15 )) python3 -m hf_tensorizer.bench.runner --dir "$D" --layers "$LAYERS" \
  --device "$DEVICE" --loaders "$LOADERS" --out "$OUT/bench" --warm-runs 2 --timeout 60 --budget "$BUDGET" \
  --threads 16 --no-table ${HFT_BENCH_ARGS:-}
RC=$?

step "done, bench exit status $RC, total $(( $(date +%s) - T0 )) s"
echo
cat "$OUT/bench/table.md" 2>/dev/null || echo "no table: see the log above"
