#!/usr/bin/env bash
# Prepare the GPU session for a machine with PyTorch but no network: download here every wheel
# the benchmarks and the served app need beyond what that machine's image already holds
# (/work/.library/device/KINDS.md, "Python packages already there"), resolved against the
# project's pins (requirements.txt as a constraints file), for CPython 3.12 on x86_64. None of
# them depends on torch, so no CUDA wheel is fetched. The device tool carries at most 64 MiB a
# call, so the wheels are split into .whl/1, .whl/2, ... of at most 60 MiB each; carry one part
# per call (each call installs its part into .site/, an ignored folder that stays on a warm
# machine), and the last call runs the session:
#   bash bench/gpu_wheels.sh
#   run(carry=[".whl/1"]): bash bench/gpu_session.sh --install-only
#   run(carry=[".whl/2"]): bash bench/gpu_session.sh
set -euo pipefail
cd "$(dirname "$0")/.."
# What the image already has (KINDS.md); a wheel of these is not carried.
present=" accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs certifi charset-normalizer
 click cloudpickle colorama contourpy cycler filelock fonttools frozenlist fsspec grpcio h11 hf-xet httpcore httpx
 huggingface-hub idna jinja2 kiwisolver markdown markdown-it-py markupsafe matplotlib mdurl mpmath msgpack multidict
 networkx numpy packaging pandas pillow pluggy prometheus-client propcache protobuf psutil pygments pyparsing
 python-dateutil pyyaml regex requests rich safetensors setuptools shellingham six sympy tokenizers tqdm
 transformers typer typing-extensions urllib3 werkzeug wheel yarl zipp "
present=" $(echo $present) "  # one line, one space between names
all=$(mktemp -d)
pip download -q --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --implementation cp \
  -c requirements.txt -d "$all" \
  diffusers gradio gradio-client boto3 "moto[server]" pydantic pydantic-settings itsdangerous python-multipart
rm -rf .whl && mkdir -p .whl/1
part=1 used=0 limit=$((60 * 1024 * 1024))
for wheel in $(ls -S "$all"/*.whl); do
  name=$(basename "$wheel" | cut -d- -f1 | tr '_A-Z' '-a-z')
  [[ "$present" == *" $name "* ]] && continue
  size=$(stat -c %s "$wheel")
  if (( used + size > limit )); then part=$((part + 1)) used=0; mkdir -p ".whl/$part"; fi
  cp "$wheel" ".whl/$part/" && used=$((used + size))
done
rm -rf "$all"
du -sh .whl/*
