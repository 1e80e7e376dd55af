"""How each backend is configured: plain data, read from the app's settings."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

# A worker or replica that holds work and makes no denoising step this long counts as stalled
# (``sd_pipeline.backends.stall``); PIPELINE_STALL_SECONDS.
DEFAULT_STALL_SECONDS = 120.0


@dataclass(frozen=True)
class RestartPolicy:
    """When a worker counts as stalled, how fast to restart it, and what counts as a crash loop."""

    stall_seconds: float = DEFAULT_STALL_SECONDS
    max_restarts: int = 5
    restart_window: float = 600.0
    backoff_initial: float = 1.0
    backoff_max: float = 30.0


@dataclass(frozen=True)
class ReplicaPlan:
    """How many pipeline replicas run, what each holds and how much work each takes."""

    replicas: int | None = 1  # None: Serve autoscaling between min_replicas and max_replicas
    min_replicas: int = 1
    max_replicas: int = 1
    autoscaling: dict[str, Any] = field(default_factory=dict)  # more fields of Serve's AutoscalingConfig
    gpus_per_replica: float | None = None  # None: 1 when the cluster has GPUs, else 0
    cpus_per_replica: float = 1.0
    max_batch_images: int = 8  # each replica's step-engine batch, and its max_ongoing_requests
    max_queued_requests: int = -1  # requests waiting at one caller for a replica; -1: no bound
    stall_seconds: float = (
        DEFAULT_STALL_SECONDS  # a replica whose engine has work but makes no step this long fails its health check
    )
    health_check_period_s: float = 5.0  # Serve calls each replica's check_health this often
    health_check_timeout_s: float = 30.0  # a check unanswered this long (a frozen process) fails
    graceful_shutdown_s: float = 60.0  # a replica being stopped (a new model version) finishes its requests this long

    @property
    def most_replicas(self) -> int:
        """The most replicas that can run at once."""
        return self.max_replicas if self.replicas is None else self.replicas

    def deployment_options(self, *, gpus_per_replica: float) -> dict[str, Any]:
        """The keyword arguments of ``serve.deployment`` for this plan."""
        options: dict[str, Any] = {
            "max_ongoing_requests": self.max_batch_images,
            "max_queued_requests": self.max_queued_requests,
            "health_check_period_s": self.health_check_period_s,
            "health_check_timeout_s": self.health_check_timeout_s,
            "graceful_shutdown_timeout_s": self.graceful_shutdown_s,
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
    start_timeout: float = 3600.0  # seconds to wait for the application and a replica at start-up
