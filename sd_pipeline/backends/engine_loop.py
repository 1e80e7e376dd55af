"""The loop that feeds one step engine, shared by the worker process and every Ray replica.

Requests arrive from any thread (the worker's pipe reader, a replica's request coroutines); the
loop's own thread hands them to the engine between two denoising steps and steps while there
is work. A fatal device error or any unexpected error ends the loop: the worker process then
exits and a Ray replica fails its health check, so the backend replaces it and the jobs it
held are retried once, alone (``sd_pipeline.admission``). ``health_problem`` also reports a
stall (``StallWatch``: work held and no step for its limit).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch

from sd_pipeline.backends.stall import StallWatch
from sd_pipeline.contract.backend import BackendInfo
from sd_pipeline.contract.facts import GenerationObserver
from sd_pipeline.contract.jobs import JobOutcome
from sd_pipeline.contract.lifecycle import Request
from sd_pipeline.contract.settings import PipelineSettings
from sd_pipeline.loras.sources import lora_source
from sd_pipeline.model.engine import Done, StepEngine
from sd_pipeline.model.failures import DeviceFailedError
from sd_pipeline.model.loading import LoadedPipeline, load_pipeline
from sd_pipeline.model.loras import LoraAdapters
from sd_pipeline.model.previews import load_previewer
from sd_pipeline.model.threads import ThreadTuner

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Submitted:
    request: Request
    done: Done


_STOP = object()


class EngineLoop:
    """Requests in from any thread; steps, outcomes and facts out from the thread that calls ``run``."""

    def __init__(self, engine: StepEngine, *, stall: StallWatch | None = None) -> None:
        self.engine = engine
        self.stall = stall or StallWatch()
        self.failure: str | None = None
        self._inbox: queue.Queue[_Submitted | object] = queue.Queue()
        self._lock = threading.Lock()
        self._held: dict[str, Request] = {}  # submitted and not yet answered, by request id
        self._answers: dict[str, Done] = {}
        self._stopping = False
        self._refusal: Exception | None = None  # set by fail_held: what later requests are answered

    def submit(self, request: Request, done: Done) -> None:
        """Queue a validated request; ``done`` gets its outcome on the loop's thread (at once after a
        failure that ``fail_held`` answered)."""
        with self._lock:
            refused = self._refusal
            if refused is None:
                self._held[request.id] = request
                self._answers[request.id] = done
                self.stall.holding(True)
        if refused is not None:
            done(JobOutcome(error=refused))
            return
        self._inbox.put(_Submitted(request, self._answer(request)))

    def cancel(self, request_id: str) -> None:
        """Mark a held request cancelled: the engine drops it at its next step."""
        with self._lock:
            request = self._held.get(request_id)
        if request is not None:
            request.cancel()

    def stop(self) -> None:
        """Finish every request submitted so far, then let ``run`` return."""
        self._inbox.put(_STOP)

    def health_problem(self) -> str | None:
        """Why this loop can serve no more (it failed, or it stalled: ``StallWatch``)."""
        return self.failure if self.failure is not None else self.stall.problem()

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
            self.stall.stepped()

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
                self.engine.submit(item.request, item.done)

    def fail_held(self, error: Exception) -> None:
        """After a failure: answer every request still held, and every later one, with ``error``
        (a Ray replica does this, so its calls end and are retried elsewhere at once)."""
        with self._lock:
            self._refusal = error
            answers = list(self._answers.values())
            self._held.clear()
            self._answers.clear()
            self.stall.holding(False)
        for done in answers:
            done(JobOutcome(error=error))

    def _answer(self, request: Request) -> Callable[[JobOutcome], None]:
        def answer(outcome: JobOutcome) -> None:
            with self._lock:
                self._held.pop(request.id, None)
                done = self._answers.pop(request.id, None)
                last = not self._held
                self.stall.holding(not last)
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
        loras=lora_adapters(settings, loaded, observer),
    )
    warmup_seconds = engine.warmup() if settings.warmup else None
    return engine, loaded.describe(warmup_seconds=warmup_seconds)


def lora_adapters(
    settings: PipelineSettings, loaded: LoadedPipeline, observer: GenerationObserver | None
) -> LoraAdapters | None:
    """The adapters prompts may name, loaded on first use (None without a LoRA folder or store)."""
    source = lora_source(settings.lora_dir, settings.lora_store)
    if source is None:
        return None
    return LoraAdapters(loaded.pipeline, source, cache_bytes=settings.lora_cache_mb * 2**20, observer=observer)


def thread_tuner(settings: PipelineSettings, loaded: LoadedPipeline) -> ThreadTuner | None:
    """On the CPU with several thread counts allowed, the engine picks one per step by measuring."""
    if loaded.device.type != "cpu" or len(set(settings.cpu_thread_choices)) < 2:
        return None
    logger.info("CPU threads per step chosen by measuring among %s", sorted(set(settings.cpu_thread_choices)))
    return ThreadTuner(settings.cpu_thread_choices, set_threads=torch.set_num_threads)


def cuda_in_use() -> bool:
    """Whether this process has started CUDA (only then is there device memory to report)."""
    return torch.cuda.is_available() and torch.cuda.is_initialized()  # type: ignore[no-untyped-call]
