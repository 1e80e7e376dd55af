"""The typed generation request and the one place every request is checked.

``check_inputs`` is used by the web page, the API and the CLI alike; it raises
``InvalidRequestError`` naming the field and the allowed range, before any GPU work.
"""

from __future__ import annotations

import functools
import math
import secrets
import unicodedata
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from sd_pipeline.contract.errors import InvalidRequestError
from sd_pipeline.contract.images import (
    DEFAULT_MAX_UPLOAD_BYTES,
    DEFAULT_MAX_UPLOAD_PIXELS,
    InputImage,
    read_input_image,
)
from sd_pipeline.contract.loras import LoraChoice, PromptAdapters, check_adapters, parse_prompt
from sd_pipeline.contract.samplers import DEFAULT_SCHEDULER, SCHEDULER_NAMES

MAX_SEED = 2**32 - 1
RANDOM_SEED = -1
ALLOWED_CONTROL_CHARACTERS = {"\n", "\t"}
DEFAULT_MAX_PIXELS = 1024 * 1024  # largest width x height accepted unless MAX_PIXELS says otherwise
DEFAULT_STRENGTH = 0.75  # AUTOMATIC1111's default denoising strength


@dataclass(frozen=True)
class RequestLimits:
    """Bounds a deployment enforces; defaults suit a 24 GB GPU."""

    max_prompt_chars: int = 2000
    min_steps: int = 1
    max_steps: int = 100
    max_guidance: float = 30.0
    min_side: int = 64
    max_side: int = 1024
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_images: int = 4
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES  # an input image's or mask's file
    max_upload_pixels: int = DEFAULT_MAX_UPLOAD_PIXELS  # before it is resized to width x height


@dataclass(frozen=True)
class GenerationRequest:
    """A validated request. ``seed`` is always concrete (never -1)."""

    prompt: str
    negative_prompt: str = ""
    seed: int = 0
    steps: int = 25
    guidance_scale: float = 7.5
    width: int = 512
    height: int = 512
    num_images: int = 1
    scheduler: str = DEFAULT_SCHEDULER
    init_image: InputImage | None = None  # image-to-image (and inpainting) starts from it
    strength: float = DEFAULT_STRENGTH  # how much of init_image is redrawn: 1 = all of it
    mask: InputImage | None = None  # inpainting: white = redraw, black = keep init_image
    true_cfg_scale: float = 1.0  # FLUX.1: classifier-free guidance with the negative prompt when > 1

    @property
    def mode(self) -> Literal["txt2img", "img2img", "inpaint"]:
        """Text-to-image, image-to-image or inpainting."""
        if self.init_image is None:
            return "txt2img"
        return "img2img" if self.mask is None else "inpaint"

    @property
    def denoising_steps(self) -> int:
        """The steps that run: all of them, or the last ``int(steps x strength)`` from a picture."""
        return self.steps if self.init_image is None else min(int(self.steps * self.strength), self.steps)

    @functools.cached_property
    def _split_prompt(self) -> PromptAdapters:
        """The prompt read once per request (the engine asks on every step while it waits)."""
        return parse_prompt(self.prompt)

    @property
    def text(self) -> str:
        """The prompt the text encoder reads: without its ``<lora:...>`` tags."""
        return self._split_prompt.text

    @property
    def loras(self) -> tuple[LoraChoice, ...]:
        """The LoRA adapters the prompt names, with their weights."""
        return self._split_prompt.loras

    def seeds(self) -> list[int]:
        """Seed of each image: consecutive from ``seed``, wrapping at 2**32 (AUTOMATIC1111 convention)."""
        return [(self.seed + index) % (MAX_SEED + 1) for index in range(self.num_images)]


@dataclass(frozen=True)
class TokenBudget:
    """How many tokens the text encoder reads, and how to count a text's tokens."""

    limit: int
    count: Callable[[str], int]

    @classmethod
    def of(cls, tokenizer: Any, limit: int | None = None) -> TokenBudget:
        """The budget of a Hugging Face tokenizer: ``limit`` tokens (else its ``model_max_length``),
        start and end tokens included."""
        return cls(
            limit=tokenizer.model_max_length if limit is None else limit,
            count=lambda text: len(tokenizer(text).input_ids),
        )


