"""The pipeline in a process of its own, so the web server's threads never hold its GIL.

On a busy server the event loop, uploads and client connections wake many times a second;
sharing a GIL with them, the pipeline's Python-level loop stalls (measured: a busy Python
thread beside a batch of 4 tiny images turned 43 ms per image into seconds). The worker
process owns the model and one ``Generator``; the parent validates requests with the same
tokenizer, sends batches, and relays progress, cancellation and metrics facts.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import signal
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any, Protocol

import torch

from sd_pipeline.device_errors import DeviceFailedError
from sd_pipeline.errors import ModelLoadError, WorkerLostError
from sd_pipeline.generator import GenerationJob, GenerationObserver, Generator, JobOutcome
from sd_pipeline.loading import load_pipeline, model_source
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


class _ForwardingObserver:
    """In the worker: sends observer facts to the parent, and takes in cancellations each step."""

    def __init__(self, connection: Connection) -> None:
        self.connection = connection
        self.jobs: list[GenerationJob] = []

    def pipeline_call(self, *, seconds: float, images: int) -> None:
        self.connection.send(("pipeline_call", {"seconds": seconds, "images": images}))

    def denoising_step(self, *, seconds: float) -> None:
        self.connection.send(("denoising_step", {"seconds": seconds}))
        self.take_cancellations()  # before the generator checks whether everyone cancelled

    def out_of_memory(self) -> None:
        self.connection.send(("out_of_memory", {}))

    def take_cancellations(self) -> None:
        while self.connection.poll():
            kind, index = self.connection.recv()
            if kind == "cancel" and index < len(self.jobs):
                self.jobs[index].cancel()


def _serve(connection: Connection, settings: PipelineSettings, limits: RequestLimits, max_batch_images: int) -> None:
    """The worker process: load, report ready, then run batches until told to stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when to stop (Ctrl-C reaches both)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        loaded = load_pipeline(settings)
    except ModelLoadError as error:
        connection.send(("failed", str(error)))
        return
    observer = _ForwardingObserver(connection)
    generator = Generator(loaded, limits=limits, max_batch_images=max_batch_images, observer=observer)
    if settings.warmup:
        generator.warmup()
    dtype = str(loaded.dtype).removeprefix("torch.")
    connection.send(("ready", WorkerInfo(loaded.model, str(loaded.device), dtype, loaded.load_seconds)))
    while True:
        try:
            message = connection.recv()
        except EOFError:
            return  # the parent is gone
        if message[0] == "stop":
            return
        if message[0] == "run":
            try:
                _run(connection, generator, observer, message[1])
            except DeviceFailedError as error:
                logger.critical("%s; exiting so the supervisor starts a new worker", error)
                return  # the parent sees the process end, restarts it and retries the requests once


def _run(
    connection: Connection, generator: Generator, observer: _ForwardingObserver, requests: list[GenerationRequest]
) -> None:
    jobs = [GenerationJob(request) for request in requests]
    for index, job in enumerate(jobs):
        job.on_step = _step_reporter(connection, index)
    observer.jobs = jobs
    cuda = _cuda_in_use()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    outcomes = generator.run(jobs)
    observer.take_cancellations()
    if cuda:  # this run's peak, sent before its result so the metric is never a run behind
        memory = {"allocated": torch.cuda.max_memory_allocated(), "reserved": torch.cuda.max_memory_reserved()}
        connection.send(("gpu_memory", memory))
    connection.send(("done", [(outcome.results, _picklable(outcome.error)) for outcome in outcomes]))


def _step_reporter(connection: Connection, index: int) -> Any:
    def report(step: int, total: int) -> None:
        connection.send(("step", (index, step, total)))

    return report


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


