#!/usr/bin/env bash
# Prepare the GPU benchmark for a machine with PyTorch but no network: download here every
# wheel its imports need beyond torch, with their own dependencies, resolved against the
# project's pins (requirements.txt as a constraints file), for CPython 3.12 on x86_64.
# None of these packages depends on torch, so no CUDA wheel is fetched. Then, on the GPU
# machine, from the repository root:
#   pip install --no-index --find-links bench/wheels diffusers transformers pydantic pydantic-settings safetensors
#   python -m bench.gpu
set -euo pipefail
cd "$(dirname "$0")/.."
pip download --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 \
  --platform manylinux2014_x86_64 --implementation cp -c requirements.txt -d bench/wheels \
  diffusers transformers pydantic pydantic-settings safetensors
