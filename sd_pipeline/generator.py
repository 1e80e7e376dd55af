"""Turn validated requests into images: batching compatible requests, progress, cancel, OOM."""

from __future__ import annotations

import enum
import itertools
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from PIL import Image

from sd_pipeline.device_errors import detached, is_out_of_memory, raise_if_device_failed
from sd_pipeline.errors import GenerationCancelledError, OutOfMemoryError
from sd_pipeline.loading import LoadedPipeline, freeze_compiled_shapes
from sd_pipeline.request import GenerationRequest, RequestLimits, TokenBudget, check_inputs
from sd_pipeline.schedulers import SCHEDULER_NAMES, make_scheduler

StepCallback = Callable[[int, int], None]


class GenerationObserver(Protocol):
    """Receives plain facts about pipeline work (implemented by the metrics module)."""

    def pipeline_call(self, *, seconds: float, images: int) -> None: ...

    def denoising_step(self, *, seconds: float) -> None: ...

    def first_step_wait(self, *, seconds: float) -> None: ...

    def out_of_memory(self) -> None: ...


Fact = tuple[str, dict[str, Any]]  # a GenerationObserver method's name and its keyword arguments


class FactRelay:
    """A ``GenerationObserver`` that hands each fact as data to ``send``: how the worker process
    (down its pipe) and a Ray replica (on its request streams) carry facts to the app."""

    def __init__(self, send: Callable[[Fact], None]) -> None:
        self.send = send

    def pipeline_call(self, *, seconds: float, images: int) -> None:
        self.send(("pipeline_call", {"seconds": seconds, "images": images}))

    def denoising_step(self, *, seconds: float) -> None:
        self.send(("denoising_step", {"seconds": seconds}))

    def first_step_wait(self, *, seconds: float) -> None:
        self.send(("first_step_wait", {"seconds": seconds}))

    def out_of_memory(self) -> None:
        self.send(("out_of_memory", {}))


def replay(fact: Fact, observer: Any) -> None:
    """In the app: give a relayed fact to the real observer (the metrics)."""
    name, fields = fact
    getattr(observer, name)(**fields)


@dataclass(frozen=True)
class Timings:
    """How long the pipeline call that made an image took, and how many images it made."""

    generation_seconds: float
    batch_images: int


@dataclass(frozen=True)
class GenerationResult:
    """One image with everything needed to reproduce it."""

    image: Image.Image
    request: GenerationRequest
    seed: int
    index: int
    model: str
    timings: Timings
    nsfw: bool = False


