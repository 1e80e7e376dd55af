"""Admission in front of the generation backend: a bounded, fair queue, drained in batches.

Callers ``submit`` a job and get a future. Two ways to drain it, matching the backend's
batching (``BATCHING``):

- ``request``: one thread owns the pipeline; whatever is waiting when it frees up, up to
  ``max_batch_size`` requests, goes into the next ``run`` (which groups compatible requests
  into shared pipeline calls).
- ``step``: up to ``max_batch_size`` requests run at once, each handed to the backend as soon
  as there is room, where it joins the running batch at the next denoising step.

Either way the next request is chosen round-robin across owners (the owner served least
recently goes first), not strictly first-come, and one owner may hold at most
``max_per_owner`` requests waiting or running: one script flooding the queue cannot starve
the page's users. Each caller validates its own request first, so a bad request never fails
anyone else's batch, and each can cancel its own job, queued or running.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Literal, Protocol

from sd_pipeline.errors import GenerationCancelledError
from sd_pipeline.generator import GenerationBackend, GenerationJob, GenerationResult

logger = logging.getLogger(__name__)


class QueueFullError(RuntimeError):
    """The queue is at capacity; the caller should try again later."""


class TooManyRequestsError(QueueFullError):
    """This owner already has the most requests in progress that one owner may have."""


class ShuttingDownError(RuntimeError):
    """The service is stopping and takes no new requests."""


class BatchObserver(Protocol):
    """Receives queue facts (implemented by the metrics module)."""

    def queued(self, *, depth: int) -> None: ...

    def started(self, *, waited_seconds: float) -> None: ...

    def idle_while_waiting(self, *, seconds: float) -> None: ...


@dataclass(eq=False)
class _Entry:
    job: GenerationJob
    future: Future[list[GenerationResult]] = field(default_factory=Future)
    enqueued_at: float = field(default_factory=time.perf_counter)


class BatchScheduler:
    """A bounded, fair queue in front of one generation backend, drained by worker threads."""

    def __init__(
        self,
        generator: GenerationBackend,
        *,
        max_batch_size: int = 8,
        capacity: int = 64,
        observer: BatchObserver | None = None,
        dispatch: Literal["batches", "each"] = "batches",
        max_per_owner: int | None = None,
    ) -> None:
        self.generator = generator
        self.max_batch_size = max_batch_size
        self.capacity = capacity
        self.observer = observer
        self.dispatch = dispatch
        self.max_per_owner = max_per_owner
        self._waiting: deque[_Entry] = deque()
        self._running: list[_Entry] = []
        self._condition = threading.Condition()
        self._closed = False
        self._idle_since = time.perf_counter()
        self._turns = itertools.count()
        self._last_turn: dict[str, int] = {}
        threads = 1 if dispatch == "batches" else max_batch_size
        self._threads = [
            threading.Thread(target=self._work, name=f"pipeline-dispatch-{n}", daemon=True) for n in range(threads)
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
            held = sum(entry.job.owner == job.owner for entry in (*self._waiting, *self._running))
            if self.max_per_owner is not None and held >= self.max_per_owner:
                plural = "s" if held != 1 else ""
                raise TooManyRequestsError(
                    f"you already have {held} request{plural} in progress (at most {self.max_per_owner}); "
                    "wait for one to finish"
                )
            entry = _Entry(job)
            self._waiting.append(entry)
            self._report_depth()
            self._condition.notify()
        return entry.future

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
        requests waiting ahead. With ``dispatch="each"`` a request starts when one of the
        ``max_batch_size`` slots frees; with ``"batches"`` when the running batch and the
        batches ahead have finished (each as long as its longest request).
        """
        with self._condition:
            waiting = [entry.job for entry in self._waiting]
            ahead = next((index for index, queued in enumerate(waiting) if queued is job), None)
            if ahead is None:
                return None
            running = [entry.job.steps_left for entry in self._running]
        before = [queued.request.steps for queued in waiting[:ahead]]
        if self.dispatch == "batches":
            size = self.max_batch_size
            batches = [max(before[start : start + size]) for start in range(0, len(before) - len(before) % size, size)]
            return max(running, default=0) + sum(batches)
        slots = sorted(running) + [0] * max(0, self.max_batch_size - len(running))  # when each slot frees
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

    def _take_batch(self) -> tuple[list[_Entry], bool] | None:
        """The next requests to run (None once closed and drained): a batch, or one request when
        each runs on its own (``dispatch="each"``, one thread per running request)."""
        with self._condition:
            while not self._waiting and not self._closed:
                self._condition.wait()
            if not self._waiting:
                return None
            count = min(self.max_batch_size, len(self._waiting)) if self.dispatch == "batches" else 1
            batch = [self._next_fair() for _ in range(count)]
            pipeline_was_idle = not self._running
            self._running.extend(batch)
            self._report_depth()
            return batch, pipeline_was_idle

    def _next_fair(self) -> _Entry:
        """Remove and return the oldest entry of the owner served least recently."""
        owners_seen: set[str] = set()
        chosen: _Entry | None = None
        for entry in self._waiting:
            owner = entry.job.owner
            if owner in owners_seen:
                continue
            owners_seen.add(owner)
            if chosen is None or self._last_turn.get(owner, -1) < self._last_turn.get(chosen.job.owner, -1):
                chosen = entry
        assert chosen is not None
        self._waiting.remove(chosen)
        self._last_turn[chosen.job.owner] = next(self._turns)
        return chosen

    def _work(self) -> None:
        while True:
            taken = self._take_batch()
            if taken is None:
                return
            batch, pipeline_was_idle = taken
            started = time.perf_counter()
            if self.observer is not None:
                if pipeline_was_idle:
                    first_arrival = min(entry.enqueued_at for entry in batch)
                    idle = max(0.0, started - max(self._idle_since, first_arrival))
                    self.observer.idle_while_waiting(seconds=idle)
                for entry in batch:
                    self.observer.started(waited_seconds=started - entry.enqueued_at)
            self._run(batch)
            with self._condition:
                for entry in batch:
                    self._running.remove(entry)
                if not self._running:
                    self._idle_since = time.perf_counter()
                self._condition.notify_all()

    def _run(self, batch: list[_Entry]) -> None:
        try:
            outcomes = self.generator.run([entry.job for entry in batch])
        except Exception as error:  # the worker must survive; every caller gets the error
            logger.exception("pipeline worker failed")
            for entry in batch:
                entry.future.set_exception(error)
            return
        for entry, outcome in zip(batch, outcomes, strict=True):
            if entry.future.done():
                continue
            if outcome.error is not None:
                entry.future.set_exception(outcome.error)
            else:
                entry.future.set_result(outcome.results)

    def _report_depth(self) -> None:
        if self.observer is not None:
            self.observer.queued(depth=len(self._waiting))
