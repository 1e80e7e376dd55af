"""Dynamic batching: requests that arrive while the pipeline is busy run together next.

One worker thread owns the pipeline (concurrency 1 on the GPU). Callers ``submit`` a job and
get a future; whatever is waiting when the pipeline frees up, up to ``max_batch_size``
requests, goes into the next ``Generator.run`` (which groups compatible requests into shared
pipeline calls). Each caller validates its own request first, so a bad request never fails
anyone else's batch, and each can cancel its own job, queued or running.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Protocol

from sd_pipeline.errors import GenerationCancelledError
from sd_pipeline.generator import GenerationBackend, GenerationJob, GenerationResult

logger = logging.getLogger(__name__)


class QueueFullError(RuntimeError):
    """The queue is at capacity; the caller should try again later."""


class ShuttingDownError(RuntimeError):
    """The service is stopping and takes no new requests."""


class BatchObserver(Protocol):
    """Receives queue facts (implemented by the metrics module)."""

    def queued(self, *, depth: int) -> None: ...

    def started(self, *, waited_seconds: float) -> None: ...

    def idle_while_waiting(self, *, seconds: float) -> None: ...


@dataclass
class _Entry:
    job: GenerationJob
    future: Future[list[GenerationResult]] = field(default_factory=Future)
    enqueued_at: float = field(default_factory=time.perf_counter)


class BatchScheduler:
    """A bounded queue in front of one generation backend, drained in batches by one worker thread."""

    def __init__(
        self,
        generator: GenerationBackend,
        *,
        max_batch_size: int = 8,
        capacity: int = 64,
        observer: BatchObserver | None = None,
    ) -> None:
        self.generator = generator
        self.max_batch_size = max_batch_size
        self.capacity = capacity
        self.observer = observer
        self._waiting: deque[_Entry] = deque()
        self._running: list[_Entry] = []
        self._condition = threading.Condition()
        self._closed = False
        self._idle_since = time.perf_counter()
        self._thread = threading.Thread(target=self._work, name="pipeline-worker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def submit(self, job: GenerationJob) -> Future[list[GenerationResult]]:
        """Queue a job; raises ``QueueFullError`` or ``ShuttingDownError`` at once when it cannot."""
        with self._condition:
            if self._closed:
                raise ShuttingDownError("the server is shutting down; try again in a moment")
            if len(self._waiting) + len(self._running) >= self.capacity:
                raise QueueFullError(f"the server is busy ({self.capacity} requests queued); try again shortly")
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
        self._thread.join(timeout=timeout)
        finished = not self._thread.is_alive()
        with self._condition:
            for entry in self._waiting:
                entry.job.cancel()
                entry.future.set_exception(ShuttingDownError("the server stopped before this request could run"))
            self._waiting.clear()
        return finished

    def _take_batch(self) -> list[_Entry] | None:
        with self._condition:
            while not self._waiting and not self._closed:
                self._condition.wait()
            if not self._waiting:
                return None
            count = min(self.max_batch_size, len(self._waiting))
            self._running = [self._waiting.popleft() for _ in range(count)]
            self._report_depth()
            return list(self._running)

    def _work(self) -> None:
        while True:
            batch = self._take_batch()
            if batch is None:
                return
            started = time.perf_counter()
            if self.observer is not None:
                first_arrival = min(entry.enqueued_at for entry in batch)
                self.observer.idle_while_waiting(seconds=max(0.0, started - max(self._idle_since, first_arrival)))
                for entry in batch:
                    self.observer.started(waited_seconds=started - entry.enqueued_at)
            self._run(batch)
            with self._condition:
                self._running = []
                self._idle_since = time.perf_counter()

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
