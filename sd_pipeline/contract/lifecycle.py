"""A request's one record from the page to the engine: ``Request`` and its ``Status``.

The app's admission owns each ``Request``; a worker process or replica holds a ``Request`` of
its own, made from the ``Submit`` message that carried it there (``contract.messages``). Its
status is the only place that says where a request stands: waiting, running, retrying alone,
done, failed or cancelled. Cancel is a status change that the engine sees at its next step.
"""

from __future__ import annotations

import threading
import time
import uuid
from concurrent.futures import Future
from dataclasses import dataclass, field
from enum import StrEnum

from sd_pipeline.contract.jobs import GenerationResult, Preview, PreviewCallback, StepCallback
from sd_pipeline.contract.request import GenerationRequest


class Status(StrEnum):
    """Where a request stands. The last three are final."""

    WAITING = "waiting"  # in admission's queue
    RUNNING = "running"  # handed to a backend
    RETRYING = "retrying alone"  # lost with its worker once; runs again with nothing beside it
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def final(self) -> bool:
        return self in (Status.DONE, Status.FAILED, Status.CANCELLED)


def new_request_id() -> str:
    return uuid.uuid4().hex


@dataclass(eq=False)
class Request:
    """One request: who asked, what for, where it stands, what it made so far."""

    inputs: GenerationRequest
    owner: str = ""  # whose request it is, for fair admission; "" when nobody is named
    address: str = ""  # an anonymous caller's client address (shares a limit and turns); "" when logged in
    on_step: StepCallback | None = None
    on_preview: PreviewCallback | None = None  # set only when the caller shows previews
    id: str = field(default_factory=new_request_id)
    status: Status = Status.WAITING
    attempts: int = 0  # how many times it was handed to a backend
    steps_done: int = 0
    reported_total: int = 0  # the steps it runs, as the engine reported them (0: not yet)
    preview: Preview | None = None  # the newest preview
    results: list[GenerationResult] = field(default_factory=list)
    error: Exception | None = None
    queued_at: float = field(default_factory=time.perf_counter)
    ended: Future[list[GenerationResult]] = field(default_factory=Future, repr=False)  # set once it is final
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def steps_total(self) -> int:
        """The steps it runs: as the engine reports them once it runs (a family may cut a schedule
        from a picture one step differently), before that as the request says."""
        return self.reported_total or self.inputs.denoising_steps

    @property
    def steps_left(self) -> int:
        return max(0, self.steps_total - self.steps_done)

    @property
    def wants_previews(self) -> bool:
        return self.on_preview is not None

    @property
    def cancelled(self) -> bool:
        return self.status is Status.CANCELLED

    def report_step(self, step: int, total: int) -> None:
        """Record that ``step`` of ``total`` is done and tell ``on_step``."""
        self.steps_done, self.reported_total = step, total
        if self.on_step is not None:
            self.on_step(step, total)

    def report_preview(self, preview: Preview) -> None:
        """Keep the newest preview and hand it to ``on_preview`` (none once cancelled: Stop ends the pictures too)."""
        if self.cancelled:
            return
        self.preview = preview
        if self.on_preview is not None:
            self.on_preview(preview)

    def cancel(self) -> bool:
        """Mark it cancelled (unless it already ended); True if this call did. The engine drops it
        at its next step; admission drops it at once while it waits."""
        return self.move(Status.CANCELLED)

    def move(self, status: Status) -> bool:
        """Change status unless it is final already (a cancel stays a cancel); True if it changed."""
        with self._lock:
            if self.status.final:
                return False
            self.status = status
            return True

    def finish(self, results: list[GenerationResult]) -> None:
        with self._lock:
            if not self.status.final:
                self.status, self.results = Status.DONE, results

    def fail(self, error: Exception) -> None:
        with self._lock:
            if not self.status.final:
                self.status, self.error = Status.FAILED, error
