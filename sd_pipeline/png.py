"""PNG files that carry their generation parameters in AUTOMATIC1111's ``parameters`` text chunk."""

from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from sd_pipeline.contract.jobs import GenerationResult

PARAMETERS_CHUNK = "parameters"
# One "Key: value" pair of the settings line; a value holding commas is a quoted JSON string
# (AUTOMATIC1111's infotext parser, ``re_param``).
_PAIR = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


@dataclass(frozen=True)
class ImageParameters:
    """The fields written into (and read back from) the ``parameters`` chunk."""

    prompt: str
    negative_prompt: str
    steps: int
    sampler: str
    cfg_scale: float
    seed: int
    width: int
    height: int
    model: str
    model_version: str = ""
    model_hash: str = ""
    lora_hashes: str = ""
    denoising_strength: float | None = None  # image-to-image and inpainting
    true_cfg_scale: float | None = None  # FLUX.1's true CFG, when above 1


def parameters_of(result: GenerationResult) -> ImageParameters:
    """The parameters that reproduce ``result``."""
    request = result.request
    return ImageParameters(
        prompt=request.prompt,
        negative_prompt=request.negative_prompt,
        steps=request.steps,
        sampler=request.scheduler,
        cfg_scale=request.guidance_scale,
        seed=result.seed,
        width=request.width,
        height=request.height,
        model=result.model,
        model_version=result.model_version,
        model_hash=result.model_hash,
        lora_hashes=result.lora_hashes,
        denoising_strength=request.strength if request.init_image is not None else None,
        true_cfg_scale=request.true_cfg_scale if request.true_cfg_scale > 1 else None,
    )


def format_parameters(parameters: ImageParameters) -> str:
    """Format as AUTOMATIC1111 does: prompt, ``Negative prompt:`` line, then ``Key: value`` pairs."""
    lines = [parameters.prompt]
    if parameters.negative_prompt:
        lines.append(f"Negative prompt: {parameters.negative_prompt}")
    pairs = [
        f"Steps: {parameters.steps}",
        f"Sampler: {parameters.sampler}",
        f"CFG scale: {parameters.cfg_scale:g}",
        f"Seed: {parameters.seed}",
        f"Size: {parameters.width}x{parameters.height}",
    ]
    if parameters.model_hash:
        pairs.append(f"Model hash: {parameters.model_hash}")
    pairs.append(f"Model: {parameters.model}")
    if parameters.denoising_strength is not None:
        pairs.append(f"Denoising strength: {parameters.denoising_strength:g}")
    if parameters.true_cfg_scale is not None:
        pairs.append(f"True CFG scale: {parameters.true_cfg_scale:g}")
    if parameters.lora_hashes:
        pairs.append(f"Lora hashes: {json.dumps(parameters.lora_hashes, ensure_ascii=False)}")
    if parameters.model_version:
        pairs.append(f"Model version: {parameters.model_version}")
    lines.append(", ".join(pairs))
    return "\n".join(lines)


def parse_parameters(text: str) -> ImageParameters:
    """Read a ``parameters`` chunk written by this app (or AUTOMATIC1111) back into fields."""
    *prompt_lines, settings_line = text.split("\n")
    negative = ""
    negative_at = next((i for i, line in enumerate(prompt_lines) if line.startswith("Negative prompt: ")), None)
    if negative_at is not None:
        negative = "\n".join(prompt_lines[negative_at:])[len("Negative prompt: ") :]
        prompt_lines = prompt_lines[:negative_at]
    values = {key: _unquote(value) for key, value in _PAIR.findall(settings_line)}
    width, height = values["Size"].split("x")
    return ImageParameters(
        prompt="\n".join(prompt_lines),
        negative_prompt=negative,
        steps=int(values["Steps"]),
        sampler=values["Sampler"],
        cfg_scale=float(values["CFG scale"]),
        seed=int(values["Seed"]),
        width=int(width),
        height=int(height),
        model=values.get("Model", ""),
        model_version=values.get("Model version", ""),
        model_hash=values.get("Model hash", ""),
        lora_hashes=values.get("Lora hashes", ""),
        denoising_strength=float(values["Denoising strength"]) if "Denoising strength" in values else None,
        true_cfg_scale=float(values["True CFG scale"]) if "True CFG scale" in values else None,
    )


def _unquote(value: str) -> str:
    """A value as AUTOMATIC1111 quotes one holding a comma or colon (a JSON string)."""
    if value.startswith('"') and value.endswith('"') and len(value) > 1:
        try:
            return str(json.loads(value))
        except ValueError:
            return value
    return value


def encode_png(result: GenerationResult) -> bytes:
    """The image as PNG bytes with its ``parameters`` chunk."""
    info = PngInfo()
    info.add_text(PARAMETERS_CHUNK, format_parameters(parameters_of(result)))
    buffer = io.BytesIO()
    result.image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def read_png_parameters(data: bytes) -> ImageParameters:
    """Read the ``parameters`` chunk from PNG bytes."""
    with Image.open(io.BytesIO(data)) as image:
        text = image.info[PARAMETERS_CHUNK]
    return parse_parameters(text)
