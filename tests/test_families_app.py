"""An SDXL model served by the launched app: its images equal diffusers' SDXL pipeline, alone and sharing steps."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from gradio_client import Client

from harness.app_server import RunningApp, is_stepping, launched_app
from harness.images import assert_same_image, pipeline_image
from harness.servers import S3Server, wait_until
from sd_pipeline.contract.request import GenerationRequest
from sd_pipeline.model.loading import LoadedPipeline
from sd_pipeline.png import read_png_parameters
from tests.test_app import fetch_pixels

SERVED_TOLERANCE = 2  # levels of 255, on the served PNG (the bar for every family)
ASKED: dict[str, Any] = {"negative_prompt": "", "steps": 8, "width": 128, "height": 128, "guidance_scale": 5.0}


@pytest.fixture(scope="module")
def sdxl_app(
    tiny_sdxl_dir: Path, s3_server: S3Server, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningApp]:
    s3_server.create_bucket("sdxl-images")
    env = {"S3_BUCKET": "sdxl-images", "S3_ENDPOINT_URL": s3_server.endpoint_url, "S3_REGION": "us-east-1"}
    with launched_app(tiny_sdxl_dir, tmp_path_factory.mktemp("sdxl-app"), env=env) as app:
        yield app


def client(app: RunningApp, folder: Path) -> Client:
    return Client(app.url, verbose=False, download_files=str(folder))


def asked(prompt: str, seed: int, scheduler: str) -> dict[str, Any]:
    return {"prompt": prompt, "seed": seed, "scheduler": scheduler, "num_images": 1, **ASKED}


def served_matches_the_pipeline(loaded: LoadedPipeline, result: dict[str, Any], fields: dict[str, Any]) -> None:
    (record,) = result["images"]
    png = requests.get(record["url"], timeout=10).content
    assert read_png_parameters(png).seed == fields["seed"]
    expected = pipeline_image(loaded, GenerationRequest(**fields))[0]
    assert_same_image(fetch_pixels(record["url"]), expected, tolerance=SERVED_TOLERANCE)


def test_sdxl_from_the_app_equals_its_pipeline_alone_and_sharing_steps(
    sdxl_app: RunningApp, sdxl_loaded: LoadedPipeline, tmp_path: Path
) -> None:
    api = client(sdxl_app, tmp_path).view_api(return_format="dict", print_info=False)
    parameters = {p["parameter_name"]: p for p in api["named_endpoints"]["/generate"]["parameters"]}
    assert parameters["width"]["parameter_default"] == parameters["height"]["parameter_default"] == 256  # native
    alone = asked("a red circle", 11, "Euler")
    _, result = client(sdxl_app, tmp_path / "alone").predict(**alone, api_name="/generate")
    served_matches_the_pipeline(sdxl_loaded, result, alone)

    images_before = sdxl_app.metric("sdapp_batch_size_images_sum")
    steps_before = sdxl_app.metric("sdapp_batch_size_images_count")
    long = {**asked("a long one", 1, "Euler a"), "steps": 100, "num_images": 4}
    running = client(sdxl_app, tmp_path / "long").submit(**long, api_name="/generate")
    wait_until(lambda: is_stepping(running), timeout=120)
    joiners = [asked("a blue square", 12, "DPM++ 2M Karras"), asked("a green triangle", 13, "UniPC")]
    jobs = [
        client(sdxl_app, tmp_path / str(n)).submit(**fields, api_name="/generate") for n, fields in enumerate(joiners)
    ]
    for job, fields in zip(jobs, joiners, strict=True):
        served_matches_the_pipeline(sdxl_loaded, job.result(timeout=120)[1], fields)
    running.result(timeout=120)
    image_steps = sdxl_app.metric("sdapp_batch_size_images_sum") - images_before
    steps = sdxl_app.metric("sdapp_batch_size_images_count") - steps_before
    assert image_steps == 100 * 4 + 8 + 8 and steps < 100 + 8 + 8  # the joiners rode the long request's steps


def test_sdxl_app_names_the_family_and_refuses_a_size_by_field(sdxl_app: RunningApp, tmp_path: Path) -> None:
    exposition = requests.get(f"{sdxl_app.metrics_url}/metrics", timeout=10).text
    assert re.search(r'sdapp_model_info\{[^}]*family="sdxl"', exposition)
    with pytest.raises(Exception, match=r"width: .*multiple of 8"):
        client(sdxl_app, tmp_path).predict(**{**asked("odd", 1, "Euler"), "width": 100}, api_name="/generate")
