"""The ``Backend`` over Ray Serve replicas: validation here, generation in the replicas.

Ray does the cluster work: the router picks a replica, ``max_ongoing_requests`` bounds each,
``max_queued_requests`` bounds what waits at this caller (more is refused as busy), Serve's
autoscaler adds and removes replicas, and replicas that die or fail their health check are
replaced. Each request is one streaming call carrying the one message set (``contract.messages``),
consumed on one event-loop thread (no thread waits per request). A call lost with its replica
is answered ``Lost``; until that replica is gone the backend is not ``accepting``, so admission's
retry (once, alone) cannot be routed to it. Stop cancels a call at once, also while it waits
for a replica.

A new model version is a new deployment version: the application is deployed again with the
new model and Serve's rolling update replaces the replicas (each stops only after finishing
its requests, within ``graceful_shutdown_timeout_s``; calls meanwhile wait for a replica). A
version whose replicas cannot start is refused: the previous version is deployed again.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

from sd_pipeline.backends.ray.loopback import LOOPBACK_SWITCH, start_private_instance
from sd_pipeline.backends.ray.replica import APP_NAME, DEPLOYMENT_NAME, PipelineReplica, pipeline_application
from sd_pipeline.backends.tokens import token_budget
from sd_pipeline.contract.backend import BackendInfo, ReplyTo, RequestChecker
from sd_pipeline.contract.errors import GenerationCancelledError, ModelLoadError, PipelineUnavailableError
from sd_pipeline.contract.facts import GenerationObserver, replay
from sd_pipeline.contract.jobs import JobOutcome
from sd_pipeline.contract.lifecycle import Request
from sd_pipeline.contract.messages import (
    Finished,
    Lost,
    MalformedMessageError,
    PreviewReady,
    Step,
    Submit,
    decode,
    encode,
    replayable,
)
from sd_pipeline.contract.plans import RayPlan
from sd_pipeline.contract.request import GenerationRequest, RequestLimits
from sd_pipeline.contract.settings import PipelineSettings
from sd_pipeline.loras.sources import adapter_listing
from sd_pipeline.versions.location import pinned_version

logger = logging.getLogger(__name__)

REPLICA_WATCH_SECONDS = 2.0
SERVE_NAMESPACE = "serve"  # where Serve names its replica actors (by their full replica id)


class ReplicaObserver(GenerationObserver, Protocol):
    """The generation facts replayed from the replicas, and the replica counts."""

    def replicas(self, *, by_state: dict[str, int]) -> None: ...


class RayBackend:
    """``Backend`` over the Ray Serve deployment of ``PipelineReplica``."""

    def __init__(
        self,
        settings: PipelineSettings,
        plan: RayPlan,
        *,
        limits: RequestLimits,
        observer: ReplicaObserver | None = None,
        replica_class: type[PipelineReplica] = PipelineReplica,
    ) -> None:
        self.settings = settings
        self.replica_class = replica_class
        self.plan = plan
        self.observer = observer
        self.checker = RequestChecker(limits, adapters=adapter_listing(settings.lora_dir, settings.lora_store))
        self.info: BackendInfo | None = None
        self._handle: Any = None
        self._calls = asyncio.new_event_loop()  # every request's stream is read here
        self._streams: dict[str, Any] = {}  # each running request's Ray call, by request id
        self._listeners: list[Callable[[], None]] = []
        self._started_ray = False
        self._private_dir: Path | None = None
        self._closing = threading.Event()
        self._replicas_by_state: dict[str, int] = {}
        self._replica_problem: str | None = "not started"
        self._lost_lock = threading.Lock()
        self._lost_replicas: set[str] = set()
        self._notice: str | None = None

    # The Backend surface.
    @property
    def model(self) -> str:
        return self.info.model if self.info else self.settings.model

    @property
    def max_running(self) -> int:
        """Requests the replicas can run at once, at the most replicas the plan allows."""
        return self.plan.deployment.most_replicas * self.plan.deployment.max_batch_images

    def check(self, data: Mapping[str, Any]) -> GenerationRequest:
        return self.checker.check(data)

    def accepting(self) -> bool:
        """False while a replica that lost a call still exists (a retry must not be routed to it)."""
        with self._lost_lock:
            return not self._lost_replicas and not self._closing.is_set()

    def when_accepting(self, callback: Callable[[], None]) -> None:
        self._listeners.append(callback)

    def submit(self, request: Request, reply: ReplyTo) -> None:
        """Start ``request``'s streaming call; its messages go to ``reply`` from the calls' thread."""
        if self._closing.is_set():
            raise PipelineUnavailableError("the server is stopping; try again in a moment")
        asyncio.run_coroutine_threadsafe(self._call(request, reply), self._calls)

    def cancel(self, request: Request) -> None:
        """Cancel the Ray call, also while it waits for a replica (off this thread: Ray's cancel may wait)."""
        stream = self._streams.get(request.id)
        if stream is not None:
            threading.Thread(target=stream.cancel, name="ray-cancel", daemon=True).start()

    def start(self) -> BackendInfo:
        """Connect to (or start) Ray, deploy or join the pipeline application, wait (bounded) for a replica."""
        deadline = time.monotonic() + self.plan.start_timeout
        self._connect()
        from ray import serve
        from ray.exceptions import GetTimeoutError

        # No HTTP proxy: the app calls the replicas through handles (Serve's proxy would take port 8000).
        # Where Serve already runs (another front end, a RayService) this joins it as it is.
        serve.start(proxy_location="Disabled")
        private = self.plan.address == "local"
        if private or self.plan.deploy == "always" or (self.plan.deploy == "if-missing" and not _app_exists()):
            logger.info("deploying the pipeline application (%s)", self.plan.deployment)
            self._deploy(self.settings, deadline)
        else:
            logger.info("joining the pipeline application already deployed on the cluster")
            while not _app_exists():
                if time.monotonic() > deadline:
                    raise ModelLoadError(self._not_within("no pipeline application appeared on the cluster"))
                time.sleep(2)
            self._handle = serve.get_app_handle(APP_NAME)
        try:
            self.info = self._handle.describe.remote().result(timeout_s=max(1.0, deadline - time.monotonic()))
        except (GetTimeoutError, TimeoutError):
            raise ModelLoadError(self._not_within("no pipeline replica answered")) from None
        self.checker.serve(self.info, token_budget(self.settings))  # front ends share the replicas' settings
        self.start_calls()
        self._look_at_replicas()
        threading.Thread(target=self._watch_replicas, name="ray-replica-watch", daemon=True).start()
        return self.info

    def start_calls(self) -> None:
        """Start the one thread every request's stream is read on."""
        threading.Thread(target=self._calls.run_forever, name="ray-calls", daemon=True).start()

    def switch_model(self, model: str) -> BackendInfo:
        """Deploy ``model`` as a new deployment version (Serve's rolling update); refused (the old
        version deployed again) if its replicas cannot start. No-op when the replicas already
        serve it (another front end rolled it out)."""
        settings = self.settings.model_copy(update={"model": model})
        tokens = token_budget(settings)  # fetches and verifies a version from S3 first
        target = pinned_version(model)
        if target and self.info is not None:
            serving = self._serving(target, timeout=30)
            if serving is not None:  # another front end rolled it out already
                self.settings, self.info = settings, serving
                self.checker.serve(serving, tokens)
                return serving
        deadline = time.monotonic() + self.plan.start_timeout
        if self.plan.deploy == "never" and self.plan.address != "local":
            # Another deployer (a RayService, the deploying front end) rolls the replicas out: wait for it.
            info = self._wait_for_version(target, deadline)
            self.settings, self.info = settings, info
            self.checker.serve(info, tokens)
            return info
        self._notice = f"waiting for a replica while the model is updated to {target or model}"
        try:
            self._deploy(settings, deadline)
            info = self._describe(timeout=max(1.0, deadline - time.monotonic()))
        except ModelLoadError as error:
            logger.error("model %s refused (%s); deploying the previous version again", model, error)
            self._deploy(self.settings, time.monotonic() + self.plan.start_timeout)
            raise
        finally:
            self._notice = None
        self.settings, self.info = settings, info
        self.checker.serve(info, tokens)
        return info

    def _wait_for_version(self, target: str | None, deadline: float) -> BackendInfo:
        """With ``RAY_DEPLOY=never``: the replicas' description once they serve ``target``, asked
        every few seconds; ``ModelLoadError`` if they do not by ``deadline`` (this front end deploys nothing)."""
        if not target:
            raise ModelLoadError("with RAY_DEPLOY=never a front end follows published versions only (s3://...@VERSION)")
        while True:
            info = self._serving(target, timeout=max(1.0, deadline - time.monotonic()))
            if info is not None:
                return info
            if time.monotonic() > deadline or self._closing.wait(REPLICA_WATCH_SECONDS):
                raise ModelLoadError(
                    self._not_within(f"the replicas did not reach version {target} (RAY_DEPLOY=never deploys nothing)")
                )

    def notice(self) -> str | None:
        """Set while Serve's rolling update replaces the replicas (calls may wait for one)."""
        return self._notice

    def readiness_problem(self) -> str | None:
        """Why no request can run (None while at least one replica is running)."""
        if self._replica_problem is not None:
            return self._replica_problem
        by_state = self._replicas_by_state
        return None if by_state.get("RUNNING", 0) > 0 else f"no pipeline replica is running ({by_state})"

    def liveness_problem(self) -> str | None:
        """Ray replaces dead replicas itself; this process stays live."""
        return None

    def close(self) -> None:
        """Stop a private Ray instance; on a shared cluster leave the application to the others."""
        import ray
        from ray import serve

        self._closing.set()
        self._calls.call_soon_threadsafe(self._calls.stop)
        if ray.is_initialized() and self._started_ray:
            if self.plan.address == "local":
                serve.shutdown()
            ray.shutdown()
        if self._private_dir is not None:
            shutil.rmtree(self._private_dir, ignore_errors=True)

    # Start-up.
    def _deploy(self, settings: PipelineSettings, deadline: float) -> None:
        """Deploy (or update) the application with ``settings`` and wait, bounded, until it runs."""
        from ray import serve

        application = pipeline_application(settings, self.plan.deployment, replica_class=self.replica_class)
        # Not serve.run: it waits for the replicas without a bound (e.g. while no node has a free GPU).
        target = serve.RunTarget(target=application, name=APP_NAME, route_prefix=None)
        (self._handle,) = serve.run_many([target], wait_for_applications_running=False)
        self._wait_until_running(deadline)

    def _serving(self, target: str, *, timeout: float) -> BackendInfo | None:
        """The replicas' description once all of them serve ``target``, else None: one replica
        says so and Serve's rolling update is over (mid-update, one new replica may answer for all)."""
        info = self._describe(timeout=timeout)
        return info if info.version == target and self._application().status == "RUNNING" else None

    def _application(self) -> Any:
        """Serve's status of the pipeline application (``status`` is DEPLOYING while a rolling
        update runs; ``deployments`` has the replica counts)."""
        from ray import serve

        return serve.status().applications[APP_NAME]

    def _describe(self, *, timeout: float) -> BackendInfo:
        from ray.exceptions import GetTimeoutError

        try:
            info: BackendInfo = self._handle.describe.remote().result(timeout_s=timeout)
        except (GetTimeoutError, TimeoutError):
            raise ModelLoadError(f"no pipeline replica answered within {timeout:g}s") from None
        return info

    def _connect(self) -> None:
        private = self.plan.address == "local"
        if private or _on_loopback(self.plan.address):
            # A private instance (or one reached on loopback): Ray's own switch for single-machine use
            # (its default on macOS) keeps the node on the loopback address instead of the machine's
            # network address. Ray reads it when imported, so it is set first.
            os.environ.setdefault(LOOPBACK_SWITCH, "0")
        import ray

        if ray.is_initialized():
            return
        if private:
            self._start_private_instance()
        else:
            ray.init(address=self.plan.address, log_to_driver=False, configure_logging=False)
        self._started_ray = True

    def _start_private_instance(self) -> None:
        """Ray on this machine alone (``loopback.start_private_instance``), sized for the replicas."""
        plan = self.plan.deployment
        self._private_dir = start_private_instance(
            num_cpus=max(1, int(plan.most_replicas * plan.cpus_per_replica)),
            object_store_bytes=self.plan.object_store_bytes,
        )

    def _wait_until_running(self, deadline: float) -> None:
        """Until the application runs: a clear error if its deployment failed or the deadline passed."""
        while time.monotonic() < deadline:
            status = self._application()
            if status.status == "RUNNING":
                return
            if status.status == "DEPLOY_FAILED":
                raise ModelLoadError(f"the pipeline replicas failed to start: {status.message}")
            time.sleep(0.5)
        raise ModelLoadError(self._not_within("the pipeline application was not running"))

    def _not_within(self, what: str) -> str:
        return f"{what} within {self.plan.start_timeout:g}s (PIPELINE_START_TIMEOUT); is the Ray cluster up?"

    # Replicas.
    def _watch_replicas(self) -> None:
        """Every few seconds, until closed: look at the replicas again."""
        while not self._closing.wait(REPLICA_WATCH_SECONDS):
            self._look_at_replicas()

    def _look_at_replicas(self) -> None:
        """The replica counts by state, for readiness and the metrics."""
        try:
            deployment = self._application().deployments[DEPLOYMENT_NAME]
        except Exception as error:  # noqa: BLE001 - any failure to ask Ray is a readiness problem
            self._replica_problem = f"Ray Serve status unavailable: {type(error).__name__}"
            if self.observer is not None:
                self.observer.replicas(by_state={})  # none known to run: nothing can run requests
            return
        states = deployment.replica_states.items()
        self._replicas_by_state = {str(getattr(state, "value", state)): count for state, count in states}
        self._replica_problem = None
        if self.observer is not None:
            self.observer.replicas(by_state=self._replicas_by_state)

    def _forget_when_gone(self, replica: str) -> None:
        """On its own thread: wait (bounded) until a replica that lost a call is gone, then accept
        requests again (Ray's router could otherwise hand the retry to that replica)."""
        import ray

        deadline = time.monotonic() + self.plan.deployment.health_check_timeout_s + 60
        while time.monotonic() < deadline and not self._closing.is_set():
            try:
                ray.get_actor(replica, namespace=SERVE_NAMESPACE)
            except ValueError:  # no such live actor: gone
                break
            time.sleep(0.2)
        with self._lost_lock:
            self._lost_replicas.discard(replica)
        for listener in list(self._listeners):
            listener()

    # Calls.
    async def _call(self, request: Request, reply: ReplyTo) -> None:
        """One request's streaming call: every message it brings goes to ``reply``, ending with
        ``Finished`` or ``Lost`` whatever happens."""
        from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
        from ray.serve.exceptions import BackPressureError, RequestCancelledError

        replica = ""
        try:
            stream = self._handle.options(stream=True).generate.remote(encode(Submit.of(request)))
            self._streams[request.id] = stream
            if request.cancelled:  # stopped before the call existed
                self.cancel(request)
            async for data in stream:
                message = self._decoded(data)
                if message is None:
                    continue
                replica = message.by
                self._replay(message)
                if isinstance(message, Finished) and message.error is not None and message.error.kind == "lost":
                    self._remember_lost(replica)
                    reply(Lost(id=request.id, reason=message.error.reason or "died", message=message.error.message))
                    return
                if isinstance(message, Finished):
                    logger.info("request served by replica %s", replica.rsplit("#", 1)[-1])
                reply(message)
                if isinstance(message, Finished):
                    return
            outcome = JobOutcome(
                error=PipelineUnavailableError("the pipeline replica ended the call without an answer")
            )
        except RequestCancelledError:
            outcome = JobOutcome(error=GenerationCancelledError("cancelled"))
        except BackPressureError as error:
            waiting = error.args[1]  # max_queued_requests
            busy = f"the server is busy ({waiting} requests wait for a pipeline replica); try again shortly"
            outcome = JobOutcome(error=PipelineUnavailableError(busy))
        except (ActorDiedError, ActorUnavailableError, RayActorError) as error:
            if replica:
                self._remember_lost(replica)
            reply(Lost(id=request.id, message=f"a pipeline replica died ({type(error).__name__})"))
            return
        except Exception as error:
            logger.exception("a Ray call failed")
            outcome = JobOutcome(error=PipelineUnavailableError(f"the pipeline call failed: {type(error).__name__}"))
        finally:
            self._streams.pop(request.id, None)
        reply(Finished.of(request.id, outcome))

    def _decoded(self, data: Any) -> Step | PreviewReady | Finished | None:
        try:
            message = decode(data)
        except MalformedMessageError as error:
            logger.error("a pipeline replica sent a %s; dropped", error)
            return None
        if not isinstance(message, Step | PreviewReady | Finished):
            logger.error("a pipeline replica sent a %s message on a request stream; dropped", message.kind)
            return None
        return message

    def _remember_lost(self, replica: str) -> None:
        with self._lost_lock:
            known = replica in self._lost_replicas
            self._lost_replicas.add(replica)
        if not known:
            threading.Thread(
                target=self._forget_when_gone, args=(replica,), name="ray-lost-replica", daemon=True
            ).start()

    def _replay(self, message: Step | PreviewReady | Finished) -> None:
        """Hand a replica's generation facts to this process's observer (the metrics)."""
        if self.observer is None:
            return
        for fact in replayable(message):
            replay(fact, self.observer)


def _on_loopback(address: str) -> bool:
    """Whether a Ray address names this machine's loopback interface."""
    host = address.removeprefix("ray://").rsplit(":", 1)[0].strip("[]")
    return host in ("localhost", "::1") or host.startswith("127.")


def _app_exists() -> bool:
    """Whether the pipeline application is deployed on the cluster this process is connected to."""
    from ray import serve

    return APP_NAME in serve.status().applications
