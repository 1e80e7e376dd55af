"""The step engine in a process of its own, so the web server's threads never hold its GIL.

On a busy server the event loop, uploads and client connections wake many times a second;
sharing a GIL with them, the pipeline's Python-level loop stalls (measured: a busy Python
thread beside a batch of 4 tiny images turned 43 ms per image into seconds). The worker
process (``child``) owns the model and the engine loop; this side validates requests with the
same tokenizer, submits requests and relays their messages (``contract.messages``), and is the
watchdog: a worker that holds work and makes no step for the stall limit (``StallWatch``) is
killed. Nothing here imports torch: the web process never loads it.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import sys
import threading
from multiprocessing.connection import Connection, wait
from typing import Any

from sd_pipeline.backends.stall import StallWatch
from sd_pipeline.contract.backend import BackendInfo, ReplyTo
from sd_pipeline.contract.errors import ModelLoadError
from sd_pipeline.contract.facts import WorkerObserver, replay
from sd_pipeline.contract.lifecycle import Request
from sd_pipeline.contract.messages import (
    Cancel,
    Facts,
    Finished,
    LoadFailed,
    Lost,
    MalformedMessageError,
    PreviewReady,
    Ready,
    Step,
    Stop,
    Submit,
    decode,
    encode,
    replayable,
)
from sd_pipeline.contract.plans import DEFAULT_STALL_SECONDS
from sd_pipeline.contract.settings import PipelineSettings

logger = logging.getLogger(__name__)

_WATCH_SECONDS = 0.5  # how often the reader looks at the stall clock while the pipe is quiet


def _worker_main(connection: Connection, settings: PipelineSettings, max_batch_images: int) -> None:
    """The worker process's entry point (torch and the model load there, never in this process)."""
    from sd_pipeline.backends.local.child import serve

    serve(connection, settings, max_batch_images)
    # Served and stopped: nothing is left to send or save, so skip the interpreter's teardown of torch
    # and the model (over a second on two cores, paid by every stop, rollout and worker replacement).
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


