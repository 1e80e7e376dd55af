"""The app on Ray Serve: a private Ray instance on this machine with two CPU replicas of the shapes model.

Driven through gradio_client like every other app test. The app starts Ray (RAY_ADDRESS=local)
and stops it on SIGTERM; the fixture checks that no Ray process outlives it.
"""

from __future__ import annotations

import os
import re
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from gradio_client import Client
from PIL import Image

from sd_pipeline.ray_serving import RayPlan
from sd_pipeline.shapes import SHAPES_MODEL_DIR
from sd_pipeline.shapes.adherence import every_ask
from sd_pipeline.shapes.drawing import read_picture
from tests.app_server import RunningApp, clients_at_once, launched_app
from tests.servers import wait_until
from webapp.settings import load_settings

pytest.importorskip("ray.serve")

REPLICA = re.compile(r"request served by replica (\S+)")


def ray_processes(app: RunningApp) -> list[psutil.Process]:
    try:
        return psutil.Process(app.process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def replica_processes(app: RunningApp) -> list[psutil.Process]:
    found = []
    for process in ray_processes(app):
        try:
            if "ServeReplica" in " ".join(process.cmdline()):
                found.append(process)
        except psutil.NoSuchProcess:
            continue
    return found


@pytest.fixture(scope="module")
def ray_app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningApp]:
    env = {"RAY_ADDRESS": "local", "RAY_REPLICAS": "2", "RAY_CPUS_PER_REPLICA": "1", "SD_WARMUP": "false"}
    with launched_app(SHAPES_MODEL_DIR, tmp_path_factory.mktemp("ray-app"), env=env) as app:
        yield app
        children = ray_processes(app)  # replacements for killed replicas included
    _, alive = psutil.wait_procs(children, timeout=30)
    assert alive == [], f"Ray processes outlived the app: {alive}"


def draw(client: Client, prompt: str, **fields: Any) -> tuple[Image.Image, dict[str, Any]]:
    values = {"seed": 11, "steps": 20, "guidance_scale": 4.0, "width": 64, "height": 64, **fields}
    gallery, result = client.predict(prompt=prompt, api_name="/generate", **values)
    return Image.open(gallery[0]["image"]).convert("RGB"), result["images"][0]


def test_ray_settings_make_the_plan_and_leave_the_local_worker_as_default() -> None:
    assert load_settings([], env={}).ray_plan() is None
    plan = load_settings(["--ray-replicas", "3"], env={"RAY_ADDRESS": "local", "MAX_BATCH_SIZE": "6"}).ray_plan()
    assert plan == RayPlan(
        address="local", replicas=3, gpus_per_replica=None, cpus_per_replica=1.0, max_ongoing_requests=6
    )


def test_concurrent_clients_get_their_own_images_from_both_replicas(ray_app: RunningApp, tmp_path: Path) -> None:
    asks = every_ask()[:8]
    answers = clients_at_once(
        ray_app, tmp_path, len(asks), lambda client, n: draw(client, asks[n].prompt, seed=100 + n)
    )
    for number, ask in enumerate(asks):
        picture, record = answers[number]
        assert (record["prompt"], record["seed"]) == (ask.prompt, 100 + number)
        reading = read_picture(picture)
        assert (reading.colour, reading.shape) == (ask.colour, ask.shape), (ask, reading)
    assert len(set(REPLICA.findall(ray_app.log()))) == 2, "both replicas should have served"
    assert ray_app.metric('sdapp_pipeline_replicas{state="RUNNING"}') == 2


def test_stop_cancels_only_the_callers_request(ray_app: RunningApp, tmp_path: Path) -> None:
    cancelled_before = ray_app.metric('sdapp_requests_total{outcome="cancelled"}')
    slow = {"steps": 100, "width": 256, "height": 256}
    mine = Client(ray_app.url, verbose=False, download_files=str(tmp_path / "a"))
    theirs = Client(ray_app.url, verbose=False, download_files=str(tmp_path / "b"))
    my_job = mine.submit(prompt="a red circle", api_name="/generate", **slow)
    their_job = theirs.submit(prompt="a blue square", api_name="/generate", **{**slow, "steps": 30})
    wait_until(lambda: my_job.status().code.name == "PROGRESS", timeout=60)  # running on a replica
    my_job.cancel()
    assert their_job.result(timeout=120)[1]["images"][0]["prompt"] == "a blue square"
    wait_until(lambda: ray_app.metric('sdapp_requests_total{outcome="cancelled"}') == cancelled_before + 1, timeout=60)


def test_a_killed_replica_is_replaced_and_its_request_is_served(ray_app: RunningApp, tmp_path: Path) -> None:
    client = Client(ray_app.url, verbose=False, download_files=str(tmp_path))
    replicas = replica_processes(ray_app)
    assert len(replicas) == 2, replicas
    job = client.submit(prompt="a green triangle", api_name="/generate", seed=5, steps=100, width=256, height=256)
    wait_until(lambda: job.status().code.name == "PROGRESS", timeout=60)  # running on a replica
    for replica in replicas:
        os.kill(replica.pid, signal.SIGKILL)  # both: whichever holds the request dies
    record = job.result(timeout=240)[1]["images"][0]
    assert record["prompt"] == "a green triangle" and record["status"] == "stored"
    wait_until(lambda: ray_app.metric('sdapp_pipeline_replicas{state="RUNNING"}') == 2, timeout=240)
    picture, _ = draw(client, "a yellow square")
    assert read_picture(picture).colour == "yellow"
