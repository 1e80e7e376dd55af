"""The pipeline in its own process: same images as in-process, progress, cancel, facts, errors."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from harness.images import assert_same_image
from sd_pipeline.backends.local.process import PipelineProcess
from sd_pipeline.contract.errors import GenerationCancelledError, ModelLoadError
from sd_pipeline.contract.lifecycle import Request
from sd_pipeline.contract.request import check_inputs
from sd_pipeline.contract.settings import PipelineSettings
from sd_pipeline.model.engine import StepEngine
from tests.running import run_on_worker

SMALL: dict[str, Any] = {"width": 64, "height": 64, "steps": 4}


class RecordingObserver:
    def __init__(self) -> None:
        self.calls: list[int] = []
        self.steps = 0

    def pipeline_call(self, *, seconds: float, images: int) -> None:
        self.calls.append(images)

    def denoising_step(self, *, seconds: float) -> None:
        self.steps += 1

    def first_step_wait(self, *, seconds: float) -> None:
        return None

    def out_of_memory(self) -> None:
        raise AssertionError("no OOM on the CPU")

    def gpu_memory(self, *, allocated: int, reserved: int) -> None:
        raise AssertionError("no GPU memory on the CPU")


@pytest.fixture(scope="module")
def worker(tiny_model_dir: Path) -> Iterator[tuple[PipelineProcess, RecordingObserver]]:
    observer = RecordingObserver()
    settings = PipelineSettings(model=str(tiny_model_dir), device="cpu", warmup=True)
    process = PipelineProcess(settings, observer=observer)
    info = process.start()
    assert (info.model, info.device, info.dtype) == (tiny_model_dir.name, "cpu", "float32")
    assert info.warmup_seconds is not None and info.warmup_seconds > 0  # the worker warmed up before "ready"
    yield process, observer
    process.close()


def test_worker_images_match_in_process_ones(
    worker: tuple[PipelineProcess, RecordingObserver], engine: StepEngine
) -> None:
    process, observer = worker
    requests = [check_inputs({"prompt": "a barn", "seed": seed, **SMALL}) for seed in (3, 4)]
    calls_before = len(observer.calls)
    outcomes = run_on_worker(process, [Request(request) for request in requests])
    in_process = engine.generate(requests)
    for outcome, expected in zip(outcomes, in_process, strict=True):
        assert outcome.error is None
        assert_same_image(outcome.results[0].image, expected[0].image)  # other process, other thread count
    # each request is its own Submit: the second joins the first's batch at once or at its next step
    assert max(observer.calls[calls_before:]) == 2 and observer.steps >= 4  # images per step: they shared steps


def test_worker_relays_progress(worker: tuple[PipelineProcess, RecordingObserver]) -> None:
    process, _ = worker
    seen: list[tuple[int, int]] = []
    job = Request(check_inputs({"prompt": "steps", **SMALL}), on_step=lambda s, t: seen.append((s, t)))
    run_on_worker(process, [job])
    assert seen == [(1, 4), (2, 4), (3, 4), (4, 4)]


def test_worker_cancel_stops_within_a_step(worker: tuple[PipelineProcess, RecordingObserver]) -> None:
    process, _ = worker
    steps: list[int] = []
    job = Request(check_inputs({"prompt": "long", **{**SMALL, "steps": 80, "width": 256, "height": 256}}))

    def on_step(step: int, total: int) -> None:
        steps.append(step)
        if step == 3:
            job.cancel()

    job.on_step = on_step
    (outcome,) = run_on_worker(process, [job])
    assert isinstance(outcome.error, GenerationCancelledError)
    assert max(steps) < 20  # cancelled at 3: relayed over the pipe, honoured long before step 80
    after = run_on_worker(process, [Request(check_inputs({"prompt": "next", **SMALL}))])  # the worker keeps serving
    assert after[0].error is None and len(after[0].results) == 1


def test_a_run_from_another_thread_joins_the_running_batch(
    worker: tuple[PipelineProcess, RecordingObserver],
) -> None:
    process, _ = worker
    long_job = Request(check_inputs({"prompt": "long", **{**SMALL, "steps": 60}}))
    short_job = Request(check_inputs({"prompt": "short", **SMALL}))
    long_steps: list[int] = []
    started = threading.Event()

    def on_long_step(step: int, total: int) -> None:
        long_steps.append(step)
        if step == 2:
            started.set()

    long_job.on_step = on_long_step
    long_run = threading.Thread(target=run_on_worker, args=(process, [long_job]))
    long_run.start()
    assert started.wait(timeout=60)
    (short,) = run_on_worker(process, [short_job])
    short_done_at = long_steps[-1]
    long_run.join(timeout=120)
    assert short.error is None and len(short.results) == 1
    assert short_done_at < 60  # it finished while the long one was still running


def test_worker_reports_a_missing_model(tmp_path: Path) -> None:
    process = PipelineProcess(PipelineSettings(model=str(tmp_path / "missing"), device="cpu"))
    with pytest.raises(ModelLoadError, match="no such folder"):
        process.start()
    process.close()


def test_malformed_messages_are_refused_both_ways_and_the_worker_keeps_serving(
    worker: tuple[PipelineProcess, RecordingObserver], caplog: pytest.LogCaptureFixture
) -> None:
    process, _ = worker
    with process._send_lock:  # down the pipe: the old tagged tuples, a submit with no id, a step
        for junk in (("run", [(0, "prompt", False)]), {"kind": "submit", "id": "", "inputs": {}}, {"kind": "step"}):
            process._connection.send(junk)
    process._relay({"kind": "step", "id": "x", "step": -1, "total": 0})  # up: refused by the app's side
    process._relay({"kind": "submit", "id": "x", "inputs": {"prompt": "p"}})  # a message that cannot come up
    assert "malformed message (step.step" in caplog.text and "a submit message cannot come now" in caplog.text
    (after,) = run_on_worker(process, [Request(check_inputs({"prompt": "still here", **SMALL}))])
    assert after.error is None and len(after.results) == 1
    assert process.is_alive()
