"""The local backend: real worker processes killed, stopped and crash-looped, under admission's retry rule."""

from __future__ import annotations

import functools
import logging
import os
import re
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from harness.images import assert_same_image
from harness.servers import wait_until
from sd_pipeline.admission import CRASHED_TWICE, Admission
from sd_pipeline.backends.local import supervisor
from sd_pipeline.backends.local.process import PipelineProcess
from sd_pipeline.backends.local.supervisor import LocalBackend
from sd_pipeline.contract.backend import BackendInfo
from sd_pipeline.contract.errors import GenerationCancelledError, InvalidRequestError, WorkerCrashedError
from sd_pipeline.contract.lifecycle import Request
from sd_pipeline.contract.plans import RestartPolicy
from sd_pipeline.contract.request import check_inputs
from sd_pipeline.contract.settings import PipelineSettings
from tests.running import dispatcher, run_through

LONG: dict[str, Any] = {"width": 128, "height": 128, "steps": 40, "seed": 21}
STALL_SECONDS = 3.0


class RecordingObserver:
    def __init__(self) -> None:
        self.restarts: list[str] = []
        self.up: list[bool] = []

    def worker_restarted(self, *, reason: str) -> None:
        self.restarts.append(reason)

    def worker_up(self, *, up: bool) -> None:
        self.up.append(up)


# Real worker processes on the tiny model.
@pytest.fixture(scope="module")
def supervised(tiny_model_dir: Path) -> Iterator[tuple[LocalBackend, RecordingObserver]]:
    """The backend; its requests go through ``admitted`` (admission holds the retry rule)."""
    observer = RecordingObserver()
    policy = RestartPolicy(stall_seconds=STALL_SECONDS, max_restarts=100)
    settings = PipelineSettings(model=str(tiny_model_dir), device="cpu", cpu_threads=1)
    new_worker = functools.partial(PipelineProcess, stall_seconds=policy.stall_seconds)
    worker = LocalBackend(settings, new_worker, policy=policy, observer=observer)
    worker.start()
    _dispatchers[worker] = dispatcher(worker)
    yield worker, observer
    worker.close()


_dispatchers: dict[LocalBackend, Admission] = {}


def run(worker: LocalBackend, requests: list[Request]) -> list[Any]:
    """Through the app's one dispatcher, as the service runs requests."""
    return run_through(_dispatchers[worker], requests)


def signal_at_step(worker: LocalBackend, signum: int, *, at_step: int = 3) -> tuple[Request, list[int]]:
    """A long job whose worker gets ``signum`` once it reports ``at_step`` (the first time only)."""
    steps: list[int] = []
    sent = threading.Event()

    def on_step(step: int, total: int) -> None:
        steps.append(step)
        if step == at_step and not sent.is_set():
            sent.set()
            pid = worker.pid
            assert pid is not None
            os.kill(pid, signum)

    return Request(worker.check({"prompt": "a long one", **LONG}), on_step=on_step), steps


def test_a_killed_worker_is_replaced_and_its_request_still_gets_its_image(
    supervised: tuple[LocalBackend, RecordingObserver],
) -> None:
    worker, observer = supervised
    (reference,) = run(worker, [job_for(worker)])
    first_pid, restarts_before = worker.pid, len(observer.restarts)
    killed, steps = signal_at_step(worker, signal.SIGKILL)
    (outcome,) = run(worker, [killed])
    assert outcome.error is None, outcome.error
    assert worker.pid != first_pid and observer.restarts[restarts_before:] == ["died"]
    assert steps.count(1) == 2 and steps[-1] == LONG["steps"]  # progress restarted on the new worker
    assert_same_image(outcome.results[0].image, reference.results[0].image)  # the same image, retried
    assert worker.readiness_problem() is None and worker.liveness_problem() is None
    assert observer.up[-2:] == [False, True]


def test_the_backend_validates_with_the_models_tokenizer_in_this_process(
    supervised: tuple[LocalBackend, RecordingObserver],
) -> None:
    worker, _ = supervised
    assert worker.check({"prompt": "x" * 75}).prompt == "x" * 75  # 77 tokens with start and end
    with pytest.raises(InvalidRequestError, match="prompt: is 78 tokens long but the model reads at most 77"):
        worker.check({"prompt": "x" * 76})
    assert worker.max_running == 8


def job_for(worker: LocalBackend) -> Request:
    return Request(worker.check({"prompt": "a long one", **LONG}))


def test_a_stalled_worker_is_killed_after_the_stall_timeout_and_replaced(
    supervised: tuple[LocalBackend, RecordingObserver],
) -> None:
    worker, observer = supervised
    restarts_before, first_pid = len(observer.restarts), worker.pid
    stopped, steps = signal_at_step(worker, signal.SIGSTOP)
    (outcome,) = run(worker, [stopped])
    assert outcome.error is None and len(outcome.results) == 1
    assert observer.restarts[restarts_before:] == ["stalled"] and worker.pid != first_pid
    assert steps[-1] == LONG["steps"]


