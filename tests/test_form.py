"""The form's and the API's defaults follow what the served model recommends."""

from __future__ import annotations

import inspect
import logging
import tempfile
from pathlib import Path
from typing import Any

import gradio as gr
import pytest

from harness.app_server import ROOT
from sd_pipeline.contract.models import ModelDefaults
from sd_pipeline.contract.recommended import RECOMMENDABLE, recommended_request
from sd_pipeline.contract.request import InputRules, RequestLimits
from webapp.form import GENERAL_EXAMPLE_PROMPT, generate_fields
from webapp.ui import build_demo


def test_the_models_recommendations_become_the_defaults_where_they_fit() -> None:
    limits = RequestLimits(max_pixels=512 * 512)
    plain = recommended_request(limits, native_size=64)
    assert (plain.steps, plain.guidance_scale, plain.width, plain.height) == (25, 7.5, 64, 64)
    recommended = ModelDefaults(steps=12, guidance_scale=4.0, scheduler="UniPC", width=96)
    chosen = recommended_request(limits, native_size=64, model=recommended)
    assert (chosen.steps, chosen.guidance_scale, chosen.scheduler, chosen.width, chosen.height) == (
        12,
        4.0,
        "UniPC",
        96,
        64,
    )
    too_big = recommended_request(limits, native_size=64, model=ModelDefaults(steps=12, width=1024, height=1024))
    assert (too_big.steps, too_big.width) == (25, 64)  # beyond this app's MAX_PIXELS: the app's own defaults
    fields = {
        field.name: field.default for field in generate_fields(limits, default_size=64, model_defaults=recommended)
    }
    assert (fields["steps"], fields["guidance_scale"], fields["scheduler"], fields["width"]) == (12, 4.0, "UniPC", 96)


def test_an_inpainting_models_recommendations_hold_and_it_starts_at_strength_one(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A model that draws only from a picture and a mask: its recommendations are checked with stand-in
    pictures (they were dropped, with a warning, for lacking them), and the strength starts at 1 (its
    pipelines' default) unless the model recommends one; other models start at 0.75."""
    limits = RequestLimits(max_pixels=512 * 512)
    inpainting = InputRules(needs_mask=True)
    with caplog.at_level(logging.WARNING):
        chosen = recommended_request(limits, native_size=64, model=ModelDefaults(steps=12), rules=inpainting)
    assert (chosen.steps, chosen.strength) == (12, 1.0) and caplog.records == []
    assert (
        recommended_request(limits, native_size=64, model=ModelDefaults(strength=0.9), rules=inpainting).strength == 0.9
    )
    assert recommended_request(limits, native_size=64).strength == 0.75
    fields = {field.name: field.default for field in generate_fields(limits, default_size=64, rules=inpainting)}
    assert fields["strength"] == 1.0 and fields["init_image"] is None


class Service:
    """What the page reads from the service at load: the served model's recommendations, family rules and size."""

    model_defaults = ModelDefaults()
    model_rules = InputRules()
    native_size = 0
    gallery_dir = Path(tempfile.gettempdir()) / "form-test-gallery"


def test_a_page_opened_after_a_rollout_gets_the_new_models_defaults() -> None:
    service: Any = Service()
    demo = build_demo(service, limits=RequestLimits(), model_name="tiny", default_size=64)
    (recommends,) = [block.fn for block in demo.fns.values() if getattr(block.fn, "__name__", "") == "model_recommends"]
    skipped = type(gr.skip())
    assert all(isinstance(value, skipped) for value in recommends())  # nothing changed: nothing is touched
    service.model_defaults = ModelDefaults(steps=12, scheduler="UniPC")
    values = dict(zip(RECOMMENDABLE, recommends(), strict=True))
    assert (values["steps"], values["scheduler"]) == (12, "UniPC")
    assert isinstance(values["width"], skipped)  # unchanged fields are left as the user has them
    generate = next(block.fn for block in demo.fns.values() if getattr(block, "api_name", None) == "generate")
    assert inspect.signature(generate).parameters["steps"].default == 25  # built before the rollout
    # A rollout to another family (SD3: its own sampler, 1024 px): new pages offer its samplers at its size.
    service.model_defaults, service.native_size = ModelDefaults(), 1024
    service.model_rules = InputRules(samplers=("Euler",), size_multiple=16)
    values = dict(zip(RECOMMENDABLE, recommends(), strict=True))
    assert (values["width"], values["height"]) == (1024, 1024)
    sampler = values["scheduler"]
    assert isinstance(sampler, gr.Dropdown) and sampler.value == "Euler"
    assert [choice[0] for choice in sampler.choices] == ["Euler"]


def test_the_prompt_placeholder_is_the_models_example() -> None:
    """A model that draws coloured shapes should not suggest an oil painting of a lighthouse."""
    limits = RequestLimits(max_pixels=512 * 512)

    def placeholder(defaults: ModelDefaults | None) -> str | None:
        prompt = next(field for field in generate_fields(limits, default_size=64, model_defaults=defaults))
        box = prompt.component()
        assert isinstance(box, gr.Textbox)
        return box.placeholder

    shapes = ModelDefaults.model_validate_json((ROOT / "models" / "tiny-shapes" / "model_defaults.json").read_bytes())
    assert placeholder(shapes) == "a green triangle"
    assert placeholder(None) == GENERAL_EXAMPLE_PROMPT
    with_example = recommended_request(limits, native_size=64, model=shapes)
    assert (with_example.steps, with_example.guidance_scale) == (20, 4.0)  # the example is no form value
