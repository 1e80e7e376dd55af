"""One Ray Serve replica: the model, warmed up, and the engine loop the worker process runs too.

A request is one streaming call carrying the one message set (``contract.messages``): a
``Submit`` in, then ``Step`` reports (coalesced), ``PreviewReady`` (if asked) and one
``Finished`` out, each with the replica's name and its metrics facts. A malformed ``Submit`` is
refused (the call fails) and logged; the replica keeps serving. Cancelling the Ray call (the
user's Stop) cancels the request, which leaves the batch at the next step. When the engine loop
has failed (a fatal device error, an unexpected error) or stalled (``StallWatch``),
``check_health`` raises: Serve replaces the replica, and the calls it held end ``Lost`` so
admission retries them once, alone.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator
from typing import Any

from sd_pipeline.contract.backend import BackendInfo
from sd_pipeline.contract.facts import FactCollector
from sd_pipeline.contract.jobs import JobOutcome, Preview, coalesced_steps
from sd_pipeline.contract.lifecycle import Request
from sd_pipeline.contract.messages import (
    Finished,
    MalformedMessageError,
    PreviewReady,
    Step,
    Submit,
    decode,
    encode,
    facts_of,
)
from sd_pipeline.contract.plans import DEFAULT_STALL_SECONDS, ReplicaPlan
from sd_pipeline.contract.settings import PipelineSettings

APP_NAME = "sd-pipeline"
DEPLOYMENT_NAME = "pipeline"
logger = logging.getLogger(__name__)


class PipelineReplica:
    """One replica: load, warm up as the local worker does, then serve whatever Ray routes here."""

    def __init__(
        self, settings: PipelineSettings, max_batch_images: int, stall_seconds: float = DEFAULT_STALL_SECONDS
    ) -> None:
        from ray import serve

        from sd_pipeline.backends.engine_loop import EngineLoop, start_engine
        from sd_pipeline.backends.ray.loopback import keep_this_replica_on_loopback
        from sd_pipeline.backends.stall import StallWatch

        keep_this_replica_on_loopback()
        self.facts = FactCollector()
        engine, self.info = start_engine(settings, max_batch_images=max_batch_images, observer=self.facts)
        self.facts.take()  # the warm-up's facts are not the users' work
        self.replica = serve.get_replica_context().replica_id.to_full_id_str()  # also its actor's name
        self.loop = EngineLoop(engine, stall=StallWatch(stall_seconds))
        threading.Thread(target=self._serve, name="engine-loop", daemon=True).start()

    def _serve(self) -> None:
        """The engine loop's thread. When the loop fails, the calls it held (and any that still
        arrive) end with ``WorkerLostError`` so the app retries them once the replica is gone."""
        from sd_pipeline.contract.errors import WorkerLostError

        self.loop.run()
        if self.loop.failure is not None:
            self.loop.fail_held(WorkerLostError("died", f"a pipeline replica stopped serving: {self.loop.failure}"))

    def describe(self) -> BackendInfo:
        """What this replica loaded (and how long its warm-up took)."""
        return self.info

    def check_health(self) -> None:
        """Serve calls this every ``health_check_period_s``; raising makes Serve replace the replica."""
        problem = self.loop.health_problem()
        if problem is not None:
            raise RuntimeError(f"replica {self.replica}: {problem}")

    async def generate(self, data: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """Run one request (an encoded ``Submit``); yields its encoded messages up to ``Finished``."""
        try:
            submit = decode(data)
            if not isinstance(submit, Submit):
                raise MalformedMessageError(f"a {submit.kind} message where a submit belongs")
        except MalformedMessageError as error:
            logger.error("replica %s refused a call: %s", self.replica, error)
            raise
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Step | PreviewReady | Finished] = asyncio.Queue()

        def send(message: Step | PreviewReady | Finished) -> None:
            loop.call_soon_threadsafe(events.put_nowait, message)

        def on_step(step: int, total: int) -> None:
            send(Step(id=submit.id, step=step, total=total, **self._up()))

        def on_preview(preview: Preview) -> None:
            send(PreviewReady.of(submit.id, preview, **self._up()))

        def done(outcome: JobOutcome) -> None:
            send(Finished.of(submit.id, outcome, **self._up()))

        request = Request(
            submit.inputs,
            id=submit.id,
            on_step=coalesced_steps(on_step),
            on_preview=on_preview if submit.previews else None,
        )
        self.loop.submit(request, done)
        try:
            while True:
                message = await events.get()
                yield encode(message)
                if isinstance(message, Finished):
                    return
        except asyncio.CancelledError:
            request.cancel()
            raise

    def _up(self) -> dict[str, Any]:
        """What every message up carries: this replica's name and the facts since the last message."""
        return {"by": self.replica, "facts": facts_of(self.facts.take())}


def pipeline_application(
    settings: PipelineSettings, plan: ReplicaPlan, *, replica_class: type[PipelineReplica] = PipelineReplica
) -> Any:
    """The Serve application (``serve.run`` or a config's builder) running ``plan``'s replicas
    (tests pass a ``PipelineReplica`` subclass that misbehaves on purpose)."""
    import ray
    from ray import serve

    gpus = plan.gpus_per_replica
    if gpus is None:
        gpus = 1 if ray.cluster_resources().get("GPU", 0) > 0 else 0
    deployment = serve.deployment(replica_class, name=DEPLOYMENT_NAME, **plan.deployment_options(gpus_per_replica=gpus))
    return deployment.bind(settings, plan.max_batch_images, plan.stall_seconds)