def test_a_worker_that_dies_while_idle_is_replaced_before_the_next_request(
    supervised: tuple[LocalBackend, RecordingObserver],
) -> None:
    worker, observer = supervised
    restarts_before, first_pid = len(observer.restarts), worker.pid
    assert first_pid is not None
    os.kill(first_pid, signal.SIGKILL)
    wait_until(lambda: worker.readiness_problem() is not None or worker.pid != first_pid)
    wait_until(lambda: worker.readiness_problem() is None)
    assert worker.pid != first_pid and observer.restarts[restarts_before:] == ["died"]
    (outcome,) = run(worker, [Request(worker.check({"prompt": "after", "width": 64, "height": 64}))])
    assert outcome.error is None


def test_a_request_sent_just_as_the_idle_worker_dies_is_served(
    supervised: tuple[LocalBackend, RecordingObserver],
) -> None:
    worker, _ = supervised
    wait_until(lambda: worker.readiness_problem() is None)
    pid = worker.pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)  # the supervisor closes the dead worker while this run may be using it
    (outcome,) = run(worker, [Request(worker.check({"prompt": "right after", "width": 64, "height": 64}))])
    assert outcome.error is None and len(outcome.results) == 1
    assert worker.pid != pid


def test_a_request_that_kills_the_worker_twice_is_refused_and_the_next_one_served(
    supervised: tuple[LocalBackend, RecordingObserver],
) -> None:
    worker, observer = supervised
    restarts_before = len(observer.restarts)
    steps: list[int] = []

    def kill_every_time(step: int, total: int) -> None:
        steps.append(step)
        if step == 2:
            pid = worker.pid
            assert pid is not None
            os.kill(pid, signal.SIGKILL)

    poison = Request(worker.check({"prompt": "poison", **LONG}), on_step=kill_every_time)
    innocent = Request(worker.check({"prompt": "innocent", **LONG}))
    poisoned, served = run(worker, [poison, innocent])
    assert isinstance(poisoned.error, WorkerCrashedError) and str(poisoned.error) == CRASHED_TWICE
    assert served.error is None and len(served.results) == 1  # its batch-mate is retried alone and served
    assert observer.restarts[restarts_before:] == ["died", "died"]
    wait_until(lambda: worker.readiness_problem() is None)
    (after,) = run(worker, [job_for(worker)])
    assert after.error is None


def test_a_request_sharing_steps_with_one_that_kills_the_worker_is_retried_alone_and_served(
    supervised: tuple[LocalBackend, RecordingObserver],
) -> None:
    """Step batching: two runs from two threads share steps; each retry runs with nothing beside it."""
    worker, observer = supervised
    restarts_before = len(observer.restarts)
    innocent_started = threading.Event()

    def kill_every_time(step: int, total: int) -> None:
        if step == 2:
            pid = worker.pid
            assert pid is not None
            os.kill(pid, signal.SIGKILL)

    innocent = Request(worker.check({"prompt": "innocent", **LONG}), on_step=lambda step, total: innocent_started.set())
    poison = Request(worker.check({"prompt": "poison", **LONG}), on_step=kill_every_time)
    outcomes: dict[str, Any] = {}
    innocent_run = threading.Thread(target=lambda: outcomes.update(innocent=run(worker, [innocent])[0]))
    innocent_run.start()
    assert innocent_started.wait(timeout=60)
    (outcomes["poison"],) = run(worker, [poison])
    innocent_run.join(timeout=300)
    assert isinstance(outcomes["poison"].error, WorkerCrashedError)
    assert outcomes["innocent"].error is None and len(outcomes["innocent"].results) == 1
    # the watcher replaces the worker on its own thread: the poison's second kill may be seen
    # just after its run has already answered
    wait_until(lambda: observer.restarts[restarts_before:] == ["died", "died"])
    wait_until(lambda: worker.readiness_problem() is None)


def test_a_request_cancelled_while_the_worker_restarts_ends_cancelled(
    supervised: tuple[LocalBackend, RecordingObserver],
) -> None:
    worker, _ = supervised
    steps: list[int] = []
    holder: list[Request] = []

    def kill_then_cancel(step: int, total: int) -> None:
        steps.append(step)
        if step == 2 and len(steps) == 2:
            holder[0].cancel()  # Stop pressed just as the worker dies
            pid = worker.pid
            assert pid is not None
            os.kill(pid, signal.SIGKILL)

    cancelled = Request(worker.check({"prompt": "stop me", **LONG}), on_step=kill_then_cancel)
    holder.append(cancelled)
    (outcome,) = run(worker, [cancelled])
    assert isinstance(outcome.error, GenerationCancelledError)
    assert steps.count(1) == 1  # never ran again


