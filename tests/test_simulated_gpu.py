"""The simulated accelerator (SD_SIMULATED_GPU): its timing model, its settings, and that it changes no picture."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import torch

from harness.images import assert_same_image, max_difference
from sd_pipeline.contract.request import GenerationRequest
from sd_pipeline.contract.settings import PipelineSettings
from sd_pipeline.contract.simulation import PRESETS, CallCost, SimulatedAccelerator
from sd_pipeline.model.engine import StepEngine
from sd_pipeline.model.loading import LoadedPipeline, load_pipeline
from sd_pipeline.model.simulated import paced
from webapp.settings import SettingsError, load_settings


def test_the_cost_model_reads_fixed_and_per_image_terms() -> None:
    model = SimulatedAccelerator.parse(" unet = 30 + 1.5*n , vae=12 * n ")
    assert model.unet == CallCost(fixed_ms=30, per_image_ms=1.5)
    assert model.vae == CallCost(fixed_ms=0, per_image_ms=12)
    assert model.unet.seconds(2) == pytest.approx(0.033)
    assert model.unet.seconds(16) == pytest.approx(0.054)
    assert model.vae.seconds(4) == pytest.approx(0.048)
    assert SimulatedAccelerator.parse("unet=5").vae.seconds(8) == 0  # the VAE unmodelled: its real time


def test_the_h200_preset_matches_the_measured_table() -> None:
    """docs/BENCHMARKS.md, H200 mode a: 28.9 / 24.0 / 20.0 UNet it/s at batch 1 / 4 / 8 with guidance."""
    model = SimulatedAccelerator.parse("h200")
    assert model.spec == PRESETS["h200"]
    for batch, iterations_per_second in ((1, 28.9), (4, 24.0), (8, 20.0)):
        assert model.unet.seconds(2 * batch) == pytest.approx(1 / iterations_per_second, rel=0.03)


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("vae=3*n", "needs at least unet"),
        ("unet=3*m", "each term is milliseconds"),
        ("unet=3,unet=4", "given twice"),
        ("gpu=3", "expected unet=... or vae="),
        ("unet=-3", "each term is milliseconds"),
    ],
)
def test_a_bad_cost_model_is_refused_saying_why(text: str, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        SimulatedAccelerator.parse(text)
    with pytest.raises(SettingsError, match="SD_SIMULATED_GPU"):
        load_settings([], env={"SD_SIMULATED_GPU": text})


class FakeClock:
    """A clock that the wrapped call and the sleep move forward."""

    def __init__(self) -> None:
        self.now = 100.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def test_a_call_sleeps_what_is_left_of_its_modelled_time() -> None:
    clock = FakeClock()
    seen: list[Any] = []

    def module(sample: torch.Tensor, *, taking: float) -> str:
        seen.append(sample.shape)
        clock.now += taking
        return "output"

    call = paced(module, CallCost(fixed_ms=30, per_image_ms=2), clock=clock, sleep=clock.sleep)
    assert call(torch.zeros(4, 4, 8, 8), taking=0.010) == "output"
    assert clock.slept == [pytest.approx(0.030 + 0.008 - 0.010)]
    assert clock.now == pytest.approx(100.038)  # the call lasted exactly the modelled 38 ms
    # A call slower than the model is never made slower still.
    call(torch.zeros(1, 4, 8, 8), taking=0.050)
    assert len(clock.slept) == 1
    assert seen == [(4, 4, 8, 8), (1, 4, 8, 8)]


def test_the_replicas_of_a_simulated_accelerator_ask_ray_for_nothing() -> None:
    settings = load_settings([], env={"SD_SIMULATED_GPU": "h200", "RAY_ADDRESS": "local", "RAY_REPLICAS": "8"})
    options = settings.replica_plan().deployment_options(gpus_per_replica=0)
    assert options["ray_actor_options"] == {"num_cpus": 0, "num_gpus": 0}
    assert settings.replica_pipeline().simulation() == SimulatedAccelerator.parse("h200")
    real = load_settings([], env={"RAY_ADDRESS": "local"})
    assert real.replica_plan().deployment_options(gpus_per_replica=0)["ray_actor_options"]["num_cpus"] == 1


@pytest.fixture(scope="module")
def simulated_loaded(tiny_model_dir: Path) -> LoadedPipeline:
    settings = PipelineSettings(model=str(tiny_model_dir), device="cpu", simulated_gpu="unet=4+0.5*n,vae=3*n")
    return load_pipeline(settings)


def test_a_simulated_run_changes_no_picture_and_says_so(
    tiny_loaded: LoadedPipeline, simulated_loaded: LoadedPipeline
) -> None:
    requests = [
        GenerationRequest(prompt="a red circle", steps=5, width=64, height=64, seed=3, num_images=2),
        GenerationRequest(prompt="a blue square", steps=4, width=64, height=64, seed=4, guidance_scale=1.0),
    ]
    real = StepEngine(tiny_loaded, max_batch_images=8).generate(requests)
    simulated = StepEngine(simulated_loaded, max_batch_images=8).generate(requests)
    for ours, theirs in zip(simulated, real, strict=True):
        for image, expected in zip(ours, theirs, strict=True):
            assert_same_image(image.image, expected.image, tolerance=1)
    assert max_difference(simulated[0][0].image, simulated[1][0].image) > 10  # the comparison can fail
    assert simulated_loaded.describe().simulated == "unet=4+0.5*n,vae=3*n"
    assert tiny_loaded.describe().simulated == ""


def test_a_simulated_pipeline_says_so_in_the_log_at_load(
    tiny_model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = PipelineSettings(model=str(tiny_model_dir), device="cpu", simulated_gpu="unet=1+0*n,vae=1*n")
    with caplog.at_level(logging.WARNING, logger="sd_pipeline.model.simulated"):
        load_pipeline(settings)
    warnings = [record for record in caplog.records if record.levelno == logging.WARNING]
    assert any("SIMULATED ACCELERATOR (SD_SIMULATED_GPU=unet=1+0*n,vae=1*n)" in r.getMessage() for r in warnings)


def test_a_simulated_call_lasts_at_least_the_modelled_time(simulated_loaded: LoadedPipeline) -> None:
    """Ordering, not speed: the modelled time is a floor the real call cannot go under."""
    import time

    unet = simulated_loaded.pipeline.unet
    sample = torch.zeros(6, 4, 8, 8)
    context = torch.zeros(6, 77, unet.config.cross_attention_dim)
    started = time.perf_counter()
    with torch.no_grad():
        unet(sample, torch.tensor([10] * 6), encoder_hidden_states=context)
    assert time.perf_counter() - started >= 0.004 + 0.0005 * 6
