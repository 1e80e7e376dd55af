"""Model families on the one step engine: each family's requests equal its diffusers pipeline's own call.

The family is read from the folder's ``model_index.json``; a class no family serves is refused
at load in one line. Tiny pipelines with random weights stand for the real models (no download).
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from harness.images import (
    BATCHED_TOLERANCE,
    assert_same_image,
    each_equals_itself_alone,
    max_difference,
    pipeline_image,
)
from sd_pipeline.__main__ import main as cli_main
from sd_pipeline.backends.tokens import token_budget
from sd_pipeline.contract.errors import GenerationCancelledError, InvalidRequestError, ModelLoadError
from sd_pipeline.contract.lifecycle import Request
from sd_pipeline.contract.recommended import recommended_request
from sd_pipeline.contract.request import GenerationRequest, RequestLimits, check_inputs
from sd_pipeline.contract.settings import PipelineSettings
from sd_pipeline.model.engine import StepEngine
from sd_pipeline.model.families.flux import FLUX_LATENT_RGB
from sd_pipeline.model.families.sd3 import SD3_LATENT_RGB
from sd_pipeline.model.families.sdxl import SDXL_LATENT_RGB
from sd_pipeline.model.loading import LoadedPipeline, load_pipeline
from sd_pipeline.model.previews import DecoderPreview, LinearPreview, load_previewer
from sd_pipeline.model.schedulers import SCHEDULER_NAMES, make_scheduler
from sd_pipeline.tiny import build_tiny_pipeline

ROOT = Path(__file__).resolve().parents[1]


def ask(**fields: Any) -> GenerationRequest:
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
        wanted = ask(scheduler=scheduler, num_images=2, negative_prompt=negative)
        ours = [result.image for result in engine.generate([wanted])[0]]
        for got, expected in zip(ours, pipeline_image(sdxl_loaded, wanted), strict=True):
            assert_same_image(got, expected)
    other = pipeline_image(sdxl_loaded, ask(scheduler=scheduler, seed=8))[0]
    assert max_difference(ours[0], other) > 10  # the comparison can fail


def test_sdxl_zeroes_an_empty_negative_prompt_rather_than_encoding_it(sdxl_loaded: LoadedPipeline) -> None:
    wanted = ask(scheduler="Euler")
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
    wanted = [
        ask(scheduler="Euler", steps=6),
        ask(scheduler="DPM++ 2M Karras", seed=3, prompt="a blue square", guidance_scale=1.0),
        ask(scheduler="Euler a", seed=4, width=64, height=96, negative_prompt="dark"),
    ]
    each_equals_itself_alone(
        sdxl_loaded, wanted, late=ask(scheduler="UniPC", seed=5, steps=4, prompt="a green triangle")
    )


@pytest.mark.parametrize("scheduler", SCHEDULER_NAMES)
def test_sd2_v_prediction_keeps_its_prediction_type_and_equals_the_pipeline(
    sd2_loaded: LoadedPipeline, scheduler: str
) -> None:
    assert sd2_loaded.family.name == "sd" and sd2_loaded.native_size == 768
    built = make_scheduler(scheduler, sd2_loaded.pipeline.scheduler.config)
    assert built.config.prediction_type == "v_prediction"
    wanted = ask(scheduler=scheduler, negative_prompt="blurry")
    ours = StepEngine(sd2_loaded).generate([wanted])[0][0].image
    assert_same_image(ours, pipeline_image(sd2_loaded, wanted)[0])


@pytest.mark.parametrize(("sampler", "negative"), [("Euler", ""), ("Euler", "blurry"), ("DPM++ 2M", "blurry")])
def test_an_sd3_request_alone_equals_the_sd3_pipeline_call(
    sd3_loaded: LoadedPipeline, sampler: str, negative: str
) -> None:
    assert (sd3_loaded.family.name, sd3_loaded.family.samplers, sd3_loaded.native_size) == (
        "sd3",
        ("Euler", "DPM++ 2M"),
        256,
    )
    wanted = ask(scheduler=sampler, num_images=2, negative_prompt=negative)
    ours = [result.image for result in StepEngine(sd3_loaded).generate([wanted])[0]]
    for got, expected in zip(ours, pipeline_image(sd3_loaded, wanted), strict=True):
        assert_same_image(got, expected)
    assert max_difference(ours[0], pipeline_image(sd3_loaded, ask(scheduler="Euler", seed=8))[0]) > 10


def test_sd3_requests_sharing_steps_each_equal_themselves_alone(sd3_loaded: LoadedPipeline) -> None:
    """Flow matching keeps each request's sigmas in its own scheduler: other prompts, seeds, step
    counts, guidance on and off and a second size share steps; one joins after two steps."""
    wanted = [
        ask(scheduler="Euler", steps=6),
        ask(scheduler="Euler", seed=3, prompt="a blue square", guidance_scale=1.0),
        ask(scheduler="Euler", seed=4, width=64, height=96, negative_prompt="dark", steps=4),
    ]
    each_equals_itself_alone(
        sd3_loaded, wanted, late=ask(scheduler="Euler", seed=5, steps=3, prompt="a green triangle")
    )


def test_a_sampler_or_size_the_family_cannot_use_is_refused_by_field(sd3_loaded: LoadedPipeline) -> None:
    rules = sd3_loaded.describe().rules  # what the web process learns from the worker
    assert (rules.samplers, rules.size_multiple, rules.guidance) == (("Euler", "DPM++ 2M"), 16, "cfg")
    with pytest.raises(
        InvalidRequestError, match=r"must be one of Euler, DPM\+\+ 2M \(this model's samplers\); got 'DDIM'"
    ):
        check_inputs({"prompt": "a cat", "scheduler": "DDIM"}, rules=rules)
    with pytest.raises(InvalidRequestError, match=r"^height: must be a multiple of 16 from 64 to 1024, got 72"):
        check_inputs({"prompt": "a cat", "height": 72}, rules=rules)  # SD 1.x takes it: 72 = 9 x 8
    assert check_inputs({"prompt": "a cat", "height": 72}).height == 72
    assert check_inputs({"prompt": "a cat"}, rules=rules).scheduler == "Euler"  # the family's default
    assert recommended_request(RequestLimits(), native_size=256, rules=rules).scheduler == "Euler"


@pytest.mark.parametrize(("family", "factors"), [("sd3", SD3_LATENT_RGB), ("flux", FLUX_LATENT_RGB)])
def test_flow_matching_approx_previews_map_the_unpacked_latents_with_their_published_factors(
    request: pytest.FixtureRequest, family: str, factors: tuple[tuple[float, float, float], ...]
) -> None:
    """InvokeAI's 16-channel factors, on the x0 latents as the transformer sees them (FLUX.1's
    unpacked first): each preview is that map of what the previewer was given, at the latents' size."""
    loaded: LoadedPipeline = request.getfixturevalue(f"{family}_loaded")
    previewer = load_previewer(PipelineSettings(preview="approx"), loaded)
    assert isinstance(previewer, LinearPreview) and torch.equal(previewer.factors, torch.tensor(factors))
    rendered: list[torch.Tensor] = []
    render = previewer.render

    def recording_render(latents: torch.Tensor) -> list[bytes]:
        rendered.append(latents.clone())
        return render(latents)

    previewer.render = recording_render  # type: ignore[method-assign]
    seen: list[Any] = []
    engine = StepEngine(loaded, previewer=previewer, preview_interval=0.0)
    outcome = engine.run([Request(ask(scheduler="Euler", steps=4), on_preview=seen.append)])[0]
    assert outcome.error is None and len(seen) == len(rendered) == 3
    for latents, preview in zip(rendered, seen, strict=True):
        assert latents.shape == (1, 16, 8, 8)
        wanted = torch.einsum("nchw,cr->nhwr", latents, torch.tensor(factors))[0]
        wanted = ((wanted + 1) / 2).clamp(0, 1) * 255
        got = torch.from_numpy(np.asarray(Image.open(io.BytesIO(preview.image)).convert("RGB"), dtype=np.float32))
        assert got.shape == (8, 8, 3) and (got - wanted).abs().max() <= 1


