"""Stable Diffusion 3 / 3.5 (``StableDiffusion3Pipeline``): an MMDiT transformer on flow matching."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from sd_pipeline.contract.prompt_reader import SD3_T5
from sd_pipeline.contract.request import GenerationRequest, InputRules
from sd_pipeline.contract.settings import PipelineSettings
from sd_pipeline.model.families.base import (
    Conditioning,
    LatentRgb,
    StableDiffusion,
    encoded_negatives,
    placed_negatives,
)
from sd_pipeline.model.families.images import (
    ImageStart,
    Picture,
    cut_flow_schedule,
    flow_inpainting_start,
    flow_start,
    latent_mask,
    prepare_picture,
    sample_latents,
)

T5_PARTS = ("text_encoder_3", "tokenizer_3")  # the folder's parts that SD_T5=false leaves out
# SD3 / 3.5 latents (the transformer's: VAE latents minus 0.0609, times 1.5305) to RGB, no bias:
# InvokeAI 6.14.2 (Apache-2.0), invokeai/app/util/step_callback.py, SD3_5_LATENT_RGB_FACTORS.
SD3_LATENT_RGB: LatentRgb = (
    (-0.05240681, 0.03251581, 0.0749016),
    (-0.0580572, 0.00759826, 0.05729818),
    (0.16144888, 0.01270368, -0.03768577),
    (0.14418615, 0.08460266, 0.15941818),
    (0.04894035, 0.0056485, -0.06686988),
    (0.05187166, 0.19222395, 0.06261094),
    (0.1539433, 0.04818359, 0.07103094),
    (-0.08601796, 0.09013458, 0.10893912),
    (-0.12398469, -0.06766567, 0.0033688),
    (-0.0439737, 0.07825329, 0.02258823),
    (0.03101129, 0.06382551, 0.07753657),
    (-0.01315361, 0.08554491, -0.08772475),
    (0.06464487, 0.05914605, 0.13262741),
    (-0.07863674, -0.02261737, -0.12761454),
    (-0.09923835, -0.08010759, -0.06264447),
    (-0.03392309, -0.0804029, -0.06078822),
)
FLOW_SAMPLERS = ("Euler", "DPM++ 2M")  # flow-matching samplers by AUTOMATIC1111's names (``flow_scheduler``)


def flow_scheduler(name: str, base_config: Any) -> SchedulerMixin:
    """A flow-matching sampler from the model's own (``FlowMatchEulerDiscreteScheduler``) config.

    ``Euler`` is that scheduler. ``DPM++ 2M`` is diffusers' DPM-Solver++ (2M) on flow sigmas
    (``use_flow_sigmas``, ``flow_prediction``) with the same time shift: ``shift`` as ``flow_shift``,
    or, when the model shifts by resolution, ``exp(mu)`` (``use_dynamic_shifting``, exponential)."""
    if name == "Euler":
        euler: SchedulerMixin = FlowMatchEulerDiscreteScheduler.from_config(base_config)
        return euler
    dynamic = bool(base_config.get("use_dynamic_shifting", False))
    dpm: SchedulerMixin = DPMSolverMultistepScheduler(
        num_train_timesteps=base_config.get("num_train_timesteps", 1000),
        algorithm_type="dpmsolver++",
        solver_order=2,
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        flow_shift=base_config.get("shift", 1.0),
        use_dynamic_shifting=dynamic,
        time_shift_type=base_config.get("time_shift_type", "exponential"),
    )
    return dpm


class StableDiffusion3(StableDiffusion):
    """SD3 and 3.5, as ``StableDiffusion3Pipeline.__call__`` runs them.

    - Conditioning: two CLIP encoders' penultimate states side by side, padded to T5's width and
      followed by T5's (zeros when the folder has no T5: SD3 runs without it, a big memory saver),
      and both CLIP encoders' pooled outputs (``pooled_projections``).
    - Latents: plain noise (flow-matching schedulers have no ``init_noise_sigma``), 16 channels;
      the samplers keep the model's time shift (its ``shift``; ``mu`` from the image's sequence
      length when the config asks for dynamic shifting); the timestep goes to the transformer as it is.
    - Decoding: latents / scaling factor + shift factor. No safety checker, no negative-prompt zeros.
    """

    name: ClassVar[str] = "sd3"
    title: ClassVar[str] = "Stable Diffusion 3 / 3.5"
    pipeline_class: ClassVar[str] = "StableDiffusion3Pipeline"
    denoiser_name: ClassVar[str] = "transformer"
    latent_packing: ClassVar[int] = 1  # latent channels per transformer input channel group (FLUX.1: 2x2)
    latent_rgb: ClassVar[LatentRgb | None] = SD3_LATENT_RGB

    @staticmethod
    def load_options(settings: PipelineSettings, index: Mapping[str, Any]) -> dict[str, Any]:
        """Without T5 when the settings say so (``SD_T5=false``) or the folder was saved without it
        (``[null, null]`` in its index); SD3 pipelines have no safety checker."""
        absent = any(index.get(name) in (None, [None, None]) for name in T5_PARTS)
        return {name: None for name in T5_PARTS} if absent or not settings.t5_encoder else {}

    @property
    def samplers(self) -> tuple[str, ...]:
        return FLOW_SAMPLERS

    @property
    def rules(self) -> InputRules:
        """Sides are whole patches of latents (the pipeline's own check: VAE factor x patch size)."""
        multiple = int(self.pipeline.vae_scale_factor) * int(self.denoiser.config.patch_size)
        return InputRules(
            samplers=self.samplers, size_multiple=multiple, family=self.name, inpainting=self.masks_by_blending
        )

    @property
    def masks_by_blending(self) -> bool:
        """Inpainting as the pipelines do it for a transformer that reads only the latents (SD3's 16
        channels; FLUX.1's packed 2x2, 64); a fill transformer's mask inputs (SD3's 33 channels) are
        not built, FLUX.1-Fill's are (``FluxFill``)."""
        latent_channels = int(self.pipeline.vae.config.latent_channels)
        return int(self.denoiser.config.in_channels) == latent_channels * self.latent_packing

    def picture_latents(
        self, distribution: DiagonalGaussianDistribution, generators: list[torch.Generator]
    ) -> torch.Tensor:
        """One latent sample of a picture per generator, shifted and scaled as the VAE says."""
        vae = self.pipeline.vae.config
        sampled: torch.Tensor = (sample_latents(distribution, generators) - vae.shift_factor) * vae.scaling_factor
        return sampled

    def make_scheduler(self, name: str, base_config: Any) -> SchedulerMixin:
        return flow_scheduler(name, base_config)

    def guided(self, request: GenerationRequest) -> bool:
        return request.guidance_scale > 1

    def encode(
        self, prompts: list[str], negatives: list[str | None], device: torch.device
    ) -> tuple[list[Conditioning], list[Conditioning]]:
        texts = prompts + encoded_negatives(negatives)
        embeds, _, pooled, _ = self.pipeline.encode_prompt(
            prompt=texts,
            prompt_2=None,
            prompt_3=None,
            device=device,
            do_classifier_free_guidance=False,
            max_sequence_length=SD3_T5.max_tokens,
        )
        rows = [
            {"encoder_hidden_states": embeds[index : index + 1], "pooled_projections": pooled[index : index + 1]}
            for index in range(len(texts))
        ]
        return rows[: len(prompts)], placed_negatives(rows[len(prompts) :], negatives)

    def set_timesteps(self, scheduler: SchedulerMixin, request: GenerationRequest, device: torch.device) -> None:
        config = scheduler.config
        if not config.get("use_dynamic_shifting", None):
            scheduler.set_timesteps(request.steps, device=device)
            return
        patch = self.denoiser.config.patch_size
        scale = self.pipeline.vae_scale_factor
        sequence = (request.height // scale // patch) * (request.width // scale // patch)
        mu = calculate_shift(
            sequence,
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", 1.16),
        )
        scheduler.set_timesteps(request.steps, device=device, mu=mu)

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
        """``StableDiffusion3Img2ImgPipeline``: a latent sample per image generator, shifted and scaled
        as the VAE says, mixed with noise at the cut schedule's first timestep.
        ``StableDiffusion3InpaintPipeline`` (with a mask): one sample, the first generator's, for
        every image; noise alone at strength 1; the picture kept outside the mask."""
        timesteps = cut_flow_schedule(scheduler, request.steps, request.strength)
        if picture.mask is None:
            latents = self.picture_latents(encoded[0], generators)
            start = flow_start(scheduler, latents, generators, timesteps, device=device, dtype=dtype)
            return ImageStart(start, timesteps)
        return flow_inpainting_start(
            scheduler,
            self.picture_latents(encoded[0], generators[:1]).repeat(request.num_images, 1, 1, 1),
            latent_mask(picture, request, int(self.pipeline.vae_scale_factor)),
            generators,
            timesteps,
            whole_is_noise=request.strength == 1.0,
            device=device,
            dtype=dtype,
        )

    def prepare_picture(self, request: GenerationRequest) -> Picture:
        """The picture and mask as the pipelines prepare them; the masked picture's latents, which
        the pipelines compute for a fill transformer only, are not encoded."""
        return prepare_picture(self.pipeline, request, encode_masked=False)

    def model_input(self, scheduler: SchedulerMixin, sample: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return sample

    def step_kwargs(self, scheduler: SchedulerMixin, generators: list[torch.Generator]) -> dict[str, Any]:
        return {}  # the pipeline steps with none

    def predicted_clean(
        self, scheduler: Any, output: Any, model_output: torch.Tensor, t: Any, sample: torch.Tensor
    ) -> torch.Tensor:
        """Flow matching predicts the velocity noise - x0 at noise level sigma: x0 = x_t - sigma * v
        (the scheduler has already stepped, so this step's sigma is the one before its index)."""
        sigma: torch.Tensor = scheduler.sigmas[scheduler.step_index - 1].to(sample.device, sample.dtype)
        return sample - sigma * model_output

    def denoise(self, sample: torch.Tensor, timesteps: torch.Tensor, conditioning: Conditioning) -> torch.Tensor:
        predicted: torch.Tensor = self.denoiser(
            hidden_states=sample, timestep=timesteps, **conditioning, return_dict=False
        )[0]
        return predicted

    def decode(self, latents: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, list[bool]]:
        del device
        vae = self.pipeline.vae
        decoded: torch.Tensor = vae.decode(
            latents / vae.config.scaling_factor + vae.config.shift_factor, return_dict=False
        )[0]
        return decoded, [False] * decoded.shape[0]
