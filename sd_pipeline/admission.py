"""Admission in front of the backend: who runs next, from a bounded, fair queue.

Callers ``submit`` a ``Request`` and get a future. Admission is the one place that decides what
runs: up to the backend's ``max_running`` requests at once, each handed to the backend (which
never blocks) as soon as there is room, where it joins the running batch at the next denoising
step. The backend answers with messages (``contract.messages``); no thread waits per request.
The next request is chosen round-robin across owners (the owner served least recently goes
first), not strictly first-come, and one owner may hold at most ``max_per_owner`` requests
waiting or running: one script flooding the queue cannot starve the page's users. Anonymous
owners cost nothing to make (a new cookie or API session per request), so anonymous requests
also count against their client address: together they hold at most ``max_per_address`` and
take turns as one. Each caller validates its own request first, so a bad request never fails
anyone else's, and each can cancel its own request, queued or running.

The failure rule every backend shares lives here too: a request whose worker or replica is lost
(``Lost``) is retried once, alone: admission waits until the requests beside it have finished,
holds back new ones, and runs it with nothing beside it, so a request that kills its worker
cannot take an innocent neighbour down twice. Lost again while it runs alone, it fails with
``WorkerCrashedError``; a cancelled request is never retried.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import OrderedDict, deque
from concurrent.futures import Future
from typing import Protocol

from sd_pipeline.contract.backend import Backend
from sd_pipeline.contract.errors import GenerationCancelledError, PipelineUnavailableError, WorkerCrashedError
from sd_pipeline.contract.jobs import GenerationResult, JobOutcome
from sd_pipeline.contract.lifecycle import Request, Status
from sd_pipeline.contract.messages import Finished, Lost, PreviewReady, Reply, Step

logger = logging.getLogger(__name__)

CRASHED_TWICE = "this request stopped the image generator twice; try other settings"
MAX_REMEMBERED_TURNS = 10_000  # the owners whose last turn is remembered; the oldest is forgotten first


DEFAULT_QUEUE_CAPACITY = 64  # requests waiting or running at once (QUEUE_MAX_SIZE)


class QueueFullError(RuntimeError):
    """The queue is at capacity; the caller should try again later."""


class TooManyRequestsError(QueueFullError):
    """This owner already has the most requests in progress that one owner may have."""


class ShuttingDownError(RuntimeError):
    """The service is stopping and takes no new requests."""


class AdmissionObserver(Protocol):
    """Receives queue facts (implemented by the metrics module)."""

    def queued(self, *, depth: int) -> None: ...

    def started(self, *, waited_seconds: float) -> None: ...

    def idle_while_waiting(self, *, seconds: float) -> None: ...


class Admission:
    """A bounded, fair queue in front of one backend, and the one dispatcher of its requests."""

    def __init__(
        self,
        backend: Backend,
        *,
        capacity: int = DEFAULT_QUEUE_CAPACITY,
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
        self._waiting: deque[Request] = deque()
        self._retries: deque[Request] = deque()  # lost once: each runs next, alone
        self._running: dict[str, Request] = {}  # handed to the backend, not yet finished or lost
        self._alone: Request | None = None  # a retry running with nothing beside it
        self._stopping: set[str] = set()  # running requests whose backend was told to cancel them
        self._condition = threading.Condition()
        self._closed = False
        self._idle_since = time.perf_counter()
        self._turns = itertools.count()
        self._last_turn: OrderedDict[str, int] = OrderedDict()  # by turn taker, least recent first

    def start(self) -> None:
        """Listen for the backend turning able to take requests (a restarted worker, a switch done)."""
        self.backend.when_accepting(self._dispatch)

    def submit(self, request: Request) -> Future[list[GenerationResult]]:
        """Queue a request; raises ``QueueFullError`` (``TooManyRequestsError`` for this owner) or
        ``ShuttingDownError`` at once when it cannot. The future ends with its images or its error."""
        with self._condition:
            if self._closed:
                raise ShuttingDownError("the server is shutting down; try again in a moment")
            if self._held() >= self.capacity:
                raise QueueFullError(f"the server is busy ({self.capacity} requests queued); try again shortly")
            self._refuse_over_limits(request)
            request.queued_at = time.perf_counter()
            self._waiting.append(request)
            self._report_depth()
        self._dispatch()
        return request.ended

    def _held(self) -> int:
        return len(self._waiting) + len(self._retries) + len(self._running)

    def _all_held(self) -> list[Request]:
        return [*self._waiting, *self._retries, *self._running.values()]

    def _refuse_over_limits(self, request: Request) -> None:
        """Raise ``TooManyRequestsError`` when the owner, or an anonymous caller's address, holds its most."""
        held = self._all_held()
        mine = sum(other.owner == request.owner for other in held)
        if self.max_per_owner is not None and mine >= self.max_per_owner:
            plural = "s" if mine != 1 else ""
            raise TooManyRequestsError(
                f"you already have {mine} request{plural} in progress (at most {self.max_per_owner}); "
                "wait for one to finish"
            )
        if request.address and self.max_per_address is not None:
            shared = sum(other.address == request.address for other in held)
            if shared >= self.max_per_address:
                raise TooManyRequestsError(
                    f"{shared} requests from your address are in progress without login (at most "
                    f"{self.max_per_address}); wait for one to finish, or log in"
                )

    def position(self, request: Request) -> int | None:
        """How many requests are ahead of ``request`` (None once it runs or has ended)."""
        with self._condition:
            queue = [*self._retries, *self._waiting]
            for index, queued in enumerate(queue):
                if queued is request:
                    return index + len(self._running)
        return None

    def steps_before_start(self, request: Request) -> int | None:
        """About how many denoising steps run before ``request`` starts (None once it runs or is gone).

        Counted in turn order from the running requests' remaining steps and the steps of the
        requests waiting ahead: a request starts when one of the ``max_running`` slots frees.
        """
        with self._condition:
            queue = [*self._retries, *self._waiting]
            ahead = next((index for index, queued in enumerate(queue) if queued is request), None)
            if ahead is None:
                return None
            running = [held.steps_left for held in self._running.values()]
        before = [queued.inputs.denoising_steps for queued in queue[:ahead]]
        slots = sorted(running) + [0] * max(0, self.max_running - len(running))  # when each slot frees
        for steps in before:  # each request ahead takes the first slot to free
            slots[0] += steps
            slots.sort()
        return slots[0]

    def cancel(self, request: Request) -> None:
        """Cancel a request: dropped at once if it waits, stopped within one step if it runs."""
        with self._condition:
            running = request.id in self._running
            queued = not running and request.cancel()
            if queued:
                for queue in (self._waiting, self._retries):
                    if request in queue:
                        queue.remove(request)
                self._end(request)
                self._report_depth()
        if running and request.cancel():
            self._tell_cancelled(request)

    def _tell_cancelled(self, request: Request) -> None:
        """Tell the backend once that a running request was cancelled."""
        with self._condition:
            if request.id in self._stopping or request.id not in self._running:
                return
            self._stopping.add(request.id)
        self.backend.cancel(request)

    @property
    def depth(self) -> int:
        with self._condition:
            return len(self._waiting) + len(self._retries)

    def close(self, *, timeout: float) -> bool:
        """Take no new requests, finish the queued and running ones within ``timeout``; True if all finished."""
        with self._condition:
            self._closed = True
            finished = self._condition.wait_for(lambda: not self._held(), timeout=timeout)
            left = [*self._waiting, *self._retries]
            self._waiting.clear()
            self._retries.clear()
        for request in left:
            request.fail(ShuttingDownError("the server stopped before this request could run"))
            self._end(request)
        return finished

    # The dispatcher: every change of state ends here.
    def _dispatch(self) -> None:
        """Hand the backend what may run now (outside the lock: a backend may answer at once)."""
        with self._condition:
            chosen = self._choose()
        for request in chosen:
            try:
                self.backend.submit(request, self._reply)
            except Exception as error:  # noqa: BLE001 - e.g. the backend is stopping: that request's error
                logger.warning("the backend refused a request: %s", error)
                self._reply(Finished.of(request.id, _outcome_of(error)))

    def _choose(self) -> list[Request]:
        """Under the lock: what starts now (fair turns, ``max_running``, the retry-alone rule)."""
        if self._alone is not None or not (self._waiting or self._retries) or not self.backend.accepting():
            return []
        if self._retries:
            if self._running:  # the retry waits for its neighbours to finish, and holds back new ones
                return []
            self._alone = self._retries.popleft()
            self._start(self._alone)
            return [self._alone]
        chosen = []
        while self._waiting and len(self._running) < self.max_running:
            request = self._next_fair()
            self._start(request)
            chosen.append(request)
        return chosen

    def _start(self, request: Request) -> None:
        was_idle = not self._running
        request.move(Status.RUNNING)
        request.attempts += 1
        self._running[request.id] = request
        self._report_depth()
        if self.observer is not None and request.attempts == 1:
            started = time.perf_counter()
            if was_idle:
                self.observer.idle_while_waiting(seconds=max(0.0, started - max(self._idle_since, request.queued_at)))
            self.observer.started(waited_seconds=started - request.queued_at)

    def _next_fair(self) -> Request:
        """Remove and return the oldest request of the turn taker served least recently."""
        takers_seen: set[str] = set()
        chosen: Request | None = None
        for request in self._waiting:
            taker = _turn_taker(request)
            if taker in takers_seen:
                continue
            takers_seen.add(taker)
            if chosen is None or self._last_turn.get(taker, -1) < self._last_turn.get(_turn_taker(chosen), -1):
                chosen = request
        assert chosen is not None
        self._waiting.remove(chosen)
        taker = _turn_taker(chosen)
        self._last_turn[taker] = next(self._turns)
        self._last_turn.move_to_end(taker)
        while len(self._last_turn) > MAX_REMEMBERED_TURNS:  # bounded: forget whoever was served longest ago
            self._last_turn.popitem(last=False)
        return chosen

    def _reply(self, message: Reply) -> None:
        """A backend's message about a request it holds (from any thread)."""
        request = self._running.get(message.id)
        if request is None:
            return  # already ended here (e.g. a late message from a lost worker)
        if isinstance(message, Step):
            request.report_step(message.step, message.total)
            if request.cancelled:  # marked cancelled by its holder (a status change): the engine drops it
                self._tell_cancelled(request)
        elif isinstance(message, PreviewReady):
            request.report_preview(message.preview())
        elif isinstance(message, Finished | Lost):
            with self._condition:
                if self._running.pop(message.id, None) is None:
                    return
                self._stopping.discard(message.id)
                if self._alone is request:
                    self._alone = None
                if not self._running:
                    self._idle_since = time.perf_counter()
                if isinstance(message, Lost):
                    self._lost(request, message)
                else:
                    outcome = message.outcome(request.inputs)
                    if outcome.error is None:
                        request.finish(outcome.results)
                    elif not isinstance(outcome.error, GenerationCancelledError):
                        request.fail(outcome.error)
                    else:
                        request.cancel()
                    self._end(request)
                self._condition.notify_all()
            self._dispatch()

    def _lost(self, request: Request, lost: Lost) -> None:
        """Under the lock: the retry-alone rule for a request lost with its worker or replica."""
        if request.cancelled:
            self._end(request)
        elif request.attempts >= 2:
            logger.error("%s again while one request ran alone; refusing that request", lost.message)
            request.fail(WorkerCrashedError(CRASHED_TWICE))
            self._end(request)
        else:
            logger.warning("%s; retrying its request once, alone", lost.message)
            request.move(Status.RETRYING)
            self._retries.append(request)
            self._report_depth()

    def _end(self, request: Request) -> None:
        """Settle the caller's future from the request's final status."""
        if request.ended.done():
            return
        if request.status is Status.DONE:
            request.ended.set_result(request.results)
        elif request.status is Status.CANCELLED:
            request.ended.set_exception(GenerationCancelledError("cancelled"))
        else:
            request.ended.set_exception(request.error or RuntimeError("the request ended without a result"))

    def _report_depth(self) -> None:
        if self.observer is not None:
            self.observer.queued(depth=len(self._waiting) + len(self._retries))


def _outcome_of(error: Exception) -> JobOutcome:
    return JobOutcome(
        error=error if isinstance(error, PipelineUnavailableError) else PipelineUnavailableError(str(error))
    )


def _turn_taker(request: Request) -> str:
    """Who takes turns: a logged-in owner, or every anonymous caller at one address together."""
    return f"address:{request.address}" if request.address else f"owner:{request.owner}"
