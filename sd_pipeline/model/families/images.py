"""Starting from a picture: image-to-image and inpainting, as diffusers' Stable Diffusion pipelines do it.

``StableDiffusionImg2ImgPipeline``: the image is encoded by the VAE (a latent sample drawn with
each image's generator), the sampler's schedule is cut to its last ``int(steps x strength)``
steps, and noise is added at the first of them (``add_noise``). ``StableDiffusionInpaintPipeline``
adds a mask: with a 9-channel inpainting UNet the mask and the masked image's latents go in
beside the latents at every step; with a regular UNet the latents outside the mask are put back
after every step (the image's latents noised to the next timestep). Random draws happen in the
pipelines' order, per image generator, so a request alone gives those pipelines' images. The
VAE encodes the pictures of every request admitted together, one call per size; only sampling
from each picture's latent distribution uses the request's generators. SD3's and FLUX.1's
pipelines do the same on flow matching (``scale_noise`` mixes the noise in; their inpainting
puts the picture's latents back outside the mask after every step, as a regular UNet's does).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from diffusers.image_processor import VaeImageProcessor
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor

from sd_pipeline.contract.images import InputImage
from sd_pipeline.contract.request import GenerationRequest

INPAINTING_CHANNELS = 9  # latents 4 + mask 1 + masked-image latents 4


@dataclass
class KeepOutsideMask:
    """Regular-UNet (and SD3 / FLUX.1) inpainting: after each step, the latents outside the mask are
    the image's, noised to the next timestep."""

    image_latents: torch.Tensor
    noise: torch.Tensor
    mask: torch.Tensor  # shaped as the latents (FLUX.1's packed), 1 = redraw

    def apply(
        self, scheduler: SchedulerMixin, latents: torch.Tensor, next_timestep: torch.Tensor | None
    ) -> torch.Tensor:
        """The stepped ``latents`` with the kept part put back (at ``next_timestep``'s noise; clean after the last)."""
        kept = self.image_latents
        if next_timestep is not None:
            kept = mix_noise(scheduler, kept, self.noise, torch.tensor([next_timestep]))
        return (1 - self.mask) * kept + self.mask * latents


@dataclass
class ImageStart:
    """Where a request that starts from a picture begins: its latents and the timesteps left."""

    latents: torch.Tensor
    timesteps: torch.Tensor
    extra_channels: torch.Tensor | None = None  # 9-channel inpainting: mask and masked-image latents, per image
    keep: KeepOutsideMask | None = None  # regular-UNet inpainting


def cut_schedule(scheduler: SchedulerMixin, steps: int, strength: float) -> torch.Tensor:
    """``get_timesteps``: the schedule's last ``int(steps x strength)`` steps; the scheduler begins there."""
    return _begin_at(scheduler, max(steps - min(int(steps * strength), steps), 0))


def cut_flow_schedule(scheduler: SchedulerMixin, steps: int, strength: float) -> torch.Tensor:
    """SD3's and FLUX.1's ``get_timesteps``: the schedule from step ``int(steps - steps x strength)`` on."""
    return _begin_at(scheduler, int(max(steps - min(steps * strength, steps), 0)))


def _begin_at(scheduler: SchedulerMixin, step: int) -> torch.Tensor:
    start = step * scheduler.order
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(start)
    timesteps: torch.Tensor = scheduler.timesteps[start:]
    return timesteps


