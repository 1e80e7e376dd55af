"""The step engine against diffusers' own pipeline call: alone, batched, joining mid-run, beside a cancel."""

from __future__ import annotations

import functools
from typing import Any

import pytest
import torch

from harness.images import assert_same_image, max_difference, pipeline_image
from sd_pipeline.contract.errors import GenerationCancelledError, OutOfMemoryError
from sd_pipeline.contract.jobs import JobOutcome
from sd_pipeline.contract.lifecycle import Request
from sd_pipeline.contract.request import GenerationRequest
from sd_pipeline.model.engine import StepEngine
from sd_pipeline.model.loading import LoadedPipeline
from sd_pipeline.model.schedulers import SCHEDULER_NAMES

BATCHED_TOLERANCE = 2  # levels of 255: the same request in a different batch (issue 13)


class Collector:
    """Jobs submitted to an engine and the outcomes they got."""

    def __init__(self, engine: StepEngine) -> None:
        self.engine = engine
        self.outcomes: dict[int, JobOutcome] = {}

    def submit(self, request: GenerationRequest) -> Request:
        job = Request(request)
        self.engine.submit(job, functools.partial(self.outcomes.__setitem__, id(job)))
        return job

    def images(self, job: Request) -> list[Any]:
        outcome = self.outcomes[id(job)]
        assert outcome.error is None, outcome.error
        return [result.image for result in outcome.results]


@pytest.fixture()
def engine(tiny_loaded: LoadedPipeline) -> StepEngine:
    return StepEngine(tiny_loaded, max_batch_images=8)


def request(**fields: Any) -> GenerationRequest:
    defaults: dict[str, Any] = {"prompt": "a red circle", "steps": 6, "width": 64, "height": 64, "seed": 7}
    return GenerationRequest(**{**defaults, **fields})


@pytest.mark.parametrize("scheduler", SCHEDULER_NAMES)
def test_a_request_alone_equals_the_pipeline_call(
    engine: StepEngine, tiny_loaded: LoadedPipeline, scheduler: str
) -> None:
    wanted = request(scheduler=scheduler, num_images=2, negative_prompt="blurry")
    collector = Collector(engine)
    job = collector.submit(wanted)
    engine.run_until_idle()
    got = collector.images(job)
    expected = pipeline_image(tiny_loaded, wanted)
    for ours, theirs in zip(got, expected, strict=True):
        assert_same_image(ours, theirs)
    # The comparison can fail: another seed gives another picture.
    other = pipeline_image(tiny_loaded, request(scheduler=scheduler, seed=8))[0]
    assert max_difference(got[0], other) > 10


def test_without_guidance_equals_the_pipeline_call(engine: StepEngine, tiny_loaded: LoadedPipeline) -> None:
    wanted = request(guidance_scale=1.0, scheduler="Euler")
    collector = Collector(engine)
    job = collector.submit(wanted)
    engine.run_until_idle()
    assert_same_image(collector.images(job)[0], pipeline_image(tiny_loaded, wanted)[0])
    guided = pipeline_image(tiny_loaded, request(guidance_scale=7.5, scheduler="Euler"))[0]
    assert max_difference(collector.images(job)[0], guided) > 10


@pytest.mark.parametrize("scheduler", SCHEDULER_NAMES)
def test_mixed_batch_and_late_joiner_each_equal_themselves_alone(
    engine: StepEngine, tiny_loaded: LoadedPipeline, scheduler: str
) -> None:
    """Different steps, guidance, samplers and sizes share steps; one joins after three steps."""
    first = request(scheduler=scheduler, steps=8)
    others = [
        request(scheduler="Euler a", steps=5, seed=3, guidance_scale=1.0, prompt="a blue square"),
        request(scheduler="DDIM", steps=7, seed=4, guidance_scale=4.0, width=64, height=96),
        request(scheduler=scheduler, steps=6, seed=5, num_images=2),
    ]
    late = request(scheduler=scheduler, steps=4, seed=6, prompt="a green triangle")
    collector = Collector(engine)
    jobs = [collector.submit(r) for r in [first, *others]]
    for _ in range(3):
        engine.step()
    jobs.append(collector.submit(late))
    engine.run_until_idle()
    for job, wanted in zip(jobs, [first, *others, late], strict=True):
        for ours, theirs in zip(collector.images(job), pipeline_image(tiny_loaded, wanted), strict=True):
            assert_same_image(ours, theirs, tolerance=BATCHED_TOLERANCE)


