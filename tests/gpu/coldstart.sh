#!/usr/bin/env bash
# The scale-from-zero benchmark (issue 22, integrations/coldstart.py) on the GPU machine: a service spawned at t=0
# with 100 clients retrying until served; time to ready, first response, mean/p50/p95, peak RSS, weight loading.
#   rows: our KServe predictor (hf_tensorizer) vs the same predictor with stock from_pretrained, on cuda, warm and
#         cold page cache, local files — and from moto S3 when moto was carried (.whl) — plus the vLLM rows
#         (hf_tensorizer, default, runai_streamer, tensorizer load formats) when a CUDA vLLM imports there.
#   vLLM itself cannot be carried: its CUDA wheel and dependencies are far over the 64 MiB a call carries, and the
#   device image has none; with HFT_CS_VLLM_PYTHON naming a vLLM interpreter (an image that has one) the vLLM rows
#   run too (they need runai-model-streamer[s3] and tensorizer there, scripts/vllm_bench_env.sh's packages).
#
#   here, once:  scripts/fetch_wheels.sh            (the predictor's wheels into .whl/, git-ignored)
#   device tool: run(command="bash tests/gpu/coldstart.sh", carry=[".whl"], timeout_s=590)
#   CPU dry run: PATH=$PWD/.venv/bin:$PATH OUT=/tmp/cs-gpu-out HFT_CS_DEVICE=cpu HFT_CS_HIDDEN=64 HFT_CS_LAYERS=2 \
#                HFT_CS_VOCAB=1000 HFT_CS_REQUESTS=4 HFT_CS_REPEATS=1 HFT_CS_PRECISION=float32 \
#                HFT_CS_DIR=/tmp/cs-gpu bash tests/gpu/coldstart.sh
#
# Log and results come back under $OUT: coldstart.log, coldstart.json, coldstart.png.
# Knobs (environment): HFT_CS_LIMIT (s, whole script), HFT_CS_DEVICE (cuda), HFT_CS_DIR, HFT_CS_HIDDEN/LAYERS/VOCAB
# (2048/12/32000: 2.9 GB fp32, 1.45 GB fp16), HFT_CS_PRECISION (float16), HFT_CS_REQUESTS (100), HFT_CS_REPEATS (2),
# HFT_CS_ROWS (default: predictor,predictor-stock + the vLLM rows when HFT_CS_VLLM_PYTHON imports vllm),
# HFT_CS_SOURCES (local, + s3 when moto imports), HFT_CS_VLLM_PYTHON (a vLLM interpreter).
source "$(dirname "$0")/common.sh"
export HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
start_log coldstart.log /tmp/hft-cs-out
LIMIT=${HFT_CS_LIMIT:-560}  # one device call: <= 10 min
DEVICE=${HFT_CS_DEVICE:-cuda}
DIR=${HFT_CS_DIR:-$HOME/hftcoldstart}  # on disk, not tmpfs: cold runs must be able to drop the page cache
HIDDEN=${HFT_CS_HIDDEN:-2048}
LAYERS=${HFT_CS_LAYERS:-12}
VOCAB=${HFT_CS_VOCAB:-32000}
PRECISION=${HFT_CS_PRECISION:-float16}
REQUESTS=${HFT_CS_REQUESTS:-100}  # as in tensorizer's "real world impact" benchmark
REPEATS=${HFT_CS_REPEATS:-2}
VLLM_PY=${HFT_CS_VLLM_PYTHON:-}

step "install the wheels (the predictor's kserve stack, moto if carried)"
install_wheels "the predictor needs kserve and its dependencies"

step "machine"
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
fi
echo "cpus $(nproc); $(free -g | awk '/Mem:/{print "mem GiB total " $2 ", available " $7}')"
mkdir -p "$DIR"
df -h "$DIR" | tail -1
versions torch transformers safetensors kserve moto boto3 matplotlib

ROWS=predictor,predictor-stock
VLLM_ARGS=()
if [[ -n $VLLM_PY ]] && timeout 120 "$VLLM_PY" -c "import vllm, tensorizer, runai_model_streamer" 2>/dev/null; then
  ROWS=$ROWS,vllm,vllm-default,vllm-runai,vllm-tensorizer
  VLLM_ARGS=(--vllm-python "$VLLM_PY")
else
  echo "vLLM rows skipped: no HFT_CS_VLLM_PYTHON with vllm, tensorizer and runai_model_streamer (not carriable)"
fi
ROWS=${HFT_CS_ROWS:-$ROWS}
SOURCES=local
if timeout 60 python3 -c "import moto.server, boto3" 2>/dev/null; then
  SOURCES=local,s3
else
  echo "S3 rows skipped: moto not importable (carry its wheels in .whl to add them)"
fi
SOURCES=${HFT_CS_SOURCES:-$SOURCES}

REMAIN=$(( LIMIT - ($(date +%s) - T0) - 15 ))
(( REMAIN < 30 )) && REMAIN=30
step "cold start: $ROWS from $SOURCES on $DEVICE, $REQUESTS clients, $REPEATS repeats, ${REMAIN} s"
rm -f "$OUT/coldstart.json" "$OUT/coldstart.png"
# --timeout: one stuck run must not eat the whole call; the JSON is rewritten after every run
timeout -k 10 "$REMAIN" python3 -m integrations.coldstart --workdir "$DIR" --device "$DEVICE" \
  --precision "$PRECISION" --requests "$REQUESTS" --repeats "$REPEATS" --hidden "$HIDDEN" --layers "$LAYERS" \
  --vocab "$VOCAB" --rows "$ROWS" --sources "$SOURCES" --cache warm,cold --threads 0 --timeout 240 \
  "${VLLM_ARGS[@]}" --json "$OUT/coldstart.json" --plot "$OUT/coldstart.png"
CS_RC=$?

step "done, cold start exit status $CS_RC, total $(( $(date +%s) - T0 )) s"
echo
if [[ -f $OUT/coldstart.json ]]; then
  timeout 60 python3 -m integrations.coldstart --report "$OUT/coldstart.json"
else
  echo "no coldstart.json: see the log above"
fi