@dataclass
class GenerationJob:
    """A request on its way through the generator: progress out, cancellation in."""

    request: GenerationRequest
    on_step: StepCallback | None = None
    owner: str = ""  # whose request it is, for fair admission; "" when nobody is named
    steps_done: int = 0
    _cancelled: threading.Event = field(default_factory=threading.Event, repr=False)

    @property
    def steps_left(self) -> int:
        return max(0, self.request.steps - self.steps_done)

    def report_step(self, step: int, total: int) -> None:
        """Record that ``step`` of ``total`` is done and tell ``on_step``."""
        self.steps_done = step
        if self.on_step is not None:
            self.on_step(step, total)

    def cancel(self) -> None:
        """Ask the generator to stop this job; takes effect within one denoising step."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()


@dataclass
class JobOutcome:
    """What happened to one job: its images, or the error that ended it."""

    results: list[GenerationResult] = field(default_factory=list)
    error: Exception | None = None


class GenerationBackend(Protocol):
    """What the batch scheduler and the web layer need: validation, running jobs, the model's name.

    ``Generator`` runs in this process; ``sd_pipeline.worker.PipelineProcess`` in its own, and
    ``sd_pipeline.supervision.SupervisedWorker`` replaces that process when it dies or stalls.
    """

    @property
    def model(self) -> str: ...

    def check(self, data: Mapping[str, Any]) -> GenerationRequest: ...

    def run(self, jobs: Sequence[GenerationJob]) -> list[JobOutcome]: ...


class _Failure(enum.Enum):
    CANCELLED = "cancelled"
    OUT_OF_MEMORY = "out of memory"
    ERROR = "error"


@dataclass(frozen=True)
class _Attempt:
    """What one pipeline call gave: its images, or how it failed."""

    results: list[GenerationResult] = field(default_factory=list)
    failure: _Failure | None = None
    error: Exception | None = None


@dataclass(frozen=True)
class _ImageTask:
    job: GenerationJob
    index: int
    seed: int


class Generator:
    """Owns one pipeline and runs one pipeline call at a time on it."""

    def __init__(
        self,
        loaded: LoadedPipeline,
        *,
        limits: RequestLimits | None = None,
        max_batch_images: int = 8,
        observer: GenerationObserver | None = None,
    ) -> None:
        self.loaded = loaded
        self.limits = limits or RequestLimits()
        self.max_batch_images = max_batch_images
        self.observer = observer
        self._lock = threading.Lock()
        base_config = loaded.pipeline.scheduler.config
        self._schedulers = {name: make_scheduler(name, base_config) for name in SCHEDULER_NAMES}
        self.tokens = TokenBudget.of(loaded.pipeline.tokenizer)

    @property
    def model(self) -> str:
        return self.loaded.model

    def check(self, data: Mapping[str, Any]) -> GenerationRequest:
        """Validate raw fields against this model's limits and token budget."""
        return check_inputs(data, limits=self.limits, tokens=self.tokens)

    def generate(self, requests: Sequence[GenerationRequest]) -> list[list[GenerationResult]]:
        """Generate every request; compatible ones share pipeline calls. Raises the first error."""
        outcomes = self.run([GenerationJob(request) for request in requests])
        for outcome in outcomes:
            if outcome.error is not None:
                raise outcome.error
        return [outcome.results for outcome in outcomes]

    def run(self, jobs: Sequence[GenerationJob]) -> list[JobOutcome]:
        """Run jobs, grouping compatible ones; each job gets its own outcome, in order."""
        outcomes = {id(job): JobOutcome() for job in jobs}
        for _, group in itertools.groupby(sorted(jobs, key=_group_order), key=lambda job: job.request.batch_key()):
            tasks = [_ImageTask(job, index, seed) for job in group for index, seed in enumerate(job.request.seeds())]
            for start in range(0, len(tasks), self.max_batch_images):
                self._run_tasks(tasks[start : start + self.max_batch_images], outcomes)
        for job in jobs:
            outcome = outcomes[id(job)]
            if job.cancelled and outcome.error is None:
                outcome.results, outcome.error = [], GenerationCancelledError("cancelled")
        return [outcomes[id(job)] for job in jobs]

    def warmup(self) -> None:
        """Generate before the first user does.

        On the CPU one tiny image pays for lazy initialisation. On CUDA, or with a compiled
        UNet, the served default size runs with and without guidance (two UNet batch sizes)
        and as a batch of two, so the first real request finds its shapes compiled; after
        that a compiled UNet never recompiles (new shapes run eagerly).
        """
        if not (self.loaded.compiled or self.loaded.device.type == "cuda"):
            self.generate([GenerationRequest(prompt="warm-up", steps=1, width=64, height=64)])
            return
        with_guidance = GenerationRequest(prompt="warm-up", steps=2)
        without_guidance = GenerationRequest(prompt="warm-up", steps=2, guidance_scale=1.0)
        for requests in ([with_guidance], [without_guidance], [with_guidance, with_guidance]):
            self.generate(requests)
        if self.loaded.compiled:
            freeze_compiled_shapes()

    def _run_tasks(self, tasks: list[_ImageTask], outcomes: dict[int, JobOutcome]) -> None:
        live = [task for task in tasks if not task.job.cancelled]
        if not live:
            return
        attempt = self._attempt(live)
        # Recovery happens here, outside the ``except``: the failed call's frames and tensors are gone.
        if attempt.failure is _Failure.CANCELLED:
            return
        if attempt.failure is _Failure.OUT_OF_MEMORY:
            self._free_memory()
            if len(live) == 1:
                outcomes[id(live[0].job)].error = OutOfMemoryError(_oom_message(live[0].job.request))
                return
            half = len(live) // 2
            self._run_tasks(live[:half], outcomes)
            self._run_tasks(live[half:], outcomes)
            return
        if attempt.failure is _Failure.ERROR:
            for task in live:
                outcomes[id(task.job)].error = attempt.error
            return
        for task, result in zip(live, attempt.results, strict=True):
            outcomes[id(task.job)].results.append(result)

    def _attempt(self, tasks: list[_ImageTask]) -> _Attempt:
        """One pipeline call; its failure classified, holding no traceback (so no tensors) of the call."""
        try:
            return _Attempt(results=self._pipeline_call(tasks))
        except GenerationCancelledError:
            return _Attempt(failure=_Failure.CANCELLED)
        except Exception as error:  # noqa: BLE001 - classified below; each job in the call gets the error
            raise_if_device_failed(error)
            if is_out_of_memory(error):
                return _Attempt(failure=_Failure.OUT_OF_MEMORY)
            return _Attempt(failure=_Failure.ERROR, error=detached(error))

    def _pipeline_call(self, tasks: list[_ImageTask]) -> list[GenerationResult]:
        request = tasks[0].job.request
        generators = [torch.Generator(device="cpu").manual_seed(task.seed) for task in tasks]
        step_clock = [time.perf_counter()]

        def on_step_end(pipeline: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
            now = time.perf_counter()
            if self.observer is not None:
                self.observer.denoising_step(seconds=now - step_clock[0])
            step_clock[0] = now
            jobs = {id(task.job): task.job for task in tasks}.values()
            if all(job.cancelled for job in jobs):
                raise GenerationCancelledError("cancelled")
            for job in jobs:
                if not job.cancelled:
                    job.report_step(step + 1, request.steps)
            return tensors

        with self._lock:
            pipeline = self.loaded.pipeline
            pipeline.scheduler = self._schedulers[request.scheduler]
            started = time.perf_counter()
            step_clock[0] = started
            output = pipeline(
                prompt=[task.job.request.prompt for task in tasks],
                negative_prompt=[task.job.request.negative_prompt for task in tasks],
                width=request.width,
                height=request.height,
                num_inference_steps=request.steps,
                guidance_scale=request.guidance_scale,
                generator=generators,
                callback_on_step_end=on_step_end,
            )
            seconds = time.perf_counter() - started
        if self.observer is not None:
            self.observer.pipeline_call(seconds=seconds, images=len(tasks))
        timings = Timings(generation_seconds=seconds, batch_images=len(tasks))
        flags = output.nsfw_content_detected or [False] * len(tasks)
        return [
            GenerationResult(
                image=image,
                request=task.job.request,
                seed=task.seed,
                index=task.index,
                model=self.model,
                timings=timings,
                nsfw=bool(flag),
            )
            for task, image, flag in zip(tasks, output.images, flags, strict=True)
        ]

    def _free_memory(self) -> None:
        if self.observer is not None:
            self.observer.out_of_memory()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _group_order(job: GenerationJob) -> tuple[int, int, int, float, int]:
    width, height, steps, guidance, scheduler = job.request.batch_key()
    return (width, height, steps, guidance, SCHEDULER_NAMES.index(scheduler))


def _oom_message(request: GenerationRequest) -> str:
    return f"out of GPU memory generating one {request.width}x{request.height} image; try a smaller width and height"
