"""What "the same image" means in tests (every channel within 1/255, as the product promises), and the oracle.

CPU kernels do not promise bit-identical results across batch rows, thread counts or
machines, so no test asks for exact pixel equality.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from sd_pipeline.contract.request import GenerationRequest
from sd_pipeline.model.loading import LoadedPipeline

SAME_IMAGE_TOLERANCE = 1  # levels of 255


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
    negative prompt is no negative prompt, as the service reads it)."""
    pipeline = loaded.pipeline
    saved = pipeline.scheduler
    pipeline.scheduler = loaded.family.make_scheduler(request.scheduler, saved.config)
    try:
        output = pipeline(
            prompt=[request.text] * request.num_images,
            negative_prompt=[request.negative_prompt] * request.num_images if request.negative_prompt else None,
            width=request.width,
            height=request.height,
            num_inference_steps=request.steps,
            guidance_scale=request.guidance_scale,
            generator=[torch.Generator("cpu").manual_seed(seed) for seed in request.seeds()],
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
