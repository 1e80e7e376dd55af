"""Generation on the tiny pipeline: determinism, batching, cancel, schedulers, OOM retry."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from sd_pipeline.errors import GenerationCancelledError, InvalidRequestError, OutOfMemoryError
from sd_pipeline.generator import GenerationJob, GenerationResult, Generator
from sd_pipeline.request import check_inputs
from sd_pipeline.schedulers import SCHEDULER_NAMES
from tests.images import assert_same_image

SMALL: dict[str, Any] = {"width": 64, "height": 64, "steps": 4, "guidance_scale": 7.5}


def pixels(result: GenerationResult) -> np.ndarray:
    return np.asarray(result.image, dtype=np.int16)


def test_same_seed_same_pixels_different_seed_different_image(generator: Generator) -> None:
    first, again, other = generator.generate(
        [check_inputs({"prompt": "a boat", "seed": s, **SMALL}) for s in (11, 11, 12)]
    )
    assert first[0].seed == 11 and other[0].seed == 12
    assert_same_image(first[0].image, again[0].image)  # two batch rows: equal within 1/255
    assert np.abs(pixels(first[0]) - pixels(other[0])).mean() > 5


def test_batch_gives_the_same_images_as_single_calls(generator: Generator) -> None:
    requests = [
        check_inputs({"prompt": "a boat", "seed": 1, "num_images": 2, **SMALL}),
        check_inputs({"prompt": "a tree", "negative_prompt": "blur", "seed": 99, **SMALL}),
    ]
    batched = generator.generate(requests)
    assert [r.timings.batch_images for rs in batched for r in rs] == [3, 3, 3]
    assert [r.seed for r in batched[0]] == [1, 2]
    alone = [generator.generate([request])[0] for request in requests]
    for batch_results, single_results in zip(batched, alone, strict=True):
        for in_batch, single in zip(batch_results, single_results, strict=True):
            assert_same_image(in_batch.image, single.image)


def test_incompatible_requests_run_in_separate_calls(generator: Generator) -> None:
    small = check_inputs({"prompt": "a", "seed": 1, **SMALL})
    wide = check_inputs({"prompt": "b", "seed": 1, **{**SMALL, "width": 96}})
    results = generator.generate([small, wide])
    assert [rs[0].image.size for rs in results] == [(64, 64), (96, 64)]
    assert [rs[0].timings.batch_images for rs in results] == [1, 1]


def test_max_batch_images_splits_large_groups(tiny_loaded: Any) -> None:
    generator = Generator(tiny_loaded, max_batch_images=2)
    results = generator.generate([check_inputs({"prompt": "x", "num_images": 3, **SMALL})])
    assert [r.timings.batch_images for r in results[0]] == [2, 2, 1]


@pytest.mark.parametrize("scheduler", SCHEDULER_NAMES)
def test_each_scheduler_runs_and_is_deterministic(generator: Generator, scheduler: str) -> None:
    request = check_inputs({"prompt": "a hill", "seed": 5, "scheduler": scheduler, **SMALL})
    first, second = generator.generate([request, request])
    assert first[0].image.size == (64, 64)
    assert_same_image(first[0].image, second[0].image)  # same request in two batch rows
    assert pixels(first[0]).std() > 1


def test_cancel_stops_within_one_step(generator: Generator) -> None:
    steps_seen: list[int] = []
    job = GenerationJob(check_inputs({"prompt": "slow", **{**SMALL, "steps": 60}}))

    def on_step(step: int, total: int) -> None:
        steps_seen.append(step)
        if step == 2:
            job.cancel()

    job.on_step = on_step
    outcome = generator.run([job])[0]
    assert isinstance(outcome.error, GenerationCancelledError)
    assert outcome.results == []
    assert steps_seen == [1, 2]


def test_cancelling_one_job_keeps_the_other(generator: Generator) -> None:
    keep = GenerationJob(check_inputs({"prompt": "keep", "seed": 3, **SMALL}))
    drop = GenerationJob(check_inputs({"prompt": "drop", "seed": 4, **SMALL}))
    drop.cancel()
    kept, dropped = generator.run([keep, drop])
    assert len(kept.results) == 1 and kept.error is None
    assert isinstance(dropped.error, GenerationCancelledError)


def test_progress_reports_every_step(generator: Generator) -> None:
    seen: list[tuple[int, int]] = []
    job = GenerationJob(check_inputs({"prompt": "p", **SMALL}), on_step=lambda s, t: seen.append((s, t)))
    generator.run([job])
    assert seen == [(1, 4), (2, 4), (3, 4), (4, 4)]


def test_out_of_memory_retries_in_smaller_pieces(generator: Generator, monkeypatch: pytest.MonkeyPatch) -> None:
    unet = generator.loaded.pipeline.unet
    real_forward = unet.forward
    batch_sizes: list[int] = []

    def forward_with_memory_limit(sample: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        batch_sizes.append(sample.shape[0])
        if sample.shape[0] > 2:  # classifier-free guidance doubles the batch: one image fits
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_forward(sample, *args, **kwargs)

    monkeypatch.setattr(unet, "forward", forward_with_memory_limit)
    requests = [check_inputs({"prompt": f"p{i}", "seed": i, **SMALL}) for i in range(3)]
    results = generator.generate(requests)
    assert [rs[0].timings.batch_images for rs in results] == [1, 1, 1]
    assert max(batch_sizes) == 6 and batch_sizes[-1] == 2

    def always_out_of_memory(sample: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(unet, "forward", always_out_of_memory)
    with pytest.raises(OutOfMemoryError, match="out of GPU memory generating one 64x64 image"):
        generator.generate([requests[0]])
    monkeypatch.setattr(unet, "forward", real_forward)
    assert generator.generate([requests[0]])[0][0].image.size == (64, 64)


def test_check_uses_the_model_token_limit(generator: Generator) -> None:
    # the tiny tokenizer has one token per character, 77 with start and end
    assert generator.check({"prompt": "x" * 75}).prompt == "x" * 75
    with pytest.raises(InvalidRequestError, match="prompt: is 78 tokens long but the model reads at most 77"):
        generator.check({"prompt": "x" * 76})


def test_warmup_runs_one_pipeline_call(tiny_loaded: Any) -> None:
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

    Generator(tiny_loaded, observer=Calls()).warmup()
    assert calls == [1]
