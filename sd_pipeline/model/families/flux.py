"""FLUX.1 (``FluxPipeline``, dev and schnell): a transformer on packed latents, guidance distilled in."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any, ClassVar

import numpy as np
import torch
from diffusers import FluxPipeline
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor

from sd_pipeline.contract.prompt_reader import FLUX_T5
from sd_pipeline.contract.request import GenerationRequest, InputRules
from sd_pipeline.contract.settings import PipelineSettings
from sd_pipeline.model.families.base import Conditioning, LatentRgb, encoded_negatives, expand_rows, placed_negatives
from sd_pipeline.model.families.images import (
    ImageStart,
    KeepOutsideMask,
    Picture,
    cut_flow_schedule,
    flow_inpainting_start,
    flow_start,
    latent_mask,
    prepare_picture,
)
from sd_pipeline.model.families.sd3 import StableDiffusion3

PATCH = 2  # latents are packed in 2x2 patches: sides are multiples of the VAE factor x 2
# FLUX.1 latents (unpacked; VAE latents minus 0.1159, times 0.3611) to RGB, no bias:
# InvokeAI 6.14.2 (Apache-2.0), invokeai/app/util/step_callback.py, FLUX_LATENT_RGB_FACTORS.
FLUX_LATENT_RGB: LatentRgb = (
    (-0.0412, 0.0149, 0.0521),
    (0.0056, 0.0291, 0.0768),
    (0.0342, -0.0681, -0.0427),
    (-0.0258, 0.0092, 0.0463),
    (0.0863, 0.0784, 0.0547),
    (-0.0017, 0.0402, 0.0158),
    (0.0501, 0.1058, 0.1152),
    (-0.0209, -0.0218, -0.0329),
    (-0.0314, 0.0083, 0.0896),
    (0.0851, 0.0665, -0.0472),
    (-0.0534, 0.0238, -0.0024),
    (0.0452, -0.0026, 0.0048),
    (0.0892, 0.0831, 0.0881),
    (-0.1117, -0.0304, -0.0789),
    (0.0027, -0.0479, -0.0043),
    (-0.1146, -0.0827, -0.0598),
)


class Flux(StableDiffusion3):
    """FLUX.1-dev and -schnell, as ``FluxPipeline.__call__`` runs them.

    - Conditioning: T5's hidden states (512 tokens) and CLIP's pooled output; text ids are zeros.
    - Guidance: dev (``guidance_embeds``) feeds the guidance scale to the transformer as an
      embedding, one pass per image, a value per batch row; schnell has none and ignores it. With
      ``true_cfg_scale`` > 1 (true CFG), a second pass reads the negative prompt (the same guidance
      embedding) and the two are mixed as classifier-free guidance mixes them.
    - Latents: noise drawn unpacked with each image's generator, then packed 2x2 into a sequence
      with image ids from the size; sigmas 1 to 1/steps shifted by ``mu`` from the sequence
      length; the timestep goes to the transformer divided by 1000.
    - Decoding: unpacked, / scaling factor + shift factor, the VAE.
    """

    name: ClassVar[str] = "flux"
    title: ClassVar[str] = "FLUX.1"
    pipeline_class: ClassVar[str] = "FluxPipeline"
    channel_dim: ClassVar[int] = 2  # packed latents: (images, tokens, channels)
    latent_packing: ClassVar[int] = PATCH * PATCH
    latent_rgb: ClassVar[LatentRgb | None] = FLUX_LATENT_RGB

    @staticmethod
    def load_options(settings: PipelineSettings, index: Mapping[str, Any]) -> dict[str, Any]:
        del settings, index  # FLUX.1 pipelines have no safety checker (and need their T5)
        return {}

    @property
    def distilled_guidance(self) -> bool:
        return bool(self.denoiser.config.guidance_embeds)

    @property
    def rules(self) -> InputRules:
        return InputRules(
            samplers=self.samplers,
            size_multiple=int(self.pipeline.vae_scale_factor) * PATCH,
            guidance="distilled" if self.distilled_guidance else "none",
            family=self.name,
            true_cfg=True,
            inpainting=self.masks_by_blending,
        )

    @property
    def native_size(self) -> int:
        return int(self.pipeline.default_sample_size) * int(self.pipeline.vae_scale_factor)

    def guided(self, request: GenerationRequest) -> bool:
        return request.true_cfg_scale > 1  # true CFG: a second pass with the negative prompt

    def guidance_scale(self, request: GenerationRequest) -> float:
        return request.true_cfg_scale

    def encode(
        self, prompts: list[str], negatives: list[str | None], device: torch.device
    ) -> tuple[list[Conditioning], list[Conditioning]]:
        texts = prompts + encoded_negatives(negatives)
        embeds, pooled, _ = self.pipeline.encode_prompt(
            prompt=texts, prompt_2=None, device=device, max_sequence_length=FLUX_T5.max_tokens
        )
        rows = [
            {"encoder_hidden_states": embeds[index : index + 1], "pooled_projections": pooled[index : index + 1]}
            for index in range(len(texts))
        ]
        return rows[: len(prompts)], placed_negatives(rows[len(prompts) :], negatives)

    def conditioning(self, request: GenerationRequest, text: Conditioning) -> Conditioning:
        device = text["encoder_hidden_states"].device
        tokens = self._token_grid(request)
        rows: Conditioning = {**text, "token_grid": torch.tensor([tokens], device=device)}
        if self.distilled_guidance:
            rows["guidance"] = torch.full([1], request.guidance_scale, device=device, dtype=torch.float32)
        return expand_rows(rows, request.num_images)

    def set_timesteps(self, scheduler: SchedulerMixin, request: GenerationRequest, device: torch.device) -> None:
        config = scheduler.config
        steps = request.steps
        sigmas = None if config.get("use_flow_sigmas") else np.linspace(1.0, 1 / steps, steps)
        rows, columns = self._token_grid(request)
        mu = calculate_shift(
            rows * columns,
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", 1.15),
        )
        if sigmas is None:
            scheduler.set_timesteps(steps, device=device, mu=mu)
        else:
            scheduler.set_timesteps(sigmas=sigmas, device=device, mu=mu)
        scheduler.set_begin_index(0)

    def initial_latents(
        self,
        request: GenerationRequest,
        generators: list[torch.Generator],
        scheduler: SchedulerMixin,
        *,
        device: torch.device,
        dtype: torch.dtype,
    ) -> torch.Tensor:
        rows, columns = self._token_grid(request)
        channels = self.pipeline.vae.config.latent_channels
        shape = (request.num_images, channels, rows * PATCH, columns * PATCH)
        return _packed(randn_tensor(shape, generator=generators, device=device, dtype=dtype))

    def image_start(
        self,
        request: GenerationRequest,
        generators: list[torch.Generator],
        scheduler: SchedulerMixin,
        picture: Picture,
        encoded: list[DiagonalGaussianDistribution],
        *,
        device: torch.device,
        dtype: torch.dtype,
    ) -> ImageStart:
        """``FluxImg2ImgPipeline``: one latent sample of the picture (its first generator's, as the
        pipeline encodes its one picture) for every image, shifted and scaled, mixed with each
        image's noise at the cut schedule's first timestep, then packed. ``FluxInpaintPipeline``
        (with a mask): the same start (noise mixed in even at strength 1), and the picture's
        latents kept outside the mask, all packed."""
        timesteps = cut_flow_schedule(scheduler, request.steps, request.strength)
        image_latents = self.picture_latents(encoded[0], generators[:1]).repeat(request.num_images, 1, 1, 1)
        if picture.mask is None:
            mixed = flow_start(scheduler, image_latents, generators, timesteps, device=device, dtype=dtype)
            return ImageStart(_packed(mixed), timesteps)
        mask = latent_mask(picture, request, int(self.pipeline.vae_scale_factor))
        start = flow_inpainting_start(
            scheduler, image_latents, mask, generators, timesteps, whole_is_noise=False, device=device, dtype=dtype
        )
        assert start.keep is not None
        kept = start.keep
        channels = image_latents.shape[1]
        return ImageStart(
            _packed(start.latents),
            timesteps,
            keep=KeepOutsideMask(
                _packed(kept.image_latents), _packed(kept.noise), _packed(kept.mask.repeat(1, channels, 1, 1))
            ),
        )

    def spatial(self, latents: torch.Tensor, request: GenerationRequest) -> torch.Tensor:
        unpacked: torch.Tensor = FluxPipeline._unpack_latents(
            latents, request.height, request.width, self.pipeline.vae_scale_factor
        )
        return unpacked

    def denoise(self, sample: torch.Tensor, timesteps: torch.Tensor, conditioning: Conditioning) -> torch.Tensor:
        inputs = dict(conditioning)
        rows, columns = (int(value) for value in inputs.pop("token_grid")[0])
        context = inputs["encoder_hidden_states"]
        image_ids = FluxPipeline._prepare_latent_image_ids(sample.shape[0], rows, columns, sample.device, context.dtype)
        text_ids = torch.zeros(context.shape[1], 3, device=sample.device, dtype=context.dtype)
        predicted: torch.Tensor = self.denoiser(
            hidden_states=sample,
            timestep=timesteps.to(sample.dtype) / 1000,
            guidance=inputs.pop("guidance", None),
            txt_ids=text_ids,
            img_ids=image_ids,
            return_dict=False,
            **inputs,
        )[0]
        return predicted

    def _token_grid(self, request: GenerationRequest) -> tuple[int, int]:
        """The packed latents' rows and columns: one token per 2x2 latent patch."""
        side = int(self.pipeline.vae_scale_factor) * PATCH
        return request.height // side, request.width // side


