"""Admission without a model: fair order across owners, the per-owner limit, running side by side, wait
estimates, and the retry rule every backend shares (a lost request runs again once, alone)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from typing import Any

import pytest

from harness.servers import wait_until
from sd_pipeline import admission as admission_module
from sd_pipeline.admission import CRASHED_TWICE, Admission, QueueFullError, TooManyRequestsError
from sd_pipeline.contract.backend import ReplyTo
from sd_pipeline.contract.errors import GenerationCancelledError, WorkerCrashedError
from sd_pipeline.contract.lifecycle import Request, Status
from sd_pipeline.contract.messages import Finished, Lost, Step
from sd_pipeline.contract.request import GenerationRequest


class GatedBackend:
    """Finishes nothing until released; records what it was handed, what beside it, and how many at once."""

    model = "fake"

    def __init__(self, max_running: int = 8) -> None:
        self.max_running = max_running
        self.calls: list[list[str]] = []  # each request handed over, as a one-prompt call
        self.beside: list[list[str]] = []  # what was still running when each was handed over
        self.cancelled: list[str] = []
        self.open = True
        self.lock = threading.Lock()
        self.held: dict[str, tuple[Request, ReplyTo]] = {}
        self.permits = 0
        self.most_at_once = 0
        self.listeners: list[Callable[[], None]] = []

    @property
    def running(self) -> int:
        return len(self.held)

    def check(self, data: Mapping[str, Any]) -> GenerationRequest:
        return GenerationRequest(**data)

    def accepting(self) -> bool:
        return self.open

    def when_accepting(self, callback: Callable[[], None]) -> None:
        self.listeners.append(callback)

    def reopen(self) -> None:
        self.open = True
        for listener in self.listeners:
            listener()

    def submit(self, request: Request, reply: ReplyTo) -> None:
        with self.lock:
            self.beside.append(sorted(held.inputs.prompt for held, _ in self.held.values()))
            self.calls.append([request.inputs.prompt])
            self.held[request.id] = (request, reply)
            self.most_at_once = max(self.most_at_once, len(self.held))
        self._finish_permitted()

    def cancel(self, request: Request) -> None:
        self.cancelled.append(request.inputs.prompt)

    def release(self, count: int = 1) -> None:
        """Let ``count`` requests finish (the oldest held first, then the next handed over)."""
        with self.lock:
            self.permits += count
        self._finish_permitted()

    def _finish_permitted(self) -> None:
        while True:
            with self.lock:
                if not self.permits or not self.held:
                    return
                self.permits -= 1
                request_id = next(iter(self.held))
            self.end(request_id, Finished(id=request_id))

    def end(self, request_id: str, message: Finished | Lost) -> None:
        with self.lock:
            _, reply = self.held.pop(request_id)
        reply(message)

    def lose(self, prompt: str) -> None:
        """The worker holding ``prompt`` is lost."""
        (request_id,) = [key for key, (held, _) in self.held.items() if held.inputs.prompt == prompt]
        self.end(request_id, Lost(id=request_id, message="the pipeline worker process died"))

    def finish(self, prompt: str) -> None:
        (request_id,) = [key for key, (held, _) in self.held.items() if held.inputs.prompt == prompt]
        self.end(request_id, Finished(id=request_id))


def job(owner: str, name: str, steps: int = 25) -> Request:
    return Request(GenerationRequest(prompt=name, steps=steps), owner=owner)


def admission(backend: GatedBackend, **options: Any) -> Admission:
    started = Admission(backend, **options)
    started.start()
    return started


def finish(backend: GatedBackend, queue: Admission, count: int) -> None:
    backend.release(count)
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
    backend.release()
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
    short.report_step(4, 10)  # as admission applies a Step message
    assert queue.steps_before_start(first) == 6
    assert queue.steps_before_start(short) is None  # running: no wait to estimate
    finish(backend, queue, 4)


def anonymous(session: str, address: str, name: str) -> Request:
    """A request without login: a fresh session (free to make) from a client address."""
    return Request(GenerationRequest(prompt=name), owner=session, address=address)


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


def test_positions_and_estimates_hold_with_more_than_64_running_slots() -> None:
    """No thread per slot and no pool: 100 slots run 100 requests, and the 101st waits first in line."""
    backend = GatedBackend(max_running=100)
    queue = admission(backend, capacity=200)
    running = [queue.submit(job(f"user-{n}", f"r{n}", steps=20 + n)) for n in range(100)]
    waiting = [job("late", f"w{n}", steps=10) for n in range(3)]
    for request in waiting:
        queue.submit(request)
    assert backend.running == 100 and queue.depth == 3
    assert [queue.position(request) for request in waiting] == [100, 101, 102]
    assert [queue.steps_before_start(request) for request in waiting] == [20, 21, 22]  # the shortest slots free first
    backend.release(1)  # r0 (20 steps) ends: w0 takes its slot
    assert queue.position(waiting[0]) is None and waiting[0].status is Status.RUNNING
    assert [queue.position(request) for request in waiting[1:]] == [100, 101]
    finish(backend, queue, 103)
    assert all(future.result(timeout=5) == [] for future in running)


def test_a_lost_batch_is_retried_once_each_alone_and_a_repeat_offender_is_refused() -> None:
    backend = GatedBackend()
    queue = admission(backend)
    innocent, poison, other = (queue.submit(job(name, name)) for name in ("innocent", "poison", "other"))
    for name in ("innocent", "poison", "other"):  # the worker dies under all three
        backend.lose(name)
    late = queue.submit(job("late", "late"))  # held back while retries wait
    assert backend.calls[3:] == [["innocent"]] and backend.beside[3] == []
    backend.finish("innocent")
    assert backend.calls[4:] == [["poison"]] and backend.beside[4] == []
    backend.lose("poison")  # lost again while it ran alone
    assert isinstance(poison.exception(timeout=5), WorkerCrashedError) and str(poison.exception()) == CRASHED_TWICE
    backend.finish("other")
    assert backend.calls[5:] == [["other"], ["late"]] and backend.beside[5:] == [[], []]
    finish(backend, queue, 1)
    assert innocent.result(timeout=5) == [] and other.result(timeout=5) == [] and late.result(timeout=5) == []


def test_a_retry_waits_for_its_neighbours_and_the_backend_and_a_cancelled_request_is_never_retried() -> None:
    backend = GatedBackend()
    queue = admission(backend)
    lost, neighbour, stopped = job("a", "lost"), job("b", "neighbour"), job("c", "stopped")
    futures = [queue.submit(request) for request in (lost, neighbour, stopped)]
    queue.cancel(stopped)  # Stop pressed: the backend is told, and the request ends when it answers
    assert backend.cancelled == ["stopped"] and stopped.status is Status.CANCELLED
    backend.open = False  # e.g. the worker is restarting
    backend.lose("lost")
    backend.lose("stopped")
    assert lost.status is Status.RETRYING and lost.attempts == 1
    assert isinstance(futures[2].exception(timeout=5), GenerationCancelledError)  # not retried
    backend.finish("neighbour")
    assert len(backend.calls) == 3  # the backend does not accept yet
    backend.reopen()
    assert backend.calls[3:] == [["lost"]] and lost.attempts == 2
    finish(backend, queue, 1)
    assert futures[0].result(timeout=5) == [] and lost.status is Status.DONE


def test_a_request_cancelled_by_its_holder_is_stopped_at_its_next_step() -> None:
    """Cancel is a status change: admission tells the backend when the next step arrives."""
    backend = GatedBackend()
    queue = admission(backend)
    request = job("a", "marked")
    future = queue.submit(request)
    request.cancel()
    ((_, reply),) = backend.held.values()
    reply(Step(id=request.id, step=1, total=25))
    reply(Step(id=request.id, step=2, total=25))
    assert backend.cancelled == ["marked"]  # told once
    backend.finish("marked")
    assert isinstance(future.exception(timeout=5), GenerationCancelledError)
    assert queue.close(timeout=5)
