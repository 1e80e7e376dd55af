"""Load a diffusers pipeline of a served family from a Hugging Face id, a local folder or a published S3 version."""

from __future__ import annotations

import logging
import os
import shutil
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import DiffusionPipeline
from diffusers.models.attention_processor import AttnProcessor2_0
from huggingface_hub.errors import HfHubHTTPError

from sd_pipeline.contract.backend import BackendInfo
from sd_pipeline.contract.errors import ModelLoadError
from sd_pipeline.contract.models import ModelDefaults
from sd_pipeline.contract.settings import DeviceName, DtypeName, PipelineSettings
from sd_pipeline.model.families import Family, family_of, served_classes
from sd_pipeline.model.simulated import simulate_accelerator
from sd_pipeline.versions.resolve import ResolvedModel, resolve_model

logger = logging.getLogger(__name__)

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass
class LoadedPipeline:
    """A pipeline on its device, with what was chosen and how long loading took."""

    pipeline: Any  # a diffusers pipeline of a served family
    family: Family
    model: str
    device: torch.device
    dtype: torch.dtype
    load_seconds: float
    compiled: bool = False
    source: str = ""  # the folder (or Hub id) it was loaded from
    version: str = ""
    model_hash: str = ""
    defaults: ModelDefaults = field(default_factory=ModelDefaults)
    simulated: str = ""  # SD_SIMULATED_GPU's model when the accelerator is simulated (benchmarks)

    @property
    def native_size(self) -> int:
        """The side the model was trained at (512 for SD 1.x): diffusers' default width and height."""
        return self.family.native_size

    def describe(self, *, warmup_seconds: float | None = None) -> BackendInfo:
        """What a worker process or replica reports once this pipeline is ready."""
        dtype = str(self.dtype).removeprefix("torch.")
        return BackendInfo(
            self.model,
            str(self.device),
            dtype,
            self.load_seconds,
            self.native_size,
            warmup_seconds,
            version=self.version,
            model_hash=self.model_hash,
            defaults=self.defaults,
            simulated=self.simulated,
            family=self.family.name,
            rules=self.family.rules,
        )


CUDA_REQUIREMENTS = (
    "PyPI's torch {torch} is built for CUDA {cuda}: it needs an NVIDIA driver >= 580 and a Turing "
    "(compute capability 7.5) or newer GPU, visible to the process (docker: --gpus all)"
)


def cuda_requirements() -> str:
    return CUDA_REQUIREMENTS.format(torch=torch.__version__, cuda=torch.version.cuda or "13.0")


def resolve_device(name: DeviceName) -> torch.device:
    """``auto`` picks CUDA, then Apple MPS, then CPU; ``cuda`` without a usable GPU is a ``ModelLoadError``."""
    if name == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"SD_DEVICE=cuda but CUDA is not usable here. {cuda_requirements()}.")
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if Path("/dev/nvidia0").exists():
        logger.warning(
            "an NVIDIA device is present but CUDA is not usable, so the CPU is used. %s", cuda_requirements()
        )
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_dtype(name: DtypeName, device: torch.device) -> torch.dtype:
    """``auto`` is float16 on CUDA (what SD 1.x checkpoints ship in) and float32 elsewhere."""
    if name != "auto":
        return _DTYPES[name]
    return torch.float16 if device.type == "cuda" else torch.float32


def _load_error(settings: PipelineSettings, error: Exception) -> ModelLoadError:
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return ModelLoadError(
        f"cannot load model '{settings.model}': {reason[:300]}. Set SD_MODEL (or --model) to a local "
        "pipeline folder (for an offline try: python -m sd_pipeline.tiny ./tiny-model), or check the "
        "Hugging Face id and that the Hub is reachable."
    )


def family_in(settings: PipelineSettings, source: str) -> tuple[type[Family], dict[str, Any]]:
    """The family of the pipeline in ``source`` and its ``model_index.json``; a class no family
    serves is a one-line ``ModelLoadError`` naming it and the served ones."""
    try:
        index = DiffusionPipeline.load_config(source)
    except (OSError, ValueError, HfHubHTTPError) as error:
        raise _load_error(settings, error) from error
    index = index if isinstance(index, dict) else {}
    pipeline_class = str(index.get("_class_name", ""))
    family = family_of(pipeline_class)
    if family is None:
        raise ModelLoadError(
            f"cannot serve model '{settings.model}': its pipeline is {pipeline_class or 'of no named class'}, "
            f"and this service serves {served_classes()}"
        )
    return family, index


