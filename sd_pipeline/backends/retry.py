"""The failure rules every backend applies, written once.

A worker process or replica can be lost mid-run (killed, crashed, a fatal device error, a
stalled engine). Whichever backend ran the request reports it as ``WorkerLostError`` (raised,
or as a job's outcome), and ``Runs`` applies the same rules:

- runs from several threads share the backend (their jobs share engine steps);
- a job lost with its worker is retried once, alone: the retry waits until the runs sharing
  the backend have finished and holds back new ones, so a request that kills its worker
  cannot take an innocent neighbour down twice;
- lost again while it runs alone, it fails with ``WorkerCrashedError``: a request that kills
  the worker cannot crash-loop the service;
- a cancelled job is never retried.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator, Sequence

from sd_pipeline.contract.errors import GenerationCancelledError, WorkerCrashedError, WorkerLostError
from sd_pipeline.contract.jobs import GenerationJob, JobOutcome

logger = logging.getLogger(__name__)

CRASHED_TWICE = "this request stopped the image generator twice; try other settings"

RunOnce = Callable[[Sequence[GenerationJob]], list[JobOutcome]]


def run_with_retry(
    jobs: Sequence[GenerationJob], run_once: RunOnce, run_alone: RunOnce | None = None
) -> list[JobOutcome]:
    """Run jobs; retry each job lost with its worker once, alone; a second loss fails it clearly.

    ``run_once`` may raise ``WorkerLostError`` (every job was lost) or give it as a job's
    outcome (only that job was lost). ``run_alone`` runs a retry with nothing beside it
    (default: ``run_once``).
    """
    try:
        outcomes = run_once(jobs)
    except WorkerLostError as lost:
        outcomes = [JobOutcome(error=lost) for _ in jobs]
    return [_retried(job, outcome, run_alone or run_once) for job, outcome in zip(jobs, outcomes, strict=True)]


def _retried(job: GenerationJob, outcome: JobOutcome, run_alone: RunOnce) -> JobOutcome:
    if not isinstance(outcome.error, WorkerLostError):
        return outcome
    if job.cancelled:
        return JobOutcome(error=GenerationCancelledError("cancelled"))
    logger.warning("%s; retrying its request once, alone", outcome.error)
    try:
        (retry,) = run_alone([job])
    except WorkerLostError as lost:
        retry = JobOutcome(error=lost)
    if isinstance(retry.error, WorkerLostError):
        logger.error("%s again while one request ran alone; refusing that request", retry.error)
        return JobOutcome(error=WorkerCrashedError(CRASHED_TWICE))
    return retry


class RunGate:
    """Shared runs go side by side; a run ``alone`` waits for them to finish, and holds back new
    ones (it goes first) until it is done."""

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._shared = 0
        self._alone_waiting = 0
        self._alone_running = False

    @contextlib.contextmanager
    def shared(self, *, give_up: Callable[[], bool] = lambda: False) -> Iterator[bool]:
        """Yields True once shared runs may go, or False if ``give_up`` turned true while waiting."""
        with self._condition:
            while self._alone_running or self._alone_waiting:
                if give_up():
                    yield False
                    return
                self._condition.wait(timeout=0.1)
            self._shared += 1
        try:
            yield True
        finally:
            with self._condition:
                self._shared -= 1
                self._condition.notify_all()

    @contextlib.contextmanager
    def alone(self) -> Iterator[None]:
        with self._condition:
            self._alone_waiting += 1
            self._condition.wait_for(lambda: not self._alone_running and not self._shared)
            self._alone_waiting -= 1
            self._alone_running = True
        try:
            yield
        finally:
            with self._condition:
                self._alone_running = False
                self._condition.notify_all()


class Runs:
    """A backend's ``run``: ``run_once`` under the rules above. ``before_retry`` (optional) runs
    first when a retry goes alone, e.g. to wait until the lost replica is gone."""

    def __init__(self, run_once: RunOnce, *, before_retry: Callable[[], None] | None = None) -> None:
        self._run_once = run_once
        self._before_retry = before_retry
        self._gate = RunGate()

    def run(self, jobs: Sequence[GenerationJob]) -> list[JobOutcome]:
        return run_with_retry(jobs, self._shared, self._alone)

    def _shared(self, jobs: Sequence[GenerationJob]) -> list[JobOutcome]:
        with self._gate.shared(give_up=lambda: all(job.cancelled for job in jobs)) as admitted:
            if not admitted:  # stopped while a retry ran alone
                return [JobOutcome(error=GenerationCancelledError("cancelled")) for _ in jobs]
            return self._run_once(jobs)

    def _alone(self, jobs: Sequence[GenerationJob]) -> list[JobOutcome]:
        with self._gate.alone():
            if self._before_retry is not None:
                self._before_retry()
            return self._run_once(jobs)
