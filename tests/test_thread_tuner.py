"""The worker's CPU thread policy: per kind of step, the thread count that measures faster."""

from __future__ import annotations

import itertools
import os

import pytest
import torch

from harness.images import assert_same_image
from sd_pipeline.contract.request import GenerationRequest
from sd_pipeline.model.engine import StepEngine
from sd_pipeline.model.loading import LoadedPipeline
from sd_pipeline.model.threads import ThreadTuner, samples_bucket
from webapp.settings import load_settings


def run_steps(tuner: ThreadTuner, kind: object, count: int, cost: dict[int, float]) -> list[int]:
    """``count`` steps of one kind whose time depends on the thread count as ``cost`` says."""
    used = []
    for _ in range(count):
        threads = tuner.before_step(kind)
        tuner.after_step(cost[threads])
        used.append(threads)
    return used


def test_it_tries_each_count_then_keeps_the_faster_and_still_looks_now_and_then() -> None:
    applied: list[int] = []
    tuner = ThreadTuner([1, 2], set_threads=applied.append, explore_every=10, trials=2)
    used = run_steps(tuner, "lone", 100, {1: 0.080, 2: 0.048})
    assert sorted(used[:4]) == [1, 1, 2, 2]  # each tried twice first
    assert tuner.best("lone") == 2
    assert used[4:].count(2) >= 80 and 1 in used[4:]  # mostly the faster, with a look at the other
    assert applied[-1] == used[-1] and all(a != b for a, b in itertools.pairwise(applied))


def test_each_kind_of_step_has_its_own_choice_and_the_choice_follows_the_load() -> None:
    tuner = ThreadTuner([1, 2], set_threads=lambda n: None, explore_every=5, trials=1)
    run_steps(tuner, "alone", 30, {1: 0.080, 2: 0.048})
    run_steps(tuner, "batch of 8", 30, {1: 0.150, 2: 0.200})  # all cores stall under load
    assert (tuner.best("alone"), tuner.best("batch of 8")) == (2, 1)
    run_steps(tuner, "alone", 100, {1: 0.080, 2: 0.120})  # the server got busy: two threads now stall
    assert tuner.best("alone") == 1


def test_one_count_is_no_choice() -> None:
    with pytest.raises(ValueError, match="at least two"):
        ThreadTuner([2, 2], set_threads=lambda n: None)


def test_the_worker_measures_unless_threads_are_set_and_replicas_never_do(monkeypatch: pytest.MonkeyPatch) -> None:
    for cores, choices in ((1, ()), (2, (1, 2)), (8, (7, 8))):  # one core: nothing to choose
        monkeypatch.setattr(os, "cpu_count", lambda cores=cores: cores)
        assert load_settings([], env={}).pipeline().cpu_thread_choices == choices, cores
    monkeypatch.undo()
    assert load_settings([], env={"SD_CPU_THREADS": "3"}).pipeline().cpu_thread_choices == ()
    ray = load_settings([], env={"RAY_ADDRESS": "local"})
    assert ray.replica_pipeline().cpu_thread_choices == ()


def test_switching_threads_between_steps_changes_no_picture(tiny_loaded: LoadedPipeline) -> None:
    requests = [
        GenerationRequest(prompt="a red circle", steps=8, width=64, height=64, seed=1, num_images=2),
        GenerationRequest(prompt="a blue square", steps=6, width=64, height=64, seed=2),
    ]
    saved = torch.get_num_threads()
    applied: list[int] = []

    def set_threads(count: int) -> None:
        applied.append(count)
        torch.set_num_threads(count)

    try:
        plain = StepEngine(tiny_loaded).generate(requests)
        tuner = ThreadTuner([1, 2], set_threads=set_threads, explore_every=2, trials=1)
        switching = StepEngine(tiny_loaded, threads=tuner).generate(requests)
    finally:
        torch.set_num_threads(saved)
    assert set(applied) == {1, 2}
    for ours, theirs in zip(switching, plain, strict=True):
        for image, expected in zip(ours, theirs, strict=True):
            assert_same_image(image.image, expected.image, tolerance=1)


def test_steps_are_grouped_by_their_unet_batch_rounded_up_to_a_power_of_two() -> None:
    assert [samples_bucket(n) for n in (1, 2, 3, 4, 5, 8, 9, 16)] == [1, 2, 4, 4, 8, 8, 16, 16]


def test_one_slow_step_does_not_flip_the_choice() -> None:
    tuner = ThreadTuner([1, 2], set_threads=lambda n: None, explore_every=10, trials=2)
    run_steps(tuner, "alone", 20, {1: 0.080, 2: 0.048})
    run_steps(tuner, "alone", 1, {1: 0.080, 2: 0.500})  # the web server took the core this once
    assert tuner.best("alone") == 2
    assert run_steps(tuner, "alone", 8, {1: 0.080, 2: 0.048}) == [2] * 8
