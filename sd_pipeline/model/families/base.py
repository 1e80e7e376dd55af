"""What the step engine asks of a model family, and Stable Diffusion 1.x / 2.x's answers.

A family knows its conditioning (text encoders, pooled embeddings, extra ids), its samplers
and their timesteps, how a request's starting latents are drawn, the denoiser call on a batch
of rows that each carry their own conditioning and timestep, and decoding. The engine owns
everything else (who steps with whom, guidance, when previews are due, out-of-memory
splitting), so each family is served with the same batching, cancelling and previews. Every answer is made of the
diffusers pipeline's own parts, so a request alone gives that pipeline's ``__call__``.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor

from sd_pipeline.contract.request import GenerationRequest, InputRules
from sd_pipeline.contract.settings import PipelineSettings
from sd_pipeline.model.families.images import (
    INPAINTING_CHANNELS,
    ImageStart,
    Picture,
    encode_pictures,
    prepare_picture,
    start_from_image,
)
from sd_pipeline.model.schedulers import SCHEDULER_NAMES as SAMPLERS
from sd_pipeline.model.schedulers import make_scheduler

# Latents to RGB in [-1, 1] for the ``approx`` preview: (channels x RGB) factors and an RGB bias.
LatentRgb = tuple[tuple[float, float, float], ...]
# SD 1.x / 2.x latents (scaled by the VAE's 0.18215): ComfyUI, comfy/latent_formats.py, class SD15.
SD15_LATENT_RGB: LatentRgb = (
    (0.3512, 0.2297, 0.3227),
    (0.3250, 0.4974, 0.2350),
    (-0.2829, 0.1762, 0.2721),
    (-0.2120, -0.2616, -0.7177),
)

# One text's or one request's conditioning: the denoiser's keyword inputs, one row per image.
Conditioning = dict[str, torch.Tensor]


def join_rows(parts: list[Conditioning]) -> Conditioning:
    """Several requests' conditioning as one batch, in order."""
    return {key: torch.cat([part[key] for part in parts]) for key in parts[0]}


def split_rows(conditioning: Conditioning, chunks: int) -> list[Conditioning]:
    """A batch's conditioning in ``chunks`` pieces of rows (``tensor_split``'s sizes)."""
    pieces = {key: value.tensor_split(chunks) for key, value in conditioning.items()}
    return [{key: pieces[key][index] for key in conditioning} for index in range(chunks)]


def expand_rows(conditioning: Conditioning, rows: int) -> Conditioning:
    """One text's conditioning (batch of 1) for ``rows`` images."""
    return {key: value.expand(rows, *value.shape[1:]) for key, value in conditioning.items()}


