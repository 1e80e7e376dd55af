"""The local backend: one worker process, replaced when it dies or stalls.

A worker process can die (the kernel's OOM killer, a segfault in a native library, a fatal
CUDA error, an engine that stopped serving) or hang. ``LocalBackend`` notices within a
fraction of a second, starts a new one (with back-off while starting keeps failing) and
reports readiness and crash loops for ``/readyz`` and ``/healthz``. The requests that were
running get ``Lost``, and admission retries each once, alone (``sd_pipeline.admission``).

A new model version is started beside the old worker (``overlap``) or after it (``drain``, for
a GPU that cannot hold two models); new requests go to it once it is ready, requests running on
the old worker finish there, then the old worker stops. A version that cannot start is refused
and the old worker keeps serving.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Mapping
from multiprocessing.connection import wait
from typing import Any, Literal, Protocol

from sd_pipeline.backends.local.process import PipelineProcess
from sd_pipeline.backends.tokens import token_budget
from sd_pipeline.contract.backend import BackendInfo, ReplyTo, RequestChecker
from sd_pipeline.contract.errors import ModelLoadError, PipelineUnavailableError
from sd_pipeline.contract.lifecycle import Request
from sd_pipeline.contract.messages import Finished, Lost, Reply
from sd_pipeline.contract.plans import RestartPolicy
from sd_pipeline.contract.request import GenerationRequest, RequestLimits
from sd_pipeline.contract.settings import PipelineSettings
from sd_pipeline.loras.sources import adapter_listing
from sd_pipeline.versions.location import pinned_version

logger = logging.getLogger(__name__)

_WATCH_INTERVAL = 0.25

RolloutMode = Literal["overlap", "drain"]


class SupervisorObserver(Protocol):
    """Receives worker facts (implemented by the metrics module)."""

    def worker_restarted(self, *, reason: str) -> None: ...

    def worker_up(self, *, up: bool) -> None: ...


class LocalBackend:
    """The ``Backend`` over a pipeline worker process that is replaced when it dies or stalls."""

    def __init__(
        self,
        settings: PipelineSettings,
        new_worker: Callable[[PipelineSettings], PipelineProcess],
        *,
        limits: RequestLimits | None = None,
        max_running: int = 8,
        policy: RestartPolicy | None = None,
        observer: SupervisorObserver | None = None,
        rollout: RolloutMode = "overlap",
    ) -> None:
        self.settings = settings  # what a new (or replacement) worker loads
        self.new_worker = new_worker
        self.rollout = rollout
        self.checker = RequestChecker(
            limits or RequestLimits(), adapters=adapter_listing(settings.lora_dir, settings.lora_store)
        )
        self.max_running = max_running
        self.policy = policy or RestartPolicy()
        self.observer = observer
        self._condition = threading.Condition()
        self._worker: PipelineProcess | None = None
        self._starting: PipelineProcess | None = None
        self._ready = False
        self._problem: str | None = "pipeline worker not started"
        self._closed = False
        self._restarts: collections.deque[float] = collections.deque()
        self._in_use: collections.Counter[PipelineProcess] = collections.Counter()  # requests per worker
        self._holders: dict[str, PipelineProcess] = {}  # the worker each running request is on, by id
        self._listeners: list[Callable[[], None]] = []
        self._switching = False  # a drained switch: new runs wait, the worker is swapped
        self._switch_lock = threading.Lock()  # one model switch at a time
        self._notice: str | None = None
        self._crash_loop_logged = False
        self._watcher = threading.Thread(target=self._watch, name="worker-supervisor", daemon=True)

    # The Backend surface.
    @property
    def model(self) -> str:
        return self._current().model

    def check(self, data: Mapping[str, Any]) -> GenerationRequest:
        """Validate in this process (works while the worker restarts)."""
        return self.checker.check(data)

    def accepting(self) -> bool:
        """A worker is ready and no drained switch holds new requests."""
        with self._condition:
            return self._ready and not self._switching and not self._closed and self._worker is not None

    def when_accepting(self, callback: Callable[[], None]) -> None:
        self._listeners.append(callback)

    def submit(self, request: Request, reply: ReplyTo) -> None:
        """Send ``request`` to the current worker (``PipelineUnavailableError`` once closed)."""
        with self._condition:
            worker = self._worker
            if self._closed or worker is None:
                raise PipelineUnavailableError("the server is stopping; try again in a moment")
            self._in_use[worker] += 1
            self._holders[request.id] = worker
        worker.submit(request, lambda message: self._relay(worker, message, reply))

    def cancel(self, request: Request) -> None:
        with self._condition:
            worker = self._holders.get(request.id)
        if worker is not None:
            worker.cancel(request.id)

    def _relay(self, worker: PipelineProcess, message: Reply, reply: ReplyTo) -> None:
        """A worker's message on its way to admission; a request's end frees its worker."""
        if isinstance(message, Finished | Lost):
            with self._condition:
                self._holders.pop(message.id, None)
                self._in_use[worker] -= 1
                if self._in_use[worker] <= 0:
                    del self._in_use[worker]
                if isinstance(message, Lost) and self._worker is worker and not self._switching:
                    self._ready, self._problem = False, f"pipeline worker restarting (it {message.reason})"
                self._condition.notify_all()
        reply(message)

    def _announce(self) -> None:
        """Tell admission (outside every lock) that requests may start again."""
        for listener in list(self._listeners):
            listener()

    def switch_model(self, model: str) -> BackendInfo:
        """Serve ``model`` instead of the current one (see the module's docstring); raises
        ``ModelLoadError`` and keeps the old worker serving if the new one cannot start."""
        with self._switch_lock:
            settings = self.settings.model_copy(update={"model": model})
            tokens = token_budget(settings)  # fetches and verifies a version from S3 first
            info = self._switch_drained(settings) if self.rollout == "drain" else self._switch_beside(settings)
            self.checker.serve(info, tokens)
            return info

    def _switch_beside(self, settings: PipelineSettings) -> BackendInfo:
        """Load the new worker while the old one serves, then send new runs to it."""
        worker, info = self._start_new(settings)
        with self._condition:
            old, self._worker, self.settings = self._worker, worker, settings
            self._ready, self._problem = True, None
            self._condition.notify_all()
        self._announce()
        if old is not None:
            self._retire(old)
        return info

    def _switch_drained(self, settings: PipelineSettings) -> BackendInfo:
        """Hold new runs, let the old worker finish, stop it, then start the new one (or the old
        one again if the new cannot start): requests wait, none fail."""
        with self._condition:
            self._switching = True
            self._notice = f"waiting while the model switches to {pinned_version(settings.model) or settings.model}"
            old = self._worker
        try:
            if old is not None:
                self._retire(old)
            try:
                worker, info = self._start_new(settings)
            except ModelLoadError:
                logger.error("model %s refused; starting the previous one again", settings.model)
                worker, _ = self._start_new(self.settings)
                with self._condition:
                    self._worker = worker
                raise
            with self._condition:
                self._worker, self.settings = worker, settings
            return info
        finally:
            with self._condition:
                self._switching, self._notice = False, None
                self._condition.notify_all()
            self._announce()

    def _start_new(self, settings: PipelineSettings) -> tuple[PipelineProcess, BackendInfo]:
        """A worker for ``settings``, loaded and warm; raises ``ModelLoadError``."""
        worker = self.new_worker(settings)
        with self._condition:
            if self._closed:
                raise PipelineUnavailableError("the server is stopping")
            self._starting = worker
        try:
            info = worker.start()
        except ModelLoadError:
            worker.close(timeout=1)
            raise
        finally:
            with self._condition:
                self._starting = None
        with self._condition:
            if self._closed:
                worker.close(timeout=1)
                raise PipelineUnavailableError("the server is stopping")
        logger.info("pipeline worker for %s ready (pid %s)", info.label, worker.pid)
        return worker, info

    def _retire(self, worker: PipelineProcess) -> None:
        """Stop a worker once no run uses it (its requests finish there)."""
        with self._condition:
            self._condition.wait_for(lambda: self._in_use[worker] <= 0 or self._closed)
        worker.close()
        logger.info("previous pipeline worker (pid %s) stopped", worker.pid)

    def notice(self) -> str | None:
        """Set while a drained model switch holds new requests."""
        return self._notice

    # Lifecycle and health.
    def start(self) -> BackendInfo:
        """Start the first worker (raises ``ModelLoadError``) and begin watching it."""
        worker = self.new_worker(self.settings)
        info = worker.start()
        self.checker.serve(info, token_budget(self.settings))
        with self._condition:
            self._worker, self._ready, self._problem = worker, True, None
        self._report_up(True)
        self._watcher.start()
        return info

    @property
    def pid(self) -> int | None:
        """The current worker's process id (None before the first start)."""
        return self._worker.pid if self._worker else None

    def readiness_problem(self) -> str | None:
        """Why no request can run right now (None when a worker is ready)."""
        with self._condition:
            return None if self._ready else self._problem

    def liveness_problem(self) -> str | None:
        """A crash loop: too many restarts in the window, so the container should be restarted."""
        with self._condition:
            recent = self._recent_restarts()
            if recent < self.policy.max_restarts:
                self._crash_loop_logged = False
                return None
            plural = "s" if recent != 1 else ""
            return f"pipeline worker crash loop: {recent} restart{plural} in the last {self.policy.restart_window:g}s"

    def close(self) -> None:
        """Stop watching and stop the worker (and one being started)."""
        with self._condition:
            self._closed = True
            self._condition.notify_all()
        deadline = time.monotonic() + 60
        while self._watcher.is_alive() and time.monotonic() < deadline:
            starting = self._starting
            if starting is not None:
                starting.kill()  # a worker still loading has nothing to finish
            self._watcher.join(timeout=0.2)
        if self._worker is not None:
            self._worker.close()

    # Internals.
    def _current(self) -> PipelineProcess:
        if self._worker is None:
            raise PipelineUnavailableError("the image generator has not started")
        return self._worker

    def _watch(self) -> None:
        while True:
            with self._condition:
                if self._closed:
                    return
                worker = self._worker
            assert worker is not None
            ended = wait([worker.sentinel], timeout=_WATCH_INTERVAL)
            if worker.is_alive():
                if ended:  # exiting but not yet reaped (another thread may be joining it): look again later
                    with self._condition:
                        self._condition.wait(timeout=_WATCH_INTERVAL)
                continue
            with self._condition:
                if self._closed:
                    return
                if worker is not self._worker or self._switching:
                    # A worker retired by a model switch, not a crash: wait for the switch to install
                    # the next one (a dead worker's sentinel answers at once: no busy loop meanwhile).
                    self._condition.wait(timeout=_WATCH_INTERVAL)
                    continue
            self._replace(worker)

    def _replace(self, dead: PipelineProcess) -> None:
        """Start workers until one is ready, backing off while they fail to start."""
        reason = "stalled" if dead.stalled else "died"
        with self._condition:
            self._ready, self._problem = False, f"pipeline worker restarting (it {reason})"
        self._report_up(False)
        logger.error("pipeline worker (pid %s) %s; starting a new one", dead.pid, reason)
        dead.close(timeout=1)
        delay = 0.0
        while True:
            if self._superseded(dead):
                return
            self._count_restart(reason)
            worker = self.new_worker(self.settings)
            with self._condition:
                if self._closed:
                    return
                self._starting = worker
            try:
                info = worker.start()
            except ModelLoadError as error:
                worker.close(timeout=1)
                delay = min(max(delay * 2, self.policy.backoff_initial), self.policy.backoff_max)
                logger.error("pipeline worker failed to start (%s); trying again in %gs", error, delay)
                with self._condition:
                    self._starting, self._problem = None, f"pipeline worker failed to start; retrying in {delay:g}s"
                    if self._condition.wait_for(self._is_closed, timeout=delay):
                        return
                reason = "died"
                continue
            with self._condition:
                self._starting = None
                if self._closed:
                    worker.close(timeout=1)
                    return
                installed = self._worker is dead
                if installed:
                    self._worker, self._ready, self._problem = worker, True, None
                    self._condition.notify_all()
            if not installed:  # a model switch put its worker in place meanwhile: that one serves
                logger.info("a model switch replaced the dead worker first; pid %s stops", worker.pid)
                worker.close(timeout=1)
                self._report_up(True)
                return
            self._report_up(True)
            self._announce()
            logger.info("pipeline worker restarted (pid %s, loaded in %.1fs)", worker.pid, info.load_seconds)
            return

    def _is_closed(self) -> bool:
        return self._closed

    def _superseded(self, dead: PipelineProcess) -> bool:
        """Whether a model switch installed a worker in place of ``dead`` (then it is reported up)."""
        with self._condition:
            replaced = self._worker is not dead and self._worker is not None and self._ready
        if replaced:
            self._report_up(True)
        return replaced

    def _count_restart(self, reason: str) -> None:
        if self.observer is not None:
            self.observer.worker_restarted(reason=reason)
        with self._condition:
            self._restarts.append(time.monotonic())
            recent = self._recent_restarts()
            if recent >= self.policy.max_restarts and not self._crash_loop_logged:
                self._crash_loop_logged = True
                logger.critical(
                    "pipeline worker restarted %d times in %gs: reporting unhealthy on /healthz so the "
                    "container is restarted",
                    recent,
                    self.policy.restart_window,
                )

    def _recent_restarts(self) -> int:
        cutoff = time.monotonic() - self.policy.restart_window
        while self._restarts and self._restarts[0] < cutoff:
            self._restarts.popleft()
        return len(self._restarts)

    def _report_up(self, up: bool) -> None:
        if self.observer is not None:
            self.observer.worker_up(up=up)