class PipelineProcess:
    """One worker process running the step engine; ``LocalBackend`` replaces it when it is lost.

    ``submit`` may be called from any thread and never waits: the request joins the worker's
    running batch at its next step. A reader thread relays the worker's messages to each
    request's ``reply`` and the metrics facts to the observer; when the worker dies or stalls,
    every request it held gets ``Lost``.
    """

    def __init__(
        self,
        settings: PipelineSettings,
        *,
        max_batch_images: int = 8,
        observer: WorkerObserver | None = None,
        start_timeout: float = 3600.0,
        stall_seconds: float = DEFAULT_STALL_SECONDS,
    ) -> None:
        self.settings = settings
        self.max_batch_images = max_batch_images
        self.observer = observer
        self.start_timeout = start_timeout
        self.stall = StallWatch(stall_seconds)
        self.stalled = False  # set when the watchdog killed it
        self._send_lock = threading.Lock()
        self._pending_lock = threading.Lock()
        self._pending: dict[str, ReplyTo] = {}  # the requests it holds, by id: where their messages go
        self._lost: Lost | None = None  # once lost: how (later submits are answered with it)
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

    @property
    def holding(self) -> int:
        """How many requests it holds."""
        with self._pending_lock:
            return len(self._pending)

    def is_alive(self) -> bool:
        return self._process.is_alive()

    def start(self) -> BackendInfo:
        """Start the worker and wait until the model is loaded; raises ``ModelLoadError``."""
        self._process.start()
        self._child_connection.close()  # only the child holds its end now: its death reads as EOF here
        if not self._connection.poll(self.start_timeout):
            self.close()
            raise ModelLoadError(f"model '{self.settings.model}' did not load within {self.start_timeout:.0f}s")
        try:
            message = decode(self._connection.recv())
        except EOFError:
            raise ModelLoadError(f"the pipeline worker for '{self.settings.model}' exited while loading") from None
        except MalformedMessageError as error:
            self.kill()
            raise ModelLoadError(f"the pipeline worker for '{self.settings.model}' did not start: {error}") from None
        if isinstance(message, LoadFailed):
            self._process.join(timeout=10)
            raise ModelLoadError(message.reason)
        if not isinstance(message, Ready):
            self.kill()
            raise ModelLoadError(f"the pipeline worker sent {message.kind} before it was ready")
        self._replay(message)  # facts from the warm-up generation
        self.info = message.info
        self._reader.start()
        return message.info

    def submit(self, request: Request, reply: ReplyTo) -> None:
        """Send ``request`` to the worker; its messages go to ``reply`` (``Lost`` if the worker is gone)."""
        with self._pending_lock:
            lost = self._lost
            if lost is None:
                self._pending[request.id] = reply
                self.stall.holding(True)
        if lost is not None:
            reply(lost.model_copy(update={"id": request.id}))
            return
        self._send(Submit.of(request))

    def cancel(self, request_id: str) -> None:
        """Tell the worker at once; it answers with a cancelled ``Finished`` within a step."""
        with self._pending_lock:
            if request_id not in self._pending:
                return
        self._send(Cancel(id=request_id))

    def _send(self, message: Submit | Cancel | Stop) -> None:
        try:
            with self._send_lock:
                self._connection.send(encode(message))
        except OSError:  # BrokenPipeError and friends: the other end is gone; the reader reports it
            pass

    def _read(self) -> None:
        """The reader thread: relay messages until the worker ends; the watchdog while it holds work."""
        while True:
            try:
                ready = wait([self._connection, self._process.sentinel], timeout=_WATCH_SECONDS)
                data = self._connection.recv() if self._connection in ready else None
            except (EOFError, OSError):
                self._fail_pending("died", "the pipeline worker process died")
                return
            if data is not None:
                self._relay(data)
                continue
            if not self._process.is_alive():
                self._fail_pending("died", "the pipeline worker process died")
                return
            if (problem := self.stall.problem()) is not None:
                logger.warning("pipeline worker (pid %s): %s; killing it", self.pid, problem)
                self.stalled = True
                self.kill()
                self._fail_pending("stalled", f"the pipeline worker made no progress for {self.stall.seconds:g}s")
                return

    def _relay(self, data: Any) -> None:
        try:
            message = decode(data)
        except MalformedMessageError as error:
            logger.error("pipeline worker (pid %s): %s; dropped", self.pid, error)
            return
        if not isinstance(message, Step | PreviewReady | Finished | Facts):
            logger.error("pipeline worker (pid %s): a %s message cannot come now; dropped", self.pid, message.kind)
            return
        self._replay(message)
        if isinstance(message, Facts):
            return
        with self._pending_lock:
            if isinstance(message, Finished):
                reply = self._pending.pop(message.id, None)
                self.stall.holding(bool(self._pending))
            else:
                reply = self._pending.get(message.id)
        if isinstance(message, Step):
            self.stall.stepped()
        if reply is not None:
            reply(message)

    def _replay(self, message: Facts | Ready | Step | PreviewReady | Finished) -> None:
        if self.observer is not None:
            for fact in replayable(message):
                replay(fact, self.observer)

    def _fail_pending(self, reason: str, message: str) -> None:
        """The worker is gone: every request it held (and any submitted later) gets ``Lost``."""
        self._process.join(timeout=5)  # reap it, so its exit code and sentinel are final
        code = self._process.exitcode
        text = message if code is None else f"{message} (exit code {code})"
        with self._pending_lock:
            if self._lost is None:
                self._lost = Lost(id="-", reason=reason, message=text)
            lost = self._lost
            pending, self._pending = self._pending, {}
            self.stall.holding(False)
        for request_id, reply in pending.items():
            reply(lost.model_copy(update={"id": request_id}))

    def kill(self) -> None:
        """End the process at once, without a clean stop."""
        if self._process.is_alive():
            self._process.kill()

    def close(self, *, timeout: float = 30.0) -> None:
        """Ask the worker to stop; kill it if it does not."""
        if self._process.is_alive():
            with contextlib.suppress(OSError), self._send_lock:
                self._connection.send(encode(Stop()))
            self._process.join(timeout=timeout)
        if self._process.is_alive():
            self._process.kill()
            self._process.join(timeout=5)
        if self._reader.is_alive():  # it sees the process gone, fails what is pending and returns
            self._reader.join(timeout=5)
        self._fail_pending("died", "the pipeline worker process stopped")
        with self._send_lock:
            self._connection.close()
