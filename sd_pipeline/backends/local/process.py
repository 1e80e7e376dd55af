"""The step engine in a process of its own, so the web server's threads never hold its GIL.

On a busy server the event loop, uploads and client connections wake many times a second;
sharing a GIL with them, the pipeline's Python-level loop stalls (measured: a busy Python
thread beside a batch of 4 tiny images turned 43 ms per image into seconds). The worker
process (``child``) owns the model and the engine loop; this side validates requests with the
same tokenizer, sends jobs, and relays progress, cancellation and metrics facts. Nothing here
imports torch: the web process never loads it.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import multiprocessing
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

from sd_pipeline.contract.backend import BackendInfo
from sd_pipeline.contract.errors import ModelLoadError, WorkerLostError
from sd_pipeline.contract.facts import WorkerObserver, replay
from sd_pipeline.contract.jobs import GenerationJob, JobOutcome
from sd_pipeline.contract.settings import PipelineSettings

logger = logging.getLogger(__name__)


def _worker_main(connection: Connection, settings: PipelineSettings, max_batch_images: int) -> None:
    """The worker process's entry point (torch and the model load there, never in this process)."""
    from sd_pipeline.backends.local.child import serve

    serve(connection, settings, max_batch_images)


@dataclass
class _Pending:
    """A job sent to the worker, waiting for its outcome (or for the worker's loss)."""

    job: GenerationJob
    outcome: Future[JobOutcome] = field(default_factory=Future)


class PipelineProcess:
    """One worker process running the step engine; ``LocalBackend`` replaces it when it is lost.

    ``run`` may be called from several threads at once: each call's jobs join the worker's
    running batch at its next step. A reader thread relays the worker's messages (steps,
    outcomes, metrics facts) and is the watchdog.
    """

    def __init__(
        self,
        settings: PipelineSettings,
        *,
        max_batch_images: int = 8,
        observer: WorkerObserver | None = None,
        start_timeout: float = 3600.0,
        stall_seconds: float = 120.0,
    ) -> None:
        self.settings = settings
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
            target=_worker_main,
            args=(self._child_connection, settings, max_batch_images),
            name="pipeline-worker",
            daemon=True,
        )
        self._reader = threading.Thread(target=self._read, name="pipeline-worker-reader", daemon=True)
        self.info: BackendInfo | None = None

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

    def start(self) -> BackendInfo:
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
        info: BackendInfo = payload
        self.info = info
        self._reader.start()
        return info

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
            runs = [(job_id, entry.job.request, entry.job.wants_previews) for job_id, entry in entries.items()]
            self._send(("run", runs))
            for job_id, entry in entries.items():
                entry.job.when_cancelled(functools.partial(self._send_cancel, job_id))
            return [entry.outcome.result() for entry in entries.values()]
        finally:
            with self._pending_lock:
                for job_id in entries:
                    self._pending.pop(job_id, None)

    def _send_cancel(self, job_id: int) -> None:
        """Tell the worker at once (on the cancelling thread); a lost worker fails the run anyway."""
        with self._pending_lock:
            if job_id not in self._pending:
                return
        with contextlib.suppress(WorkerLostError):
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
        if kind in ("step", "preview", "done"):
            with self._pending_lock:
                entry = self._pending.get(payload[0])
            if entry is None:
                return
            if kind == "step":
                _, step, total = payload
                entry.job.report_step(step, total)
            elif kind == "preview":
                entry.job.report_preview(payload[1])
            else:
                _, results, error = payload
                entry.outcome.set_result(JobOutcome(results=list(results), error=error))
            return
        if self.observer is not None:
            replay((kind, payload), self.observer)  # facts only: replay ignores any other kind

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
