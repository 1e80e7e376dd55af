"""The CPU thread count of each denoising step, chosen by measuring (the local worker on a CPU).

Which is faster depends on the model and the load: a lone request runs fastest on every core
(the web server is idle), while eight clients' steps of a light model stall on all cores,
because their OpenMP threads wait on the one the web server just took, and run faster on all
but one; a compute-heavy model is faster on every core either way. So the engine keeps, per
kind of step (UNet batch rounded up to a power of two, and image size), the median of the last
few times per UNet sample for each candidate count (one step slowed by the web server cannot
flip the choice), uses the fastest, and now and then tries another so the choice follows the load.
"""

from __future__ import annotations

import logging
import statistics
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)


@dataclass
class _Timings:
    """The recent step times of each thread count, for one kind of step."""

    recent: dict[int, deque[float]] = field(default_factory=dict)
    steps: int = 0

    def measured(self, threads: int) -> int:
        """How many recent times this thread count has (at most the tuner's ``remembered``)."""
        return len(self.recent.get(threads, ()))

    def typical(self, threads: int) -> float:
        return statistics.median(self.recent[threads])


class ThreadTuner:
    """Chooses torch's thread count for each step from ``choices`` by measured step time."""

    def __init__(
        self,
        choices: Sequence[int],
        *,
        set_threads: Callable[[int], None],
        explore_every: int = 25,
        trials: int = 3,
        remembered: int = 5,
    ) -> None:
        if len(set(choices)) < 2:
            raise ValueError("a thread tuner needs at least two thread counts to choose between")
        if not 1 <= trials <= remembered:
            raise ValueError("trials must be from 1 to remembered: a count's trials are among its recent times")
        self.choices = sorted(set(choices))
        self.set_threads = set_threads
        self.explore_every = explore_every
        self.trials = trials
        self.remembered = remembered
        self._kinds: dict[Hashable, _Timings] = {}
        self._current: int | None = None
        self._chosen: tuple[Hashable, int] | None = None

    def before_step(self, *kind: Hashable) -> int:
        """Set and return the thread count for the next step of this kind."""
        timings = self._kinds.setdefault(kind, _Timings())
        timings.steps += 1
        threads = self._pick(timings)
        if threads != self._current:
            self.set_threads(threads)
            self._current = threads
        self._chosen = (kind, threads)
        return threads

    def after_step(self, seconds: float) -> None:
        """Record how long the step chosen by the last ``before_step`` took (per sample, or any
        measure that is comparable between steps of one kind)."""
        if self._chosen is None:
            return
        kind, threads = self._chosen
        self._chosen = None
        timings = self._kinds[kind]
        timings.recent.setdefault(threads, deque(maxlen=self.remembered)).append(seconds)

    def best(self, *kind: Hashable) -> int | None:
        """The fastest thread count measured for this kind of step, if every count was tried."""
        timings = self._kinds.get(kind)
        if timings is None or any(timings.measured(n) < self.trials for n in self.choices):
            return None
        return min(self.choices, key=timings.typical)

    def _pick(self, timings: _Timings) -> int:
        untried = [n for n in self.choices if timings.measured(n) < self.trials]
        if untried:
            return min(untried, key=timings.measured)
        best = min(self.choices, key=timings.typical)
        if timings.steps % self.explore_every == 0:
            others = [n for n in self.choices if n != best]
            return others[(timings.steps // self.explore_every) % len(others)]
        return best


def samples_bucket(samples: int) -> int:
    """A UNet batch rounded up to a power of two: steps of one bucket cost alike per sample."""
    return 1 << max(0, samples - 1).bit_length()
