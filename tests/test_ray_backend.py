"""The Ray backend without the web app: a private Ray instance on loopback, one CPU replica of the tiny model.

A replica whose engine loop fails, or whose process freezes (SIGSTOP), is replaced by Serve
and the request it held is served after one retry; Stop ends a request still waiting for a
replica at once; replicas warm up; every socket the private instance listens on is on
127.0.0.1, and its token and files are private. The replicas load a version published to the
loopback S3 server; a new version (of another family: SDXL after SD) is rolled out as a new
deployment version while a request runs (it finishes, later ones report the new version and
equal SDXL's own pipeline) and a corrupt one is refused.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import logging
import os
import shutil
import signal
import stat
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import psutil
import pytest

from harness.images import assert_same_image, pipeline_image, pipeline_image_with_loras
from harness.servers import S3Server, wait_until
from sd_pipeline.admission import Admission
from sd_pipeline.backends.ray.backend import RayBackend
from sd_pipeline.backends.ray.loopback import keep_token_private
from sd_pipeline.backends.ray.replica import PipelineReplica
from sd_pipeline.contract.backend import BackendInfo
from sd_pipeline.contract.errors import GenerationCancelledError, InvalidRequestError, ModelLoadError
from sd_pipeline.contract.jobs import JobOutcome, Preview
from sd_pipeline.contract.lifecycle import Request, Status
from sd_pipeline.contract.messages import Finished, encode
from sd_pipeline.contract.models import LoraStoreSettings, ModelStore
from sd_pipeline.contract.plans import RayPlan, ReplicaPlan
from sd_pipeline.contract.request import RequestLimits, check_inputs
from sd_pipeline.contract.settings import PipelineSettings
from sd_pipeline.loras.folder import short_hash
from sd_pipeline.loras.store import ADAPTER_FILE, adapter_location
from sd_pipeline.model.loading import LoadedPipeline
from sd_pipeline.versions.location import ModelLocation
from sd_pipeline.versions.manifest import build_adapter_manifest
from sd_pipeline.versions.registry import ModelRegistry, make_client
from tests.needs import needed_module
from tests.running import dispatcher, run_direct, run_through
from webapp.settings import load_settings

needed_module("ray.serve")

FAIL_MARKER = "SD_TEST_FAIL_ONCE_MARKER"


class FailingOnceReplica(PipelineReplica):
    """A replica whose engine loop raises at its third step once the test arms it (``MARKER.armed``),
    once only (``MARKER`` then names the replica that failed; its replacement serves)."""

    def __init__(self, settings: PipelineSettings, max_batch_images: int, stall_seconds: float = 120.0) -> None:
        super().__init__(settings, max_batch_images, stall_seconds)
        marker = Path(os.environ[FAIL_MARKER])
        engine = self.loop.engine
        real_step = engine.step

        armed_steps: list[int] = []

        def step() -> None:
            if engine.active_images and marker.with_suffix(".armed").exists() and not marker.exists():
                armed_steps.append(1)
            if len(armed_steps) == 3 and not marker.exists():
                marker.write_text(self.replica)
                raise RuntimeError("a bug in the engine (injected by the test)")
            real_step()

        engine.step = step  # type: ignore[method-assign]


def on_loopback(ip: str) -> bool:
    """127.0.0.1, also as IPv6 writes it (``::ffff:127.0.0.1``); never ``::``, ``0.0.0.0`` or a real address."""
    address = ipaddress.ip_address(ip)
    mapped = getattr(address, "ipv4_mapped", None)
    return str(mapped or address) == "127.0.0.1"


EARLIER_CHILDREN: set[int] = set()  # this process's children before Ray started (e.g. multiprocessing's tracker)


def ray_children() -> list[psutil.Process]:
    """The processes the private Ray instance started under this one."""
    return [child for child in psutil.Process().children(recursive=True) if child.pid not in EARLIER_CHILDREN]


def replica_process() -> psutil.Process:
    found = [process for process in ray_children() if "ServeReplica" in " ".join(process.cmdline())]
    assert len(found) == 1, found
    return found[0]


@pytest.fixture(scope="module")
def registry(s3_server: S3Server, tiny_model_dir: Path, tiny_sdxl_dir: Path) -> ModelRegistry:
    """The tiny SD model published as v1 (current) and the tiny SDXL as v2 in a bucket of the loopback S3 server."""
    bucket = f"ray-models-{uuid.uuid4().hex[:8]}"
    s3_server.create_bucket(bucket)
    store = ModelStore(endpoint_url=s3_server.endpoint_url, region="us-east-1", cache_dir="")
    registry = ModelRegistry(make_client(store), ModelLocation.parse(f"s3://{bucket}/tiny"))
    registry.publish(tiny_model_dir, "v1", promote=True)
    registry.publish(tiny_sdxl_dir, "v2")
    return registry


@pytest.fixture(scope="module")
def lora_store(registry: ModelRegistry, tiny_lora_dir: Path) -> str:
    """The tiny SD ``style`` adapter published to a LoRA store beside the model's versions."""
    root = ModelLocation.parse(f"s3://{registry.location.bucket}/loras")
    adapter = ModelRegistry(registry.client, adapter_location(root, "style"))
    file = tiny_lora_dir / "style.safetensors"
    manifest = build_adapter_manifest(file, name=ADAPTER_FILE, version="v1", family="sd")
    adapter.publish_files(manifest, {ADAPTER_FILE: file}, promote=True)
    return str(root)