def test_repeated_start_failures_back_off_and_report_a_crash_loop(
    tiny_model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    good = PipelineSettings(model=str(tiny_model_dir), device="cpu", cpu_threads=1, warmup=False)
    missing = PipelineSettings(model=str(tmp_path / "gone"), device="cpu")
    made: list[PipelineProcess] = []

    def new_worker(settings: PipelineSettings) -> PipelineProcess:  # the model vanishes after the first start
        made.append(PipelineProcess(settings if not made else missing))
        return made[-1]

    observer = RecordingObserver()
    policy = RestartPolicy(max_restarts=2, restart_window=600, backoff_initial=0.5, backoff_max=1)
    worker = LocalBackend(good, new_worker, policy=policy, observer=observer)
    worker.start()
    try:
        assert worker.liveness_problem() is None
        first = made[0].pid
        assert first is not None
        with caplog.at_level(logging.ERROR, logger="sd_pipeline.backends.local.supervisor"):
            os.kill(first, signal.SIGKILL)
            wait_until(lambda: len(observer.restarts) >= 4)
        # The waits between failed starts: the first back-off, then doubling up to the most.
        delays = [float(found) for found in re.findall(r"trying again in ([0-9.]+)s", caplog.text)]
        assert delays[:3] == [0.5, 1.0, 1.0], caplog.text
        problem = worker.liveness_problem()
        assert problem is not None and problem.startswith("pipeline worker crash loop: ")
        readiness = worker.readiness_problem()
        assert readiness is not None and readiness.startswith("pipeline worker")
        assert observer.up == [True, False]
    finally:
        worker.close()
    assert not any(process.is_alive() for process in made)


# Model switches racing a dead worker (real worker processes, plain folders as the versions).
def versions(tiny_model_dir: Path, folder: Path) -> tuple[str, str]:
    for name in ("v1", "v2"):
        shutil.copytree(tiny_model_dir, folder / name)
    return str(folder / "v1"), str(folder / "v2")


def test_a_worker_dying_during_an_overlap_switch_does_not_bring_the_old_version_back(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """The old worker dies while v2 loads beside it; the restart it causes (of v1) ends after the switch
    installed v2. v2 must serve, and the restarted v1 worker must stop (it used to be installed over
    v2, which leaked)."""
    v1, v2 = versions(tiny_model_dir, tmp_path)
    switch_done, replacement_loaded = threading.Event(), threading.Event()

    class ReplacementAfterTheSwitch(PipelineProcess):
        def start(self) -> BackendInfo:
            switch_done.wait(timeout=120)
            try:
                return super().start()
            finally:
                replacement_loaded.set()

    made: list[PipelineProcess] = []

    def new_worker(settings: PipelineSettings) -> PipelineProcess:
        kind = ReplacementAfterTheSwitch if len(made) == 2 else PipelineProcess
        made.append(kind(settings))
        return made[-1]

    settings = PipelineSettings(model=v1, device="cpu", cpu_threads=1, warmup=False)
    observer = RecordingObserver()
    backend = LocalBackend(settings, new_worker, rollout="overlap", observer=observer)
    backend.start()
    try:
        switch = threading.Thread(target=backend.switch_model, args=(v2,))
        switch.start()
        wait_until(lambda: len(made) == 2, timeout=60)  # v2 is loading beside v1
        assert made[0].pid is not None
        os.kill(made[0].pid, signal.SIGKILL)
        wait_until(lambda: len(made) == 3, timeout=60)  # the watcher restarts v1
        switch.join(timeout=180)
        assert backend.readiness_problem() is None
        switch_done.set()
        assert replacement_loaded.wait(timeout=120)
        wait_until(lambda: not made[2].is_alive(), timeout=60)  # the restarted v1 worker stops
        (outcome,) = run_through(
            dispatcher(backend), [Request(check_inputs({"prompt": "after", "steps": 2, "width": 64, "height": 64}))]
        )
        assert outcome.error is None and outcome.results[0].model == "v2"
        assert [worker for worker in made if worker.is_alive()] == [made[1]]  # nothing leaked
        assert observer.up[-1] is True  # up again: the switch's worker serves
    finally:
        switch_done.set()
        backend.close()
    assert not any(worker.is_alive() for worker in made)


def test_a_drained_switch_does_not_spin_the_watcher(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While a drained switch loads the new worker, the retired one is dead: its sentinel answers at
    once, and the watcher looped on it as fast as it could (a core at 100 %) until the switch ended."""
    v1, v2 = versions(tiny_model_dir, tmp_path)
    calls: list[float] = []
    real_wait = supervisor.wait

    def counting_wait(*args: Any, **kwargs: Any) -> Any:
        calls.append(time.monotonic())
        return real_wait(*args, **kwargs)

    monkeypatch.setattr(supervisor, "wait", counting_wait)
    settings = PipelineSettings(model=v1, device="cpu", cpu_threads=1, warmup=False)
    backend = LocalBackend(settings, PipelineProcess, rollout="drain")
    backend.start()
    try:
        started = time.monotonic()
        before = len(calls)
        backend.switch_model(v2)  # seconds: a new worker process loads v2
        seconds = time.monotonic() - started
        looked = len(calls) - before
        # One look per watch interval, not a busy loop: a count, bounded with a wide margin.
        assert looked <= 4 * seconds / supervisor._WATCH_INTERVAL + 10, (looked, seconds)
        (outcome,) = run_through(
            dispatcher(backend), [Request(check_inputs({"prompt": "after", "steps": 2, "width": 64, "height": 64}))]
        )
        assert outcome.error is None and outcome.results[0].model == "v2"
    finally:
        backend.close()
