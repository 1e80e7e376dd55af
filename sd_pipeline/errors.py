"""Errors the generation core raises, each with a message fit to show a user."""

from __future__ import annotations


class InvalidRequestError(ValueError):
    """A request field is out of range; ``field`` names it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class ModelLoadError(RuntimeError):
    """The model could not be found, downloaded or loaded."""


class GenerationCancelledError(RuntimeError):
    """Every request in a pipeline call was cancelled, so the call stopped early."""


class OutOfMemoryError(RuntimeError):
    """The accelerator ran out of memory even for a single image."""


class WorkerLostError(RuntimeError):
    """The process running the pipeline died or stalled mid-run; ``reason`` is ``died`` or ``stalled``."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class WorkerCrashedError(RuntimeError):
    """A request was running each time the image generator died (twice), so it is not retried again."""


class PipelineUnavailableError(RuntimeError):
    """No image generator can take the request (the service is stopping, or every replica is full)."""
