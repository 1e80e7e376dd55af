#!/usr/bin/env bash
# Everything a short GPU lease should run, in one call and under one time budget (the device
# tool allows 600 s a call): the machine, then the served app end to end against the raw
# pipeline at batch 8 (bench.gpu_served: the number we most lack), then bench.gpu (modes a-d,
# partial results kept per mode), then bench.cuda_checks (OOM split, compile warm-up and
# recompile-free variants). Each step has its own limit so one slow step cannot take the
# others' time. Results land in $OUT (the device tool's folder) or bench/results.
# Model families beyond SD 1.5 take a call of their own (--families): SDXL base's architecture
# (random weights, float16, ~7 GB written once to $GPU_SDXL_DIR), 1024x1024, 30 steps, raw at
# batch 1/4/8 against the app with 1/4/8 clients. FLUX.1 at its real shape (12B transformer + T5-XXL,
# ~33 GB of random weights to write and load) does not fit one 600-s call and is not run.
#   bash bench/gpu_session.sh                  # after the wheels (bench/gpu_wheels.sh) are installed
#   bash bench/gpu_session.sh --families       # the SDXL rows, in a second call
#   bash bench/gpu_session.sh --install-only   # install the carried part of .whl/ into .site/ and stop
set -u
out=${OUT:-bench/results}
model=${GPU_MODEL_DIR:-/tmp/sd15-random}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
for part in .whl/*/; do  # whichever part of the wheels this call carried
  [ -d "$part" ] && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target .site "$part"*.whl
done
[ -d .site ] && export PYTHONPATH="$PWD/.site${PYTHONPATH:+:$PYTHONPATH}"
[ "${1:-}" = "--install-only" ] && exit 0
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, diffusers, transformers, gradio; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__, 'gradio', gradio.__version__)"
if [ "${1:-}" = "--families" ]; then
  timeout "${GPU_SDXL_SECONDS:-540}" python3 -m bench.gpu_served --family sdxl --model "${GPU_SDXL_DIR:-/tmp/sdxl-random}" \
    --batch 8 --raw-batches 1,4,8 --clients 1,4,8 --per-client 2 --raw-calls 2 --out "$out" 2>&1 | tee "$out/gpu_served_sdxl.log"
  exit 0
fi
timeout "${GPU_SERVED_SECONDS:-210}" python3 -m bench.gpu_served --model "$model" --out "$out" 2>&1 | tee "$out/gpu_served.log"
timeout "${GPU_BENCH_SECONDS:-220}" python3 -m bench.gpu --model "$model" --out "$out" 2>&1 | tee "$out/gpu.log"
timeout "${CUDA_CHECKS_SECONDS:-150}" python3 -m bench.cuda_checks --model "$model" --out "$out" 2>&1 | tee "$out/cuda_checks.log"
