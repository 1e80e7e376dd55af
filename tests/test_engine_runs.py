"""The engine driven to the end (``run``, ``generate``): determinism, batching, cancel, samplers, OOM."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from harness.images import assert_same_image
from sd_pipeline.contract.errors import GenerationCancelledError, InvalidRequestError
from sd_pipeline.contract.jobs import GenerationResult
from sd_pipeline.contract.lifecycle import Request
from sd_pipeline.contract.request import TokenBudget, check_inputs
from sd_pipeline.model.engine import StepEngine
from sd_pipeline.model.schedulers import SCHEDULER_NAMES, scheduler_names

SMALL: dict[str, Any] = {"width": 64, "height": 64, "steps": 4, "guidance_scale": 7.5}


def pixels(result: GenerationResult) -> np.ndarray:
    return np.asarray(result.image, dtype=np.int16)


def test_same_seed_same_pixels_different_seed_different_image(engine: StepEngine) -> None:
    first, again, other = engine.generate(
        [check_inputs({"prompt": "a boat", "seed": s, **SMALL}) for s in (11, 11, 12)]
    )
    assert first[0].seed == 11 and other[0].seed == 12
    assert_same_image(first[0].image, again[0].image)  # two batch rows: equal within 1/255
    assert np.abs(pixels(first[0]) - pixels(other[0])).mean() > 5


def test_batch_gives_the_same_images_as_single_calls(engine: StepEngine) -> None:
    requests = [
        check_inputs({"prompt": "a boat", "seed": 1, "num_images": 2, **SMALL}),
        check_inputs({"prompt": "a tree", "negative_prompt": "blur", "seed": 99, **SMALL}),
    ]
    batched = engine.generate(requests)
    assert [r.timings.batch_images for rs in batched for r in rs] == [3, 3, 3]
    assert [r.seed for r in batched[0]] == [1, 2]
    alone = [engine.generate([request])[0] for request in requests]
    for batch_results, single_results in zip(batched, alone, strict=True):
        for in_batch, single in zip(batch_results, single_results, strict=True):
            assert_same_image(in_batch.image, single.image)


def test_different_sizes_step_in_separate_groups(engine: StepEngine) -> None:
    small = check_inputs({"prompt": "a", "seed": 1, **SMALL})
    wide = check_inputs({"prompt": "b", "seed": 1, **{**SMALL, "width": 96}})
    results = engine.generate([small, wide])
    assert [rs[0].image.size for rs in results] == [(64, 64), (96, 64)]
    assert [rs[0].timings.batch_images for rs in results] == [1, 1]


@pytest.mark.parametrize("scheduler", SCHEDULER_NAMES)
def test_each_scheduler_runs_and_is_deterministic(engine: StepEngine, scheduler: str) -> None:
    request = check_inputs({"prompt": "a hill", "seed": 5, "scheduler": scheduler, **SMALL})
    first, second = engine.generate([request, request])
    assert first[0].image.size == (64, 64)
    assert_same_image(first[0].image, second[0].image)  # same request in two batch rows
    assert pixels(first[0]).std() > 1


def test_cancel_stops_within_one_step(engine: StepEngine) -> None:
    steps_seen: list[int] = []
    job = Request(check_inputs({"prompt": "slow", **{**SMALL, "steps": 60}}))

    def on_step(step: int, total: int) -> None:
        steps_seen.append(step)
        if step == 2:
            job.cancel()

    job.on_step = on_step
    outcome = engine.run([job])[0]
    assert isinstance(outcome.error, GenerationCancelledError)
    assert outcome.results == []
    assert steps_seen == [1, 2]


def test_cancelling_one_job_keeps_the_other(engine: StepEngine) -> None:
    keep = Request(check_inputs({"prompt": "keep", "seed": 3, **SMALL}))
    drop = Request(check_inputs({"prompt": "drop", "seed": 4, **SMALL}))
    drop.cancel()
    kept, dropped = engine.run([keep, drop])
    assert len(kept.results) == 1 and kept.error is None
    assert isinstance(dropped.error, GenerationCancelledError)


def test_progress_reports_every_step(engine: StepEngine) -> None:
    seen: list[tuple[int, int]] = []
    job = Request(check_inputs({"prompt": "p", **SMALL}), on_step=lambda s, t: seen.append((s, t)))
    engine.run([job])
    assert seen == [(1, 4), (2, 4), (3, 4), (4, 4)]


def test_every_offered_sampler_name_builds_a_scheduler() -> None:
    assert scheduler_names() == SCHEDULER_NAMES  # the contract's names and the model's schedulers agree


def test_check_uses_the_model_token_limit(engine: StepEngine) -> None:
    # the tiny tokenizer has one token per character, 77 with start and end
    tokens = TokenBudget.of(engine.loaded.pipeline.tokenizer)
    assert check_inputs({"prompt": "x" * 75}, tokens=tokens).prompt == "x" * 75
    with pytest.raises(InvalidRequestError, match="prompt: is 78 tokens long but the model reads at most 77"):
        check_inputs({"prompt": "x" * 76}, tokens=tokens)


def test_warmup_on_the_cpu_runs_one_step(tiny_loaded: Any) -> None:
    calls: list[int] = []

    class Calls:
        def pipeline_call(self, *, seconds: float, images: int) -> None:
            calls.append(images)

        def denoising_step(self, *, seconds: float) -> None:
            return None

        def first_step_wait(self, *, seconds: float) -> None:
            return None

        def out_of_memory(self) -> None:
            raise AssertionError("no OOM on the CPU")

    StepEngine(tiny_loaded, observer=Calls()).warmup()
    assert calls == [1]


def test_out_of_memory_for_one_requests_images_runs_its_unet_batch_in_pieces(
    engine: StepEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    request = check_inputs({"prompt": "four at once", "seed": 8, "num_images": 4, **SMALL})
    (whole,) = engine.generate([request])
    unet = engine.loaded.pipeline.unet
    real_forward = unet.forward
    batch_sizes: list[int] = []

    def forward_with_memory_limit(sample: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        batch_sizes.append(sample.shape[0])
        if sample.shape[0] > 2:  # one guided image fits, not four (eight UNet samples)
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_forward(sample, *args, **kwargs)

    monkeypatch.setattr(unet, "forward", forward_with_memory_limit)
    (pieces,) = engine.generate([request])
    assert batch_sizes[:4] == [8, 4, 2, 2] and max(batch_sizes[4:]) == 2  # halved until it fitted, then kept
    for alone, split in zip(whole, pieces, strict=True):
        assert_same_image(alone.image, split.image)
