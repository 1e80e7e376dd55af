"""The pipeline as a Ray Serve deployment, and the ``GenerationBackend`` that reaches it.

Each replica loads the model with the same loading code as the local worker and runs a
``StepEngine`` in a thread of its own: requests routed to it join its running batch between
denoising steps. A request is one streaming call: the replica yields ``("step", n, total)``
as the engine reports progress and then ``("done", outcome)``. Cancelling the Ray call (the
user's Stop) cancels the job, which leaves the batch at the next step.

Ray does the cluster work: the router picks a replica, ``max_ongoing_requests`` bounds each,
dead replicas are replaced. A call lost with its replica raises ``WorkerLostError`` here, so
``run_with_retry`` applies the same rule as the local worker: retried once, alone, then a
clear error.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import threading
from collections.abc import AsyncIterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any, Protocol

from sd_pipeline.errors import WorkerLostError
from sd_pipeline.generator import GenerationJob, GenerationObserver, JobOutcome
from sd_pipeline.request import GenerationRequest, RequestLimits, TokenBudget, check_inputs
from sd_pipeline.settings import PipelineSettings
from sd_pipeline.supervision import run_with_retry
from sd_pipeline.worker import WorkerInfo, token_budget

logger = logging.getLogger(__name__)

APP_NAME = "sd-pipeline"


class ReplicaObserver(GenerationObserver, Protocol):
    """The generation facts replayed from the replicas, and the replica counts."""

    def replicas(self, *, by_state: dict[str, int]) -> None: ...


Fact = tuple[str, dict[str, Any]]  # a GenerationObserver method's name and its keyword arguments


class _FactCollector:
    """In a replica: keeps the engine's facts until a request's stream carries them to the app."""

    def __init__(self) -> None:
        self._facts: list[Fact] = []
        self._lock = threading.Lock()

    def take(self) -> list[Fact]:
        with self._lock:
            facts, self._facts = self._facts, []
        return facts

    def _add(self, name: str, **fields: Any) -> None:
        with self._lock:
            self._facts.append((name, fields))

    def pipeline_call(self, *, seconds: float, images: int) -> None:
        self._add("pipeline_call", seconds=seconds, images=images)

    def denoising_step(self, *, seconds: float) -> None:
        self._add("denoising_step", seconds=seconds)

    def first_step_wait(self, *, seconds: float) -> None:
        self._add("first_step_wait", seconds=seconds)

    def out_of_memory(self) -> None:
        self._add("out_of_memory")


@dataclass(frozen=True)
class RayPlan:
    """Where and how many replicas run."""

    address: str  # "local" starts a private Ray instance; anything else is Ray's own RAY_ADDRESS
    replicas: int = 1
    gpus_per_replica: float | None = None  # None: 1 when the cluster has GPUs, else 0
    cpus_per_replica: float = 1
    max_ongoing_requests: int = 8
    object_store_bytes: int = 100 * 2**20


_LOOPBACK_ONLY = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # "0": Ray keeps the node on the loopback address


def _keep_replica_grpc_on_loopback() -> None:
    """In a private instance, bind the replica's inter-deployment gRPC server to 127.0.0.1.

    Ray Serve 2.60 binds it to every interface ("[::]:0" in ray/serve/_private/replica.py),
    whatever the node address; everything else in a private instance already stays on loopback.
    """
    from ray.serve._private import replica

    bind = replica.add_port_to_grpc_server
    replica.add_port_to_grpc_server = lambda server, address: bind(server, address.replace("[::]", "127.0.0.1"))


class PipelineReplica:
    """One replica: the model and a step engine serving whatever Ray routes here."""

    def __init__(self, settings: PipelineSettings, max_batch_images: int) -> None:
        from ray import serve

        from sd_pipeline.engine import StepEngine
        from sd_pipeline.loading import load_pipeline

        if os.environ.get(_LOOPBACK_ONLY) == "0":
            _keep_replica_grpc_on_loopback()

        loaded = load_pipeline(settings)
        self.facts = _FactCollector()
        self.engine = StepEngine(loaded, max_batch_images=max_batch_images, observer=self.facts)
        self.info = WorkerInfo.of(loaded)
        self.replica = serve.get_replica_context().replica_id.unique_id
        self._inbox: queue.Queue[tuple[GenerationJob, Any]] = queue.Queue()
        threading.Thread(target=self._serve, name="step-engine", daemon=True).start()

    def describe(self) -> WorkerInfo:
        """What this replica loaded."""
        return self.info

    async def generate(self, fields: dict[str, Any]) -> AsyncIterator[tuple[Any, ...]]:
        """Run one request; yields its steps, then its outcome."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[tuple[Any, ...]] = asyncio.Queue()

        def on_step(step: int, total: int) -> None:
            loop.call_soon_threadsafe(events.put_nowait, ("step", step, total))

        def done(outcome: JobOutcome) -> None:
            loop.call_soon_threadsafe(events.put_nowait, ("done", outcome, self.replica))

        job = GenerationJob(GenerationRequest(**fields), on_step=on_step)
        self._inbox.put((job, done))
        try:
            while True:
                event = await events.get()
                yield (*event, self.facts.take())
                if event[0] == "done":
                    return
        except asyncio.CancelledError:
            job.cancel()
            raise

    def _serve(self) -> None:
        while True:
            try:
                job, done = self._inbox.get(block=self.engine.idle, timeout=None if self.engine.idle else 0)
                self.engine.submit(job, done)
                continue
            except queue.Empty:
                pass
            self.engine.step()


