"""The pipeline in a process of its own, so the web server's threads never hold its GIL.

On a busy server the event loop, uploads and client connections wake many times a second;
sharing a GIL with them, the pipeline's Python-level loop stalls (measured: a busy Python
thread beside a batch of 4 tiny images turned 43 ms per image into seconds). The worker
process owns the model and one ``Generator``; the parent validates requests with the same
tokenizer, sends batches, and relays progress, cancellation and metrics facts.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import multiprocessing
import signal
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any, Protocol

import torch

from sd_pipeline.device_errors import DeviceFailedError
from sd_pipeline.engine import StepEngine
from sd_pipeline.errors import ModelLoadError, WorkerLostError
from sd_pipeline.generator import FactRelay, GenerationJob, GenerationObserver, Generator, JobOutcome, replay
from sd_pipeline.loading import LoadedPipeline, load_pipeline, model_source
from sd_pipeline.request import GenerationRequest, RequestLimits, TokenBudget, check_inputs
from sd_pipeline.settings import PipelineSettings

logger = logging.getLogger(__name__)


class WorkerObserver(GenerationObserver, Protocol):
    """Generation facts plus the worker's accelerator memory (implemented by the metrics module)."""

    def gpu_memory(self, *, allocated: int, reserved: int) -> None: ...


@dataclass(frozen=True)
class WorkerInfo:
    """What the worker loaded, reported once it is ready."""

    model: str
    device: str
    dtype: str
    load_seconds: float
    native_size: int = 512  # the side the model was trained at: the page's and API's default size

    @classmethod
    def of(cls, loaded: LoadedPipeline) -> WorkerInfo:
        """What a loaded pipeline reports once ready."""
        dtype = str(loaded.dtype).removeprefix("torch.")
        return cls(loaded.model, str(loaded.device), dtype, loaded.load_seconds, loaded.native_size)


class _ForwardingObserver(FactRelay):
    """In the worker: sends observer facts to the parent; reads its messages at every step."""

    def __init__(self, connection: Connection) -> None:
        super().__init__(connection.send)
        self.between_steps: Callable[[], None] | None = None

    def denoising_step(self, *, seconds: float) -> None:
        super().denoising_step(seconds=seconds)
        if self.between_steps is not None:
            self.between_steps()  # cancellations land before the generator checks for them


class _WorkerJobs:
    """In the worker: the parent's messages applied, its jobs by id, their steps and outcomes sent back."""

    def __init__(self, connection: Connection) -> None:
        self.connection = connection
        self.jobs: dict[int, GenerationJob] = {}
        self.arrived: list[tuple[int, GenerationJob]] = []  # sent, not yet handed to the generator
        self.stopping = False

    def receive(self, *, block: bool) -> None:
        """Apply the waiting messages (and wait for one first if ``block``)."""
        while not self.stopping and (block or self.connection.poll()):
            block = False
            try:
                kind, payload = self.connection.recv()
            except EOFError:  # the parent is gone
                self.stopping = True
                return
            if kind == "stop":
                self.stopping = True
            elif kind == "cancel" and payload in self.jobs:
                self.jobs[payload].cancel()
            elif kind == "run":
                for job_id, request in payload:
                    job = GenerationJob(request, on_step=self._step_reporter(job_id))
                    self.jobs[job_id] = job
                    self.arrived.append((job_id, job))

    def take_arrived(self) -> list[tuple[int, GenerationJob]]:
        arrived, self.arrived = self.arrived, []
        return arrived

    def _step_reporter(self, job_id: int) -> Any:
        def report(step: int, total: int) -> None:
            self.connection.send(("step", (job_id, step, total)))

        return report

    def finish(self, job_id: int, outcome: JobOutcome) -> None:
        self.jobs.pop(job_id, None)
        if _cuda_in_use() and not self.jobs:  # the peak of the work just done, sent before its last result
            memory = {"allocated": torch.cuda.max_memory_allocated(), "reserved": torch.cuda.max_memory_reserved()}
            self.connection.send(("gpu_memory", memory))
            torch.cuda.reset_peak_memory_stats()
        self.connection.send(("done", (job_id, outcome.results, _picklable(outcome.error))))


