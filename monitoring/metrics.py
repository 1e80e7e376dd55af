"""The one module that owns the Prometheus objects. Code elsewhere reports plain facts to it."""

from __future__ import annotations

import platform
from enum import StrEnum
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
)

PREFIX = "sdapp_"
# Multi-second GPU work: from a tenth of a second to ten minutes.
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 3, 5, 8, 13, 20, 30, 45, 60, 90, 120, 180, 300, 600)
STEP_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2, 5)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)
STORAGE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class Outcome(StrEnum):
    """How a generation request ended (the only values of the ``outcome`` label)."""

    SUCCESS = "success"
    INVALID = "invalid"
    CANCELLED = "cancelled"
    ERROR = "error"
    REJECTED = "rejected"


class StorageOperation(StrEnum):
    """Storage operations that can fail (the only values of the ``operation`` label)."""

    UPLOAD = "upload"
    HISTORY = "history"
    CHECK = "check"


class WorkerRestartReason(StrEnum):
    """Why the pipeline worker was replaced (the only values of the ``reason`` label)."""

    DIED = "died"
    STALLED = "stalled"


class Metrics:
    """All metrics of the app, registered in ``registry`` (a fresh one per instance by default)."""

    def __init__(self, registry: CollectorRegistry | None = None, *, version: str = "dev") -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests = Counter(f"{PREFIX}requests", "Generation requests by outcome", ["outcome"], registry=r)
        self.images = Counter(f"{PREFIX}images_generated", "Images generated and returned to users", registry=r)
        self.queue_wait = Histogram(
            f"{PREFIX}queue_wait_seconds",
            "Time a request waited before its pipeline call started",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.generation = Histogram(
            f"{PREFIX}generation_seconds",
            "Wall time of one engine step (one UNet call over the running batch)",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.first_step_waits = Histogram(
            f"{PREFIX}first_step_wait_seconds",
            "Time a request waited inside the pipeline worker or replica before its first denoising step",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.request_duration = Histogram(
            f"{PREFIX}request_duration_seconds",
            "End-to-end time of a successful request, storage included",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            f"{PREFIX}batch_size_images",
            "Images generated together in one pipeline call or one engine step (one UNet call)",
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.step_duration = Histogram(
            f"{PREFIX}denoising_step_seconds", "Time of one denoising step", buckets=STEP_BUCKETS, registry=r
        )
        self.queue_depth = Gauge(f"{PREFIX}queue_depth", "Requests waiting for the pipeline", registry=r)
        self.queue_capacity = Gauge(f"{PREFIX}queue_capacity", "Most requests the queue accepts", registry=r)
        self.in_progress = Gauge(f"{PREFIX}requests_in_progress", "Requests being handled now", registry=r)
        self.pipeline_busy = Counter(
            f"{PREFIX}pipeline_busy_seconds", "Time the pipeline spent in pipeline calls", registry=r
        )
        self.pipeline_idle_waiting = Counter(
            f"{PREFIX}pipeline_idle_while_waiting_seconds",
            "Time the pipeline sat idle while requests were waiting for it",
            registry=r,
        )
        self.out_of_memory_events = Counter(
            f"{PREFIX}gpu_out_of_memory", "Pipeline calls that ran out of accelerator memory", registry=r
        )
        self.lora_loads = Histogram(
            f"{PREFIX}lora_load_seconds",
            "Time to load one LoRA adapter onto the device (its count: adapters loaded)",
            buckets=STORAGE_BUCKETS,
            registry=r,
        )
        self.lora_loaded_bytes = Counter(
            f"{PREFIX}lora_loaded_bytes", "Bytes of LoRA adapters loaded onto the device", registry=r
        )
        self.lora_cache_hits = Counter(
            f"{PREFIX}lora_cache_hits", "Requests' LoRA adapters found already loaded", registry=r
        )
        self.lora_cache_bytes = Gauge(
            f"{PREFIX}lora_cache_bytes", "Bytes of LoRA adapters kept loaded (LORA_CACHE_MB bounds it)", registry=r
        )
        self.lora_cache_adapters = Gauge(f"{PREFIX}lora_cache_adapters", "LoRA adapters kept loaded", registry=r)
        self.upload_duration = Histogram(
            f"{PREFIX}storage_upload_seconds",
            "Time to upload one image and its record",
            buckets=STORAGE_BUCKETS,
            registry=r,
        )
        self.storage_failures = Counter(
            f"{PREFIX}storage_failures", "Failed storage operations by operation", ["operation"], registry=r
        )
        self.storage_full = Counter(
            f"{PREFIX}storage_full",
            "Images not saved because the disk under the data folder or spool was full",
            registry=r,
        )
        self.uploads_pending = Gauge(
            f"{PREFIX}storage_uploads_pending", "Images in the on-disk spool waiting for upload", registry=r
        )
        self.gpu_allocated = Gauge(
            f"{PREFIX}gpu_memory_allocated_bytes",
            "Peak GPU memory held by tensors during the last run (CUDA only)",
            ["device"],
            registry=r,
        )
        self.gpu_reserved = Gauge(
            f"{PREFIX}gpu_memory_reserved_bytes",
            "Peak GPU memory reserved by the caching allocator during the last run (CUDA only)",
            ["device"],
            registry=r,
        )
        self.worker_restarts = Counter(
            f"{PREFIX}worker_restarts",
            "Pipeline worker processes started to replace one that died or stalled",
            ["reason"],
            registry=r,
        )
        self.worker_up_gauge = Gauge(
            f"{PREFIX}worker_up",
            "1 while a pipeline worker (on Ray: a replica) is ready to run requests, else 0",
            registry=r,
        )
        self.pipeline_replicas = Gauge(
            f"{PREFIX}pipeline_replicas",
            "Ray Serve pipeline replicas by state (RUNNING, STARTING, ...); absent without Ray",
            ["state"],
            registry=r,
        )
        self.model_load = Gauge(f"{PREFIX}model_load_seconds", "Time the model took to load", registry=r)
        self.model_info = Info(f"{PREFIX}model", "The model served, its family, version, device and dtype", registry=r)
        self.model_rollouts = Counter(
            f"{PREFIX}model_rollouts",
            "Model versions rolled out (succeeded) or refused (the old version kept serving)",
            ["outcome"],
            registry=r,
        )
        self.build_info = Info(f"{PREFIX}build", "Versions of the app and its main libraries", registry=r)
        self.build_info.info({"version": version, "python": platform.python_version(), "torch": _installed("torch")})
        for outcome in Outcome:
            self.requests.labels(outcome=outcome.value)
        for operation in StorageOperation:
            self.storage_failures.labels(operation=operation.value)
        for reason in WorkerRestartReason:
            self.worker_restarts.labels(reason=reason.value)
        for rollout in ("succeeded", "refused"):
            self.model_rollouts.labels(outcome=rollout)
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)

    # Facts from the request path.
    def request_finished(self, outcome: Outcome, *, seconds: float | None = None, images: int = 0) -> None:
        """Count a finished request; successful ones also record their end-to-end time."""
        self.requests.labels(outcome=outcome.value).inc()
        if outcome is Outcome.SUCCESS and seconds is not None:
            self.request_duration.observe(seconds)
            self.images.inc(images)

    def model_loaded(
        self,
        *,
        model: str,
        device: str,
        dtype: str,
        seconds: float,
        version: str = "",
        model_hash: str = "",
        simulated: str = "",
        family: str = "",
    ) -> None:
        """The model in service (again after each rollout); ``simulated``: the modelled accelerator, if any."""
        self.model_load.set(seconds)
        self.model_info.info(
            {
                "model": model,
                "version": version,
                "hash": model_hash,
                "device": device,
                "dtype": dtype,
                "simulated": simulated,
                "family": family,
            }
        )

    # RolloutObserver (sd_pipeline.versions.rollout)
    def model_rollout(self, *, outcome: str) -> None:
        self.model_rollouts.labels(outcome=outcome).inc()

    # GenerationObserver and WorkerObserver (sd_pipeline.contract.facts)
    def pipeline_call(self, *, seconds: float, images: int) -> None:
        self.generation.observe(seconds)
        self.batch_size.observe(images)
        self.pipeline_busy.inc(seconds)

    def denoising_step(self, *, seconds: float) -> None:
        self.step_duration.observe(seconds)

    def first_step_wait(self, *, seconds: float) -> None:
        self.first_step_waits.observe(seconds)

    def out_of_memory(self) -> None:
        self.out_of_memory_events.inc()

    def lora_load(self, *, seconds: float, size: int) -> None:
        self.lora_loads.observe(seconds)
        self.lora_loaded_bytes.inc(size)

    def lora_cache_hit(self) -> None:
        self.lora_cache_hits.inc()

    def lora_cache(self, *, size: int, adapters: int) -> None:
        self.lora_cache_bytes.set(size)
        self.lora_cache_adapters.set(adapters)

    def gpu_memory(self, *, allocated: int, reserved: int) -> None:
        """Peak memory of the pipeline's GPU during one run, reported with its result (CUDA only)."""
        self.gpu_allocated.labels(device="0").set(allocated)
        self.gpu_reserved.labels(device="0").set(reserved)

    # SupervisorObserver (sd_pipeline.backends.local.supervisor) and ReplicaObserver (backends.ray)
    def worker_restarted(self, *, reason: str) -> None:
        self.worker_restarts.labels(reason=WorkerRestartReason(reason).value).inc()

    def worker_up(self, *, up: bool) -> None:
        self.worker_up_gauge.set(1 if up else 0)

    def replicas(self, *, by_state: dict[str, int]) -> None:
        for state in ("RUNNING", "STARTING", "UPDATING", "RECOVERING", "STOPPING"):
            self.pipeline_replicas.labels(state=state).set(by_state.get(state, 0))
        # On Ray the "worker" that can run requests is a running replica (SdServiceWorkerDown pages on 0).
        self.worker_up(up=by_state.get("RUNNING", 0) > 0)

    # AdmissionObserver (sd_pipeline.admission)
    def queued(self, *, depth: int) -> None:
        self.queue_depth.set(depth)

    def started(self, *, waited_seconds: float) -> None:
        self.queue_wait.observe(waited_seconds)

    def idle_while_waiting(self, *, seconds: float) -> None:
        self.pipeline_idle_waiting.inc(seconds)

    # StorageObserver (storage.spool)
    def upload(self, *, seconds: float) -> None:
        self.upload_duration.observe(seconds)

    def failure(self, *, operation: str) -> None:
        self.storage_failures.labels(operation=StorageOperation(operation).value).inc()

    def pending(self, *, count: int) -> None:
        self.uploads_pending.set(count)


def _installed(name: str) -> str:
    """A package's installed version, read without importing it (the web process never loads torch)."""
    try:
        return package_version(name)
    except PackageNotFoundError:
        return "not installed"
