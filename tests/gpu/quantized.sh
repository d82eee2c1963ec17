#!/usr/bin/env bash
# Prepared GPU step for quantized models (issue 16, ask 1): what cannot run on the CPU machines.
#   a. tests/test_quantized.py on the GPU machine: bitsandbytes' CUDA kernels (8-bit and nf4) and torchao /
#      compressed-tensors with a CUDA torch, pre-quantized round trips and quantize-on-load, logits compared
#      bit for bit with stock loading of the same checkpoint;
#   b. GPTQ proper (qweight / qzeros / scales / g_idx): test_gptq_model_loads_like_stock loads the checkpoint
#      stock, as a tensorized artifact and behind file:// with gptqmodel's kernels (skipped without gptqmodel).
#
#   here, once:  pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl \
#                  torchao compressed-tensors bitsandbytes loguru gptqmodel   (gptqmodel: a wheel matching the
#                  image's torch/CUDA; its other Requires-Dist as the image lacks them)
#   device tool: run(command="bash tests/gpu/quantized.sh", carry=[".whl"], timeout_s=300)
# Log under $OUT/quantized.log. Knobs: HFT_Q_LIMIT (s, default 240), HFT_Q_DEVICE (cuda:0).
source "$(dirname "$0")/common.sh"
export HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
start_log quantized.log /tmp/hft-q-out
LIMIT=${HFT_Q_LIMIT:-240}
step "install the wheels"
install_wheels "backends missing from the image are skipped"
versions torch transformers diffusers torchao compressed-tensors bitsandbytes gptqmodel
python3 -c "import torch; print('cuda', torch.cuda.is_available(), torch.version.cuda)"
step "a+b. tests/test_quantized.py with the models on ${HFT_Q_DEVICE:-cuda:0}"
HFT_TEST_QUANT_DEVICE=${HFT_Q_DEVICE:-cuda:0} timeout "$LIMIT" python3 -m pytest -q -p no:cacheprovider -p no:randomly -rs tests/test_quantized.py 2>&1 | tail -30
step "done in $(( $(date +%s) - T0 )) s"
