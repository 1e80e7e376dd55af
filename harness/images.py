"""What "the same image" means in tests (every channel within 1/255, as the product promises), and the oracle.

CPU kernels do not promise bit-identical results across batch rows, thread counts or
machines, so no test asks for exact pixel equality.
"""

from __future__ import annotations

import inspect
from typing import Any

import numpy as np
import torch

from sd_pipeline.contract.lifecycle import Request
from sd_pipeline.contract.request import GenerationRequest
from sd_pipeline.model.engine import StepEngine
from sd_pipeline.model.loading import LoadedPipeline

SAME_IMAGE_TOLERANCE = 1  # levels of 255
BATCHED_TOLERANCE = 2  # levels of 255: the same request in a different batch


def max_difference(first: Any, second: Any) -> int:
    """Largest per-channel difference between two images (PIL images or arrays of the same shape)."""
    a, b = np.asarray(first, dtype=np.int16), np.asarray(second, dtype=np.int16)
    assert a.shape == b.shape, (a.shape, b.shape)
    return int(np.abs(a - b).max())


def assert_same_image(first: Any, second: Any, *, tolerance: int = SAME_IMAGE_TOLERANCE) -> None:
    """Both images have the same size and no channel differs by more than ``tolerance``/255."""
    difference = max_difference(first, second)
    assert difference <= tolerance, f"images differ by {difference}/255 (allowed {tolerance}/255)"


def pipeline_image(loaded: LoadedPipeline, request: GenerationRequest) -> list[Any]:
    """The pipeline's own ``__call__`` with the request's settings and one generator per image (an empty
    negative prompt is no negative prompt, as the service reads it, except with FLUX.1's true CFG,
    which mixes in a pass with the negative prompt as written, "" too)."""
    pipeline = loaded.pipeline
    saved = pipeline.scheduler
    pipeline.scheduler = loaded.family.make_scheduler(request.scheduler, saved.config)
    true_cfg = request.true_cfg_scale > 1
    extra = {"true_cfg_scale": request.true_cfg_scale} if true_cfg else {}
    try:
        output = pipeline(
            prompt=[request.text] * request.num_images,
            negative_prompt=[request.negative_prompt] * request.num_images
            if request.negative_prompt or true_cfg
            else None,
            width=request.width,
            height=request.height,
            num_inference_steps=request.steps,
            guidance_scale=request.guidance_scale,
            generator=[torch.Generator("cpu").manual_seed(seed) for seed in request.seeds()],
            **extra,
        )
    finally:
        pipeline.scheduler = saved
    return list(output.images)


def pipeline_image_with_loras(loaded: LoadedPipeline, request: GenerationRequest) -> Any:
    """``pipeline_image`` of a pipeline whose LoRA adapters were loaded with diffusers' ``load_lora_weights``:
    the adapters the request's prompt names at their weights (``set_adapters``), none when it names none."""
    pipeline = loaded.pipeline
    loras = request.loras
    if loras:
        pipeline.enable_lora()
        pipeline.set_adapters([lora.name for lora in loras], [lora.weight for lora in loras])
    else:
        pipeline.disable_lora()
    return pipeline_image(loaded, request)[0]


