"""Live previews: what a request's image looks like so far, from the predicted clean latents (x0).

Made where the latents are (the worker process, a Ray replica), for the images due a preview on
the same step together, and encoded small: never the latents themselves.

- ``approx``: a linear map from the latent channels to RGB (plus a bias). Each model family
  carries the published factors of its latent format (``Family.latent_rgb``; the same idea as
  AUTOMATIC1111's "Approx cheap" preview); a model folder may carry its own in ``latent_rgb.json``
  (the shapes model's are fitted by ``python -m sd_pipeline.shapes fit-preview``). The picture is
  the latents' size (1/8 of the image per side): a PNG of a few hundred bytes to a few KB.
- ``taesd``: diffusers' ``AutoencoderTiny`` (a local folder, ``SD_PREVIEW_DECODER``) decodes the
  latents into a sharper picture, sent as a JPEG of at most ``DECODED_SIDE`` pixels a side.
- ``full``: the model's own VAE decodes them (AUTOMATIC1111's "Full" preview): exact, and as
  costly as a VAE decode per preview, so for small models (the shapes demo model, whose latents
  no linear map reads: its best fitted map gets the colour of 21 in 48 clean pictures right).
"""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image

from sd_pipeline.contract.errors import ModelLoadError
from sd_pipeline.contract.settings import PipelineSettings
from sd_pipeline.model.loading import LoadedPipeline

logger = logging.getLogger(__name__)

LATENT_RGB_FILE = "latent_rgb.json"
DECODED_SIDE = 256
JPEG_QUALITY = 80


class Previewer(Protocol):
    """Turns predicted clean latents (N, C, h, w) into one encoded picture each."""

    def render(self, latents: torch.Tensor) -> list[bytes]: ...


class LinearPreview:
    """``approx``: RGB = latents x factors + bias, at the latents' size."""

    def __init__(self, factors: torch.Tensor, bias: torch.Tensor) -> None:
        self.factors = factors.float()  # (channels, 3)
        self.bias = bias.float()  # (3,)

    @classmethod
    def for_model(cls, loaded: LoadedPipeline) -> LinearPreview | None:
        """The factors a model folder carries in ``latent_rgb.json``, else its family's (None: it has none)."""
        path = Path(loaded.source) / LATENT_RGB_FILE
        if path.is_file():
            fitted = json.loads(path.read_text())
            return cls(torch.tensor(fitted["factors"]), torch.tensor(fitted["bias"]))
        family = loaded.family
        if family.latent_rgb is None:
            return None
        return cls(torch.tensor(family.latent_rgb), torch.tensor(family.latent_rgb_bias))

    def render(self, latents: torch.Tensor) -> list[bytes]:
        rgb = torch.einsum("nchw,cr->nhwr", latents.float().cpu(), self.factors) + self.bias
        return [_png(picture) for picture in _to_uint8(rgb)]


class DecoderPreview:
    """``taesd`` and ``full``: a decoder turns the latents into pictures, batched."""

    def __init__(self, decoder: Any, *, latent_scale: float = 1.0, latent_shift: float = 0.0) -> None:
        self.decoder = decoder
        self.latent_scale = latent_scale  # what the decoder's input is divided by (the VAE's scaling factor)
        self.latent_shift = latent_shift  # then shifted by (the VAE's shift factor: SD3, FLUX.1)

    def render(self, latents: torch.Tensor) -> list[bytes]:
        parameter = next(self.decoder.parameters())
        scaled = latents.to(parameter.device, parameter.dtype) / self.latent_scale + self.latent_shift
        with torch.no_grad():
            decoded = self.decoder.decode(scaled, return_dict=False)[0]
        pictures = _to_uint8(decoded.float().cpu().permute(0, 2, 3, 1))
        return [_jpeg(picture) for picture in pictures]


def load_previewer(settings: PipelineSettings, loaded: LoadedPipeline) -> Previewer | None:
    """The previewer ``settings.preview`` asks for (``auto``: the model's recommendation, else
    approx; None when off); raises ``ModelLoadError``."""
    method = settings.preview
    if method == "auto":
        method = loaded.defaults.preview or "approx"
    if method == "off":
        return None
    if method == "approx":
        linear = LinearPreview.for_model(loaded)
        if linear is not None:
            return linear
        logger.warning("no approx preview factors for %s latents: previews use the model's VAE", loaded.family.title)
        method = "full"
    if method == "full":
        vae = loaded.pipeline.vae
        shift = float(getattr(vae.config, "shift_factor", None) or 0.0)
        return DecoderPreview(vae, latent_scale=float(vae.config.scaling_factor), latent_shift=shift)
    if not settings.preview_decoder or not Path(settings.preview_decoder).expanduser().is_dir():
        raise ModelLoadError(
            "SD_PREVIEW=taesd needs SD_PREVIEW_DECODER: a local folder with a diffusers AutoencoderTiny "
            f"(e.g. madebyollin/taesd saved with save_pretrained); got {settings.preview_decoder!r}"
        )
    from diffusers import AutoencoderTiny

    try:
        decoder = AutoencoderTiny.from_pretrained(str(Path(settings.preview_decoder).expanduser()), dtype=loaded.dtype)
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"cannot load the preview decoder {settings.preview_decoder!r}: {error}") from error
    theirs, ours = int(decoder.config.latent_channels), int(loaded.pipeline.vae.config.latent_channels)
    if theirs != ours:
        raise ModelLoadError(
            f"SD_PREVIEW_DECODER {settings.preview_decoder!r} reads {theirs}-channel latents but "
            f"{loaded.family.title} makes {ours}-channel ones: use the decoder made for it (taesd for SD 1.x/2.x, "
            "taesdxl for SDXL, taesd3 for SD3, taef1 for FLUX.1)"
        )
    # As diffusers' pipelines decode with it as their VAE: divided by its scaling factor, plus its shift.
    scale, shift = float(decoder.config.scaling_factor), float(getattr(decoder.config, "shift_factor", 0.0) or 0.0)
    return DecoderPreview(decoder.to(loaded.device).eval(), latent_scale=scale, latent_shift=shift)


def _to_uint8(rgb: torch.Tensor) -> np.ndarray:
    """(N, h, w, 3) in [-1, 1] to 8-bit pictures."""
    return (((rgb + 1) / 2).clamp(0, 1) * 255).round().to(torch.uint8).numpy()


def _png(picture: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(picture).save(buffer, format="PNG")
    return buffer.getvalue()


def _jpeg(picture: np.ndarray) -> bytes:
    image = Image.fromarray(picture)
    image.thumbnail((DECODED_SIDE, DECODED_SIDE))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()
