"""Inside the worker process: load, warm up, report ready, then feed the engine loop from the pipe.

Messages from the parent: ``("run", [(job_id, request, wants_previews), ...])``,
``("cancel", job_id)``, ``("stop", None)``. To the parent: facts, ``("step", (job_id, step, total))``,
``("preview", (job_id, preview))``, ``("done", (job_id, results, error))``, and at start
``("ready", info)`` or ``("failed", reason)``.
"""

from __future__ import annotations

import logging
import pickle
import signal
import threading
from multiprocessing.connection import Connection

from sd_pipeline.backends.engine_loop import EngineLoop, start_engine
from sd_pipeline.contract.errors import ModelLoadError
from sd_pipeline.contract.facts import FactRelay
from sd_pipeline.contract.jobs import GenerationJob, JobOutcome, Preview, PreviewCallback, StepCallback
from sd_pipeline.contract.settings import PipelineSettings
from sd_pipeline.model.engine import Done

logger = logging.getLogger(__name__)


def serve(connection: Connection, settings: PipelineSettings, max_batch_images: int) -> None:
    """The worker process: load, report ready, then serve runs until told to stop or the engine fails."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when to stop (Ctrl-C reaches both)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        engine, info = start_engine(settings, max_batch_images=max_batch_images, observer=FactRelay(connection.send))
    except ModelLoadError as error:
        connection.send(("failed", str(error)))
        return
    connection.send(("ready", info))
    loop = EngineLoop(engine)
    jobs = _PipeJobs(connection, loop)
    threading.Thread(target=jobs.read, name="pipe-reader", daemon=True).start()
    loop.run()  # returns when stopped, or when the engine failed: the process then ends and is replaced


class _PipeJobs:
    """The parent's messages applied to the loop; each job's steps and outcome sent back by id."""

    def __init__(self, connection: Connection, loop: EngineLoop) -> None:
        self.connection = connection
        self.loop = loop
        self._jobs: dict[int, GenerationJob] = {}
        self._lock = threading.Lock()

    def read(self) -> None:
        """On the reader thread: until the parent says stop or goes away."""
        while True:
            try:
                kind, payload = self.connection.recv()
            except (EOFError, OSError):  # the parent is gone
                self.loop.stop()
                return
            if kind == "stop":
                self.loop.stop()
                return
            if kind == "cancel":
                with self._lock:
                    job = self._jobs.get(payload)
                if job is not None:
                    job.cancel()
            elif kind == "run":
                for job_id, request, wants_previews in payload:
                    previews = self._preview_reporter(job_id) if wants_previews else None
                    job = GenerationJob(request, on_step=self._step_reporter(job_id), on_preview=previews)
                    with self._lock:
                        self._jobs[job_id] = job
                    self.loop.submit(job, self._finisher(job_id))

    def _step_reporter(self, job_id: int) -> StepCallback:
        def report(step: int, total: int) -> None:
            self.connection.send(("step", (job_id, step, total)))

        return report  # every step: a pipe message is cheap, and the supervisor hears the worker progress

    def _preview_reporter(self, job_id: int) -> PreviewCallback:
        def report(preview: Preview) -> None:
            self.connection.send(("preview", (job_id, preview)))

        return report

    def _finisher(self, job_id: int) -> Done:
        def finish(outcome: JobOutcome) -> None:
            with self._lock:
                self._jobs.pop(job_id, None)
            self.connection.send(("done", (job_id, outcome.results, picklable(outcome.error))))

        return finish


def picklable(error: Exception | None) -> Exception | None:
    """The error itself if it survives pickling, else a ``RuntimeError`` with its text."""
    if error is None:
        return None
    try:
        pickle.dumps(error)
    except Exception:  # noqa: BLE001 - any unpicklable error is passed on by its text
        return RuntimeError(f"{type(error).__name__}: {error}")
    return error