def test_a_short_request_finishes_while_a_long_one_runs(engine: StepEngine) -> None:
    collector = Collector(engine)
    long_job = collector.submit(request(steps=60))
    steps_seen: list[int] = []
    long_job.on_step = lambda step, total: steps_seen.append(step)
    for _ in range(2):
        engine.step()
    short_job = collector.submit(request(steps=6, seed=1))
    while id(short_job) not in collector.outcomes:
        engine.step()
    assert id(long_job) not in collector.outcomes
    assert steps_seen[-1] == 2 + 6  # the short one shared the long one's steps; nobody waited
    engine.run_until_idle()
    assert len(collector.images(long_job)) == 1


def test_a_cancelled_neighbour_leaves_at_the_next_step_and_changes_nothing(
    engine: StepEngine, tiny_loaded: LoadedPipeline
) -> None:
    kept = request(steps=8, scheduler="DPM++ 2M Karras")
    collector = Collector(engine)
    kept_job = collector.submit(kept)
    doomed = collector.submit(request(steps=8, seed=99, num_images=3))
    doomed_steps: list[int] = []
    doomed.on_step = lambda step, total: doomed_steps.append(step)
    for _ in range(3):
        engine.step()
    doomed.cancel()
    engine.step()
    error = collector.outcomes[id(doomed)].error
    assert isinstance(error, GenerationCancelledError)
    assert doomed_steps == [1, 2, 3]
    engine.run_until_idle()
    assert_same_image(collector.images(kept_job)[0], pipeline_image(tiny_loaded, kept)[0], tolerance=BATCHED_TOLERANCE)


def test_admission_stops_at_the_image_budget(tiny_loaded: LoadedPipeline) -> None:
    engine = StepEngine(tiny_loaded, max_batch_images=3)
    collector = Collector(engine)
    batches: list[int] = []

    class Observer:
        def pipeline_call(self, *, seconds: float, images: int) -> None:
            batches.append(images)

        def denoising_step(self, *, seconds: float) -> None:
            return None

        def first_step_wait(self, *, seconds: float) -> None:
            return None

        def out_of_memory(self) -> None:
            return None

    engine.observer = Observer()
    jobs = [collector.submit(request(steps=3, seed=seed, num_images=2)) for seed in range(3)]
    engine.run_until_idle()
    assert batches == [2] * 9  # two 2-image requests exceed 3 images, so they take turns
    assert all(len(collector.images(job)) == 2 for job in jobs)


def test_out_of_memory_splits_the_group_and_then_fails_only_one_request(
    engine: StepEngine, tiny_loaded: LoadedPipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    unet = tiny_loaded.pipeline.unet
    real_forward = unet.forward
    samples: list[int] = []

    def forward_with_memory_limit(sample: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        samples.append(sample.shape[0])
        if sample.shape[0] > 2:  # one guided image (2 samples) fits
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_forward(sample, *args, **kwargs)

    monkeypatch.setattr(unet, "forward", forward_with_memory_limit)
    wanted = [request(seed=seed, steps=3) for seed in range(3)]
    collector = Collector(engine)
    jobs = [collector.submit(r) for r in wanted]
    engine.run_until_idle()
    assert samples[:5] == [6, 2, 4, 2, 2]  # the group, then halves, then halves of the half
    monkeypatch.setattr(unet, "forward", real_forward)
    for job, r in zip(jobs, wanted, strict=True):
        assert_same_image(collector.images(job)[0], pipeline_image(tiny_loaded, r)[0], tolerance=BATCHED_TOLERANCE)

    def always_out_of_memory(sample: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(unet, "forward", always_out_of_memory)
    failing = collector.submit(request())
    engine.run_until_idle()
    error = collector.outcomes[id(failing)].error
    assert isinstance(error, OutOfMemoryError) and "out of GPU memory generating 64x64 images" in str(error)
