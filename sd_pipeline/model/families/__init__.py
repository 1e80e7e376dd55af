"""Model families: which pipeline classes the engine serves, read from a model's ``model_index.json``."""

from __future__ import annotations

from sd_pipeline.model.families.base import (
    Conditioning,
    StableDiffusion,
    StableDiffusionInpainting,
    join_rows,
    split_rows,
)
from sd_pipeline.model.families.flux import Flux, FluxFill
from sd_pipeline.model.families.sd3 import StableDiffusion3
from sd_pipeline.model.families.sdxl import StableDiffusionXL, StableDiffusionXLInpainting

Family = StableDiffusion  # every family is one; the others override what differs
FAMILIES: dict[str, type[Family]] = {
    family.pipeline_class: family
    for family in (
        StableDiffusion,
        StableDiffusionInpainting,
        StableDiffusionXL,
        StableDiffusionXLInpainting,
        StableDiffusion3,
        Flux,
        FluxFill,
    )
}

__all__ = ["FAMILIES", "Conditioning", "Family", "family_of", "join_rows", "served_classes", "split_rows"]


def family_of(pipeline_class: str) -> type[Family] | None:
    """The family serving a diffusers pipeline class, or None."""
    return FAMILIES.get(pipeline_class)


def served_classes() -> str:
    """The pipeline classes served, for error messages: 'StableDiffusionPipeline (SD 1.x / 2.x), ...'."""
    return ", ".join(f"{family.pipeline_class} ({family.title})" for family in FAMILIES.values())
