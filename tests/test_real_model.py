"""Image quality needs real weights from the Hugging Face Hub: opt in with SD_TEST_REAL_MODEL=1."""

from __future__ import annotations

import os

import numpy as np
import pytest

from sd_pipeline.contract.request import check_inputs
from sd_pipeline.contract.settings import DEFAULT_MODEL, PipelineSettings
from sd_pipeline.model.engine import StepEngine
from sd_pipeline.model.loading import load_pipeline


@pytest.mark.real_weights
@pytest.mark.skipif(not os.environ.get("SD_TEST_REAL_MODEL"), reason="needs the real model from the Hub")
def test_default_model_draws_a_picture_not_noise() -> None:
    engine = StepEngine(load_pipeline(PipelineSettings(model=DEFAULT_MODEL)))
    request = check_inputs({"prompt": "a red apple on a white table, photo", "seed": 1, "steps": 20})
    result = engine.generate([request])[0][0]
    pixels = np.asarray(result.image, dtype=np.float32)
    # a photo of an apple: smooth regions (neighbouring pixels close) and a mostly bright background
    assert np.abs(np.diff(pixels, axis=1)).mean() < 12
    assert pixels.mean() > 100