def _serve(connection: Connection, settings: PipelineSettings, limits: RequestLimits, max_batch_images: int) -> None:
    """The worker process: load, report ready, then serve runs until told to stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when to stop (Ctrl-C reaches both)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        loaded = load_pipeline(settings)
    except ModelLoadError as error:
        connection.send(("failed", str(error)))
        return
    observer = _ForwardingObserver(connection)
    runner: StepEngine | Generator
    if settings.batching == "step":
        runner = StepEngine(loaded, max_batch_images=max_batch_images, observer=observer)
    else:
        runner = Generator(loaded, limits=limits, max_batch_images=max_batch_images, observer=observer)
    if settings.warmup:
        runner.warmup()
    connection.send(("ready", WorkerInfo.of(loaded)))
    jobs = _WorkerJobs(connection)
    try:
        if isinstance(runner, StepEngine):
            _serve_steps(runner, jobs)
        else:
            observer.between_steps = functools.partial(jobs.receive, block=False)
            _serve_runs(runner, jobs)
    except DeviceFailedError as error:
        # The parent sees the process end, restarts it and retries the requests once.
        logger.critical("%s; exiting so the supervisor starts a new worker", error)


def _serve_runs(generator: Generator, jobs: _WorkerJobs) -> None:
    """Request-level batching: the jobs of each run message share ``Generator.run`` calls."""
    while True:
        jobs.receive(block=not jobs.arrived)
        if jobs.stopping and not jobs.arrived:
            return  # a stop waits for the runs already sent
        batch = jobs.take_arrived()
        outcomes = generator.run([job for _, job in batch])
        for (job_id, _), outcome in zip(batch, outcomes, strict=True):
            jobs.finish(job_id, outcome)


def _serve_steps(engine: StepEngine, jobs: _WorkerJobs) -> None:
    """Step-level batching: runs and cancels are taken in between two denoising steps."""
    while True:
        jobs.receive(block=engine.idle and not jobs.stopping)
        if jobs.stopping and engine.idle and not jobs.arrived:
            return  # a stop waits for the runs already sent
        for job_id, job in jobs.take_arrived():
            engine.submit(job, functools.partial(jobs.finish, job_id))
        engine.step()


def _cuda_in_use() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_initialized()  # type: ignore[no-untyped-call]


def _picklable(error: Exception | None) -> Exception | None:
    if error is None:
        return None
    try:
        import pickle

        pickle.dumps(error)
    except Exception:  # noqa: BLE001 - any unpicklable error is passed on by its text
        return RuntimeError(f"{type(error).__name__}: {error}")
    return error


@dataclass
class _Pending:
    """A job sent to the worker, waiting for its outcome (or for the worker's loss)."""

    job: GenerationJob
    outcome: Future[JobOutcome] = field(default_factory=Future)
    cancel_sent: bool = False


class PipelineProcess:
    """A ``Generator`` or ``StepEngine`` in its own process, with the ``check``/``run``/``model`` surface.

    ``run`` may be called from several threads at once: with step-level batching each call's
    jobs join the worker's running batch at its next step. A reader thread relays the worker's
    messages (steps, outcomes, metrics facts) and is the watchdog.
    """

    def __init__(
        self,
        settings: PipelineSettings,
        *,
        limits: RequestLimits | None = None,
        max_batch_images: int = 8,
        observer: WorkerObserver | None = None,
        start_timeout: float = 3600.0,
        stall_seconds: float = 120.0,
    ) -> None:
        self.settings = settings
        self.limits = limits or RequestLimits()
        self.max_batch_images = max_batch_images
        self.observer = observer
        self.start_timeout = start_timeout
        self.stall_seconds = stall_seconds
        self.stalled = False  # set when the watchdog killed it
        self._send_lock = threading.Lock()
        self._pending_lock = threading.Lock()
        self._pending: dict[int, _Pending] = {}
        self._job_ids = itertools.count()
        self._lost_error: WorkerLostError | None = None
        context = multiprocessing.get_context("spawn")  # CUDA and threads need a fresh interpreter
        self._connection, self._child_connection = context.Pipe()
        self._process = context.Process(
            target=_serve,
            args=(self._child_connection, settings, self.limits, max_batch_images),
            name="pipeline-worker",
            daemon=True,
        )
        self._reader = threading.Thread(target=self._read, name="pipeline-worker-reader", daemon=True)
        self.info: WorkerInfo | None = None
        self.tokens: TokenBudget | None = None

    @property
    def model(self) -> str:
        return self.info.model if self.info else self.settings.model

    @property
    def pid(self) -> int | None:
        return self._process.pid

    @property
    def sentinel(self) -> int:
        """Becomes ready when the process ends (for ``multiprocessing.connection.wait``)."""
        return self._process.sentinel

    def is_alive(self) -> bool:
        return self._process.is_alive()

    def start(self) -> WorkerInfo:
        """Start the worker and wait until the model is loaded; raises ``ModelLoadError``."""
        self._process.start()
        self._child_connection.close()  # only the child holds its end now: its death reads as EOF here
        while True:
            if not self._connection.poll(self.start_timeout):
                self.close()
                raise ModelLoadError(f"model '{self.settings.model}' did not load within {self.start_timeout:.0f}s")
            try:
                kind, payload = self._connection.recv()
            except EOFError:
                raise ModelLoadError(f"the pipeline worker for '{self.settings.model}' exited while loading") from None
            if kind in ("ready", "failed"):
                break
            self._relay(kind, payload)  # facts from the warm-up generation
        if kind == "failed":
            self._process.join(timeout=10)
            raise ModelLoadError(payload)
        info: WorkerInfo = payload
        self.info = info
        self.tokens = token_budget(self.settings.model)
        self._reader.start()
        return info

    def check(self, data: Mapping[str, Any]) -> GenerationRequest:
        """Validate raw fields against the model's limits and token budget (in this process)."""
        return check_inputs(data, limits=self.limits, tokens=self.tokens)

    def run(self, jobs: Sequence[GenerationJob]) -> list[JobOutcome]:
        """Run jobs in the worker, relaying progress and cancellation.

        Raises ``WorkerLostError`` when the process dies, or when it sends nothing (no step, no
        reply) for ``stall_seconds`` while it has work: the watchdog then kills it.
        """
        entries = {next(self._job_ids): _Pending(job) for job in jobs}
        with self._pending_lock:
            if self._lost_error is not None:
                raise self._lost_error
            self._pending.update(entries)
        try:
            self._send(("run", [(job_id, entry.job.request) for job_id, entry in entries.items()]))
            for entry in entries.values():
                while True:
                    try:
                        entry.outcome.result(timeout=0.02)
                        break
                    except FutureTimeout:
                        self._send_cancellations(entries)
            return [entry.outcome.result() for entry in entries.values()]
        finally:
            with self._pending_lock:
                for job_id in entries:
                    self._pending.pop(job_id, None)

    def _send_cancellations(self, entries: Mapping[int, _Pending]) -> None:
        for job_id, entry in entries.items():
            if entry.job.cancelled and not entry.cancel_sent and not entry.outcome.done():
                entry.cancel_sent = True
                self._send(("cancel", job_id))

    def _send(self, message: tuple[str, Any]) -> None:
        try:
            with self._send_lock:
                self._connection.send(message)
        except OSError:  # BrokenPipeError and friends: the other end is gone
            raise self._lost("died", "the pipeline worker process died") from None

    def _read(self) -> None:
        """The reader thread: relay messages until the worker ends; the watchdog while it has work."""
        last_heard = time.monotonic()
        while True:
            with self._pending_lock:
                busy = bool(self._pending)
            if not busy:
                last_heard = time.monotonic()
            try:
                ready = self._connection.poll(0.05)
                message = self._connection.recv() if ready else None
            except (EOFError, OSError):
                self._fail_pending(self._lost("died", "the pipeline worker process died"))
                return
            if message is None:
                if not self._process.is_alive():
                    self._fail_pending(self._lost("died", "the pipeline worker process died"))
                    return
                if busy and time.monotonic() - last_heard > self.stall_seconds:
                    self._kill_stalled()
                    self._fail_pending(
                        self._lost("stalled", f"the pipeline worker made no progress for {self.stall_seconds:g}s")
                    )
                    return
                continue
            last_heard = time.monotonic()
            self._relay(*message)

    def _fail_pending(self, error: WorkerLostError) -> None:
        with self._pending_lock:
            self._lost_error = error
            pending = list(self._pending.values())
        for entry in pending:
            if not entry.outcome.done():
                entry.outcome.set_exception(error)

    def _lost(self, reason: str, message: str) -> WorkerLostError:
        self._process.join(timeout=5)  # reap it, so its exit code and sentinel are final
        code = self._process.exitcode
        return WorkerLostError(reason, message if code is None else f"{message} (exit code {code})")

    def _kill_stalled(self) -> None:
        logger.warning("pipeline worker (pid %s) made no progress for %gs; killing it", self.pid, self.stall_seconds)
        self.stalled = True
        self.kill()

    def _relay(self, kind: str, payload: Any) -> None:
        if kind in ("step", "done"):
            with self._pending_lock:
                entry = self._pending.get(payload[0])
            if entry is None:
                return
            if kind == "step":
                _, step, total = payload
                entry.job.report_step(step, total)
            else:
                _, results, error = payload
                entry.outcome.set_result(JobOutcome(results=list(results), error=error))
            return
        if self.observer is not None and kind in _FACTS:
            replay((kind, payload), self.observer)

    def kill(self) -> None:
        """End the process at once, without a clean stop."""
        if self._process.is_alive():
            self._process.kill()

    def close(self, *, timeout: float = 30.0) -> None:
        """Ask the worker to stop; kill it if it does not."""
        if self._process.is_alive():
            with contextlib.suppress(BrokenPipeError, OSError), self._send_lock:
                self._connection.send(("stop", None))
            self._process.join(timeout=timeout)
        if self._process.is_alive():
            self._process.kill()
            self._process.join(timeout=5)
        if self._reader.is_alive():  # it sees the process gone, fails what is pending and returns
            self._reader.join(timeout=5)
        self._fail_pending(WorkerLostError("died", "the pipeline worker process stopped"))
        with self._send_lock:
            self._connection.close()


_FACTS = {"pipeline_call", "denoising_step", "first_step_wait", "out_of_memory", "gpu_memory"}


def token_budget(model: str) -> TokenBudget:
    """The tokenizer the worker uses (already downloaded by it), for validating prompts here."""
    from transformers import CLIPTokenizer

    return TokenBudget.of(CLIPTokenizer.from_pretrained(model_source(model), subfolder="tokenizer"))
