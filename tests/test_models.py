"""Model versions in S3 (the loopback S3 server): publish, promote, list, the verified cache, the
fallback to the last version served, the CLI, the rollout watcher's rules, and the local
backend switching versions (beside the old worker, or drained) with no request failing."""

from __future__ import annotations

import functools
import json
import shutil
import subprocess
import threading
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from harness.servers import S3Server, free_port, wait_until
from sd_pipeline.admission import Admission
from sd_pipeline.backends.local.process import PipelineProcess
from sd_pipeline.backends.local.supervisor import LocalBackend
from sd_pipeline.contract.backend import BackendInfo
from sd_pipeline.contract.errors import ModelLoadError
from sd_pipeline.contract.jobs import JobOutcome
from sd_pipeline.contract.lifecycle import Request
from sd_pipeline.contract.models import DEFAULTS_FILE, ModelDefaults, ModelStore
from sd_pipeline.contract.request import check_inputs
from sd_pipeline.contract.settings import PipelineSettings
from sd_pipeline.versions.cache import ModelCache, VersionRefusedError
from sd_pipeline.versions.location import LocationError, ModelLocation
from sd_pipeline.versions.registry import ModelRegistry, RegistryError, RegistryUnavailableError, make_client
from sd_pipeline.versions.resolve import resolve_model
from sd_pipeline.versions.rollout import ModelRollout
from tests.running import dispatcher, run_through
from tests.versions_cli import compose_step, run_compose_step, versions_cli

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture()
def store(s3_server: S3Server, tmp_path: Path) -> ModelStore:
    return ModelStore(endpoint_url=s3_server.endpoint_url, region="us-east-1", cache_dir=str(tmp_path / "cache"))


@pytest.fixture()
def registry(store: ModelStore, bucket: str) -> ModelRegistry:
    return ModelRegistry(make_client(store), ModelLocation.parse(f"s3://{bucket}/team/tiny"))


def with_defaults(model_dir: Path, folder: Path, **defaults: Any) -> Path:
    """A copy of a pipeline folder that recommends ``defaults`` (a different version's files)."""
    shutil.copytree(model_dir, folder)
    (folder / DEFAULTS_FILE).write_text(json.dumps(defaults))
    return folder


def corrupt(registry: ModelRegistry, version: str, name: str = "scheduler/scheduler_config.json") -> None:
    """Change one file after publishing (same key, other bytes): the manifest no longer matches."""
    key = registry.location.version_prefix(version) + name
    registry.client.put_object(Bucket=registry.location.bucket, Key=key, Body=b'{"changed": true}')


def test_locations_and_version_names() -> None:
    pinned = ModelLocation.parse("s3://models/team/demo@v2")
    assert (pinned.bucket, pinned.prefix, pinned.pinned, pinned.name) == ("models", "team/demo", "v2", "demo")
    assert str(pinned) == "s3://models/team/demo@v2" and ModelLocation.parse("s3://m/d/").pinned is None
    for bad in ("s3://models", "s3://models/", "s3://m/d@", "s3://m/d@../x", "/local/folder"):
        with pytest.raises(LocationError):
            ModelLocation.parse(bad)


def test_publish_promote_list_and_never_overwrite(
    registry: ModelRegistry, tiny_model_dir: Path, tmp_path: Path
) -> None:
    with pytest.raises(RegistryError, match="no version has been promoted"):
        registry.current()
    first = registry.publish(tiny_model_dir, "v1", promote=True)
    assert registry.current() == "v1" and "unet/config.json" in first.files and first.defaults == ModelDefaults()
    with pytest.raises(RegistryError, match="'v1' already exists"):
        registry.publish(tiny_model_dir, "v1")
    second = registry.publish(with_defaults(tiny_model_dir, tmp_path / "v2", steps=12), "v2")
    assert second.defaults.steps == 12 and second.short_hash != first.short_hash
    # A version still uploading (files, no manifest yet) is neither listed nor promotable.
    registry.client.put_object(
        Bucket=registry.location.bucket, Key=registry.location.version_prefix("v3") + "x", Body=b""
    )
    with pytest.raises(RegistryError, match="'v3' is not published"):
        registry.promote("v3")
    listed = registry.versions()
    assert [(summary.name, summary.current) for summary in listed] == [("v1", True), ("v2", False)]
    assert listed[1].total_bytes == second.total_bytes and listed[1].short_hash == second.short_hash
    registry.promote("v2")
    assert registry.current() == "v2"


