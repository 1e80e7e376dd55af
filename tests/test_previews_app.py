"""Live previews through the launched app and gradio_client, with the shapes model (SD_PREVIEW=full).

The shapes model's latents are not read by a linear map (its fitted ``approx`` map gets the
colour of only 21 in 48 clean pictures right), so these checks decode previews with the model's
own VAE, which is cheap at 64x64; ``approx`` and ``taesd`` are covered in tests/test_previews.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from gradio_client import Client
from gradio_client.client import Job
from PIL import Image

from harness.app_server import RunningApp, clients_at_once, launched_app
from harness.servers import wait_until
from sd_pipeline.shapes import SHAPES_MODEL_DIR
from sd_pipeline.shapes.adherence import every_ask
from sd_pipeline.shapes.drawing import read_picture

HALF_WAY = 15
FIELDS: dict[str, Any] = {"steps": 2 * HALF_WAY, "guidance_scale": 4.0, "width": 64, "height": 64}


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningApp]:
    env = {"SD_PREVIEW": "full", "PREVIEW_INTERVAL_SECONDS": "0.01", "SD_WARMUP": "false"}
    with launched_app(SHAPES_MODEL_DIR, tmp_path_factory.mktemp("previews"), env=env) as running:
        yield running


def previews(job: Job) -> list[tuple[dict[str, Any], Image.Image]]:
    """The job's intermediate outputs: each preview's step report and its picture."""
    found = []
    for gallery, result in job.outputs():
        if result.get("preview"):
            assert result["images"] == [] and len(gallery) == 1
            with Image.open(gallery[0]["image"]) as picture:
                found.append((result["preview"], picture.convert("RGB")))
    return found


def test_a_request_streams_previews_then_its_usual_result(app: RunningApp, tmp_path: Path) -> None:
    client = Client(app.url, verbose=False, download_files=str(tmp_path))
    job = client.submit(prompt="a red circle", seed=3, api_name="/generate", **FIELDS)
    gallery, result = job.result(timeout=120)
    shown = previews(job)
    assert len(shown) >= 3, shown
    steps = [report["step"] for report, _ in shown]
    assert steps == sorted(steps) and steps[-1] < FIELDS["steps"] and {r["total"] for r, _ in shown} == {30}
    with Image.open(gallery[0]["image"]) as final:
        assert all(picture.size == final.size == (64, 64) for _, picture in shown)
    assert [image["prompt"] for image in result["images"]] == ["a red circle"] and "preview" not in result
    _, history = client.predict(1, api_name="/history")
    assert len(history["images"]) == 1  # the previews were never stored


def test_by_the_half_way_step_the_preview_shows_the_asked_colour(app: RunningApp, tmp_path: Path) -> None:
    asks = [ask for ask in every_ask() for _ in range(2)]  # 24 prompts

    def three_in_a_row(client: Client, number: int) -> list[bool]:
        matches = []
        for ask_number in range(number * 3, number * 3 + 3):
            ask = asks[ask_number]
            job = client.submit(prompt=ask.prompt, seed=500 + ask_number, api_name="/generate", **FIELDS)
            job.result(timeout=240)
            early = [picture for report, picture in previews(job) if report["step"] <= HALF_WAY]
            matches.append(bool(early) and read_picture(early[-1]).colour == ask.colour)
        return matches

    matched = sum(sum(row) for row in clients_at_once(app, tmp_path, 8, three_in_a_row))
    assert matched >= 0.8 * len(asks), f"{matched} of {len(asks)} previews showed the asked colour by step {HALF_WAY}"


def test_each_client_gets_only_its_own_previews(app: RunningApp, tmp_path: Path) -> None:
    def own(client: Client, number: int) -> set[int]:
        steps = 20 + 10 * number  # 20 and 30: the totals tell whose previews they are
        job = client.submit(prompt="a blue square", seed=number, api_name="/generate", **{**FIELDS, "steps": steps})
        job.result(timeout=120)
        return {report["total"] for report, _ in previews(job)}

    assert clients_at_once(app, tmp_path, 2, own) == [{20}, {30}]


def test_stop_during_previews_ends_the_request(app: RunningApp, tmp_path: Path) -> None:
    cancelled = app.metric('sdapp_requests_total{outcome="cancelled"}')
    client = Client(app.url, verbose=False, download_files=str(tmp_path))
    long_render = {**FIELDS, "steps": 100, "width": 256, "height": 256}  # long enough to stop on any machine
    job = client.submit(prompt="a green triangle", seed=9, api_name="/generate", **long_render)
    wait_until(lambda: len(previews(job)) >= 2, timeout=120)
    job.cancel()
    wait_until(lambda: app.metric('sdapp_requests_total{outcome="cancelled"}') == cancelled + 1, timeout=60)
    steps = [report["step"] for report, _ in previews(job)]
    assert steps and max(steps) < long_render["steps"]  # ended before its last step
    assert not job.status().success  # no result came back
    gallery, _ = client.predict(prompt="a green triangle", seed=9, api_name="/generate", **FIELDS)
    with Image.open(gallery[0]["image"]) as picture:
        assert read_picture(picture).colour == "green"  # the app keeps serving