def default_sampler(samplers: Sequence[str]) -> str:
    """The general default sampler where the model can use it, else the model's first."""
    return DEFAULT_SCHEDULER if DEFAULT_SCHEDULER in samplers else samplers[0]


Guidance = Literal["cfg", "distilled", "none"]
GUIDANCE_MEANING: dict[str, str] = {
    "cfg": "classifier-free guidance: how closely to follow the prompt (1 or less: off)",
    "distilled": "the model's distilled guidance (FLUX.1-dev: about 3.5); one pass per image (the negative "
    "prompt is used only with true_cfg_scale above 1)",
    "none": "not used by this model (FLUX.1-schnell is guidance-distilled): any value draws the same image",
}


@dataclass(frozen=True)
class InputRules:
    """What the served model's family accepts, beside the deployment's limits: its samplers (the
    default is ``DEFAULT_SCHEDULER`` where it is one of them, else the first), the multiple its
    width and height must be, and what its guidance scale means."""

    samplers: tuple[str, ...] = SCHEDULER_NAMES
    size_multiple: int = 8
    guidance: Guidance = "cfg"
    family: str = "sd"  # the family's name, which LoRA adapters must be made for
    image_inputs: bool = True  # takes an init_image (and a mask)
    needs_mask: bool = False  # an inpainting model: every request brings an init_image and a mask
    inpainting: bool = True  # takes a mask with its init_image
    true_cfg: bool = False  # takes true_cfg_scale: classifier-free guidance beside distilled guidance (FLUX.1)

    @property
    def default_sampler(self) -> str:
        return default_sampler(self.samplers)


