"""LoRA adapters through the launched app: the served PNG equals diffusers with the same adapters,
alone and in one shared step with other adapters, other weights and none; every bad adapter or tag
is an error naming the prompt field, and the requests beside it are untouched."""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import torch
from gradio_client import Client
from safetensors.torch import save_file

from harness.app_server import RunningApp, is_stepping, launched_app
from harness.images import assert_same_image, pipeline_image_with_loras
from harness.servers import S3Server, wait_until
from sd_pipeline.contract.request import GenerationRequest
from sd_pipeline.loras.folder import LoraFolder
from sd_pipeline.loras.random import write_random_lora
from sd_pipeline.model.loading import LoadedPipeline
from sd_pipeline.png import read_png_parameters
from sd_pipeline.versions.__main__ import main as versions_cli
from tests.test_app import fetch_pixels

SERVED_TOLERANCE = 2  # levels of 255, on the served PNG
ASKED: dict[str, Any] = {"negative_prompt": "", "steps": 6, "width": 64, "height": 64, "guidance_scale": 6.0}
SHAPE_MISMATCH = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"


@pytest.fixture(scope="module")
def lora_app(
    tiny_model_dir: Path,
    tiny_lora_dir: Path,
    tiny_sdxl_dir: Path,
    s3_server: S3Server,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[RunningApp]:
    """The tiny SD model served with the two good adapters and four that cannot serve it, and
    ``style``'s file published to the S3 LoRA store as ``s3style``."""
    folder = tmp_path_factory.mktemp("lora-app-adapters")
    for name in ("style", "subject"):
        shutil.copy(tiny_lora_dir / f"{name}.safetensors", folder)
    write_random_lora(tiny_sdxl_dir, folder / "xl_style.safetensors", file_format="peft")  # another family
    save_file(  # SD's key names, wrong shapes
        {
            f"{SHAPE_MISMATCH}.lora_down.weight": torch.ones(4, 999),
            f"{SHAPE_MISMATCH}.lora_up.weight": torch.ones(64, 4),
        },
        str(folder / "misfit.safetensors"),
    )
    (folder / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    s3_server.create_bucket("lora-images")
    store = ["--endpoint-url", s3_server.endpoint_url, "publish-lora", str(tiny_lora_dir / "style.safetensors")]
    store += ["s3://lora-store/loras", "--name", "s3style", "--version", "v1", "--promote", "--create-bucket"]
    assert versions_cli(store) == 0
    env = {"S3_BUCKET": "lora-images", "S3_ENDPOINT_URL": s3_server.endpoint_url, "S3_REGION": "us-east-1"}
    env |= {"LORA_DIR": str(folder), "LORA_S3": "s3://lora-store/loras", "SD_WARMUP": "false"}
    with launched_app(tiny_model_dir, tmp_path_factory.mktemp("lora-app"), env=env) as app:
        yield app


def client(app: RunningApp, folder: Path) -> Client:
    return Client(app.url, verbose=False, download_files=str(folder))


def asked(prompt: str, seed: int, **fields: Any) -> dict[str, Any]:
    return {"prompt": prompt, "seed": seed, "scheduler": "Euler a", "num_images": 1, **ASKED, **fields}


def served_matches_diffusers(oracle: LoadedPipeline, result: dict[str, Any], fields: dict[str, Any]) -> bytes:
    (record,) = result["images"]
    expected = pipeline_image_with_loras(oracle, GenerationRequest(**fields))
    assert_same_image(fetch_pixels(record["url"]), expected, tolerance=SERVED_TOLERANCE)
    return requests.get(record["url"], timeout=10).content


def test_adapters_per_request_equal_diffusers_alone_and_sharing_steps(
    lora_app: RunningApp, lora_oracle: LoadedPipeline, tiny_lora_dir: Path, tmp_path: Path
) -> None:
    alone = asked("a red circle <lora:style:0.8>", 21)
    _, result = client(lora_app, tmp_path / "alone").predict(**alone, api_name="/generate")
    png = served_matches_diffusers(lora_oracle, result, alone)
    folder = LoraFolder(tiny_lora_dir)
    assert read_png_parameters(png).lora_hashes == f"style: {folder.hash_of('style')}"
    assert result["images"][0]["lora_hashes"] == f"style: {folder.hash_of('style')}"

    images_before = lora_app.metric("sdapp_batch_size_images_sum")
    calls_before = lora_app.metric("sdapp_batch_size_images_count")
    long = asked("a long one <lora:subject:0.5>", 1, steps=100, num_images=2)
    running = client(lora_app, tmp_path / "long").submit(**long, api_name="/generate")
    wait_until(lambda: is_stepping(running), timeout=120)
    joiners = [
        asked("a blue square <lora:subject:1.2>", 22),  # the same adapter at another weight
        asked("a green triangle <lora:style:-0.7> <lora:subject:0.4>", 23),  # two adapters
        asked("a plain square", 24),  # none
    ]
    jobs = [client(lora_app, tmp_path / str(n)).submit(**f, api_name="/generate") for n, f in enumerate(joiners)]
    for job, fields in zip(jobs, joiners, strict=True):
        served_matches_diffusers(lora_oracle, job.result(timeout=120)[1], fields)
    served_matches_diffusers(lora_oracle, {"images": running.result(timeout=120)[1]["images"][:1]}, long)
    image_steps = lora_app.metric("sdapp_batch_size_images_sum") - images_before
    calls = lora_app.metric("sdapp_batch_size_images_count") - calls_before
    assert image_steps == 100 * 2 + 3 * 6 and calls < 100 + 3 * 6  # the joiners rode the long request's calls
    assert lora_app.metric("sdapp_lora_load_seconds_count") == 2  # each adapter loaded once
    assert lora_app.metric("sdapp_lora_cache_hits_total") >= 3
    assert lora_app.metric("sdapp_lora_cache_adapters") == 2


@pytest.mark.parametrize(
    ("prompt", "says"),
    [
        ("a <lora:styel:1>", "prompt: names LoRA 'styel', which is not available; did you mean style"),
        ("a <lora:style:1", "prompt: has a <lora: tag that is not closed with '>'"),
        ("a <lora:style:9>", "prompt: LoRA weight of 'style' must be from -4 to 4, got 9"),
        ("a <lora:../style>", "prompt: LoRA name '../style' must be a plain name"),
        ("a <lora:xl_style>", "prompt: LoRA 'xl_style' is for sdxl models; the served model is sd"),
        ("a <lora:misfit>", "prompt: LoRA 'misfit' cannot be used with this model: its layers' shapes differ"),
        ("a <lora:broken>", "prompt: LoRA 'broken' cannot be used with this model: its file is not a readable"),
    ],
)
def test_a_bad_adapter_is_an_error_naming_the_prompt_and_its_neighbour_is_untouched(
    lora_app: RunningApp, lora_oracle: LoadedPipeline, tmp_path: Path, prompt: str, says: str
) -> None:
    fields = asked("a neighbour <lora:style:0.9>", 5, steps=60)
    neighbour = client(lora_app, tmp_path / "neighbour").submit(**fields, api_name="/generate")
    # Running, or already done on a fast machine (the tiny model's steps take milliseconds, so the
    # status poll can miss them all): either way the bad request must leave it as diffusers draws it.
    wait_until(lambda: is_stepping(neighbour) or neighbour.done(), timeout=120)
    with pytest.raises(Exception, match=re.escape(says)):
        client(lora_app, tmp_path / "bad").predict(**asked(prompt, 1), api_name="/generate")
    served_matches_diffusers(lora_oracle, neighbour.result(timeout=120)[1], fields)


def test_the_api_lists_the_adapters_with_their_family_and_tag(lora_app: RunningApp, tmp_path: Path) -> None:
    listing = client(lora_app, tmp_path).predict(api_name="/loras")
    entries = {entry["name"]: entry for entry in listing["loras"]}
    assert listing["served_family"] == "sd"
    assert set(entries) == {"style", "subject", "xl_style", "misfit", "broken", "s3style"}
    assert entries["style"] == {"name": "style", "family": "sd", "usable": True, "tag": "<lora:style:1>"}
    assert entries["s3style"] == {"name": "s3style", "family": "sd", "usable": True, "tag": "<lora:s3style:1>"}
    assert entries["xl_style"]["family"] == "sdxl" and not entries["xl_style"]["usable"]


def test_an_adapter_from_the_s3_lora_store_is_served_equal_to_diffusers(
    lora_app: RunningApp, lora_oracle: LoadedPipeline, tiny_lora_dir: Path, tmp_path: Path
) -> None:
    fields = asked("a red circle <lora:s3style:0.7>", 31)
    _, result = client(lora_app, tmp_path).predict(**fields, api_name="/generate")
    served_matches_diffusers(lora_oracle, result, {**fields, "prompt": "a red circle <lora:style:0.7>"})  # its file
    assert result["images"][0]["lora_hashes"] == f"s3style: {LoraFolder(tiny_lora_dir).hash_of('style')}"