@pytest.fixture(scope="module")
def backend(registry: ModelRegistry, lora_store: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayBackend]:
    EARLIER_CHILDREN.update(child.pid for child in psutil.Process().children(recursive=True))
    os.environ[FAIL_MARKER] = str(tmp_path_factory.mktemp("ray-marker") / "failed-once")  # inherited by Ray
    store = ModelStore(
        endpoint_url=registry.client.meta.endpoint_url,
        region="us-east-1",
        cache_dir=str(tmp_path_factory.mktemp("ray-model-cache")),
    )
    settings = PipelineSettings(
        model=str(registry.location.pin("v1")),
        model_store=store,
        device="cpu",
        cpu_threads=1,
        warmup=True,
        preview="approx",
        preview_interval=0.01,
        lora_store=LoraStoreSettings(location=lora_store, store=store),
    )
    replicas = ReplicaPlan(
        replicas=1,
        max_batch_images=1,
        health_check_period_s=1.0,
        health_check_timeout_s=5.0,
        stall_seconds=30.0,
        # Serve stops a frozen replica only after this long, and starts its replacement after that
        # (120 s made the frozen-replica test take 150 s); the rollout's old replica finishes in a few.
        graceful_shutdown_s=30.0,
    )
    backend = RayBackend(
        settings,
        RayPlan(address="local", deployment=replicas, start_timeout=300),
        limits=RequestLimits(),
        replica_class=FailingOnceReplica,
    )
    try:
        backend.start()
        _dispatchers[backend] = dispatcher(backend)
        yield backend
    finally:
        children = ray_children()
        backend.close()
        os.environ.pop(FAIL_MARKER, None)
        _, alive = psutil.wait_procs(children, timeout=30)
        assert alive == [], f"Ray processes outlived the backend: {alive}"


_dispatchers: dict[RayBackend, Admission] = {}


def run(backend: RayBackend, requests: list[Request]) -> list[JobOutcome]:
    """Through the app's one dispatcher (it holds the retry rule)."""
    return run_through(_dispatchers[backend], requests)


def long_job(steps: int = 60, **fields: Any) -> tuple[Request, list[int]]:
    seen: list[int] = []
    job = Request(check_inputs({"prompt": "a long one", "steps": steps, "width": 64, "height": 64, **fields}))
    job.on_step = lambda step, total: seen.append(step)
    return job, seen


def test_replicas_warm_up_and_the_backend_validates_with_the_models_tokens(backend: RayBackend) -> None:
    assert backend.info is not None and backend.info.warmup_seconds is not None and backend.info.warmup_seconds > 0
    assert backend.max_running == 1
    assert backend.check({"prompt": "x" * 75}).prompt == "x" * 75  # the tiny tokenizer: 77 with start and end


