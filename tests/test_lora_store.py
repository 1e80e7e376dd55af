"""LoRA adapters published to S3 (the loopback S3 server): the command line publishes and lists
them, workers fetch the version in service verified against its manifest, a promoted version
reaches the next request once no running request uses the old one, and a corrupt or unreachable
store ends only the request that names it (or serves what this host fetched last)."""

from __future__ import annotations

import re
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml

from harness.app_server import ROOT
from harness.images import assert_same_image, max_difference, pipeline_image_with_loras
from harness.servers import S3Server, free_port
from sd_pipeline.contract.errors import InvalidRequestError
from sd_pipeline.contract.lifecycle import Request
from sd_pipeline.contract.models import LoraStoreSettings, ModelStore
from sd_pipeline.contract.request import GenerationRequest
from sd_pipeline.contract.settings import PipelineSettings
from sd_pipeline.loras.folder import LoraFolder, short_hash
from sd_pipeline.loras.random import write_random_lora
from sd_pipeline.loras.sources import LoraSources
from sd_pipeline.loras.store import ADAPTER_FILE, UNLISTED_RELIST_SECONDS, LoraStore, adapter_location
from sd_pipeline.model.engine import StepEngine
from sd_pipeline.model.loading import LoadedPipeline, load_pipeline
from sd_pipeline.model.loras import LoraAdapters
from sd_pipeline.versions.location import ModelLocation
from sd_pipeline.versions.registry import ModelRegistry, make_client
from tests.versions_cli import compose_step, run_compose_step, versions_cli
from webapp.settings import SettingsError, load_settings


