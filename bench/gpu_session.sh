#!/usr/bin/env bash
# Everything a short GPU lease should run, in one call and under one time budget: the machine,
# then bench.gpu (modes a-d, partial results kept per mode), then bench.cuda_checks (OOM split,
# compile warm-up and recompile-free variants). Each step has its own limit so one slow compile
# cannot take the others' time. Results land in $OUT (the device tool's folder) or bench/results.
#   bash bench/gpu_session.sh
set -u
out=${OUT:-bench/results}
model=${GPU_MODEL_DIR:-/tmp/sd15-random}
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, diffusers, transformers; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__)"
timeout "${GPU_BENCH_SECONDS:-300}" python3 -m bench.gpu --model "$model" --out "$out" 2>&1 | tee "$out/gpu.log"
timeout "${CUDA_CHECKS_SECONDS:-200}" python3 -m bench.cuda_checks --model "$model" --out "$out" 2>&1 | tee "$out/cuda_checks.log"
