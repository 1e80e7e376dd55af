"""Admission without a model: fair order across owners, the per-owner limit, and both dispatch modes."""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import pytest

from sd_pipeline.batching import BatchScheduler, QueueFullError, TooManyRequestsError
from sd_pipeline.generator import GenerationJob, JobOutcome
from sd_pipeline.request import GenerationRequest
from tests.servers import wait_until


class GatedBackend:
    """Runs nothing until released; records which jobs ran, in what calls, and how many at once."""

    model = "fake"

    def __init__(self) -> None:
        self.calls: list[list[str]] = []
        self.gate = threading.Semaphore(0)
        self.lock = threading.Lock()
        self.running = 0
        self.most_at_once = 0

    def check(self, data: Mapping[str, Any]) -> GenerationRequest:
        return GenerationRequest(**data)

    def run(self, jobs: Sequence[GenerationJob]) -> list[JobOutcome]:
        with self.lock:
            self.calls.append([job.request.prompt for job in jobs])
            self.running += 1
            self.most_at_once = max(self.most_at_once, self.running)
        self.gate.acquire()
        with self.lock:
            self.running -= 1
        return [JobOutcome() for _ in jobs]


def job(owner: str, name: str, steps: int = 25) -> GenerationJob:
    return GenerationJob(GenerationRequest(prompt=name, steps=steps), owner=owner)


def scheduler(backend: GatedBackend, dispatch: Literal["batches", "each"], **options: Any) -> BatchScheduler:
    started = BatchScheduler(backend, dispatch=dispatch, **options)
    started.start()
    return started


def finish(backend: GatedBackend, queue: BatchScheduler, count: int) -> None:
    for _ in range(count):
        backend.gate.release()
    assert queue.close(timeout=10)


def test_owners_take_turns_instead_of_first_come() -> None:
    backend = GatedBackend()
    queue = scheduler(backend, "batches", max_batch_size=1)
    queue.submit(job("script", "blocker"))
    wait_until(lambda: len(backend.calls) == 1, timeout=5)
    futures = [queue.submit(job("script", f"flood-{n}")) for n in range(4)]
    futures.append(queue.submit(job("page-user", "mine")))
    futures.append(queue.submit(job("other-user", "theirs")))
    finish(backend, queue, 7)
    assert all(future.result(timeout=5) == [] for future in futures)
    order = [call[0] for call in backend.calls]
    # The script was served last (its blocker), so both users go before its flood.
    assert order == ["blocker", "mine", "theirs", "flood-0", "flood-1", "flood-2", "flood-3"], order


def test_one_owner_is_limited_and_others_are_not() -> None:
    backend = GatedBackend()
    queue = scheduler(backend, "each", max_batch_size=2, max_per_owner=3)
    for n in range(3):
        queue.submit(job("script", f"flood-{n}"))
    with pytest.raises(TooManyRequestsError, match="you already have 3 requests in progress"):
        queue.submit(job("script", "one too many"))
    other = queue.submit(job("page-user", "mine"))
    finish(backend, queue, 4)
    assert other.result(timeout=5) == []
    assert issubclass(TooManyRequestsError, QueueFullError)  # the web layer answers it like "busy"


def test_a_finished_request_frees_its_owner_slot() -> None:
    backend = GatedBackend()
    queue = scheduler(backend, "each", max_batch_size=1, max_per_owner=1)
    first = queue.submit(job("user", "first"))
    backend.gate.release()
    first.result(timeout=5)
    wait_until(lambda: queue.depth == 0 and backend.running == 0, timeout=5)
    second = queue.submit(job("user", "second"))
    finish(backend, queue, 1)
    assert second.result(timeout=5) == []


def test_each_dispatch_runs_requests_side_by_side_up_to_the_batch_size() -> None:
    backend = GatedBackend()
    queue = scheduler(backend, "each", max_batch_size=3)
    futures = [queue.submit(job(f"user-{n}", f"r{n}")) for n in range(5)]
    wait_until(lambda: backend.running == 3, timeout=5)
    assert all(len(call) == 1 for call in backend.calls)
    assert queue.depth == 2
    finish(backend, queue, 5)
    assert all(future.result(timeout=5) == [] for future in futures)
    assert backend.most_at_once == 3


def test_batches_dispatch_sends_what_waits_as_one_run() -> None:
    backend = GatedBackend()
    queue = scheduler(backend, "batches", max_batch_size=8)
    queue.submit(job("a", "first"))
    wait_until(lambda: backend.running == 1, timeout=5)
    for n in range(3):
        queue.submit(job(f"user-{n}", f"r{n}"))
    finish(backend, queue, 2)
    assert [len(call) for call in backend.calls] == [1, 3]
    assert backend.most_at_once == 1


def test_steps_before_start_with_slots() -> None:
    backend = GatedBackend()
    queue = scheduler(backend, "each", max_batch_size=2)
    short, long = job("a", "short", steps=10), job("b", "long", steps=30)
    queue.submit(short)
    queue.submit(long)
    wait_until(lambda: backend.running == 2, timeout=5)
    first, second = job("c", "first", steps=5), job("d", "second")
    queue.submit(first)
    queue.submit(second)
    assert queue.steps_before_start(first) == 10  # the short run's slot frees first
    assert queue.steps_before_start(second) == 15  # then the first one's 5 steps in that slot
    short.report_step(4, 10)
    assert queue.steps_before_start(first) == 6
    assert queue.steps_before_start(short) is None  # running: no wait to estimate
    finish(backend, queue, 4)


def test_steps_before_start_with_whole_batches() -> None:
    backend = GatedBackend()
    queue = scheduler(backend, "batches", max_batch_size=2)
    running = job("a", "running", steps=10)
    queue.submit(running)
    wait_until(lambda: backend.running == 1, timeout=5)
    waiting = [job(f"user-{n}", f"w{n}", steps=steps) for n, steps in enumerate((5, 7, 3))]
    for queued in waiting:
        queue.submit(queued)
    assert queue.steps_before_start(waiting[0]) == 10
    assert queue.steps_before_start(waiting[2]) == 10 + 7  # after the batch of 5 and 7 steps
    finish(backend, queue, 3)
