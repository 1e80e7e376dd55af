"""``RAY_REPLICAS=auto``: Ray Serve's autoscaler adds a replica under load and removes it after.

A private Ray instance with one CPU replica of the shapes model, room for two, one request per
replica, and short autoscaling delays (Ray's own ``autoscaling_config`` fields, through
``RAY_AUTOSCALING``). Its own module, so it never shares the machine with test_ray's instance.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from gradio_client import Client

from harness.app_server import RunningApp, launched_app
from harness.servers import wait_until
from sd_pipeline.shapes import SHAPES_MODEL_DIR
from tests.needs import needed_module

needed_module("ray.serve")


def running_replicas(app: RunningApp) -> float:
    """Replicas Ray reports RUNNING (0 before the app's first look at Ray)."""
    try:
        return app.metric('sdapp_pipeline_replicas{state="RUNNING"}')
    except KeyError:
        return 0


@pytest.fixture(scope="module")
def autoscaled_app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningApp]:
    env = {
        "RAY_ADDRESS": "local",
        "RAY_REPLICAS": "auto",
        "RAY_MIN_REPLICAS": "1",
        "RAY_MAX_REPLICAS": "2",
        "RAY_CPUS_PER_REPLICA": "1",
        "MAX_BATCH_SIZE": "1",
        # Up at once; down only after 30 s idle, so a fast machine that finishes both requests before the
        # second replica is up still sees it arrive.
        "RAY_AUTOSCALING": '{"upscale_delay_s": 0, "downscale_delay_s": 30, "metrics_interval_s": 0.5,'
        ' "look_back_period_s": 1}',
        "SD_WARMUP": "false",
    }
    with launched_app(SHAPES_MODEL_DIR, tmp_path_factory.mktemp("ray-auto"), env=env) as app:
        yield app


def test_a_replica_is_added_under_load_and_removed_after(autoscaled_app: RunningApp, tmp_path: Path) -> None:
    wait_until(lambda: running_replicas(autoscaled_app) == 1, timeout=60)
    clients = [Client(autoscaled_app.url, verbose=False, download_files=str(tmp_path / str(n))) for n in range(2)]
    # The app hands Ray one request per replica it may have (2); with one replica, one waits in Ray,
    # which is the load Serve's autoscaler scales on.
    jobs = [
        client.submit(prompt="a red circle", api_name="/generate", seed=n, steps=50, width=256, height=256)
        for n, client in enumerate(clients)
    ]
    wait_until(lambda: running_replicas(autoscaled_app) == 2, timeout=180)
    records = [job.result(timeout=300)[1]["images"][0] for job in jobs]
    assert [record["seed"] for record in records] == [0, 1]
    served_by = re.findall(r"request served by replica (\S+)", autoscaled_app.log())
    assert len(served_by) == 2
    wait_until(lambda: running_replicas(autoscaled_app) == 1, timeout=180)  # idle: back to RAY_MIN_REPLICAS
