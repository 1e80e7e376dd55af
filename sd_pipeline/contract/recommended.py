"""The settings a request starts from: what the served model recommends (its manifest or
``model_defaults.json``) where that fits the limits, else the general defaults, at the model's
native size. The page, the API and the command line all start from here."""

from __future__ import annotations

import logging

from sd_pipeline.contract.errors import InvalidRequestError
from sd_pipeline.contract.models import ModelDefaults
from sd_pipeline.contract.request import GenerationRequest, InputRules, RequestLimits, check_inputs

logger = logging.getLogger(__name__)

RECOMMENDABLE = ("steps", "guidance_scale", "scheduler", "width", "height")  # the fields a model may recommend


def recommended_request(
    limits: RequestLimits,
    *,
    native_size: int,
    model: ModelDefaults | None = None,
    rules: InputRules | None = None,
) -> GenerationRequest:
    """A prompt-less request with the model's recommendations where they pass ``check_inputs``
    under ``limits`` and the model family's ``rules``; if they do not, the general defaults at
    ``native_size`` with the family's default sampler (logged)."""
    rules = rules or InputRules()
    settings = (model or ModelDefaults()).model_dump(include=set(RECOMMENDABLE))
    recommended = {name: value for name, value in settings.items() if value is not None}
    general = {"width": native_size, "height": native_size, "scheduler": rules.default_sampler}
    chosen = {**general, **recommended}
    try:
        check_inputs({"prompt": "defaults", **chosen}, limits=limits, rules=rules)
    except InvalidRequestError as error:
        logger.warning("the model's recommended settings do not fit this app (%s); the general defaults apply", error)
        chosen = general
    return GenerationRequest(prompt="", **chosen)