def test_the_cache_verifies_every_file_and_then_needs_no_s3(
    registry: ModelRegistry, store: ModelStore, tiny_model_dir: Path
) -> None:
    registry.publish(tiny_model_dir, "good")
    registry.publish(tiny_model_dir, "bad")
    corrupt(registry, "bad")
    cache = ModelCache(Path(store.cache_dir))
    with pytest.raises(VersionRefusedError, match=r"scheduler/scheduler_config\.json: .*manifest"):
        cache.fetch(registry, "bad")
    parent = cache.model_folder(registry.location)
    assert sorted(path.name for path in parent.iterdir()) == []  # nothing partial or corrupt kept
    fetched = cache.fetch(registry, "good")
    assert fetched.manifest.problems(fetched.path) == []
    offline = ModelRegistry(
        make_client(store.model_copy(update={"endpoint_url": f"http://127.0.0.1:{free_port()}"})), registry.location
    )
    assert cache.fetch(offline, "good").path == fetched.path  # a cached version starts without S3
    (fetched.path / "unet" / "config.json").unlink()  # damaged on disk after the fact: the manifest says so
    assert fetched.manifest.problems(fetched.path) == ["unet/config.json: missing"]


def test_two_processes_fetching_one_version_both_get_it(
    registry: ModelRegistry, store: ModelStore, tiny_model_dir: Path
) -> None:
    """Front ends sharing a cache folder may fetch the same version at once: both end with it."""
    registry.publish(tiny_model_dir, "v1")
    with ThreadPoolExecutor(max_workers=4) as pool:
        fetched = list(pool.map(lambda _: ModelCache(Path(store.cache_dir)).fetch(registry, "v1"), range(4)))
    assert len({version.path for version in fetched}) == 1
    assert fetched[0].manifest.problems(fetched[0].path) == []
    assert [path.name for path in fetched[0].path.parent.iterdir()] == ["v1"]  # no partial download left


def test_resolving_follows_current_and_falls_back_to_the_last_version_served(
    registry: ModelRegistry, store: ModelStore, tiny_model_dir: Path
) -> None:
    registry.publish(tiny_model_dir, "v1", promote=True)
    model = str(registry.location)
    resolved = resolve_model(model, store)
    assert (resolved.name, resolved.version, resolved.pinned) == ("tiny", "v1", f"{model}@v1")
    assert resolved.model_hash == registry.manifest("v1").short_hash and resolved.note is None
    dead = store.model_copy(update={"endpoint_url": f"http://127.0.0.1:{free_port()}"})
    with pytest.raises(ModelLoadError, match="cannot fetch model"):
        resolve_model(model, dead)  # never served here: nothing to fall back to
    ModelCache(Path(store.cache_dir)).remember_served(registry.location, "v1")
    fallback = resolve_model(model, dead)
    assert fallback.version == "v1" and fallback.note is not None and "last version this host served" in fallback.note
    assert resolve_model(f"{model}@v1", dead).version == "v1"  # pinned and cached: no S3 needed
    with pytest.raises(ModelLoadError, match="'nope' is not published"):
        resolve_model(f"{model}@nope", store)


def test_the_command_line_publishes_lists_and_promotes(bucket: str, s3_server: S3Server, tiny_model_dir: Path) -> None:
    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return versions_cli(s3_server.endpoint_url, *args)

    location = f"s3://{bucket}/demo"
    published = cli("publish", str(tiny_model_dir), location, "--version", "v1", "--promote")
    assert published.returncode == 0, published.stderr
    assert cli("publish", str(tiny_model_dir), location, "--version", "v2").returncode == 0
    again = cli("publish", str(tiny_model_dir), location, "--version", "v2")
    assert again.returncode == 2 and "already exists" in again.stderr
    listing = cli("list", location).stdout.splitlines()
    assert [line.split()[0] for line in listing[1:]] == ["v1", "v2"] and listing[1].rstrip().endswith("*")
    assert all(" StableDiffusionPipeline " in line for line in listing[1:])  # the family each version is
    assert cli("promote", location, "v2").returncode == 0
    assert cli("list", location).stdout.splitlines()[2].rstrip().endswith("*")
    missing = cli("promote", location, "v9")
    assert missing.returncode == 2 and "'v9' is not published" in missing.stderr