def mix_noise(
    scheduler: SchedulerMixin, sample: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """``sample`` noised to ``timesteps``: flow matching's ``scale_noise``, else ``add_noise`` (the
    SD samplers; a DPM-Solver on flow sigmas mixes the same (1 - sigma) x + sigma noise that way)."""
    if hasattr(scheduler, "scale_noise"):
        mixed: torch.Tensor = scheduler.scale_noise(sample, timesteps, noise)
        return mixed
    return scheduler.add_noise(sample, noise, timesteps)  # type: ignore[no-any-return]


def flow_start(
    scheduler: SchedulerMixin,
    picture_latents: torch.Tensor,
    generators: list[torch.Generator],
    timesteps: torch.Tensor,
    *,
    device: torch.device,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Flow matching's start from a picture: noise drawn with each image's generator, mixed in at the
    first timestep left."""
    noise = draw_noise(picture_latents.shape, generators, device=device, dtype=dtype)
    return mix_noise(scheduler, picture_latents, noise, timesteps[:1].repeat(picture_latents.shape[0]))


def flow_inpainting_start(
    scheduler: SchedulerMixin,
    image_latents: torch.Tensor,
    latent_mask: torch.Tensor,
    generators: list[torch.Generator],
    timesteps: torch.Tensor,
    *,
    whole_is_noise: bool,
    device: torch.device,
    dtype: torch.dtype,
) -> ImageStart:
    """``StableDiffusion3InpaintPipeline`` / ``FluxInpaintPipeline`` with a regular transformer: each
    image's noise (drawn after the picture's latents were sampled), mixed into the picture's latents
    at the first timestep left (SD3 starts from the noise alone at strength 1: ``whole_is_noise``);
    after every step the picture's latents, noised to the next timestep, are put back outside the mask."""
    noise = draw_noise(image_latents.shape, generators, device=device, dtype=dtype)
    if whole_is_noise:
        latents = noise
    else:
        latents = mix_noise(scheduler, image_latents, noise, timesteps[:1].repeat(image_latents.shape[0]))
    mask = latent_mask.to(device=device, dtype=dtype)
    return ImageStart(latents, timesteps, keep=KeepOutsideMask(image_latents, noise, mask))


def latent_mask(picture: Picture, request: GenerationRequest, vae_scale_factor: int) -> torch.Tensor:
    """The binarised mask at the latents' size (nearest), one row per image (``prepare_mask_latents``)."""
    assert picture.mask is not None
    size = (request.height // vae_scale_factor, request.width // vae_scale_factor)
    resized = torch.nn.functional.interpolate(picture.mask, size=size)
    return resized.repeat(request.num_images, 1, 1, 1)


@dataclass(frozen=True)
class Picture:
    """A request's input as its pipeline prepares it: pixels in [-1, 1], and the binarised mask."""

    pixels: torch.Tensor
    mask: torch.Tensor | None = None
    encode_masked: bool = True  # the denoiser takes (or the draw order needs) the masked picture's latents

    def to_encode(self) -> list[torch.Tensor]:
        """What the VAE encodes for it: the picture, and for inpainting the picture outside the mask."""
        if self.mask is None or not self.encode_masked:
            return [self.pixels]
        return [self.pixels, self.pixels * (self.mask < 0.5)]


def prepare_picture(pipeline: Any, request: GenerationRequest, *, encode_masked: bool = True) -> Picture:
    """``image_processor.preprocess`` (and the inpainting pipeline's ``mask_processor``), at the request's size."""
    assert request.init_image is not None
    pixels = _pixels(pipeline.image_processor, request.init_image, request).to(torch.float32)
    if request.mask is None:
        return Picture(pixels)
    scale = int(pipeline.vae_scale_factor)
    masks = VaeImageProcessor(vae_scale_factor=scale, do_normalize=False, do_binarize=True, do_convert_grayscale=True)
    return Picture(pixels, _pixels(masks, request.mask, request), encode_masked=encode_masked)


def encode_pictures(
    vae: Any, pictures: list[torch.Tensor], *, device: torch.device, dtype: torch.dtype
) -> list[DiagonalGaussianDistribution]:
    """Each picture's latent distribution; pictures of one size share one VAE call (several
    requests' inputs, admitted together, are encoded at once)."""
    encoded: dict[int, DiagonalGaussianDistribution] = {}
    by_size: dict[tuple[int, ...], list[int]] = {}
    for index, picture in enumerate(pictures):
        by_size.setdefault(tuple(picture.shape[-2:]), []).append(index)
    for indices in by_size.values():
        batch = torch.cat([pictures[index] for index in indices]).to(device=device, dtype=dtype)
        moments = vae.encode(batch).latent_dist.parameters
        for row, index in enumerate(indices):
            encoded[index] = DiagonalGaussianDistribution(moments[row : row + 1])
    return [encoded[index] for index in range(len(pictures))]


def start_from_image(
    pipeline: Any,
    request: GenerationRequest,
    generators: list[torch.Generator],
    scheduler: SchedulerMixin,
    picture: Picture,
    encoded: list[DiagonalGaussianDistribution],
    *,
    unet_channels: int,
    device: torch.device,
    dtype: torch.dtype,
) -> ImageStart:
    """The start of an image-to-image or inpainting request, from its ``picture`` and the
    distributions ``encode_pictures`` gave for ``picture.to_encode()``."""
    timesteps = cut_schedule(scheduler, request.steps, request.strength)
    start_at = timesteps[:1].repeat(request.num_images)
    factor = pipeline.vae.config.scaling_factor
    if picture.mask is None:
        image_latents = sample_latents(encoded[0], generators) * factor
        noise = draw_noise(image_latents.shape, generators, device=device, dtype=dtype)
        return ImageStart(latents=scheduler.add_noise(image_latents, noise, start_at), timesteps=timesteps)
    return _start_inpainting(
        pipeline, request, picture, encoded, generators, scheduler, start_at, timesteps, unet_channels, device, dtype
    )


def _start_inpainting(
    pipeline: Any,
    request: GenerationRequest,
    picture: Picture,
    encoded: list[DiagonalGaussianDistribution],
    generators: list[torch.Generator],
    scheduler: SchedulerMixin,
    start_at: torch.Tensor,
    timesteps: torch.Tensor,
    unet_channels: int,
    device: torch.device,
    dtype: torch.dtype,
) -> ImageStart:
    """``StableDiffusionInpaintPipeline``'s steps 6 to 8, with its random draws in its order."""
    assert picture.mask is not None
    scale, factor, images = int(pipeline.vae_scale_factor), pipeline.vae.config.scaling_factor, request.num_images
    whole = request.strength == 1.0
    regular = unet_channels != INPAINTING_CHANNELS
    first = generators[:1]  # the pipeline encodes its one picture with the first generator, for every image
    image_latents = None
    if regular or not whole:
        image_latents = (sample_latents(encoded[0], first) * factor).repeat(images, 1, 1, 1)
    shape = (images, pipeline.vae.config.latent_channels, request.height // scale, request.width // scale)
    noise = draw_noise(shape, generators, device=device, dtype=dtype)
    if whole:
        latents = noise * scheduler.init_noise_sigma
    else:
        assert image_latents is not None
        latents = scheduler.add_noise(image_latents, noise, start_at)
    masked_latents = (sample_latents(encoded[1], first) * factor).repeat(images, 1, 1, 1)
    mask = latent_mask(picture, request, scale).to(device=device, dtype=dtype)
    if regular:
        assert image_latents is not None
        return ImageStart(latents, timesteps, keep=KeepOutsideMask(image_latents, noise, mask))
    return ImageStart(latents, timesteps, extra_channels=torch.cat([mask, masked_latents], dim=1))


def _pixels(processor: VaeImageProcessor, picture: InputImage, request: GenerationRequest) -> torch.Tensor:
    """The picture as the pipeline's processor prepares it (already at the request's size)."""
    prepared: torch.Tensor = processor.preprocess(picture.picture(), height=request.height, width=request.width)
    return prepared


def sample_latents(distribution: DiagonalGaussianDistribution, generators: list[torch.Generator]) -> torch.Tensor:
    """One latent sample per generator, as ``retrieve_latents`` draws them."""
    return torch.cat([distribution.sample(generator) for generator in generators])


def draw_noise(
    shape: tuple[int, ...] | torch.Size, generators: list[torch.Generator], *, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """Noise of ``shape``, each image's row drawn with its own generator (``randn_tensor``)."""
    noise: torch.Tensor = randn_tensor(tuple(shape), generator=generators, device=device, dtype=dtype)
    return noise
