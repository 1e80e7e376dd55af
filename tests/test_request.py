"""check_inputs: every bad field is refused with an error naming it and its range."""

from __future__ import annotations

import math
from typing import Any

import pytest

from sd_pipeline.contract.errors import InvalidRequestError
from sd_pipeline.contract.request import MAX_SEED, RequestLimits, TokenBudget, check_inputs
from sd_pipeline.model.schedulers import SCHEDULER_NAMES

GOOD: dict[str, Any] = {"prompt": "a lighthouse at dusk", "width": 64, "height": 64, "steps": 2}

BAD_INPUTS = [
    ({"prompt": ""}, "prompt", "must not be empty"),
    ({"prompt": "   \n "}, "prompt", "must not be empty"),
    ({"prompt": 42}, "prompt", "must be text"),
    ({"prompt": "x" * 2001}, "prompt", "at most 2000 characters"),
    ({"prompt": "bell\x07"}, "prompt", "control characters"),
    ({"negative_prompt": "nul\x00"}, "negative_prompt", "control characters"),
    ({"negative_prompt": None}, "negative_prompt", "must be text"),
    ({"seed": -2}, "seed", "from -1 to 4294967295"),
    ({"seed": MAX_SEED + 1}, "seed", "from -1 to 4294967295"),
    ({"seed": 1.5}, "seed", "must be an integer"),
    ({"seed": True}, "seed", "must be an integer"),
    ({"seed": "7"}, "seed", "must be an integer"),
    ({"steps": 0}, "steps", "from 1 to 100"),
    ({"steps": 101}, "steps", "from 1 to 100"),
    ({"steps": math.nan}, "steps", "must be an integer"),
    ({"guidance_scale": -0.5}, "guidance_scale", "from 0 to 30"),
    ({"guidance_scale": 30.5}, "guidance_scale", "from 0 to 30"),
    ({"guidance_scale": math.nan}, "guidance_scale", "finite number"),
    ({"guidance_scale": math.inf}, "guidance_scale", "finite number"),
    ({"guidance_scale": False}, "guidance_scale", "finite number"),
    ({"width": 60}, "width", "from 64 to 1024"),
    ({"width": 1032}, "width", "from 64 to 1024"),
    ({"width": 100}, "width", "multiple of 8"),
    ({"height": 513}, "height", "multiple of 8"),
    ({"height": math.inf}, "height", "must be an integer"),
    ({"width": 1024, "height": 1024}, "width", "at most 65536 pixels"),
    ({"num_images": 0}, "num_images", "from 1 to 4"),
    ({"num_images": 5}, "num_images", "from 1 to 4"),
    ({"num_images": 2.5}, "num_images", "must be an integer"),
    ({"scheduler": "LMS Turbo"}, "scheduler", "must be one of"),
    ({"scheduler": None}, "scheduler", "must be one of"),
    ({"colour": "red"}, "colour", "not a known field"),
]


@pytest.mark.parametrize(("change", "field", "message"), BAD_INPUTS)
def test_bad_input_names_its_field(change: dict[str, Any], field: str, message: str) -> None:
    limits = RequestLimits(max_pixels=256 * 256)
    with pytest.raises(InvalidRequestError) as raised:
        check_inputs({**GOOD, **change}, limits=limits)
    assert raised.value.field == field
    assert str(raised.value).startswith(f"{field}: ")
    assert message in str(raised.value)


def test_defaults_and_random_seed() -> None:
    request = check_inputs({"prompt": "  a cat  "})
    assert request.prompt == "a cat"
    assert (request.steps, request.width, request.height, request.num_images) == (25, 512, 512, 1)
    assert 0 <= request.seed <= MAX_SEED
    other = check_inputs({"prompt": "a cat"})
    assert other.seed != request.seed  # two random 32-bit seeds collide with odds 2**-32


def test_integral_floats_are_accepted_as_integers() -> None:
    request = check_inputs({**GOOD, "steps": 3.0, "seed": 12.0})
    assert (request.steps, request.seed) == (3, 12)
    assert isinstance(request.steps, int)


def test_every_scheduler_name_is_accepted() -> None:
    for name in SCHEDULER_NAMES:
        assert check_inputs({**GOOD, "scheduler": name}).scheduler == name


def test_too_many_tokens_is_refused_not_truncated() -> None:
    budget = TokenBudget(limit=10, count=lambda text: len(text.split()) + 2)
    assert check_inputs({**GOOD, "prompt": "one two three"}, tokens=budget).prompt == "one two three"
    with pytest.raises(InvalidRequestError, match=r"prompt: is 14 tokens long but the model reads at most 10"):
        check_inputs({**GOOD, "prompt": " ".join(["word"] * 12)}, tokens=budget)
    with pytest.raises(InvalidRequestError, match="negative_prompt: is 14 tokens"):
        check_inputs({**GOOD, "negative_prompt": " ".join(["word"] * 12)}, tokens=budget)


def test_seeds_of_a_multi_image_request_wrap_at_the_top() -> None:
    request = check_inputs({**GOOD, "seed": MAX_SEED, "num_images": 3})
    assert request.seeds() == [MAX_SEED, 0, 1]
