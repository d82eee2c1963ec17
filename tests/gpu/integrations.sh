#!/usr/bin/env bash
# The one prepared GPU-machine run for the integrations (issues 5, 6 and 12), summary printed last:
#   a. CUDA correctness: tests/test_cuda.py, tests/test_prewarm.py + the CUDA device_map test of
#      tests/test_integration_transformers.py;
#   b. bench: ours from_pretrained of the tensorized artifact (hftfp) and of the stock safetensors folder as a
#      file:// URI (hftfp-st) against our raw deserializer (hft), InstantTensor (itbuf) and stock transformers
#      from_pretrained (hf), 6.46 GB checkpoint, warm and cold, each load a fresh process: integration overhead
#      and speed-up over stock; then hft and hftfp again with HF_TENSORIZER_PREWARM=0 (the staging block and
#      CUDA context made in the load, not ahead of it) — the measurement that decides the prewarm default;
#   t. time to ready (interpreter start -> first forward) on the same 6.5 GB shape: ours vs stock vs raw;
#   c. cold start: the KServe predictor started from zero with 100 clients retrying, hf_tensorizer (predictor)
#      vs stock from_pretrained (predictor-stock), local files, warm and cold page cache.
#
#   here, once:  scripts/fetch_wheels.sh            (peers' and the server's wheels into .whl/, git-ignored)
#   device tool: run(command="bash tests/gpu/integrations.sh", carry=[".whl"], timeout_s=590)
#   CPU dry run: PATH=$PWD/.venv/bin:$PATH OUT=/tmp/int-out HFT_INT_DEVICE=cpu HFT_INT_LAYERS=2 \
#                HFT_BENCH_ARGS="--hidden 256 --vocab 1000" HFT_INT_CS_HIDDEN=64 HFT_INT_CS_LAYERS=2 \
#                HFT_INT_CS_VOCAB=1000 HFT_INT_CS_REQUESTS=2 HFT_INT_TTR_SHAPE="--quick" HFT_INT_LOADERS=hft,hftfp,hf \
#                HFT_BENCH_DIR=/tmp/int-bench HFT_INT_CS_DIR=/tmp/int-cs bash tests/gpu/integrations.sh
#
# Log and results come back under $OUT: run.log, bench/{results.json,table.md,bench.png}, coldstart.{json,png}.
# Knobs (environment): HFT_INT_LIMIT (s, whole script), HFT_INT_DEVICE (cuda:0), HFT_BENCH_DIR, HFT_INT_LAYERS
# (10 = 6.46 GB), HFT_INT_LOADERS (hft,hftfp,hftfp-st,hf), HFT_INT_WARM (2), HFT_BENCH_ARGS (more bench options);
# cold start: HFT_INT_CS_DIR, HFT_INT_CS_HIDDEN/LAYERS/VOCAB (2048/12/32000: 2.9 GB fp32), HFT_INT_CS_REQUESTS (16),
# HFT_INT_CS_REPEATS (2), HFT_INT_CS_PRECISION (float16), HFT_INT_CS_RESERVE (s kept for it after the bench).
source "$(dirname "$0")/common.sh"
export HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
start_log run.log /tmp/hft-int-out
TIMES=()
STEP_T=$T0
lap() { TIMES+=("$1|$(( $(date +%s) - STEP_T ))|$2"); STEP_T=$(date +%s); }  # name, exit status
LIMIT=${HFT_INT_LIMIT:-560}  # seconds for the whole script (one device call: <= 10 min)
DEVICE=${HFT_INT_DEVICE:-cuda:0}
CS_DEVICE=cpu
[[ $DEVICE == cuda* ]] && CS_DEVICE=cuda
D=${HFT_BENCH_DIR:-$HOME/hftbench}  # on disk, not tmpfs: cold runs must be able to drop the page cache
LAYERS=${HFT_INT_LAYERS:-10}
LOADERS=${HFT_INT_LOADERS:-hft,hftfp,hftfp-st,itbuf,hf}
NOPREWARM_LOADERS=${HFT_INT_NOPREWARM_LOADERS:-hft,hftfp}
TTR_RESERVE=${HFT_INT_TTR_RESERVE:-100}  # time to ready: 3 loaders x (1 warm-up + 2 runs) + prepare
TTR_SHAPE=${HFT_INT_TTR_SHAPE:---layers 10 --hidden 4096 --vocab 32000}  # 6.5 GB bf16, the bench's model
WARM=${HFT_INT_WARM:-2}
CS_DIR=${HFT_INT_CS_DIR:-$HOME/hftcoldstart}
CS_HIDDEN=${HFT_INT_CS_HIDDEN:-2048}
CS_LAYERS=${HFT_INT_CS_LAYERS:-12}
CS_VOCAB=${HFT_INT_CS_VOCAB:-32000}
CS_REQUESTS=${HFT_INT_CS_REQUESTS:-100}  # as in tensorizer's "real world impact" benchmark
CS_REPEATS=${HFT_INT_CS_REPEATS:-2}
CS_PRECISION=${HFT_INT_CS_PRECISION:-float16}
CS_RESERVE=${HFT_INT_CS_RESERVE:-260}  # prepare ~40 s + 2 x 2 x 2 predictor starts on a 16-core H100 machine

