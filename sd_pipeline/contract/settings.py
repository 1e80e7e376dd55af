"""Settings for loading and running the model (plain data: they travel to the worker process and the replicas)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, field_validator

from sd_pipeline.contract.models import LoraStoreSettings, ModelStore, PreviewMethod
from sd_pipeline.contract.request import DEFAULT_MAX_PIXELS
from sd_pipeline.contract.simulation import SimulatedAccelerator

DEFAULT_MODEL = "OFA-Sys/small-stable-diffusion-v0"
DEFAULT_PREVIEW_INTERVAL = 0.5  # seconds between two previews of one request

DeviceName = Literal["auto", "cuda", "mps", "cpu"]
PreviewName = Literal["auto", PreviewMethod]  # auto: what the model recommends, else approx
DtypeName = Literal["auto", "float16", "bfloat16", "float32"]


class PipelineSettings(BaseModel):
    """How to load the model and which speedups to apply.

    The defaults suit one-off use (the command line, tests, benchmarks): no warm-up and no
    previews. The app's ``Settings`` (webapp/settings.py) serve with both on (SD_WARMUP, SD_PREVIEW)
    and build these through ``Settings.pipeline()``."""

    model: str = Field(
        DEFAULT_MODEL, description="Hugging Face model id, local pipeline folder, or s3://BUCKET/PREFIX@VERSION"
    )
    model_store: ModelStore | None = Field(None, description="where s3:// versions are fetched from and cached")
    device: DeviceName = Field("auto", description="auto picks cuda, then mps, then cpu")
    dtype: DtypeName = Field("auto", description="auto: float16 on CUDA, float32 elsewhere")
    safety_checker: bool = Field(True, description="run the model's safety checker when it has one")
    t5_encoder: bool = Field(
        True,
        description="load SD3's T5 text encoder when the folder has one (off: SD3 runs without it, in less memory)",
    )
    cpu_threads: int | None = Field(None, ge=1, le=512, description="torch CPU threads (default: torch's choice)")
    cpu_thread_choices: tuple[int, ...] = Field(
        (), description="on the CPU, thread counts the engine picks from per step by measuring (cpu_threads first)"
    )
    warmup: bool = Field(False, description="run one small generation after loading")
    compile_unet: bool = Field(False, description="torch.compile the UNet (CUDA; warm-up compiles the served shapes)")
    compile_backend: str = Field("inductor", description="torch.compile backend ('eager' checks dynamo alone)")
    cudnn_benchmark: bool = Field(
        False, description="let cuDNN time its algorithms for each new shape (slow first call per shape)"
    )
    channels_last: bool = Field(False, description="channels-last memory format for the UNet and VAE")
    fuse_qkv: bool = Field(False, description="fuse attention q/k/v projections")
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, ge=64 * 64, description="largest width x height accepted")
    preview: PreviewName = Field(
        "off",
        description="live previews: approx (a linear map of the latents), taesd (a tiny decoder), full (the VAE), "
        "off, or auto (the model's recommendation in model_defaults.json, else approx)",
    )
    preview_decoder: str | None = Field(None, description="folder of a diffusers AutoencoderTiny (for taesd)")
    preview_interval: float = Field(
        DEFAULT_PREVIEW_INTERVAL, gt=0, description="seconds between two previews of one request"
    )
    lora_dir: str | None = Field(None, description="folder of LoRA adapters that prompts name (<lora:NAME:W>)")
    lora_store: LoraStoreSettings | None = Field(
        None, description="LoRA adapters published to S3 that prompts name too (after lora_dir's)"
    )
    lora_cache_mb: int = Field(1024, ge=1, description="LoRA adapters kept loaded on the device (MB, LRU)")
    simulated_gpu: str | None = Field(
        None, description="benchmarks only: model each UNet/VAE call's time, e.g. 'unet=32.6+1.1*n,vae=13*n' or 'h200'"
    )

    @field_validator("simulated_gpu")
    @classmethod
    def _simulation_reads(cls, value: str | None) -> str | None:
        return SimulatedAccelerator.parse(value).spec if value else None

    def simulation(self) -> SimulatedAccelerator | None:
        """The modelled accelerator, or None for the real device."""
        return SimulatedAccelerator.parse(self.simulated_gpu) if self.simulated_gpu else None
