"""Which accelerator errors mean "out of memory" (retry smaller) and which leave the process unusable.

PyTorch reports running out of device memory in several shapes: ``torch.OutOfMemoryError``
from the caching allocator, but also a plain ``RuntimeError`` from cuBLAS or cuDNN when their
own workspace allocation fails, from the CUDA runtime ("CUDA error: out of memory"), or
wrapped by the compiler when it happens while compiling. Other CUDA errors are *sticky*: after
an illegal memory access or a device-side assert every later CUDA call in the process fails,
so the only way back is a new process.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TypeVar

import torch

_OUT_OF_MEMORY_MARKERS = (
    "out of memory",
    "CUBLAS_STATUS_ALLOC_FAILED",
    "CUDNN_STATUS_ALLOC_FAILED",
)
_STICKY_CUDA_MARKERS = (
    "illegal memory access",
    "device-side assert triggered",
    "unspecified launch failure",
    "misaligned address",
    "illegal instruction",
    "CUDA error: an illegal",
    "CUBLAS_STATUS_EXECUTION_FAILED",
    "uncorrectable ECC error",
)


ErrorType = TypeVar("ErrorType", bound=BaseException)


class DeviceFailedError(RuntimeError):
    """The accelerator is in an unrecoverable state; the process must be replaced."""


def _chain(error: BaseException) -> Iterator[BaseException]:
    """The error and everything it was raised from or during (compilers wrap the real cause)."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _mentions(error: BaseException, markers: tuple[str, ...]) -> bool:
    """A RuntimeError somewhere in the chain whose message holds one of ``markers``."""
    return any(
        isinstance(link, RuntimeError) and any(marker in str(link) for marker in markers) for link in _chain(error)
    )


def is_out_of_memory(error: BaseException) -> bool:
    """True for any flavour of running out of accelerator memory."""
    return any(isinstance(link, torch.OutOfMemoryError) for link in _chain(error)) or _mentions(
        error, _OUT_OF_MEMORY_MARKERS
    )


def is_sticky_device_error(error: BaseException) -> bool:
    """True for CUDA errors after which the process cannot use the device again."""
    return _mentions(error, _STICKY_CUDA_MARKERS)


def raise_if_device_failed(error: BaseException) -> None:
    """Raise ``DeviceFailedError`` for a sticky CUDA error (the worker must exit); else return."""
    if is_sticky_device_error(error):
        raise DeviceFailedError(f"the accelerator failed and needs a new process: {error}") from None


def detached(error: ErrorType) -> ErrorType:
    """The same error without tracebacks, so it no longer keeps the failed call's frames (and tensors) alive."""
    for link in _chain(error):
        link.__traceback__ = None
    return error


@dataclass(frozen=True)
class Failure:
    """How a piece of pipeline work failed: out of memory (free memory, retry smaller), or an error
    for the requests it served. Holds no traceback, so no tensors of the failed work."""

    out_of_memory: bool
    error: Exception | None = None


def classify(error: Exception) -> Failure:
    """The one place a failed pipeline call is judged; a sticky device error raises ``DeviceFailedError``."""
    raise_if_device_failed(error)
    if is_out_of_memory(error):
        return Failure(out_of_memory=True)
    return Failure(out_of_memory=False, error=detached(error))