step "install the wheels (peers, inference server)"
install_wheels "the predictor (cold start) needs kserve and its dependencies"
lap wheels 0

step "machine"
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
fi
echo "cpus $(nproc); $(free -g | awk '/Mem:/{print "mem GiB total " $2 ", available " $7}')"
mkdir -p "$D" "$CS_DIR"
df -h "$D" | tail -1
versions torch transformers safetensors accelerate fastapi starlette uvicorn pydantic pydantic-core \
  typing-extensions anyio h11 httpx click matplotlib
timeout 60 python3 -c "import fastapi, uvicorn" && echo "server stack imports: ok" \
  || echo "server stack imports: FAILED (the cold start cannot run)"
lap machine 0

step "a. CUDA correctness: tests/test_cuda.py + test_device_map_split_cuda_cpu (-k cuda)"
# --noconftest: tests/ may hold conftests needing packages the image lacks; -p conftest loads tests/conftest.py
# alone (stdlib + pytest at import time) for the hf_enabled fixture that test_integration_transformers.py uses.
PYTHONPATH=$PYTHONPATH:$PWD/tests timeout 120 python3 -m pytest -q -p no:cacheprovider --noconftest -p conftest \
  -rfEs tests/test_cuda.py tests/test_prewarm.py tests/test_integration_transformers.py -k "cuda or prewarm or estimate or block" 2>&1 | tee /tmp/hft-int-pytest.log | tail -25
PT_RC=${PIPESTATUS[0]}
PYTEST_LINE=$(grep -E "(passed|failed|error|skipped|no tests ran)" /tmp/hft-int-pytest.log | tail -1)
lap "a. pytest" "$PT_RC"

ELAPSED=$(( $(date +%s) - T0 ))
BUDGET=$(( LIMIT - ELAPSED - CS_RESERVE - TTR_RESERVE - 70 ))
(( BUDGET < 30 )) && BUDGET=30
step "b. bench $LOADERS on $DEVICE: prepare + limits + loads, budget ${BUDGET} s (later runs skipped when it runs out)"
timeout -k 10 $(( BUDGET + 15 )) python3 -m hf_tensorizer.bench.runner --dir "$D" --layers "$LAYERS" \
  --device "$DEVICE" --loaders "$LOADERS" --out "$OUT/bench" --warm-runs "$WARM" --timeout 90 --budget "$BUDGET" \
  --threads 16 --no-table ${HFT_BENCH_ARGS:-}
BENCH_RC=$?
lap "b. bench" "$BENCH_RC"

step "b2. bench $NOPREWARM_LOADERS with HF_TENSORIZER_PREWARM=0, budget 60 s"
HF_TENSORIZER_PREWARM=0 timeout -k 10 75 python3 -m hf_tensorizer.bench.runner --dir "$D" --layers "$LAYERS" \
  --device "$DEVICE" --loaders "$NOPREWARM_LOADERS" --out /tmp/hft-noprewarm --warm-runs "$WARM" --timeout 90 \
  --budget 60 --threads 16 --no-table ${HFT_BENCH_ARGS:-}
NOPREWARM_RC=$?
lap "b2. bench, prewarm off" "$NOPREWARM_RC"

REMAIN=$(( LIMIT - ($(date +%s) - T0) - CS_RESERVE ))
(( REMAIN < 30 )) && REMAIN=30
step "t. time to ready on $DEVICE ($TTR_SHAPE), ${REMAIN} s"
# shellcheck disable=SC2086
timeout -k 10 "$REMAIN" python3 -m hf_tensorizer bench ttr --dir "$D-ttr" --device "$DEVICE" $TTR_SHAPE \
  --runs 2 --warmup 1 --out /tmp/hft-ttr
