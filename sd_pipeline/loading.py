"""Load a Stable Diffusion pipeline from a Hugging Face id or a local folder."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline
from diffusers.models.attention_processor import AttnProcessor2_0
from huggingface_hub.errors import HfHubHTTPError

from sd_pipeline.errors import ModelLoadError
from sd_pipeline.settings import DeviceName, DtypeName, PipelineSettings

logger = logging.getLogger(__name__)

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass
class LoadedPipeline:
    """A pipeline on its device, with what was chosen and how long loading took."""

    pipeline: StableDiffusionPipeline
    model: str
    device: torch.device
    dtype: torch.dtype
    load_seconds: float


def resolve_device(name: DeviceName) -> torch.device:
    """``auto`` picks CUDA, then Apple MPS, then CPU."""
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_dtype(name: DtypeName, device: torch.device) -> torch.dtype:
    """``auto`` is float16 on CUDA (what SD 1.x checkpoints ship in) and float32 elsewhere."""
    if name != "auto":
        return _DTYPES[name]
    return torch.float16 if device.type == "cuda" else torch.float32


def _from_pretrained(settings: PipelineSettings, dtype: torch.dtype) -> StableDiffusionPipeline:
    extra = {} if settings.safety_checker else {"safety_checker": None, "requires_safety_checker": False}
    if settings.model.startswith((".", "/", "~")) and not Path(settings.model).expanduser().is_dir():
        raise ModelLoadError(
            f"cannot load model '{settings.model}': no such folder. Set SD_MODEL (or --model) to a folder made by "
            "save_pretrained (for an offline try: python -m sd_pipeline.tiny ./tiny-model) or to a Hugging Face id."
        )
    try:
        pipeline: StableDiffusionPipeline = StableDiffusionPipeline.from_pretrained(
            model_source(settings.model), dtype=dtype, **extra
        )
    except (OSError, ValueError, HfHubHTTPError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelLoadError(
            f"cannot load model '{settings.model}': {reason[:300]}. Set SD_MODEL (or --model) to a local "
            "pipeline folder (for an offline try: python -m sd_pipeline.tiny ./tiny-model), or check the "
            "Hugging Face id and that the Hub is reachable."
        ) from error
    return pipeline


def apply_speedups(pipeline: StableDiffusionPipeline, settings: PipelineSettings, device: torch.device) -> None:
    """Zero-cost speedups on by default on CUDA; the optional ones only when asked for."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
        pipeline.unet.set_attn_processor(AttnProcessor2_0())
        pipeline.vae.set_attn_processor(AttnProcessor2_0())
    if settings.fuse_qkv:
        pipeline.fuse_qkv_projections()
    if settings.channels_last:
        pipeline.unet.to(memory_format=torch.channels_last)
        pipeline.vae.to(memory_format=torch.channels_last)
    if settings.compile_unet:
        pipeline.unet = torch.compile(pipeline.unet, fullgraph=True)


def load_pipeline(settings: PipelineSettings) -> LoadedPipeline:
    """Load the model named in ``settings`` onto the chosen device; raises ``ModelLoadError``."""
    if settings.cpu_threads:
        torch.set_num_threads(settings.cpu_threads)
    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device)
    started = time.perf_counter()
    pipeline = _from_pretrained(settings, dtype)
    pipeline.to(device)
    pipeline.set_progress_bar_config(disable=True)
    apply_speedups(pipeline, settings, device)
    load_seconds = time.perf_counter() - started
    logger.info("loaded %s on %s (%s) in %.1fs", settings.model, device, dtype, load_seconds)
    return LoadedPipeline(
        pipeline=pipeline, model=model_name(settings.model), device=device, dtype=dtype, load_seconds=load_seconds
    )


def model_source(model: str) -> str:
    """What ``from_pretrained`` should be given: an existing local folder's path, else the Hub id."""
    local = Path(model).expanduser()
    return str(local) if local.is_dir() else model


def model_name(model: str) -> str:
    """How records and PNGs name the model: the Hub id, or a local folder's own name (no server path)."""
    local = Path(model).expanduser()
    return local.resolve().name if local.is_dir() else model
