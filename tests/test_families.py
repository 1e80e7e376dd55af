"""Model families on the one step engine: each family's requests equal its diffusers pipeline's own call.

The family is read from the folder's ``model_index.json``; a class no family serves is refused
at load in one line. Tiny pipelines with random weights stand for the real models (no download).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from harness.images import assert_same_image, max_difference, pipeline_image
from sd_pipeline.contract.errors import ModelLoadError
from sd_pipeline.contract.lifecycle import Request
from sd_pipeline.contract.request import GenerationRequest
from sd_pipeline.contract.settings import PipelineSettings
from sd_pipeline.model.engine import StepEngine
from sd_pipeline.model.families.sdxl import SDXL_LATENT_RGB
from sd_pipeline.model.loading import LoadedPipeline, load_pipeline
from sd_pipeline.model.previews import LinearPreview
from sd_pipeline.model.schedulers import SCHEDULER_NAMES, make_scheduler
from sd_pipeline.tiny import build_tiny_pipeline

BATCHED_TOLERANCE = 2  # levels of 255: the same request in a different batch
ROOT = Path(__file__).resolve().parents[1]


def request(**fields: Any) -> GenerationRequest:
    defaults: dict[str, Any] = {"prompt": "a red circle", "steps": 5, "width": 64, "height": 64, "seed": 7}
    return GenerationRequest(**{**defaults, **fields})


@pytest.fixture(scope="module")
def sd2_loaded(tmp_path_factory: pytest.TempPathFactory) -> LoadedPipeline:
    folder = build_tiny_pipeline(tmp_path_factory.mktemp("tiny-sd2"), family="sd2")
    return load_pipeline(PipelineSettings(model=str(folder), device="cpu"))


def test_the_family_is_read_from_the_folder(tiny_loaded: LoadedPipeline, sdxl_loaded: LoadedPipeline) -> None:
    assert (tiny_loaded.family.name, type(tiny_loaded.pipeline).__name__) == ("sd", "StableDiffusionPipeline")
    assert (sdxl_loaded.family.name, type(sdxl_loaded.pipeline).__name__) == ("sdxl", "StableDiffusionXLPipeline")
    assert sdxl_loaded.describe().family == "sdxl"


@pytest.mark.parametrize("scheduler", SCHEDULER_NAMES)
def test_an_sdxl_request_alone_equals_the_sdxl_pipeline_call(sdxl_loaded: LoadedPipeline, scheduler: str) -> None:
    engine = StepEngine(sdxl_loaded)
    for negative in ("", "blurry"):  # an empty negative prompt is zeros (force_zeros_for_empty_prompt)
        wanted = request(scheduler=scheduler, num_images=2, negative_prompt=negative)
        ours = [result.image for result in engine.generate([wanted])[0]]
        for got, expected in zip(ours, pipeline_image(sdxl_loaded, wanted), strict=True):
            assert_same_image(got, expected)
    other = pipeline_image(sdxl_loaded, request(scheduler=scheduler, seed=8))[0]
    assert max_difference(ours[0], other) > 10  # the comparison can fail


def test_sdxl_zeroes_an_empty_negative_prompt_rather_than_encoding_it(sdxl_loaded: LoadedPipeline) -> None:
    wanted = request(scheduler="Euler")
    ours = StepEngine(sdxl_loaded).generate([wanted])[0][0].image
    pipeline = sdxl_loaded.pipeline
    pipeline.scheduler = make_scheduler("Euler", pipeline.scheduler.config)
    encoded_empty = pipeline(
        prompt="a red circle", negative_prompt="", width=64, height=64, num_inference_steps=5,
        generator=torch.Generator("cpu").manual_seed(7),
    ).images[0]  # fmt: skip
    assert max_difference(ours, encoded_empty) > 2


def test_sdxl_requests_sharing_steps_each_equal_themselves_alone(sdxl_loaded: LoadedPipeline) -> None:
    """Other prompts, seeds, samplers, guidance and a second size share steps; one joins after two steps."""
    engine = StepEngine(sdxl_loaded, max_batch_images=8)
    wanted = [
        request(scheduler="Euler", steps=6),
        request(scheduler="DPM++ 2M Karras", seed=3, prompt="a blue square", guidance_scale=1.0),
        request(scheduler="Euler a", seed=4, width=64, height=96, negative_prompt="dark"),
    ]
    late = request(scheduler="UniPC", seed=5, steps=4, prompt="a green triangle")
    outcomes: dict[int, Any] = {}
    jobs = [Request(r) for r in wanted]
    for job in jobs:
        engine.submit(job, lambda outcome, job=job: outcomes.__setitem__(id(job), outcome))
    engine.step()
    engine.step()
    jobs.append(Request(late))
    engine.submit(jobs[-1], lambda outcome: outcomes.__setitem__(id(jobs[-1]), outcome))
    engine.run_until_idle()
    for job, asked in zip(jobs, [*wanted, late], strict=True):
        outcome = outcomes[id(job)]
        assert outcome.error is None, outcome.error
        assert_same_image(outcome.results[0].image, pipeline_image(sdxl_loaded, asked)[0], tolerance=BATCHED_TOLERANCE)
    assert max(result.timings.batch_images for job in jobs for result in outcomes[id(job)].results) >= 3


@pytest.mark.parametrize("scheduler", SCHEDULER_NAMES)
def test_sd2_v_prediction_keeps_its_prediction_type_and_equals_the_pipeline(
    sd2_loaded: LoadedPipeline, scheduler: str
) -> None:
    assert sd2_loaded.family.name == "sd" and sd2_loaded.native_size == 768
    built = make_scheduler(scheduler, sd2_loaded.pipeline.scheduler.config)
    assert built.config.prediction_type == "v_prediction"
    wanted = request(scheduler=scheduler, negative_prompt="blurry")
    ours = StepEngine(sd2_loaded).generate([wanted])[0][0].image
    assert_same_image(ours, pipeline_image(sd2_loaded, wanted)[0])


def test_sdxl_previews_use_its_latent_format(sdxl_loaded: LoadedPipeline) -> None:
    previewer = LinearPreview.for_model(sdxl_loaded)
    assert torch.allclose(previewer.factors, torch.tensor(SDXL_LATENT_RGB))
    engine = StepEngine(sdxl_loaded, previewer=previewer, preview_interval=0.0)
    seen: list[Any] = []
    job = Request(request(steps=6), on_preview=seen.append)
    outcome = engine.run([job])[0]
    assert outcome.error is None and len(seen) == 5  # every step but the last
    assert all(preview.image.startswith(b"\x89PNG") for preview in seen)


def unservable_copy(source: Path, folder: Path, pipeline_class: str) -> Path:
    shutil.copytree(source, folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": pipeline_class}))
    return folder


def test_a_pipeline_no_family_serves_is_refused_in_one_line(tiny_model_dir: Path, tmp_path: Path) -> None:
    folder = unservable_copy(tiny_model_dir, tmp_path / "flux", "FluxPipeline")
    with pytest.raises(ModelLoadError) as refused:
        load_pipeline(PipelineSettings(model=str(folder), device="cpu"))
    message = str(refused.value)
    assert "\n" not in message and "FluxPipeline" in message
    assert "StableDiffusionPipeline" in message and "StableDiffusionXLPipeline" in message
    cli = subprocess.run(
        [sys.executable, "-m", "sd_pipeline", "--model", str(folder), "--out", str(tmp_path / "out"), "a cat"],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert cli.returncode == 2 and "Traceback" not in cli.stderr
    assert f"error: cannot serve model '{folder}': its pipeline is FluxPipeline" in cli.stderr
