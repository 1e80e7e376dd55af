"""PNG parameters round-trip, the loader's errors, and the CLI."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sd_pipeline.contract.errors import ModelLoadError
from sd_pipeline.contract.models import DEFAULTS_FILE
from sd_pipeline.contract.request import check_inputs
from sd_pipeline.contract.settings import PipelineSettings
from sd_pipeline.model.engine import StepEngine
from sd_pipeline.model.loading import load_pipeline, resolve_device, resolve_dtype
from sd_pipeline.png import encode_png, format_parameters, parse_parameters, read_png_parameters


def test_png_parameters_round_trip(engine: StepEngine) -> None:
    request = check_inputs(
        {"prompt": "a castle, ink", "negative_prompt": "blurry", "seed": 42, "steps": 3, "width": 64, "height": 72}
    )
    result = engine.generate([request])[0][0]
    data = encode_png(result)
    assert data.startswith(b"\x89PNG")
    parameters = read_png_parameters(data)
    assert parameters.prompt == "a castle, ink"
    assert parameters.negative_prompt == "blurry"
    assert (parameters.steps, parameters.seed, parameters.width, parameters.height) == (3, 42, 64, 72)
    assert parameters.sampler == request.scheduler and parameters.cfg_scale == 7.5
    assert parameters.model == engine.loaded.model


def test_parameters_text_is_automatic1111_format() -> None:
    text = "a cat\nNegative prompt: dog\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x768, Model: m"
    parsed = parse_parameters(text)
    assert (parsed.prompt, parsed.negative_prompt, parsed.sampler, parsed.height) == ("a cat", "dog", "Euler a", 768)
    assert format_parameters(parsed) == text
    published = text.replace("Model: m", "Model hash: 1a2b3c4d5e, Model: m, Model version: v2")
    parsed = parse_parameters(published)
    assert (parsed.model, parsed.model_version, parsed.model_hash) == ("m", "v2", "1a2b3c4d5e")
    assert format_parameters(parsed) == published
    flux = text.replace("CFG scale: 7", "CFG scale: 3.5").replace("Model: m", "Model: m, True CFG scale: 4")
    assert parse_parameters(flux).true_cfg_scale == 4.0 and format_parameters(parse_parameters(flux)) == flux
    assert parse_parameters(text).true_cfg_scale is None  # 1 (off) is not written


def test_missing_local_folder_gives_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "no-model-here"
    with pytest.raises(ModelLoadError, match=f"cannot load model '{missing}': no such folder"):
        load_pipeline(PipelineSettings(model=str(missing), device="cpu"))


def test_folder_without_a_pipeline_gives_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="Set SD_MODEL"):
        load_pipeline(PipelineSettings(model=str(tmp_path), device="cpu"))


def test_unreachable_hub_model_gives_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match=r"cannot load model 'OFA-Sys/small-stable-diffusion-v0'.*Set SD_MODEL"):
        load_pipeline(PipelineSettings(device="cpu"))


def test_loading_measures_time_and_picks_cpu_fp32(tiny_loaded) -> None:  # type: ignore[no-untyped-def]
    assert tiny_loaded.load_seconds > 0
    assert tiny_loaded.device.type == "cpu" and tiny_loaded.dtype == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.float16
    assert resolve_device("cpu").type == "cpu"


def test_the_native_size_is_the_unet_sample_size_times_the_vae_factor(tiny_loaded) -> None:  # type: ignore[no-untyped-def]
    # the tiny random UNet works on 32x32 latents and its VAE shrinks 8x: diffusers' default is 256
    assert tiny_loaded.native_size == 256
    default = tiny_loaded.pipeline.unet.config.sample_size * tiny_loaded.pipeline.vae_scale_factor
    assert tiny_loaded.native_size == default


def test_cli_writes_pngs_from_a_prompts_file(tiny_model_dir: Path, tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red fox\n\na blue bird\n", encoding="utf-8")
    out = tmp_path / "out"
    command = [sys.executable, "-m", "sd_pipeline", "--prompts-file", str(prompts), "--model", str(tiny_model_dir)]
    command += ["--out", str(out), "--seed", "7", "--steps", "2", "--width", "64", "--height", "64"]
    subprocess.run(command, check=True, capture_output=True, timeout=120)
    files = sorted(out.glob("*.png"))
    assert [f.name for f in files] == ["0000-7.png", "0001-7.png"]
    assert read_png_parameters(files[1].read_bytes()).prompt == "a blue bird"


def test_cli_starts_from_the_models_recommendations_at_its_native_size(tiny_model_dir: Path, tmp_path: Path) -> None:
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    (model / DEFAULTS_FILE).write_text(json.dumps({"steps": 2, "guidance_scale": 3.0, "scheduler": "Euler"}))
    out = tmp_path / "out"
    command = [sys.executable, "-m", "sd_pipeline", "a red fox", "--model", str(model), "--out", str(out)]
    subprocess.run([*command, "--seed", "1"], check=True, capture_output=True, timeout=120)
    subprocess.run(
        [*command, "--seed", "2", "--steps", "1", "--width", "64"], check=True, capture_output=True, timeout=120
    )
    recommended = read_png_parameters((out / "0000-1.png").read_bytes())
    assert (recommended.steps, recommended.cfg_scale, recommended.sampler) == (2, 3.0, "Euler")
    assert (recommended.width, recommended.height) == (256, 256)  # the tiny UNet's native size, not 512
    chosen = read_png_parameters((out / "0000-2.png").read_bytes())
    assert (chosen.steps, chosen.cfg_scale, chosen.width, chosen.height) == (1, 3.0, 64, 256)  # flags win


def test_cli_reports_bad_input_by_field(tiny_model_dir: Path, tmp_path: Path) -> None:
    command = [sys.executable, "-m", "sd_pipeline", "hi", "--model", str(tiny_model_dir), "--width", "65"]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert finished.returncode == 2
    assert "error: width: must be a multiple of 8" in finished.stderr
