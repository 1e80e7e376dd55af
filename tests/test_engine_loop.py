"""The engine loop both backends run: jobs from other threads, a stop that finishes them, failures and stalls."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from harness.servers import wait_until
from sd_pipeline.backends.engine_loop import EngineLoop
from sd_pipeline.backends.stall import StallWatch
from sd_pipeline.contract.errors import WorkerLostError
from sd_pipeline.contract.jobs import JobOutcome, coalesced_steps
from sd_pipeline.contract.lifecycle import Request
from sd_pipeline.contract.request import check_inputs
from sd_pipeline.model.engine import StepEngine
from sd_pipeline.model.failures import DeviceFailedError

SMALL: dict[str, Any] = {"width": 64, "height": 64, "steps": 3}


def job(name: str) -> Request:
    return Request(check_inputs({"prompt": name, **SMALL}))


def test_jobs_from_another_thread_are_served_and_a_stop_finishes_them(engine: StepEngine) -> None:
    loop = EngineLoop(engine)
    outcomes: list[JobOutcome] = []
    runner = threading.Thread(target=loop.run)
    runner.start()
    for name in ("a", "b"):
        loop.submit(job(name), outcomes.append)
    loop.stop()
    runner.join(timeout=60)
    assert not runner.is_alive() and loop.failure is None and loop.health_problem() is None
    assert [len(outcome.results) for outcome in outcomes] == [1, 1]


@pytest.mark.parametrize(
    ("error", "reported"),
    [
        (RuntimeError("a bug"), "the step engine failed: RuntimeError: a bug"),
        (DeviceFailedError("the accelerator failed and needs a new process"), "needs a new process"),
    ],
)
def test_a_failing_engine_ends_the_loop_and_its_jobs_are_answered_only_when_asked(
    engine: StepEngine, monkeypatch: pytest.MonkeyPatch, error: Exception, reported: str
) -> None:
    def broken() -> None:
        raise error

    monkeypatch.setattr(engine, "step", broken)
    loop = EngineLoop(engine)
    outcomes: list[JobOutcome] = []
    loop.submit(job("held"), outcomes.append)
    loop.run()  # returns: the worker process then exits, a replica fails its health check
    assert loop.failure is not None and reported in loop.failure
    assert loop.health_problem() == loop.failure and outcomes == []
    lost = WorkerLostError("died", "a pipeline replica stopped serving")
    loop.fail_held(lost)  # what a replica does, so its calls end and are retried elsewhere
    loop.submit(job("late"), outcomes.append)  # a call that still arrives is answered at once
    assert [outcome.error for outcome in outcomes] == [lost, lost]


def test_an_engine_with_work_and_no_step_is_reported_stalled(
    engine: StepEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    release = threading.Event()
    real_step = engine.step

    def stuck() -> None:
        release.wait(timeout=30)  # a hung device call, until the test releases it
        real_step()

    monkeypatch.setattr(engine, "step", stuck)
    loop = EngineLoop(engine, stall=StallWatch(0.2))
    assert loop.health_problem() is None  # idle is never stalled
    runner = threading.Thread(target=loop.run)
    runner.start()
    loop.submit(job("stuck"), lambda outcome: None)
    wait_until(lambda: loop.health_problem() is not None, timeout=30)  # 0.2 s without a step, while work is held
    problem = loop.health_problem()
    release.set()
    loop.stop()
    runner.join(timeout=30)
    assert problem is not None and "made no progress" in problem
    assert not runner.is_alive() and loop.health_problem() is None  # stepping again: no longer stalled


def test_step_reports_crossing_a_boundary_are_the_first_the_last_and_one_per_interval() -> None:
    now = [0.0]
    sent: list[tuple[int, int]] = []
    report = coalesced_steps(lambda step, total: sent.append((step, total)), interval=0.2, clock=lambda: now[0])
    for step in range(1, 26):  # 25 steps of 62.5 ms (exact in binary)
        now[0] = step * 0.0625
        report(step, 25)
    steps = [step for step, _ in sent]
    assert steps[0] == 1 and steps[-1] == 25
    assert steps == [1, 5, 9, 13, 17, 21, 25]  # one per 0.2 s in between: every 4th step of 62.5 ms
    # A slow model: every step is reported.
    sent.clear()
    for step in range(1, 6):
        now[0] = 10 + step * 0.5
        report(step, 5)
    assert [step for step, _ in sent] == [1, 2, 3, 4, 5]


def test_a_stall_is_work_held_with_no_step_and_only_that() -> None:
    """The one definition both backends use (the worker's supervisor and every Ray replica)."""
    now = [0.0]
    watch = StallWatch(10.0, clock=lambda: now[0])
    now[0] = 100.0
    assert watch.problem() is None  # idle for 100 s: not a stall
    watch.holding(True)  # work arrives: the clock starts now, not at the last step
    now[0] = 109.0
    assert watch.problem() is None
    watch.stepped()
    now[0] = 118.0
    assert watch.problem() is None  # 9 s since the last step
    now[0] = 120.0
    problem = watch.problem()
    assert problem is not None and "no progress for 11s while it held work (limit 10s)" in problem
    watch.holding(False)
    assert watch.problem() is None