def _from_pretrained(settings: PipelineSettings, source: str, dtype: torch.dtype) -> tuple[Any, Family]:
    if settings.model.startswith((".", "/", "~")) and not Path(settings.model).expanduser().is_dir():
        raise ModelLoadError(
            f"cannot load model '{settings.model}': no such folder. Set SD_MODEL (or --model) to a folder made by "
            "save_pretrained (for an offline try: python -m sd_pipeline.tiny ./tiny-model) or to a Hugging Face id."
        )
    family, index = family_in(settings, source)
    options = family.load_options(settings, index)
    try:
        pipeline = DiffusionPipeline.from_pretrained(source, dtype=dtype, **options)
    except (OSError, ValueError, HfHubHTTPError) as error:
        raise _load_error(settings, error) from error
    return pipeline, family(pipeline)


def apply_speedups(family: Family, settings: PipelineSettings, device: torch.device) -> None:
    """Zero-cost speedups on by default on CUDA; the optional ones only when asked for.

    cuDNN benchmarking stays off unless asked for: it times algorithms again for every new
    (batch, height, width), so many first requests run slow, and its choice can move pixels.
    The denoiser (UNet or transformer) is compiled without ``fullgraph``: a graph break or the
    recompile limit then falls back to eager instead of failing the request, and after warm-up the
    compiler runs new shapes eagerly instead of blocking the pipeline to compile them (see
    ``freeze_compiled_shapes``).
    """
    pipeline = family.pipeline
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = settings.cudnn_benchmark
        family.denoiser.set_attn_processor(AttnProcessor2_0())
        pipeline.vae.set_attn_processor(AttnProcessor2_0())
    if settings.fuse_qkv:
        pipeline.fuse_qkv_projections()
    if settings.channels_last:
        family.denoiser.to(memory_format=torch.channels_last)
        pipeline.vae.to(memory_format=torch.channels_last)
    if settings.compile_unet:
        if settings.compile_backend == "inductor" and device.type == "cuda":
            require_compiler_toolchain()
        family.denoiser = torch.compile(family.denoiser, backend=settings.compile_backend)


def require_compiler_toolchain() -> None:
    """Inductor's Triton kernels build a small C launcher at run time: a C compiler and Python.h must exist."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    headers = Path(sysconfig.get_paths()["include"]) / "Python.h"
    if not compiler or not headers.exists():
        missing = " and ".join(
            name
            for name, ok in (("a C compiler", bool(compiler)), (f"Python headers ({headers})", headers.exists()))
            if not ok
        )
        raise ModelLoadError(
            f"SD_COMPILE=true needs {missing} for Triton at run time; install them (Debian/Ubuntu: apt-get install "
            "gcc libc6-dev python3-dev) or turn SD_COMPILE off"
        )


def freeze_compiled_shapes() -> None:
    """From now on reuse compiled graphs where they fit and run other shapes eagerly, never recompiling."""
    torch.compiler.set_stance("eager_on_recompile")


def load_pipeline(settings: PipelineSettings) -> LoadedPipeline:
    """Load the model named in ``settings`` onto the chosen device; raises ``ModelLoadError``."""
    if settings.cpu_threads:
        torch.set_num_threads(settings.cpu_threads)
    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device)
    started = time.perf_counter()
    resolved: ResolvedModel = resolve_model(settings.model, settings.model_store)
    pipeline, family = _from_pretrained(settings, resolved.source, dtype)
    pipeline.to(device)
    pipeline.set_progress_bar_config(disable=True)
    apply_speedups(family, settings, device)
    simulation = settings.simulation()
    if simulation is not None:
        simulate_accelerator(family.denoiser, pipeline.vae, simulation)
    load_seconds = time.perf_counter() - started
    label = f"{resolved.name}@{resolved.version}" if resolved.version else settings.model
    logger.info("loaded %s (%s) on %s (%s) in %.1fs", label, family.title, device, dtype, load_seconds)
    return LoadedPipeline(
        pipeline=pipeline,
        family=family,
        model=resolved.name,
        device=device,
        dtype=dtype,
        load_seconds=load_seconds,
        compiled=settings.compile_unet,
        source=resolved.source,
        version=resolved.version,
        model_hash=resolved.model_hash,
        defaults=resolved.defaults,
        simulated=simulation.spec if simulation else "",
    )
