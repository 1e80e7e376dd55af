"""Admission in front of the backend: who runs next, from a bounded, fair queue.

Callers ``submit`` a job and get a future. Up to the backend's ``max_running`` requests run
at once, each handed to the backend as soon as there is room, where it joins the running
batch at the next denoising step. The next request is chosen round-robin across owners (the
owner served least recently goes first), not strictly first-come, and one owner may hold at
most ``max_per_owner`` requests waiting or running: one script flooding the queue cannot
starve the page's users. Anonymous owners cost nothing to make (a new cookie or API session
per request), so anonymous requests also count against their client address: together they
hold at most ``max_per_address`` and take turns as one. Each caller validates its own request
first, so a bad request never fails anyone else's, and each can cancel its own job, queued or
running.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import OrderedDict, deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Protocol

from sd_pipeline.contract.backend import Backend
from sd_pipeline.contract.errors import GenerationCancelledError
from sd_pipeline.contract.jobs import GenerationJob, GenerationResult

logger = logging.getLogger(__name__)


class QueueFullError(RuntimeError):
    """The queue is at capacity; the caller should try again later."""


class TooManyRequestsError(QueueFullError):
    """This owner already has the most requests in progress that one owner may have."""


class ShuttingDownError(RuntimeError):
    """The service is stopping and takes no new requests."""


MAX_REMEMBERED_TURNS = 10_000  # the owners whose last turn is remembered; the oldest is forgotten first


class AdmissionObserver(Protocol):
    """Receives queue facts (implemented by the metrics module)."""

    def queued(self, *, depth: int) -> None: ...

    def started(self, *, waited_seconds: float) -> None: ...

    def idle_while_waiting(self, *, seconds: float) -> None: ...


@dataclass(eq=False)
class _Entry:
    job: GenerationJob
    future: Future[list[GenerationResult]] = field(default_factory=Future)
    enqueued_at: float = field(default_factory=time.perf_counter)


class Admission:
    """A bounded, fair queue in front of one backend; one dispatch thread per request that may run."""

    def __init__(
        self,
        backend: Backend,
        *,
        capacity: int = 64,
        observer: AdmissionObserver | None = None,
        max_per_owner: int | None = None,
        max_per_address: int | None = None,
    ) -> None:
        self.backend = backend
        self.max_running = backend.max_running
        self.capacity = capacity
        self.observer = observer
        self.max_per_owner = max_per_owner
        self.max_per_address = max_per_address
        self._waiting: deque[_Entry] = deque()
        self._running: list[_Entry] = []
        self._condition = threading.Condition()
        self._closed = False
        self._idle_since = time.perf_counter()
        self._turns = itertools.count()
        self._last_turn: OrderedDict[str, int] = OrderedDict()  # by turn taker, least recent first
        self._threads = [
            threading.Thread(target=self._work, name=f"pipeline-dispatch-{n}", daemon=True)
            for n in range(self.max_running)
        ]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def submit(self, job: GenerationJob) -> Future[list[GenerationResult]]:
        """Queue a job; raises ``QueueFullError`` (``TooManyRequestsError`` for this owner) or
        ``ShuttingDownError`` at once when it cannot."""
        with self._condition:
            if self._closed:
                raise ShuttingDownError("the server is shutting down; try again in a moment")
            if len(self._waiting) + len(self._running) >= self.capacity:
                raise QueueFullError(f"the server is busy ({self.capacity} requests queued); try again shortly")
            self._refuse_over_limits(job)
            entry = _Entry(job)
            self._waiting.append(entry)
            self._report_depth()
            self._condition.notify()
        return entry.future

    def _refuse_over_limits(self, job: GenerationJob) -> None:
        """Raise ``TooManyRequestsError`` when the owner, or an anonymous caller's address, holds its most."""
        held = [entry.job for entry in (*self._waiting, *self._running)]
        mine = sum(other.owner == job.owner for other in held)
        if self.max_per_owner is not None and mine >= self.max_per_owner:
            plural = "s" if mine != 1 else ""
            raise TooManyRequestsError(
                f"you already have {mine} request{plural} in progress (at most {self.max_per_owner}); "
                "wait for one to finish"
            )
        if job.address and self.max_per_address is not None:
            shared = sum(other.address == job.address for other in held)
            if shared >= self.max_per_address:
                raise TooManyRequestsError(
                    f"{shared} requests from your address are in progress without login (at most "
                    f"{self.max_per_address}); wait for one to finish, or log in"
                )

    def position(self, job: GenerationJob) -> int | None:
        """How many requests are ahead of ``job`` in the queue (None once it is running or done)."""
        with self._condition:
            for index, entry in enumerate(self._waiting):
                if entry.job is job:
                    return index + len(self._running)
        return None

    def steps_before_start(self, job: GenerationJob) -> int | None:
        """About how many denoising steps run before ``job`` starts (None once it runs or is gone).

        Counted in arrival order from the running requests' remaining steps and the steps of the
        requests waiting ahead: a request starts when one of the ``max_running`` slots frees.
        """
        with self._condition:
            waiting = [entry.job for entry in self._waiting]
            ahead = next((index for index, queued in enumerate(waiting) if queued is job), None)
            if ahead is None:
                return None
            running = [entry.job.steps_left for entry in self._running]
        before = [queued.request.steps for queued in waiting[:ahead]]
        slots = sorted(running) + [0] * max(0, self.max_running - len(running))  # when each slot frees
        for steps in before:  # each request ahead takes the first slot to free
            slots[0] += steps
            slots.sort()
        return slots[0]

    def cancel(self, job: GenerationJob) -> None:
        """Cancel a job: dropped if still queued, stopped within one step if running."""
        job.cancel()
        with self._condition:
            for entry in list(self._waiting):
                if entry.job is job:
                    self._waiting.remove(entry)
                    entry.future.set_exception(GenerationCancelledError("cancelled"))
                    self._report_depth()

    @property
    def depth(self) -> int:
        with self._condition:
            return len(self._waiting)

    def close(self, *, timeout: float) -> bool:
        """Take no new jobs, finish the queued and running ones within ``timeout``; True if all finished."""
        with self._condition:
            self._closed = True
            self._condition.notify_all()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
        finished = not any(thread.is_alive() for thread in self._threads)
        with self._condition:
            for entry in self._waiting:
                entry.job.cancel()
                entry.future.set_exception(ShuttingDownError("the server stopped before this request could run"))
            self._waiting.clear()
        return finished

    def _take_next(self) -> tuple[_Entry, bool] | None:
        """The next request to run and whether the backend was idle (None once closed and drained)."""
        with self._condition:
            while not self._waiting and not self._closed:
                self._condition.wait()
            if not self._waiting:
                return None
            entry = self._next_fair()
            backend_was_idle = not self._running
            self._running.append(entry)
            self._report_depth()
            return entry, backend_was_idle

    def _next_fair(self) -> _Entry:
        """Remove and return the oldest entry of the turn taker served least recently."""
        takers_seen: set[str] = set()
        chosen: _Entry | None = None
        for entry in self._waiting:
            taker = _turn_taker(entry.job)
            if taker in takers_seen:
                continue
            takers_seen.add(taker)
            if chosen is None or self._last_turn.get(taker, -1) < self._last_turn.get(_turn_taker(chosen.job), -1):
                chosen = entry
        assert chosen is not None
        self._waiting.remove(chosen)
        taker = _turn_taker(chosen.job)
        self._last_turn[taker] = next(self._turns)
        self._last_turn.move_to_end(taker)
        while len(self._last_turn) > MAX_REMEMBERED_TURNS:  # bounded: forget whoever was served longest ago
            self._last_turn.popitem(last=False)
        return chosen

    def _work(self) -> None:
        while True:
            taken = self._take_next()
            if taken is None:
                return
            entry, backend_was_idle = taken
            started = time.perf_counter()
            if self.observer is not None:
                if backend_was_idle:
                    idle = max(0.0, started - max(self._idle_since, entry.enqueued_at))
                    self.observer.idle_while_waiting(seconds=idle)
                self.observer.started(waited_seconds=started - entry.enqueued_at)
            self._run(entry)
            with self._condition:
                self._running.remove(entry)
                if not self._running:
                    self._idle_since = time.perf_counter()
                self._condition.notify_all()

    def _run(self, entry: _Entry) -> None:
        try:
            (outcome,) = self.backend.run([entry.job])
        except Exception as error:  # the dispatch thread must survive; the caller gets the error
            logger.exception("the backend failed a request")
            entry.future.set_exception(error)
            return
        if entry.future.done():
            return
        if outcome.error is not None:
            entry.future.set_exception(outcome.error)
        else:
            entry.future.set_result(outcome.results)

    def _report_depth(self) -> None:
        if self.observer is not None:
            self.observer.queued(depth=len(self._waiting))


def _turn_taker(job: GenerationJob) -> str:
    """Who takes turns: a logged-in owner, or every anonymous caller at one address together."""
    return f"address:{job.address}" if job.address else f"owner:{job.owner}"
