"""What a model says about itself: where its versions live and the settings it recommends.

Plain data, shared by the loader (which reads them from a version's manifest or a folder's
``model_defaults.json``), the backends (which report them) and the web layer (which uses them
as the form's defaults).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

S3_SCHEME = "s3://"
DEFAULTS_FILE = "model_defaults.json"  # beside model_index.json in a plain pipeline folder


PreviewMethod = Literal["approx", "taesd", "full", "off"]  # how live previews are made (SD_PREVIEW)


class ModelDefaults(BaseModel):
    """Settings a model recommends; unset fields keep the app's own defaults."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    steps: int | None = Field(None, ge=1, le=150)
    guidance_scale: float | None = Field(None, ge=0, le=30)
    scheduler: str | None = None
    width: int | None = Field(None, ge=64, le=4096, multiple_of=8)
    height: int | None = Field(None, ge=64, le=4096, multiple_of=8)
    strength: float | None = Field(None, gt=0, le=1)  # denoising strength, for requests from a picture
    example_prompt: str | None = Field(None, max_length=200)  # the page's prompt placeholder: what this model draws
    # The live preview that reads right for this model (SD_PREVIEW=auto): approx needs latents a
    # linear map can read; a model whose latents are not needs full (or taesd).
    preview: PreviewMethod | None = None


class ModelStore(BaseModel):
    """How to reach the S3-compatible store that holds model versions (keys: boto3's usual chain)."""

    model_config = ConfigDict(frozen=True)

    endpoint_url: str | None = None
    region: str | None = None
    addressing_style: Literal["auto", "virtual", "path"] = "auto"
    cache_dir: str = Field(description="where verified versions are kept on this host")


class LoraStoreSettings(BaseModel):
    """Where published LoRA adapters are: ``s3://BUCKET/PREFIX``, an adapter a versioned model each under it."""

    model_config = ConfigDict(frozen=True)

    location: str = Field(description="s3://BUCKET/PREFIX (adapter NAME's versions are under PREFIX/NAME)")
    store: ModelStore
    refresh_seconds: float = Field(30.0, gt=0, description="how old the list of adapters and their versions may be")


def is_s3_model(model: str) -> bool:
    """Whether ``SD_MODEL`` names published versions in S3 rather than a Hub id or folder."""
    return model.startswith(S3_SCHEME)
