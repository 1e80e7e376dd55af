"""Stable Diffusion XL (``StableDiffusionXLPipeline``): two text encoders, pooled text and size ids."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from sd_pipeline.contract.errors import ModelLoadError
from sd_pipeline.contract.request import GenerationRequest
from sd_pipeline.contract.settings import PipelineSettings
from sd_pipeline.model.families.base import Conditioning, LatentRgb, StableDiffusion, expand_rows

NO_CROP = (0, 0)
# SDXL latents (scaled by its VAE's 0.13025) to RGB: ComfyUI, comfy/latent_formats.py, class SDXL.
SDXL_LATENT_RGB: LatentRgb = (
    (0.3651, 0.4232, 0.4341),
    (-0.2533, -0.0042, 0.1068),
    (0.1076, 0.1111, -0.0362),
    (-0.3165, -0.2492, -0.2188),
)
SDXL_LATENT_RGB_BIAS = (0.1084, -0.0175, -0.0011)


class StableDiffusionXL(StableDiffusion):
    """SDXL base models, as ``StableDiffusionXLPipeline.__call__`` runs them.

    - Conditioning: both encoders' penultimate hidden states side by side, the second encoder's
      pooled output (``text_embeds``) and the six size ids (``time_ids``: original size, crop
      corner, target size; original = target = the request's size, no crop).
    - An empty negative prompt is zeros when the model says ``force_zeros_for_empty_prompt``
      (what diffusers does when no negative prompt is given).
    - A float16 VAE that asks for ``force_upcast`` is kept in float32 from loading on, rather than
      converted there and back at every decode as the pipeline does: the same numbers, once.
    - No invisible watermark (the pipeline adds one only when ``invisible-watermark`` is installed).
    """

    name: ClassVar[str] = "sdxl"
    title: ClassVar[str] = "Stable Diffusion XL"
    pipeline_class: ClassVar[str] = "StableDiffusionXLPipeline"
    latent_rgb: ClassVar[LatentRgb] = SDXL_LATENT_RGB
    latent_rgb_bias: ClassVar[tuple[float, float, float]] = SDXL_LATENT_RGB_BIAS

    def __init__(self, pipeline: Any) -> None:
        super().__init__(pipeline)
        vae = pipeline.vae
        if vae.dtype == torch.float16 and vae.config.force_upcast:
            vae.to(dtype=torch.float32)

    @staticmethod
    def load_options(settings: PipelineSettings, index: Mapping[str, Any]) -> dict[str, Any]:
        del settings, index  # SDXL pipelines have no safety checker
        return {"add_watermarker": False}

    def encode(
        self, prompts: list[str], negatives: list[str | None], device: torch.device
    ) -> tuple[list[Conditioning], list[Conditioning]]:
        zeroed = bool(self.pipeline.config.force_zeros_for_empty_prompt)
        texts = prompts + [text for text in negatives if text is not None and (text or not zeroed)]
        embeds, _, pooled, _ = self.pipeline.encode_prompt(
            prompt=texts, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        rows = [
            {"encoder_hidden_states": embeds[index : index + 1], "text_embeds": pooled[index : index + 1]}
            for index in range(len(texts))
        ]
        encoded = iter(rows[len(prompts) :])
        zeros = {key: torch.zeros_like(value) for key, value in rows[0].items()}
        negative_rows = [{} if text is None else next(encoded) if text or not zeroed else zeros for text in negatives]
        return rows[: len(prompts)], negative_rows

    def text_rows(self, negatives: list[str | None]) -> list[int]:
        zeroed = bool(self.pipeline.config.force_zeros_for_empty_prompt)
        encoded = (index for index, text in enumerate(negatives) if text is not None and (text or not zeroed))
        return [*range(len(negatives)), *encoded]

    def conditioning(self, request: GenerationRequest, text: Conditioning) -> Conditioning:
        size = (request.height, request.width)
        embeds = text["encoder_hidden_states"]
        encoder_2 = self.pipeline.text_encoder_2
        projection = encoder_2.config.projection_dim if encoder_2 is not None else int(text["text_embeds"].shape[-1])
        time_ids = self.size_ids(size, embeds.dtype, projection)
        return expand_rows({**text, "time_ids": time_ids.to(embeds.device)}, request.num_images)

    def size_ids(self, size: tuple[int, int], dtype: torch.dtype, projection: int) -> torch.Tensor:
        """The six size ids, checked against the UNet's added embedding by the pipeline's own method."""
        time_ids: torch.Tensor = self.pipeline._get_add_time_ids(
            size, NO_CROP, size, dtype=dtype, text_encoder_projection_dim=projection
        )
        return time_ids

    def set_timesteps(self, scheduler: SchedulerMixin, request: GenerationRequest, device: torch.device) -> None:
        super().set_timesteps(scheduler, request, device)
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(0)

    def denoise(self, sample: torch.Tensor, timesteps: torch.Tensor, conditioning: Conditioning) -> torch.Tensor:
        added = {"text_embeds": conditioning["text_embeds"], "time_ids": conditioning["time_ids"]}
        context = conditioning["encoder_hidden_states"]
        predicted: torch.Tensor = self.denoiser(
            sample, timesteps, encoder_hidden_states=context, added_cond_kwargs=added, return_dict=False
        )[0]
        return predicted

    def decode(self, latents: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, list[bool]]:
        del device
        vae = self.pipeline.vae
        latents = latents.to(vae.dtype)
        mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
        if mean is not None and std is not None:
            mean_t = torch.tensor(mean).view(1, -1, 1, 1).to(latents.device, latents.dtype)
            std_t = torch.tensor(std).view(1, -1, 1, 1).to(latents.device, latents.dtype)
            latents = latents * std_t / vae.config.scaling_factor + mean_t
        else:
            latents = latents / vae.config.scaling_factor
        decoded = vae.decode(latents, return_dict=False)[0]
        return decoded, [False] * decoded.shape[0]


class StableDiffusionXLInpainting(StableDiffusionXL):
    """A folder saved as ``StableDiffusionXLInpaintPipeline`` (e.g. stable-diffusion-xl-1.0-inpainting):
    SDXL's parts with a 9-channel UNet, so every request brings a picture and a mask. Served without
    an aesthetic score, as that pipeline runs with ``requires_aesthetics_score`` off; a folder that
    asks for one (a refiner's five ids, two per request) stops start-up naming it."""

    title: ClassVar[str] = "Stable Diffusion XL inpainting"
    pipeline_class: ClassVar[str] = "StableDiffusionXLInpaintPipeline"

    def __init__(self, pipeline: Any) -> None:
        if pipeline.config.get("requires_aesthetics_score", False):
            raise ModelLoadError(
                "cannot serve this StableDiffusionXLInpaintPipeline: it requires an aesthetic score "
                "(requires_aesthetics_score, as SDXL's refiner does), which this service does not send"
            )
        super().__init__(pipeline)

    def size_ids(self, size: tuple[int, int], dtype: torch.dtype, projection: int) -> torch.Tensor:
        """The inpainting pipeline's ``_get_add_time_ids`` (its positive ids: without an aesthetic
        score they are the same six as the text-to-image pipeline's)."""
        time_ids, _ = self.pipeline._get_add_time_ids(
            size, NO_CROP, size, 6.0, 2.5, size, NO_CROP, size, dtype=dtype, text_encoder_projection_dim=projection
        )
        return time_ids  # type: ignore[no-any-return]
