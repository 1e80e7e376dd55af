"""One Ray Serve replica: the model, warmed up, and the engine loop the worker process runs too.

A request is one streaming call: the replica yields a ``StepReport`` as the engine reports
progress and then one ``Finished``. Cancelling the Ray call (the user's Stop) cancels the job,
which leaves the batch at the next step. When the engine loop has failed (a fatal device
error, an unexpected error) or stalled, ``check_health`` raises: Serve replaces the replica,
and the calls it held end with the replica, so the app retries them once, alone.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from sd_pipeline.contract.backend import BackendInfo
from sd_pipeline.contract.facts import Fact, FactRelay
from sd_pipeline.contract.jobs import GenerationJob, JobOutcome, Preview, coalesced_steps
from sd_pipeline.contract.plans import ReplicaPlan
from sd_pipeline.contract.request import GenerationRequest
from sd_pipeline.contract.settings import PipelineSettings

APP_NAME = "sd-pipeline"
DEPLOYMENT_NAME = "pipeline"


@dataclass(frozen=True)
class StepReport:
    """Replica to app: a request finished denoising step ``step`` of ``total``."""

    step: int
    total: int
    replica: str
    facts: list[Fact]


@dataclass(frozen=True)
class PreviewReport:
    """Replica to app: what a request's image looks like so far (only to a caller that asked)."""

    preview: Preview
    replica: str
    facts: list[Fact]


@dataclass(frozen=True)
class Finished:
    """Replica to app: a request's outcome, and which replica ran it."""

    outcome: JobOutcome
    replica: str
    facts: list[Fact]


class _FactCollector(FactRelay):
    """Keeps the engine's facts until a request's stream carries them to the app."""

    def __init__(self) -> None:
        super().__init__(self._keep)
        self._facts: list[Fact] = []
        self._lock = threading.Lock()

    def take(self) -> list[Fact]:
        with self._lock:
            facts, self._facts = self._facts, []
        return facts

    def _keep(self, fact: Fact) -> None:
        with self._lock:
            self._facts.append(fact)


class PipelineReplica:
    """One replica: load, warm up as the local worker does, then serve whatever Ray routes here."""

    def __init__(self, settings: PipelineSettings, max_batch_images: int, stall_seconds: float = 120.0) -> None:
        from ray import serve

        from sd_pipeline.backends.engine_loop import EngineLoop, start_engine
        from sd_pipeline.backends.ray.loopback import keep_replica_grpc_on_loopback, loopback_requested

        if loopback_requested():
            keep_replica_grpc_on_loopback()
        self.facts = _FactCollector()
        engine, self.info = start_engine(settings, max_batch_images=max_batch_images, observer=self.facts)
        self.facts.take()  # the warm-up's facts are not the users' work
        self.replica = serve.get_replica_context().replica_id.to_full_id_str()  # also its actor's name
        self.loop = EngineLoop(engine, stall_seconds=stall_seconds)
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

    async def generate(
        self, fields: dict[str, Any], previews: bool = False
    ) -> AsyncIterator[StepReport | PreviewReport | Finished]:
        """Run one request; yields its steps (and previews, if asked), then its outcome."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[StepReport | PreviewReport | Finished] = asyncio.Queue()

        def on_step(step: int, total: int) -> None:
            loop.call_soon_threadsafe(events.put_nowait, StepReport(step, total, self.replica, self.facts.take()))

        def done(outcome: JobOutcome) -> None:
            loop.call_soon_threadsafe(events.put_nowait, Finished(outcome, self.replica, self.facts.take()))

        def on_preview(preview: Preview) -> None:
            loop.call_soon_threadsafe(events.put_nowait, PreviewReport(preview, self.replica, self.facts.take()))

        job = GenerationJob(
            GenerationRequest(**fields), on_step=coalesced_steps(on_step), on_preview=on_preview if previews else None
        )
        self.loop.submit(job, done)
        try:
            while True:
                event = await events.get()
                yield event
                if isinstance(event, Finished):
                    return
        except asyncio.CancelledError:
            job.cancel()
            raise


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
