"""The pipeline as a Ray Serve deployment, and the ``GenerationBackend`` that reaches it.

Each replica loads the model with the same loading code as the local worker and runs a
``StepEngine`` in a thread of its own: requests routed to it join its running batch between
denoising steps. A request is one streaming call: the replica yields a ``StepReport`` as the
engine reports progress and then one ``Finished``. Cancelling the Ray call (the user's Stop)
cancels the job, which leaves the batch at the next step.

Ray does the cluster work: the router picks a replica, ``max_ongoing_requests`` bounds each,
``max_queued_requests`` bounds what waits at this caller (more is refused as busy), Serve's
autoscaler adds and removes replicas, dead replicas are replaced. A call lost with its replica
raises ``WorkerLostError`` here, so ``run_with_retry`` applies the same rule as the local
worker: retried once, alone, then a clear error.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import threading
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Protocol

from sd_pipeline.errors import GenerationCancelledError, PipelineUnavailableError, WorkerLostError
from sd_pipeline.generator import Fact, FactRelay, GenerationJob, GenerationObserver, JobOutcome, replay
from sd_pipeline.request import GenerationRequest, RequestLimits, TokenBudget, check_inputs
from sd_pipeline.settings import PipelineSettings
from sd_pipeline.supervision import run_with_retry
from sd_pipeline.worker import WorkerInfo, token_budget

logger = logging.getLogger(__name__)

APP_NAME = "sd-pipeline"
DEPLOYMENT_NAME = "pipeline"
REPLICA_WATCH_SECONDS = 2.0


class ReplicaObserver(GenerationObserver, Protocol):
    """The generation facts replayed from the replicas, and the replica counts."""

    def replicas(self, *, by_state: dict[str, int]) -> None: ...


class _FactCollector(FactRelay):
    """In a replica: keeps the engine's facts until a request's stream carries them to the app."""

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


@dataclass(frozen=True)
class StepReport:
    """Replica to app: a request finished denoising step ``step`` of ``total``."""

    step: int
    total: int
    facts: list[Fact]


@dataclass(frozen=True)
class Finished:
    """Replica to app: a request's outcome, and which replica ran it."""

    outcome: JobOutcome
    replica: str
    facts: list[Fact]


@dataclass(frozen=True)
class ReplicaPlan:
    """How many pipeline replicas run, what each holds and how much work each takes."""

    replicas: int | None = 1  # None: Serve autoscaling between min_replicas and max_replicas
    min_replicas: int = 1
    max_replicas: int = 1
    autoscaling: dict[str, Any] = field(default_factory=dict)  # more fields of Serve's AutoscalingConfig
    gpus_per_replica: float | None = None  # None: 1 when the cluster has GPUs, else 0
    cpus_per_replica: float = 1
    max_batch_images: int = 8  # each replica's step-engine batch, and its max_ongoing_requests
    max_queued_requests: int = -1  # requests waiting at one caller for a replica; -1: no bound

    @property
    def most_replicas(self) -> int:
        """The most replicas that can run at once."""
        return self.max_replicas if self.replicas is None else self.replicas

    def deployment_options(self, *, gpus_per_replica: float) -> dict[str, Any]:
        """The keyword arguments of ``serve.deployment`` for this plan."""
        options: dict[str, Any] = {
            "max_ongoing_requests": self.max_batch_images,
            "max_queued_requests": self.max_queued_requests,
            "ray_actor_options": {"num_cpus": self.cpus_per_replica, "num_gpus": gpus_per_replica},
        }
        if self.replicas is None:
            # A replica is added when replicas hold (or have queued) more than a full batch each.
            options["autoscaling_config"] = {
                "min_replicas": self.min_replicas,
                "max_replicas": self.max_replicas,
                "target_ongoing_requests": self.max_batch_images,
                **self.autoscaling,
            }
        else:
            options["num_replicas"] = self.replicas
        return options


DeployPolicy = Literal["if-missing", "always", "never"]


