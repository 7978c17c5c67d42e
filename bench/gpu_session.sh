#!/usr/bin/env bash
# Every GPU check of the training core in one call on a lent CUDA machine (H100/H200), whose image
# has torch, triton, typer, rich, scipy, scikit-learn, Pillow and safetensors but not spikingjelly.
#
# Prepare here (wheels for the device's Python 3.12, kept out of git by .git/info/exclude):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 -d .whl spikingjelly==2.0.0 loguru==0.7.3
# then run `OUT=$OUT bash bench/gpu_session.sh` there with `.whl` carried (timeout 590 s; the
# parts take at most 280 + 2 x 90 + 110 s). Most
# important first, each part under its own timeout so a slow compile cannot lose the rest:
#   1. bench/train_step.py on the paper's setting (VGG-SNN, T=10, 2x48x48, batch 120 per stream):
#      the full TMKT step eager bf16 and compiled (`tmkt train --compile`), against the plain
#      per-time-step loop in bf16 -> $OUT/train_step.json;
#   2. `tmkt train --device cuda` (bf16 autocast, channels_last, fused AdamW) on the built-in digits
#      set, eager and then --compile, same seed: test accuracies to compare -> $OUT/train*.log;
#   3. the remaining bench variants (fp32, spikingjelly CE, compiled loop, CUDA graphs)
#      -> $OUT/train_step_rest.json.
set -uo pipefail
OUT="${OUT:-/tmp/out}"
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
timeout "${MAIN_TIMEOUT:-280}" python3 bench/train_step.py --only loop-bf16,tmkt-bf16,tmkt-bf16-compile \
    --json "$OUT/train_step.json" 2>&1 | grep -v "^W" | tee "$OUT/train_step.log"
for mode in eager compile; do
    flag=$([ "$mode" = compile ] && echo --compile || echo --no-compile)
    timeout "${TRAIN_TIMEOUT:-90}" python3 -m tmkt train --device cuda --amp --channels-last $flag --epochs 3 \
        --out "/tmp/gpu-run-$mode" --overwrite --cache-dir /tmp/gpu-cache 2>&1 | tail -6 | tee "$OUT/train-$mode.log"
done
timeout "${REST_TIMEOUT:-110}" python3 bench/train_step.py \
    --only loop-fp32,sj-ce-fp32,sj-ce-bf16,tmkt-fp32,loop-bf16-compile,tmkt-bf16-compile-cg \
    --json "$OUT/train_step_rest.json" 2>&1 | grep -v "^W" | tee "$OUT/train_step_rest.log"