def test_a_replica_serves_an_adapter_from_the_lora_store_equal_to_diffusers(
    backend: RayBackend, lora_oracle: LoadedPipeline, tiny_lora_dir: Path
) -> None:
    asked = backend.check({"prompt": "a red circle <lora:style:0.8>", "steps": 4, "width": 64, "height": 64})
    (outcome,) = run(backend, [Request(asked)])
    assert outcome.error is None, outcome.error
    assert outcome.results[0].lora_hashes == f"style: {short_hash(tiny_lora_dir / 'style.safetensors')}"
    assert_same_image(outcome.results[0].image, pipeline_image_with_loras(lora_oracle, asked), tolerance=2)
    with pytest.raises(InvalidRequestError, match="names LoRA 'stlye', which is not available; did you mean style"):
        backend.check({"prompt": "a red circle <lora:stlye>"})


def test_previews_travel_on_the_request_stream_to_the_caller_that_asked(backend: RayBackend) -> None:
    seen: list[Preview] = []
    asking = Request(check_inputs({"prompt": "show", "steps": 12, "width": 64, "height": 64}), on_preview=seen.append)
    (outcome,) = run(backend, [asking])
    steps = [preview.step for preview in seen]
    assert outcome.error is None and len(steps) >= 2 and steps == sorted(steps) and steps[-1] < 12
    assert {preview.picture().size for preview in seen} == {(64, 64)}
    silent, silent_steps = long_job(steps=6)
    (outcome,) = run(backend, [silent])
    # steps (the first, the last, and one per interval between), and no preview asked for
    assert outcome.error is None and silent_steps[0] == 1 and silent_steps[-1] == 6
    assert silent_steps == sorted(set(silent_steps))


def test_the_private_instance_listens_on_loopback_only_and_keeps_its_files_private(backend: RayBackend) -> None:
    listening = []
    for process in ray_children():
        try:
            connections = process.net_connections(kind="inet")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        listening += [(process.name(), c.laddr.ip, c.laddr.port) for c in connections if c.status == psutil.CONN_LISTEN]
    names = {name for name, _, _ in listening}
    assert {"gcs_server", "raylet"} <= names and any("ServeReplica" in name for name in names), names
    assert [entry for entry in listening if not on_loopback(entry[1])] == []
    token = keep_token_private()
    assert token is not None and stat.S_IMODE(token.stat().st_mode) == 0o600
    assert backend._private_dir is not None and stat.S_IMODE(backend._private_dir.stat().st_mode) == 0o700


def test_a_request_cancelled_while_waiting_for_a_replica_ends_at_once(backend: RayBackend) -> None:
    running, running_steps = long_job(steps=100, width=128, height=128)  # seconds: outlasts the cancel
    outcomes: dict[str, Any] = {}
    first = threading.Thread(target=lambda: outcomes.update(running=run(backend, [running])[0]))
    first.start()
    wait_until(lambda: len(running_steps) >= 2, timeout=60)  # it holds the replica's only slot
    waiting, waiting_steps = long_job(steps=5)
    # Straight to the backend (admission would hold it: the replica's one slot is taken), so the
    # call waits in Ray for a replica, and Stop must reach it there.
    direct = threading.Thread(
        target=lambda: outcomes.update(waiting=run_direct(backend.submit, backend.cancel, [waiting])[0])
    )
    direct.start()
    wait_until(lambda: waiting.id in backend._streams, timeout=30)
    waiting.cancel()
    backend.cancel(waiting)
    direct.join(timeout=30)
    second = direct
    assert not second.is_alive() and isinstance(outcomes["waiting"].error, GenerationCancelledError)
    assert waiting_steps == [] and running.steps_done < 100  # ended while the other still ran
    _dispatchers[backend].cancel(running)
    first.join(timeout=60)


def test_a_replica_whose_engine_fails_is_replaced_and_its_request_served_after_one_retry(
    backend: RayBackend,
) -> None:
    marker = Path(os.environ[FAIL_MARKER])
    marker.with_suffix(".armed").touch()
    job, steps = long_job(steps=8)
    (outcome,) = run(backend, [job])
    assert outcome.error is None, outcome.error
    assert len(outcome.results) == 1 and outcome.results[0].image.size == (64, 64)
    assert marker.exists()  # the first replica did fail
    assert steps.count(1) == 2 and steps[-1] == 8  # progress started again on the new replica
    wait_until(lambda: backend.readiness_problem() is None, timeout=120)


