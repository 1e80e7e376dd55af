"""The launched app serving a model from S3 (the loopback S3 server): v1 served from ``s3://``; v2
promoted while eight clients keep requesting (none fails, requests after the switch report v2);
a corrupt v3 refused while v2 serves; v1 promoted back; a restart with S3 down serves the cache."""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests
from gradio_client import Client

from harness.app_server import RunningApp, launched_app
from harness.servers import S3Server, free_port, wait_until
from sd_pipeline.contract.models import DEFAULTS_FILE, ModelStore
from sd_pipeline.png import read_png_parameters
from sd_pipeline.versions.location import ModelLocation
from sd_pipeline.versions.registry import ModelRegistry, make_client

FAST: dict[str, Any] = {"negative_prompt": "", "seed": -1, "num_images": 1, "steps": 6, "width": 64, "height": 64}
FAST |= {"guidance_scale": 7.5, "scheduler": "Euler a"}


@dataclass
class Served:
    submitted: float
    finished: float
    version: str


def one_image(client: Client, prompt: str) -> dict[str, Any]:
    _, result = client.predict(prompt=prompt, **FAST, api_name="/generate")
    record: dict[str, Any] = result["images"][0]
    return record


def rollouts(app: RunningApp, outcome: str) -> float:
    return app.metric(f'sdapp_model_rollouts_total{{outcome="{outcome}"}}')


def promote(app: RunningApp, registry: ModelRegistry, version: str) -> None:
    """Promote, then SIGHUP: the app (MODEL_POLL_SECONDS=0) looks at ``current`` at once."""
    registry.promote(version)
    app.process.send_signal(signal.SIGHUP)


def readiness(app: RunningApp) -> tuple[int, dict[str, Any]]:
    response = requests.get(f"{app.metrics_url}/readyz", timeout=10)
    body: dict[str, Any] = response.json()
    return response.status_code, body


def test_model_versions_roll_out_under_load_with_no_failed_request(
    tiny_model_dir: Path, s3_server: S3Server, tmp_path: Path
) -> None:
    models, images = f"models-{uuid.uuid4().hex[:8]}", f"images-{uuid.uuid4().hex[:8]}"
    for name in (models, images):
        s3_server.create_bucket(name)
    store = ModelStore(endpoint_url=s3_server.endpoint_url, region="us-east-1", cache_dir="")
    registry = ModelRegistry(make_client(store), ModelLocation.parse(f"s3://{models}/shop/tiny"))
    v2_folder = tmp_path / "v2"
    shutil.copytree(tiny_model_dir, v2_folder)
    (v2_folder / DEFAULTS_FILE).write_text(json.dumps({"steps": 12}))
    registry.publish(tiny_model_dir, "v1", promote=True)
    cache = tmp_path / "model-cache"
    env = {
        "S3_BUCKET": images,
        "S3_ENDPOINT_URL": s3_server.endpoint_url,
        "S3_REGION": "us-east-1",
        "MODEL_CACHE_DIR": str(cache),
        "MODEL_POLL_SECONDS": "0",  # only SIGHUP: each promotion below is looked at once signalled
    }
    with launched_app(str(registry.location), tmp_path, env=env) as app:
        first = one_image(Client(app.url, verbose=False, download_files=str(tmp_path / "c")), "first")
        assert (first["model"], first["model_version"]) == ("tiny", "v1") and len(first["model_hash"]) == 10

        # v2 while eight clients keep requesting.
        served: list[Served] = []
        errors: list[BaseException] = []
        stop = threading.Event()
        lock = threading.Lock()

        def keep_requesting(number: int) -> None:
            client = Client(app.url, verbose=False, download_files=str(tmp_path / f"load-{number}"))
            while not stop.is_set():
                submitted = time.monotonic()
                try:
                    record = one_image(client, f"client {number}")
                except BaseException as error:  # noqa: BLE001 - every failure is a test failure, reported below
                    errors.append(error)
                    return
                with lock:
                    served.append(Served(submitted, time.monotonic(), record["model_version"]))

        clients = [threading.Thread(target=keep_requesting, args=(n,)) for n in range(8)]
        for thread in clients:
            thread.start()
        wait_until(lambda: len(served) >= 8, timeout=120)
        registry.publish(v2_folder, "v2")
        promoted_at = time.monotonic()
        promote(app, registry, "v2")
        wait_until(lambda: rollouts(app, "succeeded") == 1, timeout=180, interval=0.05)
        switched_at = time.monotonic()
        wait_until(lambda: sum(1 for s in served if s.submitted > switched_at) >= 16 or bool(errors), timeout=180)
        stop.set()
        for thread in clients:
            thread.join(timeout=120)
        assert errors == []
        # v1 kept serving while v2 loaded (the switch itself comes before the counter, which waits for
        # the old worker's last requests, so some requests in this window may already be v2's).
        assert any(s.version == "v1" for s in served if promoted_at < s.finished < switched_at)
        after = [s for s in served if s.submitted > switched_at]
        assert len(after) >= 16 and {s.version for s in after} == {"v2"}
        assert "previous pipeline worker" in app.log() and app.metric("sdapp_worker_up") == 1

        # A corrupt v3 (a file changed after publishing) is refused; v2 keeps serving.
        registry.publish(tiny_model_dir, "v3")
        key = registry.location.version_prefix("v3") + "unet/config.json"
        registry.client.put_object(Bucket=models, Key=key, Body=b"{}")
        promote(app, registry, "v3")
        wait_until(lambda: rollouts(app, "refused") == 1, timeout=120)
        client = Client(app.url, verbose=False, download_files=str(tmp_path / "after"))
        assert one_image(client, "still v2")["model_version"] == "v2"
        status, body = readiness(app)
        assert status == 200 and "v3 refused" in " ".join(body.get("details", []))
        assert "does not match its manifest" in app.log()

        # Rolling back is promoting v1 again; its PNG says which version drew it.
        promote(app, registry, "v1")
        wait_until(lambda: rollouts(app, "succeeded") == 2, timeout=120)
        back = one_image(client, "v1 again")
        assert back["model_version"] == "v1"
        png = read_png_parameters(requests.get(back["url"], timeout=10).content)
        assert (png.model, png.model_version, png.model_hash) == ("tiny", "v1", first["model_hash"])
        info = [line for line in requests.get(f"{app.metrics_url}/metrics", timeout=10).text.splitlines()]
        assert any(line.startswith("sdapp_model_info{") and 'version="v1"' in line for line in info)

    # A restart while the model store is down: the version this host served last starts from the cache.
    dead = {key: value for key, value in env.items() if not key.startswith("S3_")}
    dead["MODEL_S3_ENDPOINT_URL"] = f"http://127.0.0.1:{free_port()}"
    with launched_app(str(registry.location), tmp_path, env={**dead, "S3_BUCKET": ""}) as app:
        record = one_image(Client(app.url, verbose=False, download_files=str(tmp_path / "offline")), "offline")
        assert record["model_version"] == "v1"
        status, body = readiness(app)
        assert status == 200 and "last version this host served" in " ".join(body.get("details", []))
    assert os.listdir(cache)  # the cache outlived both processes