def pipeline_image_from_picture(loaded: LoadedPipeline, request: GenerationRequest) -> list[Any]:
    """diffusers' image-to-image (no mask) or inpainting pipeline of the family (SD:
    ``StableDiffusionImg2ImgPipeline``, ``StableDiffusionInpaintPipeline``; SDXL's), built from the
    loaded pipeline's parts, with the request's picture, strength, settings and one generator per image."""
    import diffusers

    classes = {"sd": ("StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline")}
    classes["sdxl"] = ("StableDiffusionXLImg2ImgPipeline", "StableDiffusionXLInpaintPipeline")
    classes["sd3"] = ("StableDiffusion3Img2ImgPipeline", "StableDiffusion3InpaintPipeline")
    classes["flux"] = ("FluxImg2ImgPipeline", "FluxInpaintPipeline")
    img2img, inpaint = (getattr(diffusers, name) for name in classes[loaded.family.name])
    assert request.init_image is not None
    components = dict(loaded.pipeline.components)
    components["scheduler"] = loaded.family.make_scheduler(request.scheduler, components["scheduler"].config)
    arguments: dict[str, Any] = {
        "prompt": [request.text] * request.num_images,
        "image": request.init_image.picture(),
        "strength": request.strength,
        "num_inference_steps": request.steps,
        "guidance_scale": request.guidance_scale,
        "generator": [torch.Generator("cpu").manual_seed(seed) for seed in request.seeds()],
    }
    if request.negative_prompt and loaded.family.name != "flux":  # FLUX.1 reads none (without true CFG)
        arguments["negative_prompt"] = [request.negative_prompt] * request.num_images
    if request.mask is None:
        pipeline = img2img(**components)
        if "height" in inspect.signature(pipeline.__call__).parameters:  # SD3, FLUX.1: else their default size
            arguments.update(width=request.width, height=request.height)
        output = pipeline(**arguments)
    else:
        arguments.update(mask_image=request.mask.picture(), width=request.width, height=request.height)
        if loaded.family.pipeline_class == "FluxFillPipeline":
            inpaint = diffusers.FluxFillPipeline
        pipeline = inpaint(**components)
        if loaded.family.name == "sd3":
            return _sd3_decoded(pipeline, pipeline(**arguments, output_type="latent").images)
        output = pipeline(**arguments)
    return list(output.images)


def _sd3_decoded(pipeline: Any, latents: torch.Tensor) -> list[Any]:
    """Latents decoded as ``StableDiffusion3Pipeline`` and its img2img pipeline decode them (divided by
    the scaling factor, plus the shift factor). diffusers 0.42.1's ``StableDiffusion3InpaintPipeline``
    leaves out the shift factor, so its latents, not its pictures, are the oracle."""
    vae = pipeline.vae
    with torch.no_grad():
        decoded = vae.decode(latents / vae.config.scaling_factor + vae.config.shift_factor, return_dict=False)[0]
    return list(pipeline.image_processor.postprocess(decoded, output_type="pil"))


def oracle_image(loaded: LoadedPipeline, request: GenerationRequest) -> list[Any]:
    """diffusers' own images for ``request``: the text-to-image pipeline, or the image-to-image /
    inpainting one when it starts from a picture."""
    return (
        pipeline_image(loaded, request) if request.init_image is None else pipeline_image_from_picture(loaded, request)
    )


def each_equals_itself_alone(
    loaded: LoadedPipeline, wanted: list[GenerationRequest], *, late: GenerationRequest
) -> None:
    """``wanted`` step together, ``late`` joins after two steps; each image is within
    ``BATCHED_TOLERANCE`` of diffusers' own pipeline alone (``oracle_image``), and some step carried 3+ images."""
    engine = StepEngine(loaded, max_batch_images=8)
    outcomes: dict[int, Any] = {}
    jobs = [Request(r) for r in wanted]
    for job in jobs:
        engine.submit(job, lambda outcome, job=job: outcomes.__setitem__(id(job), outcome))
    engine.step()
    engine.step()
    jobs.append(Request(late))
    engine.submit(jobs[-1], lambda outcome: outcomes.__setitem__(id(jobs[-1]), outcome))
    engine.run_until_idle()
    for job, asked in zip(jobs, [*wanted, late], strict=True):
        outcome = outcomes[id(job)]
        assert outcome.error is None, outcome.error
        assert_same_image(outcome.results[0].image, oracle_image(loaded, asked)[0], tolerance=BATCHED_TOLERANCE)
    assert max(result.timings.batch_images for job in jobs for result in outcomes[id(job)].results) >= 3


def png_bytes(picture: Any) -> bytes:
    """A PIL picture as PNG file bytes."""
    import io

    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


def decompression_bomb_png(side: int = 30000) -> bytes:
    """A valid 1-bit PNG of ``side`` x ``side`` black pixels in about a hundred kilobytes: decoded, it
    would take ``side``² bytes (900 MB at 30000)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\x00" * (1 + (side + 7) // 8)  # filter byte + the row's bits
    packer = zlib.compressobj(9)
    rows_at_once = 1000
    body = b"".join(packer.compress(row * rows_at_once) for _ in range(side // rows_at_once))
    body += packer.compress(row * (side % rows_at_once)) + packer.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b"")
