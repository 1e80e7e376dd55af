"""Fit a model's ``approx`` preview: the least-squares linear map (plus bias) from its scaled latents
to its pictures shrunk to the latents' size, written beside the weights as ``latent_rgb.json``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from sd_pipeline.model.previews import LATENT_RGB_FILE
from sd_pipeline.shapes.drawing import examples


def fit_latent_rgb(vae: Any, pictures: list[Image.Image]) -> dict[str, Any]:
    """Factors (channels x 3) and bias (3) mapping ``vae``'s scaled latents to RGB in [-1, 1]."""
    images = torch.from_numpy(np.stack([np.asarray(picture) for picture in pictures])).permute(0, 3, 1, 2)
    images = images.float() / 127.5 - 1.0
    with torch.no_grad():
        latents = torch.cat([vae.encode(chunk).latent_dist.mean for chunk in torch.split(images, 256)])
    latents = latents * vae.config.scaling_factor
    side = latents.shape[-1]
    small = torch.nn.functional.interpolate(images, size=(side, side), mode="area")
    inputs = latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1]).double().numpy()
    targets = small.permute(0, 2, 3, 1).reshape(-1, 3).double().numpy()
    design = np.hstack([inputs, np.ones((len(inputs), 1))])
    solution, *_ = np.linalg.lstsq(design, targets, rcond=None)
    error = float(np.sqrt(np.mean((design @ solution - targets) ** 2)))
    return {
        "factors": np.round(solution[:-1], 5).tolist(),
        "bias": np.round(solution[-1], 5).tolist(),
        "rms_error": round(error, 4),
        "source": f"least squares over {len(pictures)} drawn pictures (sd_pipeline/shapes/preview_fit.py)",
    }


def write_latent_rgb(folder: Path, *, pictures: int = 512, seed: int = 7) -> dict[str, Any]:
    """Fit the preview map of the pipeline in ``folder`` on freshly drawn pictures and save it there."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae").eval()
    fitted = fit_latent_rgb(vae, [picture for picture, *_ in examples(pictures, seed)])
    (folder / LATENT_RGB_FILE).write_text(json.dumps(fitted, indent=2) + "\n", encoding="utf-8")
    return fitted
