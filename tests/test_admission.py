"""Admission without a model: fair order across owners, the per-owner limit, running side by side, wait estimates."""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from typing import Any

import pytest

from sd_pipeline import admission as admission_module
from sd_pipeline.admission import Admission, QueueFullError, TooManyRequestsError
from sd_pipeline.contract.jobs import GenerationJob, JobOutcome
from sd_pipeline.contract.request import GenerationRequest
from tests.servers import wait_until


class GatedBackend:
    """Runs nothing until released; records which jobs ran, in what calls, and how many at once."""

    model = "fake"

    def __init__(self, max_running: int = 8) -> None:
        self.max_running = max_running
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


def admission(backend: GatedBackend, **options: Any) -> Admission:
    started = Admission(backend, **options)
    started.start()
    return started


def finish(backend: GatedBackend, queue: Admission, count: int) -> None:
    for _ in range(count):
        backend.gate.release()
    assert queue.close(timeout=10)


def test_owners_take_turns_instead_of_first_come() -> None:
    backend = GatedBackend(max_running=1)
    queue = admission(backend)
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
    backend = GatedBackend(max_running=2)
    queue = admission(backend, max_per_owner=3)
    for n in range(3):
        queue.submit(job("script", f"flood-{n}"))
    with pytest.raises(TooManyRequestsError, match="you already have 3 requests in progress"):
        queue.submit(job("script", "one too many"))
    other = queue.submit(job("page-user", "mine"))
    finish(backend, queue, 4)
    assert other.result(timeout=5) == []
    assert issubclass(TooManyRequestsError, QueueFullError)  # the web layer answers it like "busy"


def test_a_finished_request_frees_its_owner_slot() -> None:
    backend = GatedBackend(max_running=1)
    queue = admission(backend, max_per_owner=1)
    first = queue.submit(job("user", "first"))
    backend.gate.release()
    first.result(timeout=5)
    wait_until(lambda: queue.depth == 0 and backend.running == 0, timeout=5)
    second = queue.submit(job("user", "second"))
    finish(backend, queue, 1)
    assert second.result(timeout=5) == []


def test_requests_run_side_by_side_up_to_the_backends_max_running() -> None:
    backend = GatedBackend(max_running=3)
    queue = admission(backend)
    futures = [queue.submit(job(f"user-{n}", f"r{n}")) for n in range(5)]
    wait_until(lambda: backend.running == 3, timeout=5)
    assert all(len(call) == 1 for call in backend.calls)
    assert queue.depth == 2
    finish(backend, queue, 5)
    assert all(future.result(timeout=5) == [] for future in futures)
    assert backend.most_at_once == 3


def test_steps_before_start_with_slots() -> None:
    backend = GatedBackend(max_running=2)
    queue = admission(backend)
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


def anonymous(session: str, address: str, name: str) -> GenerationJob:
    """A request without login: a fresh session (free to make) from a client address."""
    return GenerationJob(GenerationRequest(prompt=name), owner=session, address=address)


def test_fresh_anonymous_sessions_from_one_address_share_its_limit_and_its_turns() -> None:
    backend = GatedBackend(max_running=1)
    queue = admission(backend, max_per_owner=4, max_per_address=3)
    queue.submit(anonymous("session-0", "203.0.113.7", "blocker"))
    wait_until(lambda: len(backend.calls) == 1, timeout=5)
    futures = [queue.submit(anonymous(f"session-{n}", "203.0.113.7", f"flood-{n}")) for n in range(1, 3)]
    with pytest.raises(TooManyRequestsError, match="3 requests from your address are in progress without login"):
        queue.submit(anonymous("session-40", "203.0.113.7", "one too many"))
    futures.append(queue.submit(anonymous("neighbour", "198.51.100.2", "elsewhere")))
    futures.append(queue.submit(job("alice", "logged in")))  # a login is limited as herself, not by address
    finish(backend, queue, 5)
    assert all(future.result(timeout=5) == [] for future in futures)
    order = [call[0] for call in backend.calls]
    assert order == ["blocker", "elsewhere", "logged in", "flood-1", "flood-2"], order  # one turn per address


def test_the_turn_table_stays_bounded() -> None:
    backend = GatedBackend(max_running=1)
    queue = admission(backend, max_per_owner=1)
    limit = admission_module.MAX_REMEMBERED_TURNS
    admission_module.MAX_REMEMBERED_TURNS = 5
    try:
        futures = [queue.submit(job(f"visitor-{n}", f"once-{n}")) for n in range(12)]
        finish(backend, queue, 12)
        assert all(future.result(timeout=5) == [] for future in futures)
        assert list(queue._last_turn) == [f"owner:visitor-{n}" for n in range(7, 12)]  # the newest five
    finally:
        admission_module.MAX_REMEMBERED_TURNS = limit