@dataclass(frozen=True)
class RayPlan:
    """Which Ray to use, whether this app deploys the pipeline there, and the replicas."""

    address: str  # "local" starts a private Ray instance; anything else is Ray's own RAY_ADDRESS
    deployment: ReplicaPlan = ReplicaPlan()
    deploy: DeployPolicy = "if-missing"  # on a shared cluster; a private instance always deploys
    object_store_bytes: int = 100 * 2**20


def pipeline_application(settings: PipelineSettings, plan: ReplicaPlan) -> Any:
    """The Serve application (``serve.run`` or a config's builder) running ``plan``'s replicas."""
    import ray
    from ray import serve

    gpus = plan.gpus_per_replica
    if gpus is None:
        gpus = 1 if ray.cluster_resources().get("GPU", 0) > 0 else 0
    deployment = serve.deployment(
        PipelineReplica, name=DEPLOYMENT_NAME, **plan.deployment_options(gpus_per_replica=gpus)
    )
    return deployment.bind(settings, plan.max_batch_images)


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

    async def generate(self, fields: dict[str, Any]) -> AsyncIterator[StepReport | Finished]:
        """Run one request; yields its steps, then its outcome."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[StepReport | Finished] = asyncio.Queue()

        def on_step(step: int, total: int) -> None:
            loop.call_soon_threadsafe(lambda: events.put_nowait(StepReport(step, total, self.facts.take())))

        def done(outcome: JobOutcome) -> None:
            loop.call_soon_threadsafe(lambda: events.put_nowait(Finished(outcome, self.replica, self.facts.take())))

        job = GenerationJob(GenerationRequest(**fields), on_step=on_step)
        self._inbox.put((job, done))
        try:
            while True:
                event = await events.get()
                yield event
                if isinstance(event, Finished):
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
        observer: ReplicaObserver | None = None,
    ) -> None:
        self.settings = settings
        self.plan = plan
        self.limits = limits
        self.observer = observer
        self.info: WorkerInfo | None = None
        self._tokens: TokenBudget | None = None
        self._handle: Any = None
        self._pool = ThreadPoolExecutor(max_workers=64, thread_name_prefix="ray-call")
        self._started_ray = False
        self._closing = threading.Event()
        self._replicas_by_state: dict[str, int] = {}
        self._replica_problem: str | None = "not started"

    @property
    def model(self) -> str:
        return self.info.model if self.info else self.settings.model

    @property
    def most_running(self) -> int:
        """Requests the replicas can run at once, at the most replicas the plan allows."""
        return self.plan.deployment.most_replicas * self.plan.deployment.max_batch_images

    def start(self) -> WorkerInfo:
        """Connect to (or start) Ray, deploy or join the pipeline application, wait for a replica."""
        private = self.plan.address == "local"
        if private or _on_loopback(self.plan.address):
            # A private instance (or one reached on loopback): Ray's own switch for single-machine use
            # (its default on macOS) keeps the node on the loopback address instead of the machine's
            # network address. Ray reads it when imported, so it is set first.
            os.environ.setdefault(_LOOPBACK_ONLY, "0")
        import ray
        from ray import serve

        if not ray.is_initialized():
            if private:
                plan = self.plan.deployment
                ray.init(
                    include_dashboard=False,
                    object_store_memory=self.plan.object_store_bytes,
                    num_cpus=max(1, int(plan.most_replicas * plan.cpus_per_replica)),
                    log_to_driver=False,
                    configure_logging=False,
                )
                logger.info("private Ray instance at %s", ray.get_runtime_context().gcs_address)
            else:
                ray.init(address=self.plan.address, log_to_driver=False, configure_logging=False)
            self._started_ray = True
        # No HTTP proxy: the app calls the replicas through handles (Serve's proxy would take port 8000).
        # Where Serve already runs (another front end, a RayService) this joins it as it is.
        serve.start(proxy_location="Disabled")
        if private or self.plan.deploy == "always" or (self.plan.deploy == "if-missing" and not _app_exists()):
            logger.info("deploying the pipeline application (%s)", self.plan.deployment)
            application = pipeline_application(self.settings, self.plan.deployment)
            self._handle = serve.run(application, name=APP_NAME, route_prefix=None)
        else:
            logger.info("joining the pipeline application already deployed on the cluster")
            while not _app_exists():
                time.sleep(2)
            self._handle = serve.get_app_handle(APP_NAME)
        self.info = self._handle.describe.remote().result()
        self._tokens = token_budget(self.settings.model)  # front ends share the replicas' settings
        self._look_at_replicas()
        threading.Thread(target=self._watch_replicas, name="ray-replica-watch", daemon=True).start()
        return self.info

    def readiness_problem(self) -> str | None:
        """Why no request can run (None while at least one replica is running)."""
        if self._replica_problem is not None:
            return self._replica_problem
        by_state = self._replicas_by_state
        return None if by_state.get("RUNNING", 0) > 0 else f"no pipeline replica is running ({by_state})"

    def _watch_replicas(self) -> None:
        """Every few seconds, until closed: look at the replicas again."""
        while not self._closing.wait(REPLICA_WATCH_SECONDS):
            self._look_at_replicas()

    def _look_at_replicas(self) -> None:
        """The replica counts by state, for readiness and the metrics."""
        from ray import serve

        try:
            deployment = serve.status().applications[APP_NAME].deployments[DEPLOYMENT_NAME]
        except Exception as error:  # noqa: BLE001 - any failure to ask Ray is a readiness problem
            self._replica_problem = f"Ray Serve status unavailable: {type(error).__name__}"
            return
        states = deployment.replica_states.items()
        self._replicas_by_state = {str(getattr(state, "value", state)): count for state, count in states}
        self._replica_problem = None
        if self.observer is not None:
            self.observer.replicas(by_state=self._replicas_by_state)

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
        from ray.serve.exceptions import BackPressureError

        stream = self._handle.options(stream=True).generate.remote(asdict(job.request))
        try:
            for event in stream:
                self._replay(event.facts)
                if job.cancelled:
                    stream.cancel()
                    break
                if isinstance(event, StepReport):
                    job.report_step(event.step, event.total)
                else:
                    logger.info("request served by replica %s", event.replica)
                    outcome: JobOutcome = event.outcome
                    return outcome
        except BackPressureError as error:
            waiting = error.args[1]  # max_queued_requests
            busy = f"the server is busy ({waiting} requests wait for a pipeline replica); try again shortly"
            return JobOutcome(error=PipelineUnavailableError(busy))
        except (ActorDiedError, ActorUnavailableError, RayActorError) as error:
            raise WorkerLostError("died", f"a pipeline replica died ({type(error).__name__})") from None
        return JobOutcome(error=GenerationCancelledError("cancelled"))

    def _replay(self, facts: list[Fact]) -> None:
        """Hand a replica's generation facts to this process's observer (the metrics)."""
        if self.observer is None:
            return
        for fact in facts:
            replay(fact, self.observer)

    def close(self) -> None:
        """Stop a private Ray instance; on a shared cluster leave the application to the others."""
        import ray
        from ray import serve

        self._closing.set()
        self._pool.shutdown(wait=False, cancel_futures=True)
        if not ray.is_initialized() or not self._started_ray:
            return
        if self.plan.address == "local":
            serve.shutdown()
        ray.shutdown()


def _on_loopback(address: str) -> bool:
    """Whether a Ray address names this machine's loopback interface."""
    host = address.removeprefix("ray://").rsplit(":", 1)[0].strip("[]")
    return host in ("localhost", "::1") or host.startswith("127.")


def _app_exists() -> bool:
    """Whether the pipeline application is deployed on the cluster this process is connected to."""
    from ray import serve

    return APP_NAME in serve.status().applications
