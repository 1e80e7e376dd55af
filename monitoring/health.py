"""Liveness and readiness: model loaded, pipeline worker ready, storage reachable, not shutting down."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

ProblemCheck = Callable[[], str | None]


@dataclass(frozen=True)
class ReadinessReport:
    """Whether the app should get traffic, and why not."""

    ready: bool
    reasons: list[str]
    details: list[str] = field(default_factory=list)  # worth knowing, not a reason to stop traffic


@dataclass(frozen=True)
class LivenessReport:
    """Whether the process is worth keeping, and why not (a restart would help)."""

    alive: bool
    reasons: list[str]


class Health:
    """Flags set by the app as it starts and stops, a cached storage check, and the pipeline's own checks.

    ``pipeline_readiness`` and ``pipeline_liveness`` return a reason when the pipeline cannot
    run requests now, or is crash-looping (the backend provides both).
    """

    def __init__(
        self,
        *,
        storage_check: Callable[[], None] | None = None,
        pipeline_readiness: ProblemCheck | None = None,
        pipeline_liveness: ProblemCheck | None = None,
        cache_seconds: float = 5.0,
    ) -> None:
        self.storage_check = storage_check
        self.pipeline_readiness = pipeline_readiness
        self.pipeline_liveness = pipeline_liveness
        self.cache_seconds = cache_seconds
        self.model_detail: ProblemCheck | None = None  # e.g. a version served from the cache while S3 is down
        self.storage_detail: ProblemCheck | None = None  # e.g. S3 down while the spool takes the images
        self._storage_detail: str | None = None
        self._storage_checking = False
        self._model_loaded = False
        self._serving = False
        self._shutting_down = False
        self._lock = threading.Lock()
        self._storage_checked_at = float("-inf")
        self._storage_problem: str | None = None

    def model_loaded(self) -> None:
        self._model_loaded = True

    def serving(self) -> None:
        self._serving = True

    def shutting_down(self) -> None:
        self._shutting_down = True

    def readiness(self) -> ReadinessReport:
        """Ready when the model is loaded, the web server listens, storage answers and no shutdown began."""
        reasons = []
        if not self._model_loaded:
            reasons.append("model not loaded")
        elif self.pipeline_readiness is not None and (problem := self.pipeline_readiness()):
            reasons.append(problem)
        if not self._serving:
            reasons.append("web server not started")
        if self._shutting_down:
            reasons.append("shutting down")
        problem = self._storage()
        if problem:
            reasons.append(problem)
        details = [self.model_detail() if self.model_detail is not None else None, self._storage_detail]
        return ReadinessReport(ready=not reasons, reasons=reasons, details=[detail for detail in details if detail])

    def liveness(self) -> LivenessReport:
        """Alive unless the pipeline is crash-looping."""
        problem = self.pipeline_liveness() if self.pipeline_liveness is not None else None
        return LivenessReport(alive=problem is None, reasons=[problem] if problem else [])

    def _storage(self) -> str | None:
        """The storage problem as last checked. A due check runs in the background (S3 timing out
        must not make /readyz slow: a balancer's check would time out and drop this front end);
        the very first asks only ``storage_check`` here (the spool's room: no network), and its
        details (``storage_detail``: S3 answering?) follow from the background."""
        if self.storage_check is None:
            return None
        with self._lock:
            first = self._storage_checked_at == float("-inf")
            due = time.monotonic() - self._storage_checked_at >= self.cache_seconds
            start = due and not self._storage_checking
            self._storage_checking = self._storage_checking or start
        if first and self._storage_problem is None:
            self._storage_problem = self._problem()
        if start:
            threading.Thread(target=self._check_storage, name="storage-check", daemon=True).start()
        return self._storage_problem

    def _problem(self) -> str | None:
        assert self.storage_check is not None
        try:
            self.storage_check()
        except Exception as error:  # noqa: BLE001 - any failure means "not ready", reported by type
            return f"storage unreachable: {type(error).__name__}"
        return None

    def _check_storage(self) -> None:
        problem = self._problem()
        detail = self.storage_detail() if self.storage_detail is not None else None
        with self._lock:
            self._storage_problem, self._storage_detail = problem, detail
            self._storage_checked_at = time.monotonic()
            self._storage_checking = False
