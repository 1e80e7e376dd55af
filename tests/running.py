"""Running requests in tests the way the app does: through admission, or straight to a worker."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import Future

from sd_pipeline.admission import Admission
from sd_pipeline.backends.local.process import PipelineProcess
from sd_pipeline.contract.backend import Backend, ReplyTo
from sd_pipeline.contract.jobs import GenerationResult, JobOutcome
from sd_pipeline.contract.lifecycle import Request
from sd_pipeline.contract.messages import Finished, Lost, PreviewReady, Reply, Step

TIMEOUT = 300.0


def dispatcher(backend: Backend, *, capacity: int = 64) -> Admission:
    """The app's one dispatcher in front of ``backend`` (one per backend: it listens to it)."""
    admission = Admission(backend, capacity=capacity)
    admission.start()
    return admission


def outcomes(futures: Sequence[Future[list[GenerationResult]]], *, timeout: float = TIMEOUT) -> list[JobOutcome]:
    """Each future's images, or the error that ended it."""
    ended = []
    for future in futures:
        error = future.exception(timeout=timeout)
        ended.append(JobOutcome(error=error) if error is not None else JobOutcome(results=future.result()))
    return ended


def run_through(admission: Admission, requests: Sequence[Request], *, timeout: float = TIMEOUT) -> list[JobOutcome]:
    """Submit ``requests`` together and wait for each one's outcome."""
    return outcomes([admission.submit(request) for request in requests], timeout=timeout)


def run_on_worker(
    worker: PipelineProcess, requests: Sequence[Request], *, timeout: float = TIMEOUT
) -> list[JobOutcome]:
    """Submit straight to one worker process (no admission, no retry); each request's outcome.
    A request marked cancelled (e.g. from its ``on_step``) is cancelled on the worker at its next step."""
    return run_direct(worker.submit, lambda request: worker.cancel(request.id), requests, timeout=timeout)


def run_direct(
    submit: Callable[[Request, ReplyTo], None],
    cancel: Callable[[Request], None],
    requests: Sequence[Request],
    *,
    timeout: float = TIMEOUT,
) -> list[JobOutcome]:
    """Submit straight to an engine's ``submit`` (no admission, no retry); each request's outcome."""
    ended: dict[str, Future[JobOutcome]] = {request.id: Future() for request in requests}
    by_id = {request.id: request for request in requests}

    def reply(message: Reply) -> None:
        request = by_id[message.id]
        if isinstance(message, Step):
            request.report_step(message.step, message.total)
            if request.cancelled:
                cancel(request)
        elif isinstance(message, PreviewReady):
            request.report_preview(message.preview())
        elif isinstance(message, Finished):
            ended[message.id].set_result(message.outcome(request.inputs))
        elif isinstance(message, Lost):
            ended[message.id].set_result(JobOutcome(error=message.error()))

    for request in requests:
        submit(request, reply)
    return [ended[request.id].result(timeout=timeout) for request in requests]