class RayBackend:
    """``GenerationBackend`` over the Ray Serve deployment: validation here, generation in replicas."""

    def __init__(
        self,
        settings: PipelineSettings,
        plan: RayPlan,
        *,
        limits: RequestLimits,
        max_batch_images: int,
        observer: ReplicaObserver | None = None,
    ) -> None:
        self.settings = settings
        self.plan = plan
        self.limits = limits
        self.max_batch_images = max_batch_images
        self.observer = observer
        self.info: WorkerInfo | None = None
        self._tokens: TokenBudget | None = None
        self._handle: Any = None
        self._pool = ThreadPoolExecutor(max_workers=64, thread_name_prefix="ray-call")
        self._started_ray = False

    @property
    def model(self) -> str:
        return self.info.model if self.info else self.settings.model

    def start(self) -> WorkerInfo:
        """Connect to (or start) Ray, deploy the replicas and wait until they are ready."""
        if self.plan.address == "local":
            # A private instance: Ray's own switch for single-machine use (its default on macOS) puts
            # the node on the loopback address instead of the machine's network address. Ray reads it
            # when imported, so it is set first.
            os.environ.setdefault(_LOOPBACK_ONLY, "0")
        import ray
        from ray import serve

        if not ray.is_initialized():
            if self.plan.address == "local":
                ray.init(
                    include_dashboard=False,
                    object_store_memory=self.plan.object_store_bytes,
                    num_cpus=max(1, int(self.plan.replicas * self.plan.cpus_per_replica)),
                    log_to_driver=False,
                    configure_logging=False,
                )
            else:
                ray.init(address=self.plan.address, log_to_driver=False, configure_logging=False)
            self._started_ray = True
        gpus = self.plan.gpus_per_replica
        if gpus is None:
            gpus = 1 if ray.cluster_resources().get("GPU", 0) > 0 else 0
        # No HTTP proxy: the app calls the replicas through handles (Serve's proxy would take port 8000).
        serve.start(proxy_location="Disabled")
        deployment = serve.deployment(
            PipelineReplica,
            name="pipeline",
            num_replicas=self.plan.replicas,
            max_ongoing_requests=self.plan.max_ongoing_requests,
            ray_actor_options={"num_cpus": self.plan.cpus_per_replica, "num_gpus": gpus},
        )
        self._handle = serve.run(
            deployment.bind(self.settings, self.max_batch_images), name=APP_NAME, route_prefix=None
        )
        self.info = self._handle.describe.remote().result()
        self._tokens = token_budget(self.settings.model)
        return self.info

    def readiness_problem(self) -> str | None:
        """Why no request can run (None while at least one replica is running); reports the replica counts."""
        from ray import serve

        try:
            deployment = serve.status().applications[APP_NAME].deployments["pipeline"]
        except Exception as error:  # noqa: BLE001 - any failure to ask Ray is a readiness problem
            return f"Ray Serve status unavailable: {type(error).__name__}"
        by_state = {str(getattr(state, "value", state)): count for state, count in deployment.replica_states.items()}
        if self.observer is not None:
            self.observer.replicas(by_state=by_state)
        return None if by_state.get("RUNNING", 0) > 0 else f"no pipeline replica is running ({by_state})"

    def liveness_problem(self) -> str | None:
        """Ray replaces dead replicas itself; this process stays live."""
        return None

    def check(self, data: Mapping[str, Any]) -> GenerationRequest:
        return check_inputs(data, limits=self.limits, tokens=self._tokens)

    def run(self, jobs: Sequence[GenerationJob]) -> list[JobOutcome]:
        """Each job is its own Ray call, side by side; a call lost with its replica is retried once."""
        return run_with_retry(jobs, self._run_all)

    def _run_all(self, jobs: Sequence[GenerationJob]) -> list[JobOutcome]:
        futures = [self._pool.submit(self._run_one, job) for job in jobs]
        outcomes: list[JobOutcome] = []
        lost: WorkerLostError | None = None
        for future in futures:
            try:
                outcomes.append(future.result())
            except WorkerLostError as error:
                lost = error
        if lost is not None:
            raise lost
        return outcomes

    def _run_one(self, job: GenerationJob) -> JobOutcome:
        from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

        stream = self._handle.options(stream=True).generate.remote(asdict(job.request))
        try:
            for event in stream:
                self._replay(event[-1])
                if job.cancelled:
                    stream.cancel()
                    break
                if event[0] == "step":
                    job.report_step(event[1], event[2])
                else:
                    outcome: JobOutcome = event[1]
                    logger.info("request served by replica %s", event[2])
                    return outcome
        except (ActorDiedError, ActorUnavailableError, RayActorError) as error:
            raise WorkerLostError("died", f"a pipeline replica died ({type(error).__name__})") from None
        from sd_pipeline.errors import GenerationCancelledError

        return JobOutcome(error=GenerationCancelledError("cancelled"))

    def _replay(self, facts: list[Fact]) -> None:
        """Hand a replica's generation facts to this process's observer (the metrics)."""
        if self.observer is None:
            return
        for name, fields in facts:
            getattr(self.observer, name)(**fields)

    def close(self) -> None:
        """Delete the deployment, and stop Ray when this process started it."""
        import ray
        from ray import serve

        self._pool.shutdown(wait=False, cancel_futures=True)
        if ray.is_initialized():
            serve.shutdown()
            if self._started_ray:
                ray.shutdown()
