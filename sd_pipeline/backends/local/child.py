"""Inside the worker process: load, warm up, report ready, then feed the engine loop from the pipe.

The pipe carries the one message set (``contract.messages``) in its one encoding. From the
parent: ``Submit``, ``Cancel``, ``Stop``. To the parent: ``Ready`` or ``LoadFailed`` at start,
then ``Step``, ``PreviewReady`` and ``Finished`` per request, each with the engine's metrics
facts since the last message. A malformed message is logged and dropped; the worker keeps serving.
"""

from __future__ import annotations

import functools
import logging
import signal
import threading
from multiprocessing.connection import Connection

from sd_pipeline.backends.engine_loop import EngineLoop, start_engine
from sd_pipeline.contract.errors import ModelLoadError
from sd_pipeline.contract.facts import FactCollector
from sd_pipeline.contract.jobs import JobOutcome, Preview
from sd_pipeline.contract.lifecycle import Request
from sd_pipeline.contract.messages import (
    Cancel,
    Finished,
    LoadFailed,
    MalformedMessageError,
    PreviewReady,
    Ready,
    Step,
    Stop,
    Submit,
    decode,
    encode,
    facts_of,
)
from sd_pipeline.contract.settings import PipelineSettings

logger = logging.getLogger(__name__)


def serve(connection: Connection, settings: PipelineSettings, max_batch_images: int) -> None:
    """The worker process: load, report ready, then serve requests until told to stop or the engine fails."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when to stop (Ctrl-C reaches both)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    facts = FactCollector()
    try:
        engine, info = start_engine(settings, max_batch_images=max_batch_images, observer=facts)
    except ModelLoadError as error:
        connection.send(encode(LoadFailed(reason=str(error))))
        return
    connection.send(encode(Ready(info=info, facts=facts_of(facts.take()))))
    loop = EngineLoop(engine)  # its stall is watched from the parent (a hung process cannot report one)
    pipe = PipeEnd(connection, loop, facts)
    threading.Thread(target=pipe.read, name="pipe-reader", daemon=True).start()
    loop.run()  # returns when stopped, or when the engine failed: the process then ends and is replaced


class PipeEnd:
    """The parent's messages applied to the loop; each request's messages sent back."""

    def __init__(self, connection: Connection, loop: EngineLoop, facts: FactCollector) -> None:
        self.connection = connection
        self.loop = loop
        self.facts = facts
        self._send_lock = threading.Lock()

    def read(self) -> None:
        """On the reader thread: until the parent says stop or goes away."""
        while True:
            try:
                data = self.connection.recv()
            except (EOFError, OSError):  # the parent is gone
                self.loop.stop()
                return
            try:
                message = decode(data)
            except MalformedMessageError as error:
                logger.error("pipeline worker: %s; dropped", error)
                continue
            if isinstance(message, Stop):
                self.loop.stop()
                return
            if isinstance(message, Cancel):
                self.loop.cancel(message.id)
            elif isinstance(message, Submit):
                self.loop.submit(self._request(message), functools.partial(self._finished, message.id))
            else:
                logger.error("pipeline worker: a %s message cannot come from the app; dropped", message.kind)

    def _request(self, submit: Submit) -> Request:
        def on_step(step: int, total: int) -> None:
            self._send(Step(id=submit.id, step=step, total=total, facts=facts_of(self.facts.take())))

        def on_preview(preview: Preview) -> None:
            self._send(PreviewReady.of(submit.id, preview, facts=facts_of(self.facts.take())))

        return Request(submit.inputs, id=submit.id, on_step=on_step, on_preview=on_preview if submit.previews else None)

    def _finished(self, request_id: str, outcome: JobOutcome) -> None:
        self._send(Finished.of(request_id, outcome, facts=facts_of(self.facts.take())))

    def _send(self, message: Step | PreviewReady | Finished) -> None:
        with self._send_lock:
            self.connection.send(encode(message))