class Clock:
    """A monotonic clock the test moves (how old the store's listing is)."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def store_settings(s3_endpoint: str, root: str, cache: Path) -> LoraStoreSettings:
    store = ModelStore(endpoint_url=s3_endpoint, region="us-east-1", cache_dir=str(cache))
    return LoraStoreSettings(location=root, store=store, refresh_seconds=30)


def ask(prompt: str, **fields: Any) -> GenerationRequest:
    return GenerationRequest(**{"prompt": prompt, "steps": 4, "width": 64, "height": 64, "seed": 7, **fields})


def test_the_command_line_publishes_and_lists_adapters_and_a_store_serves_the_current_version(
    bucket: str, s3_server: S3Server, tiny_lora_dir: Path, tmp_path: Path
) -> None:
    root = f"s3://{bucket}/loras"
    style = tiny_lora_dir / "style.safetensors"
    published = versions_cli(s3_server.endpoint_url, "publish-lora", style, root, "--version", "v1", "--promote")
    assert published.returncode == 0, published.stderr
    assert f"published {root}/style@v1 (<lora:style>, for sd)" in published.stdout
    subject = tiny_lora_dir / "subject.safetensors"
    unpromoted = versions_cli(
        s3_server.endpoint_url, "publish-lora", subject, root, "--name", "look", "--version", "v1"
    )
    assert unpromoted.returncode == 0, unpromoted.stderr
    again = versions_cli(s3_server.endpoint_url, "publish-lora", style, root, "--version", "v1")
    assert again.returncode == 2 and "version 'v1' already exists" in again.stderr
    bad = versions_cli(s3_server.endpoint_url, "publish-lora", style, root, "--name", "../up", "--version", "v1")
    assert bad.returncode == 2 and "name: '../up' is not an adapter name" in bad.stderr

    listed = versions_cli(s3_server.endpoint_url, "list-loras", root)
    assert listed.returncode == 0, listed.stderr
    assert [line.split() for line in listed.stdout.splitlines()[1:]] == [["style", "v1", "sd"]]  # look: not promoted

    clock = Clock()
    store = LoraStore(store_settings(s3_server.endpoint_url, root, tmp_path / "cache"), clock=clock)
    assert store.available() == {"style": "sd"}
    fetched = store.fetch("style")
    assert fetched.path.read_bytes() == style.read_bytes() and fetched.path.name == ADAPTER_FILE
    assert fetched.short_hash == short_hash(style) == LoraFolder(tiny_lora_dir).hash_of("style")
    with pytest.raises(InvalidRequestError, match="names LoRA 'look', which is not available"):
        store.fetch("look")

    promoted = versions_cli(s3_server.endpoint_url, "promote", f"{root}/look", "v1")
    assert promoted.returncode == 0, promoted.stderr
    clock.now += UNLISTED_RELIST_SECONDS  # a name missing from the listing is looked up again this soon
    assert store.fetch("look").short_hash == short_hash(subject)


def test_a_promoted_version_reaches_the_next_request_once_no_running_request_uses_the_old(
    bucket: str,
    s3_server: S3Server,
    tiny_model_dir: Path,
    tiny_lora_dir: Path,
    lora_oracle: LoadedPipeline,
    tmp_path: Path,
) -> None:
    root = ModelLocation.parse(f"s3://{bucket}/loras")
    registry = ModelRegistry(
        make_client(store_settings(s3_server.endpoint_url, str(root), tmp_path).store), adapter_location(root, "style")
    )
    registry.create_bucket()
    new_style = write_random_lora(tiny_model_dir, tmp_path / "new.safetensors", seed=11)
    for version, file in (("v1", tiny_lora_dir / "style.safetensors"), ("v2", new_style)):
        versions_cli(s3_server.endpoint_url, "publish-lora", file, str(root), "--name", "style", "--version", version)
    registry.promote("v1")
    clock = Clock()
    store = LoraStore(store_settings(s3_server.endpoint_url, str(root), tmp_path / "cache"), clock=clock)
    loaded = load_pipeline(PipelineSettings(model=str(tiny_model_dir), device="cpu"))
    adapters = LoraAdapters(loaded.pipeline, LoraSources([store]), cache_bytes=2**30)
    engine = StepEngine(loaded, loras=adapters)
    outcomes: dict[str, Any] = {}

    stepped: list[int] = []

    def submit(key: str, request: GenerationRequest) -> None:
        job = Request(request, on_step=lambda step, total: stepped.append(step) if key == "long" else None)
        engine.submit(job, lambda outcome: outcomes.__setitem__(key, outcome))

    long, joiner, after = (
        ask("a red circle <lora:style:0.8>", steps=8),
        ask("a blue square <lora:style>"),
        ask("a green triangle <lora:style:0.9>", seed=3),
    )
    submit("long", long)
    for _ in range(2000):  # until it runs on v1 (its adapter read and loaded; a slow read takes steps)
        if len(stepped) >= 2:
            break
        engine.step()
    assert len(stepped) >= 2 and not outcomes  # running on v1
    registry.promote("v2")
    clock.now += 31  # the store reads the new current on its next look
    adapters.wait_for_reads(timeout=0)  # forget the first read
    submit("joiner", joiner)  # joins while the long request runs on v1: v1 it gets
    adapters.wait_for_reads(timeout=60)  # the engine has seen v2 before it admits the joiner
    engine.run_until_idle()
    submit("after", after)  # nothing runs on v1 any more: v2
    engine.run_until_idle()

    old, new = f"style: {short_hash(tiny_lora_dir / 'style.safetensors')}", f"style: {short_hash(new_style)}"
    assert [outcomes[key].results[0].lora_hashes for key in ("long", "joiner", "after")] == [old, old, new]
    for key, request in (("long", long), ("joiner", joiner)):
        assert_same_image(outcomes[key].results[0].image, pipeline_image_with_loras(lora_oracle, request), tolerance=2)
    new_oracle = load_pipeline(PipelineSettings(model=str(tiny_model_dir), device="cpu"))
    new_oracle.pipeline.load_lora_weights(str(new_style), adapter_name="style")
    assert_same_image(outcomes["after"].results[0].image, pipeline_image_with_loras(new_oracle, after))
    assert max_difference(outcomes["after"].results[0].image, pipeline_image_with_loras(lora_oracle, after)) > 10


def test_a_corrupt_version_is_refused_naming_the_prompt_and_an_unreachable_store_serves_the_cache(
    bucket: str, s3_server: S3Server, tiny_lora_dir: Path, tmp_path: Path
) -> None:
    root = f"s3://{bucket}/loras"
    for name in ("style", "subject"):
        file = tiny_lora_dir / f"{name}.safetensors"
        done = versions_cli(s3_server.endpoint_url, "publish-lora", file, root, "--version", "v1", "--promote")
        assert done.returncode == 0, done.stderr
    cache = tmp_path / "cache"
    store = LoraStore(store_settings(s3_server.endpoint_url, root, cache))
    fetched = store.fetch("style")

    client = make_client(store_settings(s3_server.endpoint_url, root, cache).store)
    client.put_object(Bucket=bucket, Key=f"loras/subject/versions/v1/{ADAPTER_FILE}", Body=b"changed in the store")
    with pytest.raises(InvalidRequestError, match="'subject' cannot be used: its published file does not match"):
        store.fetch("subject")
    assert not list((cache / bucket).glob("loras__subject/v1"))  # nothing unverified is kept

    unreachable = LoraStore(store_settings(f"http://127.0.0.1:{free_port()}", root, cache))
    assert unreachable.available() == {"style": "sd"}  # what this host fetched last
    assert unreachable.fetch("style") == fetched
    with pytest.raises(InvalidRequestError, match="'subject', which is not available"):
        unreachable.fetch("subject")


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("s3://adapters", "LORA_S3: Value error, 's3://adapters' needs a bucket and a prefix"),
        ("s3://adapters/loras@v1", "LORA_S3: Value error, 's3://adapters/loras@v1' names a version"),
        ("./loras", "LORA_S3: Value error, './loras' is not an s3://BUCKET/PREFIX location"),
    ],
)
def test_a_lora_store_setting_that_is_not_a_place_stops_start_up_naming_it(value: str, says: str) -> None:
    with pytest.raises(SettingsError, match=re.escape(says)):
        load_settings([], env={"LORA_S3": value})
    pipeline = load_settings(
        [], env={"LORA_S3": "s3://adapters/loras/", "S3_ENDPOINT_URL": "http://s3:9000"}
    ).pipeline()
    assert pipeline.lora_store is not None and pipeline.lora_store.location == "s3://adapters/loras"
    assert pipeline.lora_store.store.endpoint_url == "http://s3:9000"


def test_the_stacks_lora_publish_step_publishes_the_demo_adapter_once_and_never_promotes_again(
    s3_server: S3Server, tiny_lora_dir: Path, tmp_path: Path
) -> None:
    """The exact command compose's loras-publish runs, against a store that has no bucket yet."""
    bucket = f"models-{uuid.uuid4().hex[:8]}"
    swaps = {
        "--endpoint-url=http://seaweedfs:8333": f"--endpoint-url={s3_server.endpoint_url}",
        "/app/models/loras/ring.safetensors": str(ROOT / "models" / "loras" / "ring.safetensors"),
        "s3://models/loras": f"s3://{bucket}/loras",
    }
    command = compose_step("loras-publish", swaps)
    first = run_compose_step(command)
    assert first.returncode == 0, first.stderr
    root = f"s3://{bucket}/loras"
    store = LoraStore(store_settings(s3_server.endpoint_url, root, tmp_path / "cache"))
    assert store.listing()["ring"].version == "ring-1" and store.available() == {"ring": "sd"}
    newer = versions_cli(
        s3_server.endpoint_url,
        "publish-lora",
        tiny_lora_dir / "style.safetensors",
        root,
        "--name",
        "ring",
        "--version",
        "ring-2",
        "--promote",
    )  # the operator rolled a new version out
    assert newer.returncode == 0, newer.stderr
    again = run_compose_step(command)
    assert again.returncode == 0 and "already published" in again.stdout
    assert (
        LoraStore(store_settings(s3_server.endpoint_url, root, tmp_path / "cache")).listing()["ring"].version
        == "ring-2"
    )
    app_env = yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text())["x-app"]["environment"]
    assert app_env["LORA_S3"] == "${LORA_S3:-s3://models/loras}"