def _integer(field: str, value: Any, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidRequestError(field, f"must be an integer from {low} to {high}, got {value!r}")
    if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
        raise InvalidRequestError(field, f"must be an integer from {low} to {high}, got {value!r}")
    number = int(value)
    if not low <= number <= high:
        raise InvalidRequestError(field, f"must be from {low} to {high}, got {number}")
    return number


def _number(field: str, value: Any, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidRequestError(field, f"must be a finite number from {low:g} to {high:g}, got {value!r}")
    if not low <= value <= high:
        raise InvalidRequestError(field, f"must be from {low:g} to {high:g}, got {value:g}")
    return float(value)


def _text(field: str, value: Any, *, required: bool, limits: RequestLimits, tokens: TokenBudget | None) -> str:
    if not isinstance(value, str):
        raise InvalidRequestError(field, f"must be text, got {type(value).__name__}")
    text = value.strip()
    if required and not text:
        raise InvalidRequestError(field, "must not be empty")
    if len(text) > limits.max_prompt_chars:
        raise InvalidRequestError(field, f"must be at most {limits.max_prompt_chars} characters, got {len(text)}")
    for char in text:
        if unicodedata.category(char) == "Cc" and char not in ALLOWED_CONTROL_CHARACTERS:
            raise InvalidRequestError(field, f"must not contain control characters (found U+{ord(char):04X})")
    _count_tokens(field, text, tokens)
    return text


def _count_tokens(field: str, text: str, tokens: TokenBudget | None) -> None:
    if tokens is not None and text:
        used = tokens.count(text)
        if used > tokens.limit:
            raise InvalidRequestError(
                field,
                f"is {used} tokens long but the model reads at most {tokens.limit}; shorten it (nothing is truncated)",
            )


def _side(field: str, value: Any, limits: RequestLimits, multiple: int) -> int:
    side = _integer(field, value, limits.min_side, limits.max_side)
    if side % multiple:
        raise InvalidRequestError(
            field, f"must be a multiple of {multiple} from {limits.min_side} to {limits.max_side}, got {side}"
        )
    return side


def check_inputs(
    data: Mapping[str, Any],
    *,
    limits: RequestLimits | None = None,
    tokens: TokenBudget | None = None,
    rules: InputRules | None = None,
    adapters: Callable[[], Mapping[str, str]] | None = None,
) -> GenerationRequest:
    """Validate raw fields (from a form, JSON or the CLI) into a ``GenerationRequest``.

    ``rules``: the served model family's (SD 1.x's when None). ``adapters``: lists the LoRA
    adapters a prompt may name (name -> base family, "" when unknown), asked only when the prompt
    names one; none when None. Missing fields take their defaults (the sampler: the family's
    default). A seed of -1 is replaced by a random one, so the returned request always says which
    seed will be used.
    """
    limits = limits or RequestLimits()
    rules = rules or InputRules()
    defaults = GenerationRequest(prompt="", scheduler=rules.default_sampler)
    unknown = set(data) - set(GenerationRequest.__dataclass_fields__)
    if unknown:
        raise InvalidRequestError(sorted(unknown)[0], "is not a known field")

    def get(name: str) -> Any:
        return data.get(name, getattr(defaults, name))

    prompt = _text("prompt", data.get("prompt"), required=True, limits=limits, tokens=None)
    negative = _text("negative_prompt", get("negative_prompt"), required=False, limits=limits, tokens=tokens)
    _count_tokens("prompt", check_adapters(prompt, negative, adapters or dict, rules.family).text, tokens)
    seed = _integer("seed", data.get("seed", RANDOM_SEED), RANDOM_SEED, MAX_SEED)
    steps = _integer("steps", get("steps"), limits.min_steps, limits.max_steps)
    guidance = _number("guidance_scale", get("guidance_scale"), 0.0, limits.max_guidance)
    width = _side("width", get("width"), limits, rules.size_multiple)
    height = _side("height", get("height"), limits, rules.size_multiple)
    if width * height > limits.max_pixels:
        raise InvalidRequestError(
            "width", f"width x height must be at most {limits.max_pixels} pixels, got {width}x{height}"
        )
    num_images = _integer("num_images", get("num_images"), 1, limits.max_images)
    scheduler = get("scheduler")
    if scheduler not in rules.samplers:
        raise InvalidRequestError(
            "scheduler", f"must be one of {', '.join(rules.samplers)} (this model's samplers); got {scheduler!r}"
        )
    init_image, strength, mask = _image_inputs(get, limits, rules, size=(width, height), steps=steps)
    true_cfg_scale = _number("true_cfg_scale", get("true_cfg_scale"), 1.0, limits.max_guidance)
    if true_cfg_scale > 1 and not rules.true_cfg:
        raise InvalidRequestError(
            "true_cfg_scale",
            f"must be 1: this model ({rules.family}) has no true CFG (FLUX.1-dev and -schnell do); "
            f"got {true_cfg_scale:g}",
        )
    if seed == RANDOM_SEED:
        seed = secrets.randbelow(MAX_SEED + 1)
    return GenerationRequest(
        prompt=prompt,
        negative_prompt=negative,
        seed=seed,
        steps=steps,
        guidance_scale=guidance,
        width=width,
        height=height,
        num_images=num_images,
        scheduler=scheduler,
        init_image=init_image,
        strength=strength,
        mask=mask,
        true_cfg_scale=true_cfg_scale,
    )


def _image_inputs(
    get: Callable[[str], Any], limits: RequestLimits, rules: InputRules, *, size: tuple[int, int], steps: int
) -> tuple[InputImage | None, float, InputImage | None]:
    """The request's input image, strength and mask, checked; the pictures resized to ``size``."""
    strength = get("strength")
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0 < strength <= 1:
        raise InvalidRequestError("strength", f"must be a number greater than 0 and at most 1, got {strength!r}")
    image, mask = get("init_image"), get("mask")
    if rules.needs_mask and (image is None or mask is None):
        missing = "init_image" if image is None else "mask"
        raise InvalidRequestError(
            missing, "is required: this is an inpainting model (it redraws the masked part of an image)"
        )
    if image is None:
        if mask is not None:
            raise InvalidRequestError("mask", "needs an init_image: the mask says which part of it to redraw")
        return None, float(strength), None
    if not rules.image_inputs:
        raise InvalidRequestError("init_image", "is not supported by this model's family yet: leave it empty")
    if int(steps * strength) < 1:
        raise InvalidRequestError(
            "strength",
            f"must be at least {1 / steps:g} at {steps} steps (int(steps x strength) steps run), got {strength:g}",
        )
    if mask is not None and not rules.inpainting:
        raise InvalidRequestError("mask", "inpainting is not supported by this model's family yet: leave it empty")
    bounds = {"max_bytes": limits.max_upload_bytes, "max_pixels": limits.max_upload_pixels}
    image = read_input_image("init_image", image, size=size, mode="RGB", **bounds)
    if mask is not None:
        mask = read_input_image("mask", mask, size=size, mode="L", **bounds)
    return image, float(strength), mask
