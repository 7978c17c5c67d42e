#!/usr/bin/env bash
# The GPU checks of the training core in one call on a lent CUDA machine (H100/H200), whose image
# has torch, triton, typer, rich, scipy, scikit-learn, Pillow and safetensors but not spikingjelly.
#
# Prepare here (wheels for the device's Python 3.12, kept out of git by .git/info/exclude):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 -d .whl spikingjelly==2.0.0 loguru==0.7.3
# then run this script there with `.whl` carried. It prints:
#   1. bench/train_step.py: ms per optimizer step of the paper's setting (VGG-SNN, T=10, 2x48x48,
#      batch 120 per stream): per-step loop fp32/bf16, spikingjelly CE fp32/bf16, full TMKT
#      fp32/bf16 and bf16 + torch.compile (compile seconds reported), as JSON in $OUT;
#   2. a short `tmkt train --device cuda` (bf16 autocast, channels_last) on the built-in digits set.
set -uo pipefail
OUT="${OUT:-/tmp/out}"
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
timeout "${TRAIN_STEP_TIMEOUT:-420}" python3 bench/train_step.py --json "$OUT/train_step.json" 2>&1 | tee "$OUT/train_step.log"
timeout "${TRAIN_TIMEOUT:-150}" python3 -m tmkt train --device cuda --amp --channels-last --epochs 3 \
    --out /tmp/gpu-run --cache-dir /tmp/gpu-cache 2>&1 | tail -8 | tee "$OUT/train.log"