TTR_RC=$?
lap "t. time to ready" "$TTR_RC"

step "c. cold start: prepare the model (hidden $CS_HIDDEN, layers $CS_LAYERS, vocab $CS_VOCAB, fp32) in $CS_DIR"
REMAIN=$(( LIMIT - ($(date +%s) - T0) - 5 ))
(( REMAIN < 30 )) && REMAIN=30
timeout -k 10 "$REMAIN" python3 - "$CS_DIR" "$CS_HIDDEN" "$CS_LAYERS" "$CS_VOCAB" <<'PY'
import sys, time
from pathlib import Path
t = time.perf_counter()
from integrations.coldstart import prepare
paths = prepare(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
size = sum(f.stat().st_size for f in paths["tensorized"].glob("*.tensors"))
print(f"prepared {size / 1e9:.2f} GB in {time.perf_counter() - t:.1f} s")
PY
CSP_RC=$?
lap "c. cold start prepare" "$CSP_RC"

REMAIN=$(( LIMIT - ($(date +%s) - T0) - 5 ))
(( REMAIN < 30 )) && REMAIN=30
step "c. cold start: $CS_REPEATS x (predictor, predictor-stock) x (warm, cold) on $CS_DEVICE, $CS_REQUESTS clients, ${REMAIN} s"
rm -f "$OUT/coldstart.json" "$OUT/coldstart.png"
timeout -k 10 "$REMAIN" python3 -m integrations.coldstart --workdir "$CS_DIR" --device "$CS_DEVICE" \
  --precision "$CS_PRECISION" --requests "$CS_REQUESTS" --repeats "$CS_REPEATS" --hidden "$CS_HIDDEN" \
  --layers "$CS_LAYERS" --vocab "$CS_VOCAB" --rows predictor,predictor-stock --sources local --cache warm,cold \
  --threads 0 --json "$OUT/coldstart.json" --plot "$OUT/coldstart.png"
CS_RC=$?
lap "c. cold start runs" "$CS_RC"

step "done, total $(( $(date +%s) - T0 )) s"
echo
echo "### steps"
echo "| step | s | exit |"
echo "|---|---|---|"
for t in "${TIMES[@]}"; do echo "| ${t//|/ | } |"; done
echo
echo "### a. CUDA tests: ${PYTEST_LINE:-no pytest summary} (exit $PT_RC)"
echo
echo "### b. bench (exit $BENCH_RC)"
cat "$OUT/bench/table.md" 2>/dev/null || echo "no table: see the log above"
echo
echo "### b2. bench with HF_TENSORIZER_PREWARM=0 (exit $NOPREWARM_RC)"
cat /tmp/hft-noprewarm/table.md 2>/dev/null || echo "no table: see the log above"
echo
echo "### t. time to ready (exit $TTR_RC)"
cat /tmp/hft-ttr/ttr.md 2>/dev/null || echo "no table: see the log above"
echo
echo "### c. cold start (exit $CS_RC)"
python3 - "$OUT/coldstart.json" <<'PY'
import json, sys
try:
    r = json.load(open(sys.argv[1]))
except (OSError, ValueError):
    sys.exit(print("no coldstart.json: see the log above"))
m, med = r["model"], r["median"]
print(f"{m['weights_bytes'] / 1e9:.2f} GB Llama (hidden {m['hidden']}, layers {m['layers']}), {m['precision']} on "
      f"{r['device']}, {r['requests']} requests, median of {len(next(iter(r['runs'].values())))} runs")
keys = ["ready_s", "first_s", "mean_s", "p50_s", "p95_s", "peak_rss_gb", "load_s"]
print("| row | " + " | ".join(keys) + " |")
print("|---" * (len(keys) + 1) + "|")
for name, v in med.items():
    print(f"| {name} | " + " | ".join("–" if v[k] is None else f"{v[k]:.2f}" for k in keys) + " |")
for cache in ("warm", "cold"):
    a, b = med.get(f"predictor-stock local {cache}"), med.get(f"predictor local {cache}")
    if a and b:
        print(f"stock ÷ ours ({cache}): " + ", ".join(f"{k} {a[k] / b[k]:.2f}×" for k in keys if a[k] and b[k]))
PY