def test_a_frozen_replica_is_replaced_and_its_request_served(backend: RayBackend) -> None:
    frozen = replica_process()
    job, steps = long_job(steps=100, width=128, height=128)  # still running when the signal lands
    sent = threading.Event()

    def on_step(step: int, total: int) -> None:
        steps.append(step)
        if step > 1 and not sent.is_set():  # the first report after step 1 (reports are coalesced)
            sent.set()
            os.kill(frozen.pid, signal.SIGSTOP)  # the process stops answering, health checks included

    job.on_step = on_step
    try:
        (outcome,) = run(backend, [job])
    finally:
        if frozen.is_running():
            os.kill(frozen.pid, signal.SIGCONT)
    assert outcome.error is None, outcome.error
    assert steps.count(1) == 2 and steps[-1] == 100
    assert replica_process().pid != frozen.pid


def test_a_new_version_of_another_family_rolls_out_as_a_deployment_version_and_a_corrupt_one_is_refused(
    backend: RayBackend, registry: ModelRegistry, sdxl_loaded: LoadedPipeline
) -> None:
    assert backend.info is not None and (backend.info.version, backend.info.family) == ("v1", "sd")
    running, running_steps = long_job(steps=40, width=96, height=96)
    outcomes: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: outcomes.update(running=run(backend, [running])[0]))
    thread.start()
    wait_until(lambda: len(running_steps) >= 2, timeout=60)
    info = backend.switch_model(str(registry.location.pin("v2")))
    assert (info.version, info.family) == ("v2", "sdxl") and backend.info.family == "sdxl"
    thread.join(timeout=120)
    running_outcome = outcomes["running"]
    assert running_outcome.error is None and running_outcome.results[0].model_version == "v1"  # finished on v1
    # never restarted: the old replica finished it
    assert running_steps.count(1) == 1 and running_steps[-1] == 40 and running_steps == sorted(running_steps)
    after_job = long_job(steps=4, seed=11, guidance_scale=5.0)[0]
    (after,) = run(backend, [after_job])
    assert after.error is None and after.results[0].model_version == "v2"
    # A Ray replica serves SDXL as SDXL's own pipeline draws it.
    assert_same_image(after.results[0].image, pipeline_image(sdxl_loaded, after_job.inputs)[0], tolerance=2)

    key = registry.location.version_prefix("v1") + "unet/config.json"
    registry.client.put_object(Bucket=registry.location.bucket, Key=key, Body=b"{}")  # v1 changed after publishing
    store = backend.settings.model_store
    assert store is not None
    for leftover in Path(store.cache_dir).rglob("v1"):
        shutil.rmtree(leftover)  # as on a host that never had it
    with pytest.raises(ModelLoadError, match="does not match its manifest"):
        backend.switch_model(str(registry.location.pin("v1")))
    (still,) = run(backend, [long_job(steps=2)[0]])
    assert still.error is None and still.results[0].model_version == "v2"


class DescribedReplicas:
    """Stands in for the Serve handle: each ``describe`` answers the next version in the list."""

    def __init__(self, versions: list[str]) -> None:
        self.versions = versions
        self.asked = 0
        self.describe = self

    def remote(self) -> DescribedReplicas:
        return self

    def result(self, timeout_s: float) -> BackendInfo:
        version = self.versions[min(self.asked, len(self.versions) - 1)]
        self.asked += 1
        return BackendInfo("tiny", "cpu", "float32", 0.1, version=version)