def test_a_family_without_factors_previews_with_its_vae(
    sd3_loaded: LoadedPipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(type(sd3_loaded.family), "latent_rgb", None)
    previewer = load_previewer(PipelineSettings(preview="approx"), sd3_loaded)
    assert isinstance(previewer, DecoderPreview) and previewer.decoder is sd3_loaded.pipeline.vae
    engine = StepEngine(sd3_loaded, previewer=previewer, preview_interval=0.0)
    seen: list[Any] = []
    outcome = engine.run([Request(ask(scheduler="Euler", steps=6), on_preview=seen.append)])[0]
    assert outcome.error is None and len(seen) == 5
    # The last preview (x0 predicted one step from the end) is close to the final image.
    final = np.asarray(outcome.results[0].image.convert("RGB"), dtype=np.float32)
    last = np.asarray(seen[-1].picture().convert("RGB").resize((64, 64)), dtype=np.float32)
    first = np.asarray(seen[0].picture().convert("RGB").resize((64, 64)), dtype=np.float32)
    assert np.abs(last - final).mean() < np.abs(first - final).mean()


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_a_tiny_decoder_for_16_channel_latents_decodes_them_as_diffusers_would_as_the_vae(
    request: pytest.FixtureRequest, family: str, tmp_path: Path
) -> None:
    """taesd3 / taef1 through SD_PREVIEW_DECODER: the unpacked latents, divided by the decoder's own
    scaling factor plus its shift factor (what a diffusers pipeline with it as its VAE does); random
    weights and factors other than 1 and 0, so a decoder input that ignored them would differ."""
    from diffusers import AutoencoderTiny

    loaded: LoadedPipeline = request.getfixturevalue(f"{family}_loaded")
    blocks = {"encoder_block_out_channels": (8,) * 4, "decoder_block_out_channels": (8,) * 4}
    AutoencoderTiny(latent_channels=16, scaling_factor=0.6, shift_factor=0.1, **blocks).save_pretrained(
        tmp_path / "taesd"
    )
    previewer = load_previewer(PipelineSettings(preview="taesd", preview_decoder=str(tmp_path / "taesd")), loaded)
    assert isinstance(previewer, DecoderPreview)
    rendered: list[torch.Tensor] = []
    decoded: list[torch.Tensor] = []
    render, decode = previewer.render, previewer.decoder.decode

    def recording_render(latents: torch.Tensor) -> list[bytes]:
        rendered.append(latents.clone())
        return render(latents)

    def recording_decode(latents: torch.Tensor, **kwargs: Any) -> Any:
        decoded.append(latents.clone())
        return decode(latents, **kwargs)

    previewer.render, previewer.decoder.decode = recording_render, recording_decode  # type: ignore[method-assign]
    engine = StepEngine(loaded, previewer=previewer, preview_interval=0.0)
    seen: list[Any] = []
    outcome = engine.run([Request(ask(scheduler="Euler", steps=4), on_preview=seen.append)])[0]
    assert outcome.error is None and len(seen) == 3 and len(rendered) == len(decoded) == 3
    for latents, decoder_input in zip(rendered, decoded, strict=True):
        assert latents.shape == (1, 16, 8, 8)  # spatial: FLUX.1's 2x2 packing undone
        assert torch.allclose(decoder_input, latents / 0.6 + 0.1)
    assert {preview.picture().size for preview in seen} == {(64, 64)}


def test_flux_dev_alone_equals_the_flux_pipeline_and_its_guidance_is_distilled(flux_loaded: LoadedPipeline) -> None:
    rules = flux_loaded.family.rules
    assert (flux_loaded.family.name, rules.samplers, rules.size_multiple, rules.guidance) == (
        "flux",
        ("Euler", "DPM++ 2M"),
        16,
        "distilled",
    )
    assert flux_loaded.native_size == 1024  # diffusers' default_sample_size x the VAE factor
    engine = StepEngine(flux_loaded)
    images = {}
    for guidance in (1.0, 3.5):
        wanted = ask(scheduler="Euler", num_images=2, width=64, height=96, guidance_scale=guidance)
        ours = [result.image for result in engine.generate([wanted])[0]]
        for got, expected in zip(ours, pipeline_image(flux_loaded, wanted), strict=True):
            assert_same_image(got, expected)
        images[guidance] = ours[0]
    assert max_difference(images[1.0], images[3.5]) > 2  # the embedding changes the picture


@pytest.mark.parametrize(("sampler", "negative"), [("Euler", "blurry, dark"), ("DPM++ 2M", "")])
def test_flux_true_cfg_equals_the_flux_pipeline_with_true_cfg_scale(
    flux_loaded: LoadedPipeline, sampler: str, negative: str
) -> None:
    """true_cfg_scale > 1: a second transformer pass with the negative prompt as written ("" too, as
    diffusers takes an explicit empty one), mixed as classifier-free guidance mixes them."""
    assert flux_loaded.family.rules.true_cfg
    engine = StepEngine(flux_loaded)
    wanted = ask(scheduler=sampler, num_images=2, guidance_scale=3.5, true_cfg_scale=4.0, negative_prompt=negative)
    ours = [result.image for result in engine.generate([wanted])[0]]
    for got, expected in zip(ours, pipeline_image(flux_loaded, wanted), strict=True):
        assert_same_image(got, expected)
    plain = engine.generate([replace(wanted, true_cfg_scale=1.0)])[0][0].image
    assert max_difference(ours[0], plain) > 2  # the negative pass changes the picture


def test_flux_true_cfg_requests_share_steps_with_plain_ones_each_equal_itself_alone(
    flux_loaded: LoadedPipeline,
) -> None:
    wanted = [
        ask(scheduler="Euler", steps=5, true_cfg_scale=3.0, negative_prompt="blurry"),
        ask(scheduler="Euler", seed=3, prompt="a blue square", negative_prompt="ignored without true CFG"),
    ]
    late = ask(scheduler="Euler", seed=5, steps=3, prompt="a green triangle", true_cfg_scale=2.0)
    each_equals_itself_alone(flux_loaded, wanted, late=late)


def test_true_cfg_is_refused_naming_the_field_where_the_family_has_none(
    tiny_loaded: LoadedPipeline, flux_loaded: LoadedPipeline
) -> None:
    fields = {"prompt": "a cat", "width": 64, "height": 64, "true_cfg_scale": 4}
    with pytest.raises(InvalidRequestError, match=r"true_cfg_scale: must be 1: this model \(sd\) has no true CFG"):
        check_inputs(fields, rules=tiny_loaded.family.rules)
    with pytest.raises(InvalidRequestError, match=r"true_cfg_scale: must be from 1 to 30, got 0\.5"):
        check_inputs({**fields, "true_cfg_scale": 0.5}, rules=flux_loaded.family.rules)
    assert check_inputs(fields, rules=flux_loaded.family.rules).true_cfg_scale == 4.0


def test_flux_schnell_ignores_guidance(tmp_path: Path) -> None:
    folder = build_tiny_pipeline(tmp_path / "schnell", family="flux-schnell")
    loaded = load_pipeline(PipelineSettings(model=str(folder), device="cpu"))
    assert loaded.family.rules.guidance == "none"
    engine = StepEngine(loaded)
    low, high = (engine.generate([ask(scheduler="Euler", guidance_scale=g)])[0][0].image for g in (1.0, 9.0))
    assert_same_image(low, high, tolerance=0)
    assert_same_image(low, pipeline_image(loaded, ask(scheduler="Euler"))[0])


def test_flux_requests_sharing_steps_each_equal_themselves_alone(flux_loaded: LoadedPipeline) -> None:
    """Packed latents of several requests in one transformer call, each with its own guidance
    embedding, timestep and sigmas; a second size steps apart; one joins after two steps."""
    wanted = [
        ask(scheduler="Euler", steps=6, guidance_scale=3.5),
        ask(scheduler="Euler", seed=3, prompt="a blue square", guidance_scale=1.0),
        ask(scheduler="Euler", seed=4, width=64, height=96, steps=4),
    ]
    each_equals_itself_alone(
        flux_loaded, wanted, late=ask(scheduler="Euler", seed=5, steps=3, prompt="a green triangle", guidance_scale=5.0)
    )


def test_a_preview_decoder_for_other_latents_is_refused_at_start(sd3_loaded: LoadedPipeline, tmp_path: Path) -> None:
    from diffusers import AutoencoderTiny

    AutoencoderTiny(encoder_block_out_channels=(8,) * 4, decoder_block_out_channels=(8,) * 4).save_pretrained(
        tmp_path / "taesd"
    )  # SD 1.x's 4 latent channels
    settings = PipelineSettings(preview="taesd", preview_decoder=str(tmp_path / "taesd"))
    with pytest.raises(ModelLoadError, match=r"reads 4-channel latents but Stable Diffusion 3 / 3.5 makes 16-channel"):
        load_previewer(settings, sd3_loaded)


def test_sdxl_previews_use_its_latent_format(sdxl_loaded: LoadedPipeline) -> None:
    previewer = LinearPreview.for_model(sdxl_loaded)
    assert torch.allclose(previewer.factors, torch.tensor(SDXL_LATENT_RGB))
    engine = StepEngine(sdxl_loaded, previewer=previewer, preview_interval=0.0)
    seen: list[Any] = []
    job = Request(ask(steps=6), on_preview=seen.append)
    outcome = engine.run([job])[0]
    assert outcome.error is None and len(seen) == 5  # every step but the last
    assert all(preview.image.startswith(b"\x89PNG") for preview in seen)


def unservable_copy(source: Path, folder: Path, pipeline_class: str) -> Path:
    shutil.copytree(source, folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": pipeline_class}))
    return folder


def test_a_pipeline_no_family_serves_is_refused_in_one_line(tiny_model_dir: Path, tmp_path: Path) -> None:
    folder = unservable_copy(tiny_model_dir, tmp_path / "pixart", "PixArtSigmaPipeline")
    with pytest.raises(ModelLoadError) as refused:
        load_pipeline(PipelineSettings(model=str(folder), device="cpu"))
    message = str(refused.value)
    assert "\n" not in message and "PixArtSigmaPipeline" in message
    assert all(
        name in message for name in ("StableDiffusionPipeline", "StableDiffusionXLPipeline", "StableDiffusion3Pipeline")
    )
    cli = subprocess.run(
        [sys.executable, "-m", "sd_pipeline", "--model", str(folder), "--out", str(tmp_path / "out"), "a cat"],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert cli.returncode == 2 and "Traceback" not in cli.stderr
    assert f"error: cannot serve model '{folder}': its pipeline is PixArtSigmaPipeline" in cli.stderr


@pytest.mark.parametrize("family", ["sdxl", "sd3", "flux"])
def test_out_of_memory_splits_and_a_cancel_leaves_the_others_as_they_were(
    request: pytest.FixtureRequest, family: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The engine's recovery works on every family's denoiser: out of memory, the group is halved
    and then one request's rows split; a neighbour cancelled mid-run changes nobody's image."""
    loaded: LoadedPipeline = request.getfixturevalue(f"{family}_loaded")
    sampler = loaded.family.rules.default_sampler
    denoiser = loaded.family.denoiser
    real_forward = denoiser.forward
    rows: list[int] = []

    def one_row_at_a_time(*args: Any, **kwargs: Any) -> Any:
        batch = args[0] if args else kwargs["hidden_states"]
        rows.append(batch.shape[0])
        if batch.shape[0] > 1:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(denoiser, "forward", one_row_at_a_time)
    engine = StepEngine(loaded)
    wanted = [ask(scheduler=sampler, seed=seed, steps=3) for seed in (1, 2)]
    kept, doomed = Request(wanted[0]), Request(ask(scheduler=sampler, seed=9, steps=8, num_images=2))
    tried = Request(wanted[1])
    outcomes = {}
    for job in (kept, doomed, tried):
        engine.submit(job, lambda outcome, job=job: outcomes.__setitem__(id(job), outcome))
    engine.step()
    doomed.cancel()
    engine.run_until_idle()
    monkeypatch.setattr(denoiser, "forward", real_forward)
    assert isinstance(outcomes[id(doomed)].error, GenerationCancelledError)
    assert max(rows) > 1 and rows.count(1) > 0  # tried together, then one row per call
    for job, asked in zip((kept, tried), wanted, strict=True):
        got = outcomes[id(job)].results[0].image
        assert_same_image(got, pipeline_image(loaded, asked)[0], tolerance=BATCHED_TOLERANCE)


def test_the_simulated_accelerator_paces_a_transformer_and_changes_no_picture(
    flux_loaded: LoadedPipeline, tiny_flux_dir: Path
) -> None:
    settings = PipelineSettings(model=str(tiny_flux_dir), device="cpu", simulated_gpu="unet=1+0.5*n,vae=1*n")
    simulated = load_pipeline(settings)
    wanted = [ask(scheduler="Euler", steps=3, num_images=2), ask(scheduler="Euler", steps=2, seed=4)]
    paced = StepEngine(simulated).generate(wanted)
    real = StepEngine(flux_loaded).generate(wanted)
    for ours, theirs in zip(paced, real, strict=True):
        for image, expected in zip(ours, theirs, strict=True):
            assert_same_image(image.image, expected.image)
    assert simulated.describe().simulated == "unet=1+0.5*n,vae=1*n"


def test_sd3_runs_without_t5_when_told_or_when_its_folder_has_none(
    sd3_loaded: LoadedPipeline, tiny_sd3_dir: Path, tmp_path: Path
) -> None:
    assert sd3_loaded.pipeline.text_encoder_3 is not None  # the tiny SD3 ships T5, as SD3 does
    without = load_pipeline(PipelineSettings(model=str(tiny_sd3_dir), device="cpu", t5_encoder=False))
    assert without.pipeline.text_encoder_3 is None and without.pipeline.tokenizer_3 is None
    wanted = ask(scheduler="Euler")
    ours = StepEngine(without).generate([wanted])[0][0].image
    assert_same_image(ours, pipeline_image(without, wanted)[0])  # diffusers' own pipeline, T5 left out
    assert max_difference(ours, StepEngine(sd3_loaded).generate([wanted])[0][0].image) > 2  # T5 mattered
    folder = build_tiny_pipeline(tmp_path / "no-t5", family="sd3-no-t5")
    assert load_pipeline(PipelineSettings(model=str(folder), device="cpu")).pipeline.text_encoder_3 is None


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_the_flow_samplers_solve_the_same_flow(request: pytest.FixtureRequest, family: str) -> None:
    """Euler and DPM++ 2M read the prediction as the same velocity: with many steps their pictures
    meet (a sign or prediction-type mistake would not), while another seed stays far away."""
    loaded: LoadedPipeline = request.getfixturevalue(f"{family}_loaded")
    engine = StepEngine(loaded)

    def pixels(sampler: str, seed: int = 3) -> np.ndarray:
        image = engine.generate([ask(scheduler=sampler, steps=40, seed=seed, guidance_scale=1.0)])[0][0].image
        return np.asarray(image, dtype=np.float32)

    euler = pixels("Euler")
    assert np.abs(euler - pixels("DPM++ 2M")).mean() < 2.0
    assert np.abs(euler - pixels("Euler", seed=4)).mean() > 20.0


LONG_PROMPT = "a red circle above a blue square beside a green triangle, " * 3  # ~120 CLIP tokens here


def test_sd3_and_flux_prompts_are_measured_by_t5_and_equal_diffusers_past_clips_77_tokens(
    tiny_model_dir: Path,
    tiny_sd3_dir: Path,
    tiny_flux_dir: Path,
    sd3_loaded: LoadedPipeline,
    flux_loaded: LoadedPipeline,
    tmp_path: Path,
) -> None:
    """A prompt longer than CLIP's 77 tokens is refused where CLIP alone reads it (SD, SD3 without
    T5) and served where T5 reads it (SD3 256, FLUX.1 512 tokens), equal to diffusers, which gives
    CLIP the first 77; past T5's length it is refused naming the length."""
    budget = {
        "sd": token_budget(PipelineSettings(model=str(tiny_model_dir))),
        "sd3-no-t5": token_budget(PipelineSettings(model=str(tiny_sd3_dir), t5_encoder=False)),
        "sd3": token_budget(PipelineSettings(model=str(tiny_sd3_dir))),
        "flux": token_budget(PipelineSettings(model=str(tiny_flux_dir))),
    }
    assert {name: tokens.limit for name, tokens in budget.items()} == {
        "sd": 77,
        "sd3-no-t5": 77,
        "sd3": 256,
        "flux": 512,
    }
    fields = {"prompt": LONG_PROMPT, "width": 64, "height": 64, "steps": 4, "scheduler": "Euler", "seed": 3}
    for clip_only in ("sd", "sd3-no-t5"):
        with pytest.raises(InvalidRequestError, match=r"^prompt: is \d+ tokens long but the model reads at most 77"):
            check_inputs({**fields, "scheduler": "Euler a"}, tokens=budget[clip_only])
    for name, loaded in (("sd3", sd3_loaded), ("flux", flux_loaded)):
        wanted = check_inputs(fields, tokens=budget[name], rules=loaded.family.rules)
        assert_same_image(StepEngine(loaded).generate([wanted])[0][0].image, pipeline_image(loaded, wanted)[0])
        limit = budget[name].limit
        with pytest.raises(
            InvalidRequestError, match=rf"^prompt: is \d+ tokens long but the model reads at most {limit}"
        ):
            check_inputs({**fields, "prompt": "x" * (limit + 1)}, tokens=budget[name], rules=loaded.family.rules)
    common = ["--model", str(tiny_flux_dir), "--steps", "2", "--width", "64", "--height", "64"]
    assert cli_main([*common, "--out", str(tmp_path / "cli"), LONG_PROMPT]) == 0  # the command line measures alike
    assert len(list((tmp_path / "cli").glob("*.png"))) == 1
