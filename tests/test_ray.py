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
import requests
from gradio_client import Client
from gradio_client.client import Job
from PIL import Image

from app import build_ray_app
from harness.app_server import RunningApp, clients_at_once, is_stepping, launched_app
from harness.servers import wait_until
from sd_pipeline.contract.plans import RayPlan, ReplicaPlan
from sd_pipeline.shapes import SHAPES_MODEL_DIR
from sd_pipeline.shapes.adherence import every_ask
from sd_pipeline.shapes.drawing import read_picture
from tests.needs import needed_module
from webapp.settings import SettingsError, load_settings

needed_module("ray.serve")

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
    env = {
        "RAY_ADDRESS": "local",
        "RAY_REPLICAS": "2",
        "RAY_CPUS_PER_REPLICA": "1",
        "MAX_BATCH_SIZE": "2",  # 4 requests fill both replicas
        "SD_WARMUP": "false",
    }
    with launched_app(SHAPES_MODEL_DIR, tmp_path_factory.mktemp("ray-app"), env=env) as app:
        yield app
        children = ray_processes(app)  # replacements for killed replicas included
    _, alive = psutil.wait_procs(children, timeout=30)
    assert alive == [], f"Ray processes outlived the app: {alive}"


def finished(job: Job) -> bool:
    """Whether a gradio_client job has its result or its error (``Job.done`` does not tell)."""
    return bool(job.status().code.name == "FINISHED")


def denoising(job: Job) -> bool:
    """Whether a job runs on a replica: its progress says "step n/N" rather than its place in a queue."""
    progress = job.status().progress_data or []
    return any("step" in (unit.desc or "") for unit in progress)


def draw(client: Client, prompt: str, **fields: Any) -> tuple[Image.Image, dict[str, Any]]:
    values = {"seed": 11, "steps": 20, "guidance_scale": 4.0, "width": 64, "height": 64, **fields}
    gallery, result = client.predict(prompt=prompt, api_name="/generate", **values)
    return Image.open(gallery[0]["image"]).convert("RGB"), result["images"][0]


def test_ray_settings_make_the_plan_and_leave_the_local_worker_as_default() -> None:
    assert load_settings([], env={}).ray_plan() is None
    plan = load_settings(["--ray-replicas", "3"], env={"RAY_ADDRESS": "local", "MAX_BATCH_SIZE": "6"}).ray_plan()
    assert plan == RayPlan(address="local", deployment=ReplicaPlan(replicas=3, max_replicas=4, max_batch_images=6))
    assert plan.deployment.deployment_options(gpus_per_replica=1) == {
        "num_replicas": 3,
        "max_ongoing_requests": 6,
        "max_queued_requests": -1,
        "health_check_period_s": 5.0,
        "health_check_timeout_s": 30.0,
        "graceful_shutdown_timeout_s": 60.0,  # SHUTDOWN_TIMEOUT: an old version's replica finishes its requests
        "ray_actor_options": {"num_cpus": 1.0, "num_gpus": 1},
    }


def test_auto_replicas_make_serve_autoscale_on_full_batches() -> None:
    env = {
        "RAY_ADDRESS": "auto",
        "RAY_REPLICAS": "auto",
        "RAY_MIN_REPLICAS": "2",
        "RAY_MAX_REPLICAS": "5",
        "RAY_AUTOSCALING": '{"upscale_delay_s": 10}',
        "MAX_BATCH_SIZE": "4",
        "RAY_MAX_QUEUED_REQUESTS": "16",
        "RAY_DEPLOY": "never",
    }
    plan = load_settings([], env=env).ray_plan()
    assert plan is not None and plan.deploy == "never" and plan.deployment.most_replicas == 5
    options = plan.deployment.deployment_options(gpus_per_replica=0.5)
    assert "num_replicas" not in options and options["max_queued_requests"] == 16
    assert options["autoscaling_config"] == {
        "min_replicas": 2,
        "max_replicas": 5,
        "target_ongoing_requests": 4,  # a replica is added once each holds more than a full batch
        "upscale_delay_s": 10,
    }


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"RAY_REPLICAS": "many"}, "RAY_REPLICAS: Value error, must be a whole number from 1 to 1024, or 'auto'"),
        ({"RAY_REPLICAS": "0"}, "RAY_REPLICAS: Input should be greater than or equal to 1"),
        ({"RAY_MIN_REPLICAS": "3", "RAY_MAX_REPLICAS": "2"}, "RAY_MIN_REPLICAS must not exceed RAY_MAX_REPLICAS"),
        ({"RAY_AUTOSCALING": "upscale_delay_s=1"}, "RAY_AUTOSCALING: Invalid JSON"),
        ({"RAY_DEPLOY": "sometimes"}, "RAY_DEPLOY: Input should be 'if-missing', 'always' or 'never'"),
    ],
)
def test_bad_ray_settings_name_the_setting(env: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError, match=re.escape(message)):
        load_settings([], env={"RAY_ADDRESS": "local", **env})


def test_the_serve_config_builder_deploys_what_the_app_would() -> None:
    application = build_ray_app(
        {
            "sd_model": str(SHAPES_MODEL_DIR),
            "ray_replicas": "auto",
            "ray_max_replicas": 6,
            "max_batch_size": 3,
            "ray_gpus_per_replica": 1,
        }
    )
    deployment = application._bound_deployment  # Serve has no public reader for a built application
    assert (deployment.name, deployment.max_ongoing_requests) == ("pipeline", 3)
    assert deployment.ray_actor_options == {"num_cpus": 1.0, "num_gpus": 1.0}
    autoscaling = deployment._deployment_config.autoscaling_config
    assert (autoscaling.min_replicas, autoscaling.max_replicas, autoscaling.target_ongoing_requests) == (1, 6, 3)


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
    assert ray_app.metric("sdapp_worker_up") == 1  # replicas run: SdServiceWorkerDown must not page