def test_a_front_end_that_deploys_nothing_waits_for_the_version_and_never_redeploys(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """RAY_DEPLOY=never: a RayService (or the deploying front end) rolls the replicas out; this
    front end waits until they serve the version instead of deploying it itself."""
    from sd_pipeline.backends.ray import backend as ray_backend

    settings = load_settings(["--ray-address", "auto", "--ray-deploy", "never"], env={})
    plan = settings.ray_plan()
    assert plan is not None and plan.deploy == "never"
    pipeline = PipelineSettings(model=str(tiny_model_dir), device="cpu")
    front_end = RayBackend(pipeline, plan, limits=settings.limits())
    monkeypatch.setattr(ray_backend, "token_budget", lambda settings: 77)
    monkeypatch.setattr(ray_backend, "REPLICA_WATCH_SECONDS", 0.01)
    deployed: list[PipelineSettings] = []
    monkeypatch.setattr(front_end, "_deploy", lambda settings, deadline: deployed.append(settings))
    statuses = iter(["DEPLOYING", "DEPLOYING", "RUNNING"])
    monkeypatch.setattr(front_end, "_application", lambda: SimpleNamespace(status=next(statuses)))
    front_end.info = BackendInfo("tiny", "cpu", "float32", 0.1, version="v1")
    # The first replica answers v2 on the 4th look, while the update still runs; it is over on the 6th.
    front_end._handle = DescribedReplicas(["v1", "v1", "v1", "v2"])
    info = front_end.switch_model("s3://models/demo@v2")
    assert info.version == "v2" and front_end._handle.asked == 6 and deployed == []
    assert front_end.checker.tokens == 77
    monkeypatch.setattr(front_end, "_application", lambda: SimpleNamespace(status="RUNNING"))
    front_end._handle = DescribedReplicas(["v2"])
    front_end.plan = dataclasses.replace(plan, start_timeout=0.05)
    with pytest.raises(ModelLoadError, match="did not reach version v3"):
        front_end.switch_model("s3://models/demo@v3")
    assert deployed == []


class HeldStreams:
    """Stands in for the Serve handle: each call is a stream that sends a malformed message, then
    stays open until released and finishes."""

    def __init__(self) -> None:
        self.opened: list[dict[str, Any]] = []
        self.release = threading.Event()
        self.generate = self

    def options(self, **options: Any) -> HeldStreams:
        return self

    def remote(self, data: dict[str, Any]) -> HeldStream:
        self.opened.append(data)
        return HeldStream(data["id"], self.release)


class HeldStream:
    def __init__(self, request_id: str, release: threading.Event) -> None:
        self.request_id = request_id
        self.release = release

    def cancel(self) -> None:
        return None

    async def __aiter__(self) -> Any:
        yield {"kind": "step", "id": self.request_id, "step": -1, "total": 0}  # malformed: dropped
        while not self.release.is_set():
            await asyncio.sleep(0.01)
        yield encode(Finished(id=self.request_id, by="pipeline#replica-1"))


def test_more_than_64_slots_run_at_once_and_positions_stay_right(caplog: pytest.LogCaptureFixture) -> None:
    """No thread pool between admission and Ray: 10 replicas x 10 = 100 calls stream at once, and
    the 101st request is first in line (the 64-thread pool used to hold 36 of them uncounted)."""
    plan = RayPlan(address="auto", deployment=ReplicaPlan(replicas=10, max_batch_images=10))
    front_end = RayBackend(PipelineSettings(model="tiny", device="cpu"), plan, limits=RequestLimits())
    front_end._handle = handle = HeldStreams()
    front_end.start_calls()
    admission = dispatcher(front_end, capacity=200)
    try:
        running = [admission.submit(long_job(steps=10)[0]) for _ in range(100)]
        waiting = [long_job(steps=10)[0] for _ in range(3)]
        for request in waiting:
            admission.submit(request)
        wait_until(lambda: len(handle.opened) == 100, timeout=30)
        assert [admission.position(request) for request in waiting] == [100, 101, 102]
        assert [admission.steps_before_start(request) for request in waiting] == [10, 10, 10]
        with caplog.at_level(logging.ERROR, logger="sd_pipeline.backends.ray.backend"):
            handle.release.set()
            assert all(future.result(timeout=30) == [] for future in running)
        wait_until(lambda: all(request.status is Status.DONE for request in waiting), timeout=30)
        assert len(handle.opened) == 103
        assert "a pipeline replica sent a malformed message (step.step" in caplog.text  # refused, logged
    finally:
        admission.close(timeout=5)
        front_end._closing.set()
        front_end._calls.call_soon_threadsafe(front_end._calls.stop)


def test_a_replica_refuses_a_malformed_call_and_keeps_serving(backend: RayBackend) -> None:
    stream = backend._handle.options(stream=True).generate.remote({"kind": "cancel", "id": "x"})
    with pytest.raises(Exception, match="a cancel message where a submit belongs"):
        list(stream)
    (after,) = run(backend, [long_job(steps=2)[0]])
    assert after.error is None and len(after.results) == 1