class FluxFill(Flux):
    """FLUX.1-Fill (``FluxFillPipeline``): every request brings a picture and a mask. The transformer
    reads, beside the packed latents, the masked picture's packed latents and the mask folded into
    the latents' grid (each VAE-factor x VAE-factor block of mask pixels as channels), then packed.
    The start is ``FluxImg2ImgPipeline``'s (noise alone at strength 1, as its sigma is 1)."""

    title: ClassVar[str] = "FLUX.1 Fill"
    pipeline_class: ClassVar[str] = "FluxFillPipeline"

    @property
    def rules(self) -> InputRules:
        return replace(super().rules, needs_mask=True, inpainting=True, true_cfg=False)  # its pipeline has none

    def prepare_picture(self, request: GenerationRequest) -> Picture:
        return prepare_picture(self.pipeline, request)  # the masked picture is an input here

    def image_start(
        self,
        request: GenerationRequest,
        generators: list[torch.Generator],
        scheduler: SchedulerMixin,
        picture: Picture,
        encoded: list[DiagonalGaussianDistribution],
        *,
        device: torch.device,
        dtype: torch.dtype,
    ) -> ImageStart:
        """``FluxFillPipeline``'s draws in its order: the picture's sample (first generator), each
        image's noise, the masked picture's sample (first generator)."""
        assert picture.mask is not None
        start = super().image_start(
            request, generators, scheduler, Picture(picture.pixels), encoded[:1], device=device, dtype=dtype
        )
        masked = self.picture_latents(encoded[1], generators[:1])
        folded = _folded_mask(picture.mask, int(self.pipeline.vae_scale_factor))
        extra = torch.cat([_packed(masked), _packed(folded)], dim=-1).repeat(request.num_images, 1, 1)
        return ImageStart(start.latents, start.timesteps, extra_channels=extra.to(device=device, dtype=dtype))


def _folded_mask(mask: torch.Tensor, factor: int) -> torch.Tensor:
    """A pixel mask (1, 1, H, W) as (1, factor², H / factor, W / factor): each block's pixels as channels."""
    height, width = mask.shape[-2] // factor, mask.shape[-1] // factor
    blocks = mask[:, 0].view(mask.shape[0], height, factor, width, factor).permute(0, 2, 4, 1, 3)
    return blocks.reshape(mask.shape[0], factor * factor, height, width)


def _packed(latents: torch.Tensor) -> torch.Tensor:
    """Latents (images, channels, height, width) as FLUX.1's sequence of 2x2 patches."""
    images, channels, height, width = latents.shape
    packed: torch.Tensor = FluxPipeline._pack_latents(latents, images, channels, height, width)
    return packed
