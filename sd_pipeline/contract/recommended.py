"""The settings a request starts from: what the served model recommends (its manifest or
``model_defaults.json``) where that fits the limits, else the general defaults, at the model's
native size. The page, the API and the command line all start from here."""

from __future__ import annotations

import logging
from typing import Any

from sd_pipeline.contract.errors import InvalidRequestError
from sd_pipeline.contract.images import InputImage
from sd_pipeline.contract.models import ModelDefaults
from sd_pipeline.contract.request import GenerationRequest, InputRules, RequestLimits, check_inputs

logger = logging.getLogger(__name__)

# The fields a model may recommend.
RECOMMENDABLE = ("steps", "guidance_scale", "scheduler", "width", "height", "strength")
WHOLE_REDRAW = 1.0  # an inpainting or fill model's strength: its pipelines' default, the mask redrawn from noise


def recommended_request(
    limits: RequestLimits,
    *,
    native_size: int,
    model: ModelDefaults | None = None,
    rules: InputRules | None = None,
) -> GenerationRequest:
    """A prompt-less request with the model's recommendations where they pass ``check_inputs``
    under ``limits`` and the model family's ``rules``; if they do not, the general defaults at
    ``native_size`` with the family's default sampler (logged). A model that draws only from a
    picture and a mask is checked with stand-in pictures, and starts at strength 1."""
    rules = rules or InputRules()
    settings = (model or ModelDefaults()).model_dump(include=set(RECOMMENDABLE))
    recommended = {name: value for name, value in settings.items() if value is not None}
    general: dict[str, Any] = {"width": native_size, "height": native_size, "scheduler": rules.default_sampler}
    if rules.needs_mask:
        general["strength"] = WHOLE_REDRAW
    chosen = {**general, **recommended}
    try:
        check_inputs({"prompt": "defaults", **chosen, **_stand_in_pictures(rules)}, limits=limits, rules=rules)
    except InvalidRequestError as error:
        logger.warning("the model's recommended settings do not fit this app (%s); the general defaults apply", error)
        chosen = general
    return GenerationRequest(prompt="", **chosen)


def _stand_in_pictures(rules: InputRules) -> dict[str, bytes]:
    """Grey pictures for checking an inpainting model's settings (it refuses a request without them)."""
    if not rules.needs_mask:
        return {}
    picture, mask = InputImage.stand_ins((64, 64))  # resized to the request's size by the check, as any picture is
    return {"init_image": picture.png, "mask": mask.png}
