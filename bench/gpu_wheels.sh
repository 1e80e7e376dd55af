#!/usr/bin/env bash
# Prepare the GPU benchmark for a machine with PyTorch but no network: download here the
# wheels its imports need beyond what such an image ships (torch, transformers, numpy),
# for CPython 3.12 on x86_64. Then, on the GPU machine, from the repository root:
#   pip install --no-index --find-links bench/wheels diffusers pydantic pydantic-settings
#   python -m bench.gpu
set -euo pipefail
cd "$(dirname "$0")/.."
pip download --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 \
  --platform manylinux2014_x86_64 --implementation cp --no-deps -d bench/wheels \
  diffusers==0.42.1 pydantic pydantic-core annotated-types typing-inspection pydantic-settings \
  python-dotenv importlib-metadata zipp