class RecordingBackend:
    """Just enough of a backend for the watcher's rules: records switches, refuses on request."""

    def __init__(self, refuse: Sequence[str] = ()) -> None:
        self.switched: list[str] = []
        self.refuse = set(refuse)

    def switch_model(self, model: str) -> BackendInfo:
        version = model.rpartition("@")[2]
        if version in self.refuse:
            raise ModelLoadError(f"warm-up failed for {version}")
        self.switched.append(version)
        return BackendInfo("tiny", "cpu", "float32", 0.1, version=version)


class Outcomes:
    def __init__(self) -> None:
        self.seen: list[str] = []

    def model_rollout(self, *, outcome: str) -> None:
        self.seen.append(outcome)


def test_the_watcher_rolls_out_new_versions_and_refuses_bad_ones_once(
    registry: ModelRegistry, store: ModelStore, tiny_model_dir: Path
) -> None:
    for version in ("v1", "v2", "v3", "v4"):
        registry.publish(tiny_model_dir, version)
    registry.promote("v1")
    corrupt(registry, "v3")
    backend, outcomes = RecordingBackend(refuse=["v4"]), Outcomes()
    rollout = ModelRollout(
        backend,  # type: ignore[arg-type]
        registry,
        ModelCache(Path(store.cache_dir)),
        serving="v1",
        poll_seconds=0,
        observer=outcomes,
    )
    assert rollout.check_once() is None  # nothing new
    registry.promote("v2")
    assert rollout.check_once() == "succeeded" and backend.switched == ["v2"] and rollout.serving == "v2"
    assert ModelCache(Path(store.cache_dir)).last_served(registry.location) is not None
    registry.promote("v3")  # a file changed after publishing: refused before any backend sees it
    assert rollout.check_once() == "refused" and backend.switched == ["v2"]
    assert rollout.detail is not None and "v3 refused" in rollout.detail and "serving v2" in rollout.detail
    assert rollout.check_once() is None  # not tried again while current still names it
    registry.promote("v4")  # the backend cannot start it (e.g. warm-up fails)
    assert rollout.check_once() == "refused" and rollout.serving == "v2"
    registry.promote("v1")  # rolling back is promoting the old version
    assert rollout.check_once() == "succeeded" and backend.switched == ["v2", "v1"] and rollout.detail is None
    assert outcomes.seen == ["succeeded", "refused", "refused", "succeeded"]


