"""What a user reads while waiting: position, an estimate from the measured step time, time left."""

from __future__ import annotations

import threading
import time

_WEIGHT = 0.2  # of the newest step in the running mean: follows load changes within a few steps


class StepClock:
    """Seconds per denoising step as users see them (batching included), as a running mean."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seconds: float | None = None

    @property
    def seconds(self) -> float | None:
        return self._seconds

    def observe(self, seconds: float) -> None:
        with self._lock:
            previous = self._seconds
            self._seconds = seconds if previous is None else previous + _WEIGHT * (seconds - previous)


class StepTimer:
    """Feeds one request's step reports into a ``StepClock``."""

    def __init__(self, clock: StepClock) -> None:
        self.clock = clock
        self._last: tuple[int, float] | None = None

    def step(self, step: int) -> None:
        now = time.monotonic()
        if self._last is not None and step > self._last[0]:
            self.clock.observe((now - self._last[1]) / (step - self._last[0]))
        self._last = (step, now)


def about(seconds: float) -> str:
    """A rounded duration for people: "about 14 s", "about 3 min", "under a second"."""
    if seconds < 1:
        return "under a second"
    if seconds < 90:
        return f"about {round(seconds)} s"
    return f"about {round(seconds / 60)} min"


def waiting_status(ahead: int, steps_until_done: int | None, step_seconds: float | None) -> str:
    """Before the first step: "2 ahead · about 14 s" (the estimate once a step time is known)."""
    status = f"waiting for the GPU: {ahead} ahead"
    if steps_until_done is None or step_seconds is None:
        return status
    return f"{status} · {about(steps_until_done * step_seconds)}"


def running_status(step: int, total: int, step_seconds: float | None) -> str:
    """During generation: "step 3/25 · about 9 s left"."""
    status = f"step {step}/{total}"
    if step_seconds is None or step >= total:
        return status
    return f"{status} · {about((total - step) * step_seconds)} left"
