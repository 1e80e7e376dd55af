"""SDXL, SD3 and FLUX.1 models served by the launched app: the served PNG equals the family's diffusers
pipeline, alone and sharing steps, from a prompt and from a picture and a mask."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
from gradio_client import Client

from harness.app_server import RunningApp, is_stepping, launched_app
from harness.images import assert_same_image, pipeline_image, pipeline_image_from_picture
from harness.servers import S3Server, wait_until
from sd_pipeline.contract.request import GUIDANCE_MEANING, GenerationRequest, check_inputs, default_sampler
from sd_pipeline.contract.settings import PipelineSettings
from sd_pipeline.model.loading import LoadedPipeline, load_pipeline
from sd_pipeline.png import read_png_parameters
from sd_pipeline.tiny import build_tiny_pipeline
from tests.test_app import fetch_pixels, picture_file
from tests.test_image_inputs import picture, square_mask
from webapp.ui import PICTURES_REQUIRED

SERVED_TOLERANCE = 2  # levels of 255, on the served PNG (the bar for every family)
ASKED: dict[str, Any] = {"negative_prompt": "", "steps": 8, "width": 128, "height": 128, "guidance_scale": 5.0}


@dataclass
class Served:
    """A launched app serving one family's tiny model, and the same model loaded here (the oracle's)."""

    family: str
    app: RunningApp
    loaded: LoadedPipeline

    def sampler(self, number: int) -> str:
        samplers = self.loaded.family.samplers
        return samplers[number % len(samplers)]


@pytest.fixture(scope="module", params=["sdxl", "sd3", "flux"])
def served(
    request: pytest.FixtureRequest, s3_server: S3Server, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Served]:
    family = str(request.param)
    folder = Path(request.getfixturevalue(f"tiny_{family}_dir"))
    loaded = request.getfixturevalue(f"{family}_loaded")
    s3_server.create_bucket(f"{family}-images")
    env = {"S3_BUCKET": f"{family}-images", "S3_ENDPOINT_URL": s3_server.endpoint_url, "S3_REGION": "us-east-1"}
    with launched_app(folder, tmp_path_factory.mktemp(f"{family}-app"), env=env) as app:
        yield Served(family, app, loaded)


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


def test_the_app_equals_the_familys_pipeline_alone_and_sharing_steps(served: Served, tmp_path: Path) -> None:
    app, loaded = served.app, served.loaded
    api = client(app, tmp_path).view_api(return_format="dict", print_info=False)
    parameters = {p["parameter_name"]: p for p in api["named_endpoints"]["/generate"]["parameters"]}
    native = parameters["width"]["parameter_default"] == parameters["height"]["parameter_default"]
    assert native and parameters["width"]["parameter_default"] == loaded.native_size  # 256, FLUX.1 1024
    assert parameters["scheduler"]["parameter_default"] == default_sampler(loaded.family.samplers)
    if loaded.family.rules.guidance != "cfg":  # the page says what the guidance field means for this model
        page = requests.get(f"{app.url}config", timeout=10).text
        assert GUIDANCE_MEANING[loaded.family.rules.guidance] in page
    alone = asked("a red circle", 11, served.sampler(0))
    _, result = client(app, tmp_path / "alone").predict(**alone, api_name="/generate")
    served_matches_the_pipeline(loaded, result, alone)

    images_before = app.metric("sdapp_batch_size_images_sum")
    steps_before = app.metric("sdapp_batch_size_images_count")
    long = {**asked("a long one", 1, served.sampler(2)), "steps": 100, "num_images": 4}
    running = client(app, tmp_path / "long").submit(**long, api_name="/generate")
    wait_until(lambda: is_stepping(running), timeout=120)
    joiners = [asked("a blue square", 12, served.sampler(1)), asked("a green triangle", 13, served.sampler(5))]
    jobs = [client(app, tmp_path / str(n)).submit(**fields, api_name="/generate") for n, fields in enumerate(joiners)]
    for job, fields in zip(jobs, joiners, strict=True):
        served_matches_the_pipeline(loaded, job.result(timeout=120)[1], fields)
    running.result(timeout=120)
    image_steps = app.metric("sdapp_batch_size_images_sum") - images_before
    steps = app.metric("sdapp_batch_size_images_count") - steps_before
    assert image_steps == 100 * 4 + 8 + 8 and steps < 100 + 8 + 8  # the joiners rode the long request's steps


def test_the_app_names_the_family_and_refuses_a_size_or_sampler_it_cannot_use(served: Served, tmp_path: Path) -> None:
    exposition = requests.get(f"{served.app.metrics_url}/metrics", timeout=10).text
    assert re.search(rf'sdapp_model_info\{{[^}}]*family="{served.family}"', exposition)
    odd = {**asked("odd", 1, served.sampler(0)), "width": 100}
    multiple = served.loaded.family.rules.size_multiple
    with pytest.raises(Exception, match=rf"width: must be a multiple of {multiple} "):
        client(served.app, tmp_path).predict(**odd, api_name="/generate")
    if served.family != "sdxl":  # a sampler of another family, named with the ones this model takes
        foreign = asked("foreign", 1, "DPM++ 2M Karras")
        with pytest.raises(Exception, match=r"scheduler: must be one of Euler, DPM\+\+ 2M \(this model's samplers\)"):
            client(served.app, tmp_path).predict(**foreign, api_name="/generate")


def test_true_cfg_through_the_app_equals_the_flux_pipeline_and_other_families_refuse_it(
    served: Served, tmp_path: Path
) -> None:
    rules = served.loaded.family.rules
    config = requests.get(f"{served.app.url}config", timeout=10).json()
    (slider,) = [c for c in config["components"] if c.get("props", {}).get("elem_id") == "true-cfg"]
    assert slider["props"]["visible"] is rules.true_cfg  # the page offers it where the model takes it
    fields = {**asked("a red circle", 14, served.sampler(0)), "negative_prompt": "blurry", "true_cfg_scale": 3.0}
    if not rules.true_cfg:
        with pytest.raises(Exception, match=rf"true_cfg_scale: must be 1: this model \({served.family}\) has no"):
            client(served.app, tmp_path).predict(**fields, api_name="/generate")
        return
    _, result = client(served.app, tmp_path).predict(**fields, api_name="/generate")
    served_matches_the_pipeline(served.loaded, result, fields)
    (record,) = result["images"]
    png = requests.get(record["url"], timeout=10).content
    assert read_png_parameters(png).true_cfg_scale == 3.0 and record["true_cfg_scale"] == 3.0


def test_a_picture_and_a_mask_through_the_app_equal_the_familys_inpaint_pipeline(
    served: Served, tmp_path: Path
) -> None:
    """``StableDiffusionXLInpaintPipeline``, ``StableDiffusion3InpaintPipeline`` (its latents: see
    ``harness.images``), ``FluxInpaintPipeline``: the served PNG, with files sent by gradio_client."""
    start, mask = picture(size=(128, 128), seed=6), square_mask((128, 128))
    fields = {**asked("a repainted square", 31, served.sampler(0)), "strength": 0.7}
    sent = {"init_image": picture_file(tmp_path, "start.png", start), "mask": picture_file(tmp_path, "mask.png", mask)}
    (record,) = client(served.app, tmp_path).predict(**fields, **sent, api_name="/generate")[1]["images"]
    wanted = check_inputs({**fields, "init_image": start, "mask": mask}, rules=served.loaded.family.rules)
    expected = pipeline_image_from_picture(served.loaded, wanted)[0]
    assert_same_image(fetch_pixels(record["url"]), expected, tolerance=SERVED_TOLERANCE)
    assert record["strength"] == 0.7 and "mask_url" in record


@pytest.fixture(scope="module")
def inpainting_app(s3_server: S3Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """A 9-channel SD inpainting model served: every request must bring a picture and a mask."""
    folder = build_tiny_pipeline(tmp_path_factory.mktemp("tiny-inpainting-model"), family="sd-inpainting")
    loaded = load_pipeline(PipelineSettings(model=str(folder), device="cpu"))
    s3_server.create_bucket("inpainting-images")
    env = {"S3_BUCKET": "inpainting-images", "S3_ENDPOINT_URL": s3_server.endpoint_url, "S3_REGION": "us-east-1"}
    with launched_app(folder, tmp_path_factory.mktemp("inpainting-app"), env=env) as app:
        yield Served("sd", app, loaded)


def test_an_inpainting_model_opens_its_picture_section_asks_for_both_and_equals_its_pipeline(
    inpainting_app: Served, tmp_path: Path
) -> None:
    """The page opens with the picture and mask section open and saying they are required; a prompt
    alone is refused naming init_image; a picture and a mask give ``StableDiffusionInpaintPipeline``'s image."""
    app, loaded = inpainting_app.app, inpainting_app.loaded
    config = requests.get(f"{app.url}config", timeout=10).json()
    (section,) = [c for c in config["components"] if c.get("props", {}).get("elem_id") == "pictures"]
    assert section["props"]["open"] is True and section["props"]["label"] == PICTURES_REQUIRED
    api = client(app, tmp_path).view_api(return_format="dict", print_info=False)
    parameters = {p["parameter_name"]: p for p in api["named_endpoints"]["/generate"]["parameters"]}
    assert parameters["strength"]["parameter_default"] == 1.0  # the mask redrawn from noise, as its pipeline does
    fields = {**asked("a mended square", 41, "Euler a"), "width": 64, "height": 64, "strength": 1.0}
    with pytest.raises(Exception, match=r"init_image: is required: this is an inpainting model"):
        client(app, tmp_path).predict(**fields, api_name="/generate")
    start, mask = picture(seed=8), square_mask()
    sent = {"init_image": picture_file(tmp_path, "start.png", start), "mask": picture_file(tmp_path, "mask.png", mask)}
    (record,) = client(app, tmp_path).predict(**fields, **sent, api_name="/generate")[1]["images"]
    wanted = check_inputs({**fields, "init_image": start, "mask": mask}, rules=loaded.family.rules)
    expected = pipeline_image_from_picture(loaded, wanted)[0]
    assert_same_image(fetch_pixels(record["url"]), expected, tolerance=SERVED_TOLERANCE)