def test_stop_cancels_only_the_callers_request(ray_app: RunningApp, tmp_path: Path) -> None:
    cancelled_before = ray_app.metric('sdapp_requests_total{outcome="cancelled"}')
    slow = {"steps": 100, "width": 256, "height": 256}
    mine = Client(ray_app.url, verbose=False, download_files=str(tmp_path / "a"))
    theirs = Client(ray_app.url, verbose=False, download_files=str(tmp_path / "b"))
    my_job = mine.submit(prompt="a red circle", api_name="/generate", **slow)
    their_job = theirs.submit(prompt="a blue square", api_name="/generate", **{**slow, "steps": 30})
    wait_until(lambda: is_stepping(my_job), timeout=60)  # running on a replica, not waiting for one
    my_job.cancel()
    assert their_job.result(timeout=120)[1]["images"][0]["prompt"] == "a blue square"
    wait_until(lambda: ray_app.metric('sdapp_requests_total{outcome="cancelled"}') == cancelled_before + 1, timeout=60)


def test_a_second_front_end_shares_the_replicas_and_a_full_queue_answers_busy_at_once(
    ray_app: RunningApp, tmp_path: Path
) -> None:
    address = re.search(r"private Ray instance at (\S+)", ray_app.log())
    assert address is not None
    joined = {
        "RAY_ADDRESS": address.group(1),
        "RAY_AUTH_MODE": "token",  # Ray's own setting: the private instance's token is in ~/.ray/auth_token
        "RAY_DEPLOY": "never",
        "RAY_REPLICAS": "1",
        "MAX_BATCH_SIZE": "1",  # this front end hands Ray one request at a time...
        "QUEUE_MAX_SIZE": "2",  # ...and accepts two at once
        "SD_WARMUP": "false",
    }
    with launched_app(SHAPES_MODEL_DIR, tmp_path, env=joined) as second:
        assert "joining the pipeline application" in second.log()
        picture, _ = draw(Client(second.url, verbose=False, download_files=str(tmp_path / "c")), "a yellow square")
        assert read_picture(picture).colour == "yellow"  # drawn by the first front end's replicas

        first_clients = [Client(ray_app.url, verbose=False, download_files=str(tmp_path / f"a{n}")) for n in range(4)]
        filling = [
            c.submit(prompt="a red circle", api_name="/generate", steps=100, width=768, height=768)
            for c in first_clients
        ]
        try:
            # Every replica slot is taken once all four report denoising steps (not a place in a queue).
            wait_until(lambda: all(map(denoising, filling)), timeout=120)
            busy = busy_while_full(second, filling, tmp_path)
        finally:
            for job in filling:
                job.cancel()
        assert second.metric('sdapp_requests_total{outcome="rejected"}') == busy
    assert ray_app.metric('sdapp_pipeline_replicas{state="RUNNING"}') == 2  # the first front end's replicas stay


def busy_while_full(second: RunningApp, filling: list[Job], tmp_path: Path) -> int:
    """Four requests to the second front end while the first fills every replica; how many heard busy."""
    asks = every_ask()[:4]
    clients = [Client(second.url, verbose=False, download_files=str(tmp_path / f"b{n}")) for n in range(4)]
    waiting = [
        c.submit(prompt=ask.prompt, api_name="/generate", seed=3, steps=20, guidance_scale=4.0)
        for c, ask in zip(clients, asks, strict=True)
    ]
    # One waits in Ray for a replica, one in the app's queue; the others are refused at once,
    # while every replica is still busy with the first front end's requests.
    wait_until(lambda: sum(map(finished, waiting)) >= 2, timeout=120)
    assert not any(map(finished, filling))
    for job in filling:
        job.cancel()
    busy = 0
    for job, ask in zip(waiting, asks, strict=True):
        try:
            gallery, _ = job.result(timeout=240)
        except Exception as error:  # noqa: BLE001 - gradio_client raises the app's message as AppError
            assert "the server is busy" in str(error)
            busy += 1
            continue
        reading = read_picture(Image.open(gallery[0]["image"]).convert("RGB"))
        assert (reading.colour, reading.shape) == (ask.colour, ask.shape)
    assert busy == 2
    return busy


def test_a_killed_replica_is_replaced_and_its_request_is_served(ray_app: RunningApp, tmp_path: Path) -> None:
    client = Client(ray_app.url, verbose=False, download_files=str(tmp_path))
    replicas = replica_processes(ray_app)
    assert len(replicas) == 2, replicas
    job = client.submit(prompt="a green triangle", api_name="/generate", seed=5, steps=100, width=256, height=256)
    wait_until(lambda: is_stepping(job), timeout=60)  # running on a replica, not waiting for one
    for replica in replicas:
        os.kill(replica.pid, signal.SIGKILL)  # both: whichever holds the request dies
    record = job.result(timeout=240)[1]["images"][0]
    assert record["prompt"] == "a green triangle" and record["status"] == "stored"
    wait_until(lambda: ray_app.metric('sdapp_pipeline_replicas{state="RUNNING"}') == 2, timeout=240)
    picture, _ = draw(client, "a yellow square")
    assert read_picture(picture).colour == "yellow"
    _, history = client.predict(1, api_name="/history")  # history and links as with one worker
    assert [record["prompt"] for record in history["images"]] == ["a yellow square", "a green triangle"]
    assert requests.get(history["images"][1]["url"], timeout=10).content.startswith(b"\x89PNG")
