"""The rollout watcher: follows a model's ``current`` version and has the backend switch to it.

Every ``MODEL_POLL_SECONDS`` (and at once on ``check_now``, which SIGHUP calls) it reads
``current``. A new version is fetched and verified into this host's cache, then the backend
starts it beside the old one and switches new requests to it (``Backend.switch_model``). A
version that cannot be fetched, verified, loaded or warmed up is refused: the old one keeps
serving, the log says why, the observer counts it, and it is tried again only when ``current``
changes again.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Literal, Protocol

from sd_pipeline.contract.backend import Backend, BackendInfo
from sd_pipeline.contract.errors import ModelLoadError, PipelineUnavailableError
from sd_pipeline.models.cache import ModelCache
from sd_pipeline.models.location import ModelLocation
from sd_pipeline.models.registry import ModelRegistry, RegistryError, RegistryUnavailableError

logger = logging.getLogger(__name__)

RolloutOutcome = Literal["succeeded", "refused"]


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
        return self.roll_out(version)

    def roll_out(self, version: str) -> RolloutOutcome:
        """Fetch, verify and switch to ``version``; refused (the old one keeps serving) on any failure."""
        target = self.location.pin(version)
        logger.info("rolling out %s (serving %s)", target, self.serving)
        try:
            self.cache.fetch(self.registry, version)
            info = self.backend.switch_model(str(target))
        except (RegistryError, ModelLoadError, PipelineUnavailableError) as error:
            self.refused = version
            self.detail = f"model version {version} refused ({error}); serving {self.serving}"
            logger.error("model version %s refused; %s keeps serving: %s", target, self.serving, error)
            self._count("refused")
            return "refused"
        self.serving, self.refused, self.detail = version, None, None
        self.cache.remember_served(self.location, version)
        logger.info("now serving %s (hash %s)", target, info.model_hash)
        self._count("succeeded")
        if self.on_switched is not None:
            self.on_switched(info)
        return "succeeded"

    def _count(self, outcome: RolloutOutcome) -> None:
        if self.observer is not None:
            self.observer.model_rollout(outcome=outcome)
