"""Errors the generation core raises, each with a message fit to show a user."""

from __future__ import annotations


class InvalidRequestError(ValueError):
    """A request field is out of range; ``field`` names it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.detail = message

    def __reduce__(self) -> tuple[type[InvalidRequestError], tuple[str, str]]:
        return (type(self), (self.field, self.detail))  # crosses process and Ray boundaries intact


class ModelLoadError(RuntimeError):
    """The model could not be found, downloaded or loaded."""


class GenerationCancelledError(RuntimeError):
    """Every request in a pipeline call was cancelled, so the call stopped early."""


class OutOfMemoryError(RuntimeError):
    """The accelerator ran out of memory even for a single image."""


class WorkerLostError(RuntimeError):
    """The worker process or replica running a request died, stalled or stopped serving mid-run;
    ``reason`` is ``died`` or ``stalled``. Admission retries the request once, alone (``sd_pipeline.admission``)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason

    def __reduce__(self) -> tuple[type[WorkerLostError], tuple[str, str]]:
        return (type(self), (self.reason, str(self)))  # crosses process and Ray boundaries intact


class WorkerCrashedError(RuntimeError):
    """A request was running each time the image generator died (twice), so it is not retried again."""


class PipelineUnavailableError(RuntimeError):
    """No image generator can take the request (the service is stopping, or every replica is full)."""