class PipelineProcess:
    """A ``Generator`` in its own process, with the same ``check``/``run``/``model`` surface."""

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
        self._lock = threading.Lock()
        context = multiprocessing.get_context("spawn")  # CUDA and threads need a fresh interpreter
        self._connection, self._child_connection = context.Pipe()
        self._process = context.Process(
            target=_serve,
            args=(self._child_connection, settings, self.limits, max_batch_images),
            name="pipeline-worker",
            daemon=True,
        )
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
            self._relay(kind, payload, [])  # facts from the warm-up generation
        if kind == "failed":
            self._process.join(timeout=10)
            raise ModelLoadError(payload)
        info: WorkerInfo = payload
        self.info = info
        self.tokens = _token_budget(self.settings.model)
        return info

    def check(self, data: Mapping[str, Any]) -> GenerationRequest:
        """Validate raw fields against the model's limits and token budget (in this process)."""
        return check_inputs(data, limits=self.limits, tokens=self.tokens)

    def run(self, jobs: Sequence[GenerationJob]) -> list[JobOutcome]:
        """Run jobs in the worker, relaying progress and cancellation.

        Raises ``WorkerLostError`` when the process dies, or when it sends nothing (no step, no
        reply) for ``stall_seconds``: the watchdog then kills it.
        """
        with self._lock:
            self._send(("run", [job.request for job in jobs]))
            cancelled_sent: set[int] = set()
            last_heard = time.monotonic()
            while True:
                for index, job in enumerate(jobs):
                    if job.cancelled and index not in cancelled_sent:
                        self._send(("cancel", index))
                        cancelled_sent.add(index)
                if not self._connection.poll(0.02):
                    if not self._process.is_alive():
                        raise self._lost("died", "the pipeline worker process died")
                    if time.monotonic() - last_heard > self.stall_seconds:
                        self._kill_stalled()
                        raise self._lost("stalled", f"the pipeline worker made no progress for {self.stall_seconds:g}s")
                    continue
                kind, payload = self._receive()
                last_heard = time.monotonic()
                if kind == "done":
                    return [JobOutcome(results=list(results), error=error) for results, error in payload]
                self._relay(kind, payload, jobs)

    def _send(self, message: tuple[str, Any]) -> None:
        try:
            self._connection.send(message)
        except OSError:  # BrokenPipeError and friends: the other end is gone
            raise self._lost("died", "the pipeline worker process died") from None

    def _receive(self) -> tuple[str, Any]:
        try:
            message: tuple[str, Any] = self._connection.recv()
        except (EOFError, OSError):
            raise self._lost("died", "the pipeline worker process died") from None
        return message

    def _lost(self, reason: str, message: str) -> WorkerLostError:
        self._process.join(timeout=5)  # reap it, so its exit code and sentinel are final
        code = self._process.exitcode
        return WorkerLostError(reason, message if code is None else f"{message} (exit code {code})")

    def _kill_stalled(self) -> None:
        logger.warning("pipeline worker (pid %s) made no progress for %gs; killing it", self.pid, self.stall_seconds)
        self.stalled = True
        self.kill()

    def _relay(self, kind: str, payload: Any, jobs: Sequence[GenerationJob]) -> None:
        if kind == "step":
            index, step, total = payload
            on_step = jobs[index].on_step
            if on_step is not None:
                on_step(step, total)
            return
        if self.observer is None:
            return
        if kind == "pipeline_call":
            self.observer.pipeline_call(**payload)
        elif kind == "denoising_step":
            self.observer.denoising_step(**payload)
        elif kind == "out_of_memory":
            self.observer.out_of_memory()
        elif kind == "gpu_memory":
            self.observer.gpu_memory(**payload)

    def kill(self) -> None:
        """End the process at once, without a clean stop."""
        if self._process.is_alive():
            self._process.kill()

    def close(self, *, timeout: float = 30.0) -> None:
        """Ask the worker to stop; kill it if it does not."""
        if self._process.is_alive():
            with contextlib.suppress(BrokenPipeError, OSError):
                self._connection.send(("stop", None))
            self._process.join(timeout=timeout)
        if self._process.is_alive():
            self._process.kill()
            self._process.join(timeout=5)
        with self._lock:  # a run() still under way sees the process gone and returns before the pipe closes
            self._connection.close()


def _token_budget(model: str) -> TokenBudget:
    """The tokenizer the worker uses (already downloaded by it), for validating prompts here."""
    from transformers import CLIPTokenizer

    return TokenBudget.of(CLIPTokenizer.from_pretrained(model_source(model), subfolder="tokenizer"))
