"""The one list of /generate's fields: it drives the form, the handler's API signature and
descriptions, the validator, and "Load these settings". Ranges and defaults come from
``RequestLimits`` and ``GenerationRequest``, so the page, the API page and validation agree.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import gradio as gr

from sd_pipeline.contract.models import ModelDefaults
from sd_pipeline.contract.recommended import recommended_request
from sd_pipeline.contract.request import (
    DEFAULT_STRENGTH,
    GUIDANCE_MEANING,
    MAX_SEED,
    RANDOM_SEED,
    InputRules,
    RequestLimits,
)
from webapp.components import validated_by_app
from webapp.uploads import uploaded_picture

REQUIRED = inspect.Parameter.empty


@dataclass(frozen=True)
class FormField:
    """One input of /generate: its name (a ``GenerationRequest`` field), API type and default,
    its description on the API page, and how the page draws it."""

    name: str
    kind: type
    default: Any
    doc: str
    component: Callable[[], gr.components.Component]

    def render(self) -> gr.components.Component:
        """The form input, placed wherever the layout calls this."""
        return self.component()


GENERAL_EXAMPLE_PROMPT = "A lighthouse on a cliff at dusk, oil painting"  # for a model that names no example


def generate_fields(
    limits: RequestLimits,
    *,
    default_size: int,
    model_defaults: ModelDefaults | None = None,
    rules: InputRules | None = None,
) -> list[FormField]:
    """/generate's inputs in API order, with the model's recommended defaults (``recommended_request``)
    and what its family accepts (``rules``: samplers, size multiple, what guidance means)."""
    rules = rules or InputRules()
    samplers = rules.samplers
    defaults = recommended_request(limits, native_size=default_size, model=model_defaults, rules=rules)
    sides = f"{limits.min_side}-{limits.max_side}, multiple of {rules.size_multiple}"
    guidance = GUIDANCE_MEANING[rules.guidance]
    example_prompt = (model_defaults and model_defaults.example_prompt) or GENERAL_EXAMPLE_PROMPT

    def whole_slider(
        low: int, high: int, value: int, label: str, elem_id: str
    ) -> Callable[[], gr.components.Component]:
        return lambda: validated_by_app(
            gr.Slider(low, high, value=value, step=1, precision=0, label=label, elem_id=elem_id)
        )

    return [
        FormField(
            "prompt",
            str,
            REQUIRED,
            "what to draw (required; at most the model's token limit)",
            lambda: gr.Textbox(label="Prompt", lines=3, placeholder=example_prompt, elem_id="prompt"),
        ),
        FormField(
            "negative_prompt",
            str,
            defaults.negative_prompt,
            "what to avoid",
            lambda: gr.Textbox(
                label="Negative prompt",
                value=defaults.negative_prompt,
                lines=1,
                placeholder="blurry, low quality",
                elem_id="negative",
            ),
        ),
        FormField(
            "seed",
            float,
            RANDOM_SEED,
            f"0 to {MAX_SEED}, or {RANDOM_SEED} for a random seed (the seed used is in the result)",
            lambda: validated_by_app(
                gr.Number(label="Seed", value=RANDOM_SEED, precision=0, info=f"{RANDOM_SEED} = random", elem_id="seed")
            ),
        ),
        FormField(
            "steps",
            float,
            defaults.steps,
            f"denoising steps, {limits.min_steps} to {limits.max_steps}",
            whole_slider(limits.min_steps, limits.max_steps, defaults.steps, "Steps", "steps"),
        ),
        FormField(
            "guidance_scale",
            float,
            defaults.guidance_scale,
            f"{guidance}; 0 to {limits.max_guidance:g}",
            lambda: validated_by_app(
                gr.Slider(
                    0,
                    limits.max_guidance,
                    value=defaults.guidance_scale,
                    step=0.5,
                    label="Guidance scale",
                    info=None if rules.guidance == "cfg" else guidance,
                    elem_id="guidance",
                )
            ),
        ),
        FormField(
            "width",
            float,
            defaults.width,
            f"{sides} (default: the model's native size, 512 for SD 1.x)",
            lambda: validated_by_app(
                gr.Number(label="Width", value=defaults.width, precision=0, info=sides, elem_id="width")
            ),
        ),
        FormField(
            "height",
            float,
            defaults.height,
            f"{sides} (default: the model's native size)",
            lambda: validated_by_app(
                gr.Number(label="Height", value=defaults.height, precision=0, info=sides, elem_id="height")
            ),
        ),
        FormField(
            "num_images",
            float,
            defaults.num_images,
            f"images for this prompt, 1 to {limits.max_images} (seeds seed, seed+1, ...)",
            whole_slider(1, limits.max_images, defaults.num_images, "Images", "count"),
        ),
        FormField(
            "scheduler",
            str,
            defaults.scheduler,
            f"sampler: one of {', '.join(samplers)}",
            lambda: gr.Dropdown(
                list(samplers),
                value=defaults.scheduler,
                label="Sampler",
                allow_custom_value=True,
                elem_id="scheduler",
            ),
        ),
        *picture_fields(limits, strength=defaults.strength),
        FormField(
            "true_cfg_scale",
            float,
            1.0,
            f"true classifier-free guidance with the negative prompt, 1 (off) to {limits.max_guidance:g}: FLUX.1 "
            "only (above 1 every step runs twice, as FluxPipeline's true_cfg_scale); other models: 1",
            lambda: validated_by_app(
                gr.Slider(
                    1,
                    limits.max_guidance,
                    value=1.0,
                    step=0.5,
                    label="True CFG scale",
                    info="above 1: a second pass with the negative prompt each step (twice the time); 1 = off",
                    visible=rules.true_cfg,
                    elem_id="true-cfg",
                )
            ),
        ),
    ]


def picture_fields(limits: RequestLimits, *, strength: float = DEFAULT_STRENGTH) -> list[FormField]:
    """The image-to-image and inpainting inputs: last, with defaults, so earlier calls keep working."""
    files = f"PNG, JPEG or WebP, at most {limits.max_upload_bytes} bytes and {limits.max_upload_pixels} pixels"
    return [
        FormField(
            "init_image",
            str,
            None,
            f"image-to-image: the picture to start from ({files}; resized to width x height). In gradio_client: "
            "handle_file(path). None: text-to-image",
            lambda: uploaded_picture(
                label="Start from a picture (image-to-image)",
                sources=["upload", "clipboard"],
                height=220,
                elem_id="init-image",
            ),
        ),
        FormField(
            "strength",
            float,
            strength,
            "with init_image: denoising strength, greater than 0 up to 1 (1 redraws everything; "
            "int(steps x strength) steps run)",
            lambda: validated_by_app(
                gr.Slider(
                    0.01,
                    1,
                    value=strength,
                    step=0.01,
                    label="Denoising strength",
                    info="how much of the picture is redrawn",
                    elem_id="strength",
                )
            ),
        ),
        FormField(
            "mask",
            str,
            None,
            f"inpainting: white = redraw, black = keep ({files}; needs init_image; resized to width x height). "
            "In gradio_client: handle_file(path)",
            lambda: uploaded_picture(
                label="Inpainting mask (white = redraw)",
                image_mode="L",
                sources=["upload", "clipboard"],
                height=220,
                elem_id="mask",
            ),
        ),
    ]


def with_signature(handler: Callable[..., Any], fields: Sequence[FormField], *, summary: str) -> None:
    """Give ``handler(*values, request, progress)`` the named signature and docstring Gradio's API
    page and ``gradio_client`` read: one parameter per field, then the request and progress."""
    positional = inspect.Parameter.POSITIONAL_OR_KEYWORD
    parameters = [
        inspect.Parameter(field.name, positional, default=field.default, annotation=field.kind) for field in fields
    ]
    parameters += [
        inspect.Parameter("request", positional, default=None, annotation=gr.Request | None),
        inspect.Parameter("progress", positional, default=gr.Progress(), annotation=gr.Progress),
    ]
    returns = tuple[list[tuple[str, str]], dict[str, Any]]
    handler.__signature__ = inspect.Signature(parameters, return_annotation=returns)  # type: ignore[attr-defined]
    handler.__annotations__ = {parameter.name: parameter.annotation for parameter in parameters}
    arguments = "\n".join(f"    {field.name}: {field.doc}" for field in fields)
    handler.__doc__ = f"{summary}\n\nArgs:\n{arguments}\n"


def settings_of(image: dict[str, Any], fields: Sequence[FormField]) -> list[Any]:
    """A stored image's parameters as form values, in field order (fields it lacks take their defaults)."""
    return [image.get(field.name, field.default) for field in fields]
