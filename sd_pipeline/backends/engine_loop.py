"""The loop that feeds one step engine, shared by the worker process and every Ray replica.

Jobs arrive from any thread (the worker's pipe reader, a replica's request coroutines); the
loop's own thread hands them to the engine between two denoising steps and steps while there
is work. A fatal device error or any unexpected error ends the loop: the worker process then
exits and a Ray replica fails its health check, so the backend replaces it and the jobs it
held are retried once (``sd_pipeline.backends.retry``). ``health_problem`` also reports an
engine that has work but made no step for ``stall_seconds``.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from sd_pipeline.contract.backend import BackendInfo
from sd_pipeline.contract.facts import GenerationObserver
from sd_pipeline.contract.jobs import GenerationJob, JobOutcome
from sd_pipeline.contract.settings import PipelineSettings
from sd_pipeline.model.engine import Done, StepEngine
from sd_pipeline.model.failures import DeviceFailedError
from sd_pipeline.model.loading import LoadedPipeline, load_pipeline
from sd_pipeline.model.previews import load_previewer
from sd_pipeline.model.threads import ThreadTuner

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Submitted:
    job: GenerationJob
    done: Done


_STOP = object()


class EngineLoop:
    """Jobs in from any thread; steps, outcomes and facts out from the thread that calls ``run``."""

    def __init__(self, engine: StepEngine, *, stall_seconds: float = 120.0) -> None:
        self.engine = engine
        self.stall_seconds = stall_seconds
        self.failure: str | None = None
        self._inbox: queue.Queue[_Submitted | object] = queue.Queue()
        self._lock = threading.Lock()
        self._held: dict[int, Done] = {}  # jobs submitted and not yet answered, by id
        self._last_progress = time.monotonic()
        self._stopping = False
        self._refusal: Exception | None = None  # set by fail_held: what later jobs are answered

    def submit(self, job: GenerationJob, done: Done) -> None:
        """Queue a validated job; ``done`` gets its outcome on the loop's thread (at once after a failure
        that ``fail_held`` answered)."""
        with self._lock:
            refused = self._refusal
            if refused is None:
                if not self._held:
                    self._last_progress = time.monotonic()  # the stall clock starts with the work
                self._held[id(job)] = done
        if refused is not None:
            done(JobOutcome(error=refused))
            return
        self._inbox.put(_Submitted(job, self._answer(job)))

    def stop(self) -> None:
        """Finish every job submitted so far, then let ``run`` return."""
        self._inbox.put(_STOP)

    def health_problem(self) -> str | None:
        """Why this loop can serve no more (it failed, or it has work and made no step for too long)."""
        if self.failure is not None:
            return self.failure
        with self._lock:
            stalled_for = time.monotonic() - self._last_progress if self._held else 0.0

        if stalled_for > self.stall_seconds:
            return f"the step engine made no progress for {stalled_for:.0f}s"
        return None

    def run(self) -> None:
        """Step until stopped and idle; a failure ends the loop and is kept in ``failure``."""
        try:
            self._run()
        except DeviceFailedError as error:
            self.failure = str(error)
            logger.critical("%s; this engine serves no more so that its backend replaces it", error)
        except Exception as error:
            self.failure = f"the step engine failed: {type(error).__name__}: {error}"
            logger.exception("the step engine failed; this engine serves no more so that its backend replaces it")

    def _run(self) -> None:
        while True:
            self._take(block=self.engine.idle and not self._stopping)
            if self._stopping and self.engine.idle and self._inbox.empty():
                return
            self.engine.step()
            with self._lock:
                self._last_progress = time.monotonic()

    def _take(self, *, block: bool) -> None:
        """Hand what arrived to the engine (waiting for the first message if ``block``)."""
        while True:
            try:
                item = self._inbox.get(block=block)
            except queue.Empty:
                return
            block = False
            if item is _STOP:
                self._stopping = True
            elif isinstance(item, _Submitted):
                self.engine.submit(item.job, item.done)

    def fail_held(self, error: Exception) -> None:
        """After a failure: answer every job still held, and every later one, with ``error``
        (a Ray replica does this, so its calls end and are retried elsewhere at once)."""
        with self._lock:
            self._refusal = error
            held, self._held = list(self._held.values()), {}
        for done in held:
            done(JobOutcome(error=error))

    def _answer(self, job: GenerationJob) -> Callable[[JobOutcome], None]:
        def answer(outcome: JobOutcome) -> None:
            with self._lock:
                done = self._held.pop(id(job), None)
                last = not self._held
            if done is None:  # already answered by fail_held
                return
            if last:
                self._report_peak_memory()  # the peak of the work just done, before its last result
            done(outcome)

        return answer

    def _report_peak_memory(self) -> None:
        observer = self.engine.observer
        if observer is None or not hasattr(observer, "gpu_memory") or not cuda_in_use():
            return
        observer.gpu_memory(allocated=torch.cuda.max_memory_allocated(), reserved=torch.cuda.max_memory_reserved())
        torch.cuda.reset_peak_memory_stats()


def start_engine(
    settings: PipelineSettings, *, max_batch_images: int, observer: GenerationObserver | None
) -> tuple[StepEngine, BackendInfo]:
    """What the worker process and every replica do before serving: load the model and its previewer,
    build the engine, warm it up (``settings.warmup``); raises ``ModelLoadError``."""
    loaded = load_pipeline(settings)
    engine = StepEngine(
        loaded,
        max_batch_images=max_batch_images,
        observer=observer,
        previewer=load_previewer(settings, loaded),
        preview_interval=settings.preview_interval,
        threads=thread_tuner(settings, loaded),
    )
    warmup_seconds = engine.warmup() if settings.warmup else None
    return engine, loaded.describe(warmup_seconds=warmup_seconds)


def thread_tuner(settings: PipelineSettings, loaded: LoadedPipeline) -> ThreadTuner | None:
    """On the CPU with several thread counts allowed, the engine picks one per step by measuring."""
    if loaded.device.type != "cpu" or len(set(settings.cpu_thread_choices)) < 2:
        return None
    logger.info("CPU threads per step chosen by measuring among %s", sorted(set(settings.cpu_thread_choices)))
    return ThreadTuner(settings.cpu_thread_choices, set_threads=torch.set_num_threads)


def cuda_in_use() -> bool:
    """Whether this process has started CUDA (only then is there device memory to report)."""
    return torch.cuda.is_available() and torch.cuda.is_initialized()  # type: ignore[no-untyped-call]
