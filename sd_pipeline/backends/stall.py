"""The one definition of a stall, used by the worker's supervisor and by every Ray replica:
work is held and no denoising step was made for ``seconds``."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from sd_pipeline.contract.plans import DEFAULT_STALL_SECONDS


class StallWatch:
    """Told when work is held and when a step is made; says whether the engine stalled."""

    def __init__(self, seconds: float = DEFAULT_STALL_SECONDS, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.seconds = seconds
        self.clock = clock
        self._lock = threading.Lock()
        self._holding = False
        self._since = clock()

    def holding(self, busy: bool) -> None:
        """Work is held (``busy``) or not; the clock starts when work arrives at an idle engine."""
        with self._lock:
            if busy and not self._holding:
                self._since = self.clock()
            self._holding = busy

    def stepped(self) -> None:
        with self._lock:
            self._since = self.clock()

    def problem(self) -> str | None:
        """Why the engine counts as stalled, or None."""
        with self._lock:
            quiet = self.clock() - self._since if self._holding else 0.0
        if quiet > self.seconds:
            return f"the step engine made no progress for {quiet:.0f}s while it held work (limit {self.seconds:g}s)"
        return None