def test_the_watcher_retries_an_outage_with_back_off_refuses_a_bad_version_once_and_prunes_the_cache(
    registry: ModelRegistry, store: ModelStore, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for version in ("v1", "v2", "v3", "v4", "v5"):
        registry.publish(tiny_model_dir, version)
    registry.promote("v1")
    cache = ModelCache(Path(store.cache_dir))
    backend, outcomes = RecordingBackend(), Outcomes()
    rollout = ModelRollout(
        backend,  # type: ignore[arg-type]
        registry,
        cache,
        serving="v1",
        poll_seconds=10,
        observer=outcomes,
    )
    now = [0.0]
    rollout.clock = lambda: now[0]
    downloads: list[str] = []
    real_download = registry.download
    outage = [True]

    def download(version: str, *args: Any) -> None:
        downloads.append(version)
        if outage[0]:
            raise RegistryUnavailableError("the store did not answer")
        real_download(version, *args)

    monkeypatch.setattr(registry, "download", download)
    registry.promote("v2")
    # An outage is no fault of v2: postponed (not refused), then tried after 10 s, then after 20 s more.
    assert rollout.check_once() is None and outcomes.seen == [] and rollout.refused is None
    assert rollout.detail is not None and "v2 not fetched yet" in rollout.detail
    assert rollout.check_once() is None and downloads == ["v2"]  # within the back-off: not tried
    now[0] = 10.0
    assert rollout.check_once() is None and downloads == ["v2", "v2"]
    now[0] = 29.0
    assert rollout.check_once() is None and downloads == ["v2", "v2"]  # the back-off doubled to 20 s
    outage[0] = False
    now[0] = 30.0
    assert rollout.check_once() == "succeeded" and rollout.serving == "v2" and outcomes.seen == ["succeeded"]
    # A malformed manifest is the version's fault: refused once, never fetched again while current names it.
    registry.promote("v3")
    registry.client.put_object(Bucket=registry.location.bucket, Key=registry.location.manifest_key("v3"), Body=b"{")
    assert rollout.check_once() == "refused"
    tried = len(downloads)
    for _ in range(3):
        now[0] += 1000
        assert rollout.check_once() is None
    assert len(downloads) == tried and outcomes.seen == ["succeeded", "refused"]
    # The cache keeps the served version and the two that arrived before it.
    for version in ("v4", "v5", "v1"):
        registry.promote(version)
        assert rollout.check_once() == "succeeded"
    kept = sorted(
        path.name for path in cache.model_folder(registry.location).iterdir() if not path.name.startswith(".")
    )
    assert kept == ["v1", "v4", "v5"]


def run_in_thread(admission: Admission, job: Request) -> tuple[threading.Thread, list[JobOutcome]]:
    outcomes: list[JobOutcome] = []
    thread = threading.Thread(target=lambda: outcomes.extend(run_through(admission, [job])))
    thread.start()
    return thread, outcomes


@pytest.mark.parametrize("mode", ["overlap", "drain"])
def test_the_local_backend_switches_versions_with_no_request_failing(
    mode: str, registry: ModelRegistry, store: ModelStore, tiny_model_dir: Path, tmp_path: Path
) -> None:
    registry.publish(tiny_model_dir, "v1", promote=True)
    registry.publish(with_defaults(tiny_model_dir, tmp_path / "v2", steps=9), "v2")
    registry.publish(tiny_model_dir, "v3")
    corrupt(registry, "v3")
    location = registry.location
    settings = PipelineSettings(model=str(location.pin("v1")), model_store=store, device="cpu", cpu_threads=1)
    backend = LocalBackend(settings, functools.partial(PipelineProcess), rollout=mode)  # type: ignore[arg-type]
    assert backend.start().version == "v1"
    admission = dispatcher(backend)
    try:
        running = Request(check_inputs({"prompt": "at the switch", "steps": 40, "width": 96, "height": 96}))
        thread, running_outcome = run_in_thread(admission, running)
        wait_until(lambda: running.steps_done >= 2, timeout=60)
        infos: list[BackendInfo] = []
        switch = threading.Thread(target=lambda: infos.append(backend.switch_model(str(location.pin("v2")))))
        switch.start()
        if mode == "drain":  # new requests are held (with a notice for the page) until v2 runs
            wait_until(lambda: backend.notice() is not None, timeout=60)
            assert "v2" in (backend.notice() or "")
            held = Request(check_inputs({"prompt": "held", "steps": 2, "width": 64, "height": 64}))
            held_thread, held_outcome = run_in_thread(admission, held)
        switch.join(timeout=180)
        (info,) = infos
        assert (info.version, info.defaults.steps) == ("v2", 9) and backend.notice() is None
        if mode == "drain":
            held_thread.join(timeout=60)
            assert held_outcome[0].error is None and held_outcome[0].results[0].model_version == "v2"
        thread.join(timeout=120)
        (outcome,) = running_outcome
        assert outcome.error is None and outcome.results[0].model_version == "v1"  # finished where it started
        (after,) = run_through(
            admission, [Request(check_inputs({"prompt": "after", "steps": 2, "width": 64, "height": 64}))]
        )
        assert after.error is None and after.results[0].model_version == "v2"
        with pytest.raises(ModelLoadError, match="does not match its manifest"):
            backend.switch_model(str(location.pin("v3")))
        (still,) = run_through(
            admission, [Request(check_inputs({"prompt": "still", "steps": 2, "width": 64, "height": 64}))]
        )
        assert still.error is None and still.results[0].model_version == "v2"
        assert backend.readiness_problem() is None
    finally:
        backend.close()


def test_the_stacks_publish_step_creates_the_bucket_once_and_never_promotes_again(
    s3_server: S3Server, store: ModelStore, tiny_model_dir: Path
) -> None:
    """The exact command compose's models-publish runs, against a store that has no bucket yet."""
    bucket = f"models-{uuid.uuid4().hex[:8]}"
    swaps = {
        "--endpoint-url=http://seaweedfs:8333": f"--endpoint-url={s3_server.endpoint_url}",
        "/app/models/tiny-shapes": str(ROOT / "models" / "tiny-shapes"),
        "s3://models/demo": f"s3://{bucket}/demo",
    }
    command = compose_step("models-publish", swaps)
    first = run_compose_step(command)
    assert first.returncode == 0, first.stderr
    registry = ModelRegistry(make_client(store), ModelLocation.parse(f"s3://{bucket}/demo"))
    assert registry.current() == "shapes-1"
    registry.publish(tiny_model_dir, "v2", promote=True)  # the operator rolled a new version out
    again = run_compose_step(command)
    assert again.returncode == 0 and "already published" in again.stdout
    assert registry.current() == "v2"