class StableDiffusion:
    """SD 1.x and 2.x (``StableDiffusionPipeline``): one CLIP text encoder, a UNet, the safety checker.

    SD 2.x needs nothing more here: v-prediction is in the scheduler config (every sampler is
    built from it), attention upcasting in the UNet's config, the native size in its sample size.
    """

    name: ClassVar[str] = "sd"
    denoiser_name: ClassVar[str] = "unet"  # the pipeline attribute holding the denoiser
    title: ClassVar[str] = "Stable Diffusion 1.x / 2.x"
    pipeline_class: ClassVar[str] = "StableDiffusionPipeline"
    latent_rgb: ClassVar[LatentRgb | None] = SD15_LATENT_RGB  # None: no published factors
    latent_rgb_bias: ClassVar[tuple[float, float, float]] = (0.0, 0.0, 0.0)
    takes_images: ClassVar[bool] = True  # image-to-image and inpainting are built for this family
    channel_dim: ClassVar[int] = 1  # where an inpainting model's extra inputs join the latents

    def __init__(self, pipeline: Any) -> None:
        self.pipeline = pipeline

    @staticmethod
    def load_options(settings: PipelineSettings, index: Mapping[str, Any]) -> dict[str, Any]:
        """Extra ``from_pretrained`` arguments for a folder whose ``model_index.json`` is ``index``."""
        return {} if settings.safety_checker else {"safety_checker": None, "requires_safety_checker": False}

    @property
    def denoiser(self) -> Any:
        """The UNet (or transformer) called once per step."""
        return getattr(self.pipeline, self.denoiser_name)

    @denoiser.setter
    def denoiser(self, module: Any) -> None:
        setattr(self.pipeline, self.denoiser_name, module)

    @property
    def native_size(self) -> int:
        """The side the model was trained at: diffusers' default width and height."""
        sample_size = self.denoiser.config.sample_size
        side = sample_size[0] if isinstance(sample_size, (list, tuple)) else sample_size
        return int(side) * int(self.pipeline.vae_scale_factor)

    @property
    def samplers(self) -> tuple[str, ...]:
        """The sampler names this family can use (AUTOMATIC1111's names); the default is
        ``DEFAULT_SCHEDULER`` where it is one of them, else the first."""
        return SAMPLERS

    @property
    def rules(self) -> InputRules:
        """What requests to this model may ask: its samplers, size multiple and guidance."""
        return InputRules(
            samplers=self.samplers,
            size_multiple=int(self.pipeline.vae_scale_factor),
            family=self.name,
            image_inputs=self.takes_images,
            needs_mask=self.inpainting_model,
        )

    @property
    def inpainting_model(self) -> bool:
        """A 9-channel inpainting UNet: it draws only from an image and a mask."""
        return int(self.denoiser.config.in_channels) == INPAINTING_CHANNELS

    def make_scheduler(self, name: str, base_config: Any) -> SchedulerMixin:
        """A fresh scheduler for one request, built from the model's own scheduler config."""
        return make_scheduler(name, base_config)

    def guided(self, request: GenerationRequest) -> bool:
        """Classifier-free guidance (two denoiser rows per image), as the pipeline decides it."""
        return request.guidance_scale > 1 and self.pipeline.unet.config.time_cond_proj_dim is None

    def guidance_scale(self, request: GenerationRequest) -> float:
        """The scale a ``guided`` request's two rows are mixed with: uncond + scale x (text - uncond)."""
        return request.guidance_scale

    def encode(
        self, prompts: list[str], negatives: list[str | None], device: torch.device
    ) -> tuple[list[Conditioning], list[Conditioning]]:
        """Every prompt and negative prompt in one text-encoder call; one conditioning (batch 1) each.
        A negative of None (a request without guidance) is not encoded: its conditioning is empty."""
        embeds, _ = self.pipeline.encode_prompt(prompts + encoded_negatives(negatives), device, 1, False)
        rows = [{"encoder_hidden_states": embeds[index : index + 1]} for index in range(len(embeds))]
        return rows[: len(prompts)], placed_negatives(rows[len(prompts) :], negatives)

    def text_rows(self, negatives: list[str | None]) -> list[int]:
        """Whose text each row of ``encode``'s text-encoder batches is: an index into the prompts
        (then the negatives encoded), for per-request LoRA layers in the text encoders."""
        return [*range(len(negatives)), *(index for index, text in enumerate(negatives) if text is not None)]

    def conditioning(self, request: GenerationRequest, text: Conditioning) -> Conditioning:
        """A request's conditioning, one row per image, from its text's."""
        return expand_rows(text, request.num_images)

    def set_timesteps(self, scheduler: SchedulerMixin, request: GenerationRequest, device: torch.device) -> None:
        scheduler.set_timesteps(request.steps, device=device)

    def model_input(self, scheduler: SchedulerMixin, sample: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The denoiser's input for ``sample`` at ``t`` (the scheduler's ``scale_model_input``)."""
        scaled: torch.Tensor = scheduler.scale_model_input(sample, t)
        return scaled

    def step_kwargs(self, scheduler: SchedulerMixin, generators: list[torch.Generator]) -> dict[str, Any]:
        """What the pipeline's ``prepare_extra_step_kwargs`` passes: eta 0 and the images' generators."""
        accepted: Mapping[str, Any] = inspect.signature(scheduler.step).parameters
        kwargs: dict[str, Any] = {}
        if "eta" in accepted:
            kwargs["eta"] = 0.0
        if "generator" in accepted:
            kwargs["generator"] = generators
        return kwargs

    def predicted_clean(
        self, scheduler: Any, output: Any, model_output: torch.Tensor, t: Any, sample: torch.Tensor
    ) -> torch.Tensor:
        """The clean latents (x0) this step predicts, for previews: the scheduler's own where it reports
        them (Euler, DDIM), else from the prediction and the cumulative alphas (DPM-Solver, UniPC)."""
        reported = getattr(output, "pred_original_sample", None)
        if reported is not None:
            return reported  # type: ignore[no-any-return]
        alpha = scheduler.alphas_cumprod[int(t)].to(sample.device, sample.dtype)
        if scheduler.config.prediction_type == "v_prediction":
            return alpha.sqrt() * sample - (1 - alpha).sqrt() * model_output  # type: ignore[no-any-return]
        return (sample - (1 - alpha).sqrt() * model_output) / alpha.sqrt()  # type: ignore[no-any-return]

    def initial_latents(
        self,
        request: GenerationRequest,
        generators: list[torch.Generator],
        scheduler: SchedulerMixin,
        *,
        device: torch.device,
        dtype: torch.dtype,
    ) -> torch.Tensor:
        """``prepare_latents``: noise drawn with each image's generator, scaled by the scheduler's
        ``init_noise_sigma`` (flow-matching schedulers have none: their pipelines leave it unscaled)."""
        scale = self.pipeline.vae_scale_factor
        shape = (
            request.num_images,
            self.pipeline.vae.config.latent_channels,
            request.height // scale,
            request.width // scale,
        )
        noise: torch.Tensor = randn_tensor(shape, generator=generators, device=device, dtype=dtype)
        scaled: torch.Tensor = noise * getattr(scheduler, "init_noise_sigma", 1.0)
        return scaled

    def prepare_picture(self, request: GenerationRequest) -> Picture:
        """A request's input picture (and mask) as the image-to-image / inpainting pipelines prepare it."""
        return prepare_picture(self.pipeline, request)

    def encode_pictures(
        self, pictures: list[torch.Tensor], *, device: torch.device, dtype: torch.dtype
    ) -> list[DiagonalGaussianDistribution]:
        """Each picture's VAE latent distribution, pictures of one size in one call."""
        return encode_pictures(self.pipeline.vae, pictures, device=device, dtype=dtype)

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
        """Where a request with an ``init_image`` (and maybe a mask) starts (``families.images``)."""
        return start_from_image(
            self.pipeline,
            request,
            generators,
            scheduler,
            picture,
            encoded,
            unet_channels=int(self.denoiser.config.in_channels),
            device=device,
            dtype=dtype,
        )

    def spatial(self, latents: torch.Tensor, request: GenerationRequest) -> torch.Tensor:
        """A request's latents as (images, channels, height, width), for decoding and previews."""
        return latents

    def denoise(self, sample: torch.Tensor, timesteps: torch.Tensor, conditioning: Conditioning) -> torch.Tensor:
        """The denoiser's prediction for a batch of rows, each with its own timestep and conditioning."""
        predicted: torch.Tensor = self.denoiser(sample, timesteps, **conditioning, return_dict=False)[0]
        return predicted

    def decode(self, latents: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, list[bool]]:
        """Images in [-1, 1] and, per image, whether the safety checker blacked it out."""
        vae = self.pipeline.vae
        decoded = vae.decode(latents / vae.config.scaling_factor, return_dict=False)[0]
        decoded, nsfw = self.pipeline.run_safety_checker(decoded, device, latents.dtype)
        flags = [bool(flag) for flag in nsfw] if nsfw is not None else [False] * decoded.shape[0]
        return decoded, flags


class StableDiffusionInpainting(StableDiffusion):
    """A folder saved as ``StableDiffusionInpaintPipeline`` (e.g. stable-diffusion-inpainting): the same
    parts; with its 9-channel UNet every request brings an image and a mask (``InputRules.needs_mask``)."""

    title: ClassVar[str] = "Stable Diffusion 1.x / 2.x inpainting"
    pipeline_class: ClassVar[str] = "StableDiffusionInpaintPipeline"


def encoded_negatives(negatives: list[str | None]) -> list[str]:
    """The negative prompts a text encoder reads: those of guided requests (not None)."""
    return [text for text in negatives if text is not None]


def placed_negatives(rows: list[Conditioning], negatives: list[str | None]) -> list[Conditioning]:
    """The encoded negatives' rows back in the requests' order; an empty conditioning for None."""
    encoded = iter(rows)
    return [next(encoded) if text is not None else {} for text in negatives]
