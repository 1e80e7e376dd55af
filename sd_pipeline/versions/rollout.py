"""The rollout watcher: follows a model's ``current`` version and has the backend switch to it.

Every ``MODEL_POLL_SECONDS`` (and at once on ``check_now``, which SIGHUP calls) it reads
``current``. A new version is fetched and verified into this host's cache, then the backend
starts it beside the old one and switches new requests to it (``Backend.switch_model``). A
version that cannot be fetched, verified, loaded or warmed up is refused: the old one keeps
serving, the log says why, the observer counts it, and it is tried again only when ``current``
changes again. A version that could not be fetched because the store did not answer (an
outage, not a fault of the version) is tried again with back-off, from ``poll_seconds`` doubling
up to ``MAX_RETRY_SECONDS``. Once a version serves, the cache keeps it and the two that arrived
before it, and drops the rest.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Literal, Protocol

from sd_pipeline.contract.backend import Backend, BackendInfo
from sd_pipeline.contract.errors import ModelLoadError, PipelineUnavailableError
from sd_pipeline.versions.cache import ModelCache
from sd_pipeline.versions.location import ModelLocation
from sd_pipeline.versions.registry import ModelRegistry, RegistryError, RegistryUnavailableError

logger = logging.getLogger(__name__)

RolloutOutcome = Literal["succeeded", "refused"]
MAX_RETRY_SECONDS = 600.0  # the longest wait before fetching a version again after an outage


class RolloutObserver(Protocol):
    """Receives rollout facts (implemented by the metrics module)."""

    def model_rollout(self, *, outcome: RolloutOutcome) -> None: ...


class ModelRollout:
    """Watches ``current`` for one ``s3://`` model and rolls the backend to each new version."""

    def __init__(
        self,
        backend: Backend,
        registry: ModelRegistry,
        cache: ModelCache,
        *,
        serving: str,
        poll_seconds: float,
        observer: RolloutObserver | None = None,
        on_switched: Callable[[BackendInfo], None] | None = None,
    ) -> None:
        self.backend = backend
        self.registry = registry
        self.cache = cache
        self.serving = serving  # the version in service
        self.poll_seconds = poll_seconds
        self.observer = observer
        self.on_switched = on_switched
        self.refused: str | None = None  # the last version refused: not tried again until current moves
        self.detail: str | None = None  # for /readyz: a refused version, or 'current' unreadable
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="model-rollout", daemon=True)
        self._unreachable_logged = False
        self._postponed: tuple[str, float, float] | None = None  # version, retry at (monotonic), back-off
        self.clock: Callable[[], float] = time.monotonic

    @property
    def location(self) -> ModelLocation:
        return self.registry.location

    def start(self) -> None:
        self._thread.start()

    def check_now(self) -> None:
        """Look at ``current`` at once (SIGHUP); safe to call from a signal handler."""
        self._wake.set()

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=5)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.poll_seconds if self.poll_seconds > 0 else None)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self.check_once()
            except Exception:
                logger.exception("checking the model's current version failed; trying again at the next check")

    def check_once(self) -> RolloutOutcome | None:
        """Read ``current`` and roll out a new version; the outcome, or None when nothing changed."""
        try:
            version = self.registry.current()
        except RegistryError as error:
            if not self._unreachable_logged:
                logger.warning("cannot read the model's current version (%s); serving %s", error, self.serving)
                self._unreachable_logged = isinstance(error, RegistryUnavailableError)
            self.detail = f"cannot read the model's current version ({error}); serving {self.serving}"
            return None
        self._unreachable_logged = False
        if version == self.serving:
            self.detail = None
            return None
        if version == self.refused:
            return None
        if self._postponed is not None and self._postponed[0] == version and self.clock() < self._postponed[1]:
            return None  # the store failed while fetching it: wait out the back-off
        return self.roll_out(version)

    def roll_out(self, version: str) -> RolloutOutcome | None:
        """Fetch, verify and switch to ``version``: refused (the old one keeps serving) when the
        version is at fault, postponed (None) when the store did not answer."""
        target = self.location.pin(version)
        logger.info("rolling out %s (serving %s)", target, self.serving)
        try:
            self.cache.fetch(self.registry, version)
            info = self.backend.switch_model(str(target))
        except RegistryUnavailableError as error:  # the store, not the version: try again later
            self._postpone(version, error)
            return None
        # The version's fault (files not matching, a bad manifest, 'a' and 'a/b' both listed, it
        # fails to load), or a full disk: refused once rather than downloaded again every poll.
        except (RegistryError, ModelLoadError, PipelineUnavailableError, ValueError, OSError) as error:
            return self._refuse(version, error)
        self._postponed = None
        self.serving, self.refused, self.detail = version, None, None
        self.cache.remember_served(self.location, version)
        self.cache.prune(self.location, serving=version)
        logger.info("now serving %s (hash %s)", target, info.model_hash)
        self._count("succeeded")
        if self.on_switched is not None:
            self.on_switched(info)
        return "succeeded"

    def _postpone(self, version: str, error: Exception) -> None:
        """An outage while fetching ``version``: the next try waits twice as long as the last one."""
        last = self._postponed[2] if self._postponed is not None and self._postponed[0] == version else 0.0
        backoff = min(MAX_RETRY_SECONDS, max(self.poll_seconds, 1.0) if last == 0 else last * 2)
        self._postponed = (version, self.clock() + backoff, backoff)
        self.detail = f"model version {version} not fetched yet ({error}); serving {self.serving}"
        logger.warning("cannot fetch model version %s now (%s); trying again in %.0f s", version, error, backoff)

    def _refuse(self, version: str, error: Exception) -> RolloutOutcome:
        """A fault of the version itself: refused once, not tried again until ``current`` moves."""
        target = self.location.pin(version)
        self._postponed = None
        self.refused = version
        self.detail = f"model version {version} refused ({error}); serving {self.serving}"
        logger.error("model version %s refused; %s keeps serving: %s", target, self.serving, error)
        self._count("refused")
        return "refused"

    def _count(self, outcome: RolloutOutcome) -> None:
        if self.observer is not None:
            self.observer.model_rollout(outcome=outcome)
