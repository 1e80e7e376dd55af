# syntax=docker/dockerfile:1
# CUDA runtime image for the text-to-image service. PyPI's torch 2.13.0 wheel for Linux is
# built against CUDA 13.0 (it brings its own CUDA libraries as nvidia-* wheels), so the base
# is the CUDA 13.0 runtime: the host needs an NVIDIA driver >= 580 and a Turing or newer GPU.
# Model weights are never baked in: they download into the Hugging Face cache volume on first start.
# With Ray, ENTRYPOINT is replaced by "ray start ..." on the head and worker nodes (deploy/).
FROM nvidia/cuda:13.0.0-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# gcc, libc6-dev and python3-dev: SD_COMPILE=true has Triton build a small C launcher at run time.
# wget: KubeRay's default probes of a Ray node run it inside the container.
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev gcc libc6-dev ca-certificates curl wget \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv

# Dependencies in their own layer, cached until the requirements change. Ray Serve too: the
# same image runs the app, a Ray head and the Ray worker nodes (compose profile "ray", KubeRay).
COPY requirements.txt requirements-ray.txt /tmp/
RUN pip install torch==2.13.0 -r /tmp/requirements.txt -r /tmp/requirements-ray.txt

RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin app \
    && mkdir -p /data /home/app/.cache/huggingface /home/app/.cache/torchinductor \
    && chown -R app:app /data /home/app/.cache

WORKDIR /app
COPY app.py ./
COPY sd_pipeline/ sd_pipeline/
COPY storage/ storage/
COPY monitoring/ monitoring/
COPY webapp/ webapp/
# The offline demo model (11 MB): SD_MODEL=/app/models/tiny-shapes serves it without the Hub.
COPY models/tiny-shapes/ models/tiny-shapes/
# Its demo LoRA adapter: LORA_DIR=/app/models/loras lets prompts name <lora:ring>.
COPY models/loras/ models/loras/

USER app
ENV HOST=0.0.0.0 \
    PORT=7860 \
    METRICS_PORT=8000 \
    DATA_DIR=/data \
    HF_HOME=/home/app/.cache/huggingface \
    TORCHINDUCTOR_CACHE_DIR=/home/app/.cache/torchinductor \
    GRADIO_TEMP_DIR=/tmp/gradio \
    GRADIO_ANALYTICS_ENABLED=False \
    PYTHONPATH=/app
# PYTHONPATH: Ray's worker processes import the pipeline replica's code from /app whatever their directory.
# The compile cache is a volume: with SD_COMPILE a cold warm-up took over 3 minutes on an H200,
# a warm-cache one 40 s (docs/BENCHMARKS.md).
VOLUME ["/data", "/home/app/.cache/huggingface", "/home/app/.cache/torchinductor"]
EXPOSE 7860 8000

# Liveness on the metrics side port; the long start period covers a first model download.
HEALTHCHECK --interval=30s --timeout=5s --start-period=15m --retries=3 \
    CMD curl -fsS http://127.0.0.1:8000/healthz || exit 1

# Exec form: SIGTERM reaches Python, which finishes the running batch and flushes uploads.
# Give it time: docker stop -t 90 (compose sets stop_grace_period).
STOPSIGNAL SIGTERM
ENTRYPOINT ["python", "app.py"]
