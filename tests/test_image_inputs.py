"""Image-to-image and inpainting on the one step engine, and input pictures checked before any work.

The oracle is diffusers' own ``StableDiffusionImg2ImgPipeline`` / ``StableDiffusionInpaintPipeline``
built from the same parts, with the same picture, mask, strength, settings and seeds.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from harness.images import (
    assert_same_image,
    decompression_bomb_png,
    each_equals_itself_alone,
    max_difference,
    pipeline_image_from_picture,
    png_bytes,
)
from sd_pipeline.__main__ import main as cli_main
from sd_pipeline.contract.errors import InvalidRequestError, ModelLoadError
from sd_pipeline.contract.images import InputImage
from sd_pipeline.contract.lifecycle import Request
from sd_pipeline.contract.messages import Finished, Submit, decode, encode
from sd_pipeline.contract.request import GenerationRequest, InputRules, RequestLimits, check_inputs
from sd_pipeline.contract.settings import PipelineSettings
from sd_pipeline.model.engine import StepEngine
from sd_pipeline.model.families.images import cut_flow_schedule, flow_start
from sd_pipeline.model.loading import LoadedPipeline, load_pipeline
from sd_pipeline.png import encode_png, read_png_parameters
from sd_pipeline.tiny import build_tiny_pipeline


def picture(size: tuple[int, int] = (64, 64), seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    return png_bytes(Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)))


def square_mask(size: tuple[int, int] = (64, 64)) -> bytes:
    mask = Image.new("L", size, 0)
    ImageDraw.Draw(mask).rectangle([size[0] // 4, size[1] // 4, 3 * size[0] // 4 - 1, 3 * size[1] // 4 - 1], fill=255)
    return png_bytes(mask)


def ask(rules: InputRules | None = None, **fields: Any) -> GenerationRequest:
    defaults: dict[str, Any] = {"prompt": "a red circle", "steps": 6, "width": 64, "height": 64, "seed": 7}
    return check_inputs({**defaults, **fields}, rules=rules)


@pytest.fixture(scope="module")
def inpainting_loaded(tmp_path_factory: pytest.TempPathFactory) -> LoadedPipeline:
    folder = build_tiny_pipeline(tmp_path_factory.mktemp("tiny-inpainting"), family="sd-inpainting")
    return load_pipeline(PipelineSettings(model=str(folder), device="cpu"))


@pytest.mark.parametrize("scheduler", ["Euler a", "DPM++ 2M", "DDIM"])
@pytest.mark.parametrize("strength", [0.5, 1.0])
def test_image_to_image_equals_the_img2img_pipeline(
    tiny_loaded: LoadedPipeline, scheduler: str, strength: float
) -> None:
    wanted = ask(init_image=picture(), strength=strength, scheduler=scheduler, num_images=2, negative_prompt="dark")
    assert wanted.mode == "img2img"
    ours = StepEngine(tiny_loaded).generate([wanted])[0]
    for got, expected in zip(ours, pipeline_image_from_picture(tiny_loaded, wanted), strict=True):
        assert_same_image(got.image, expected)
    assert max_difference(ours[0].image, ours[1].image) > 16  # each image its own seed's


@pytest.mark.parametrize("strength", [0.6, 1.0])
def test_inpainting_with_a_regular_unet_equals_the_inpaint_pipeline(
    tiny_loaded: LoadedPipeline, strength: float
) -> None:
    wanted = ask(init_image=picture(), mask=square_mask(), strength=strength, scheduler="Euler a", num_images=2)
    assert wanted.mode == "inpaint"
    ours = StepEngine(tiny_loaded).generate([wanted])[0]
    for got, expected in zip(ours, pipeline_image_from_picture(tiny_loaded, wanted), strict=True):
        assert_same_image(got.image, expected)
    # Outside the mask the picture is kept (through the VAE), inside it is redrawn.
    assert wanted.init_image is not None
    source = np.asarray(Image.open(io.BytesIO(wanted.init_image.png)), dtype=np.int16)
    drawn = np.asarray(ours[0].image, dtype=np.int16)
    inside = np.abs(drawn - source)[24:40, 24:40].mean()
    assert inside > 10, inside


@pytest.mark.parametrize("strength", [0.6, 1.0])
def test_inpainting_with_a_nine_channel_unet_equals_the_inpaint_pipeline(
    inpainting_loaded: LoadedPipeline, strength: float
) -> None:
    rules = inpainting_loaded.describe().rules
    assert rules.needs_mask
    wanted = ask(rules, init_image=picture(), mask=square_mask(), strength=strength, scheduler="DPM++ 2M", num_images=2)
    ours = StepEngine(inpainting_loaded).generate([wanted])[0]
    for got, expected in zip(ours, pipeline_image_from_picture(inpainting_loaded, wanted), strict=True):
        assert_same_image(got.image, expected)


@pytest.fixture(scope="module")
def sdxl_inpainting_loaded(tmp_path_factory: pytest.TempPathFactory) -> LoadedPipeline:
    folder = build_tiny_pipeline(tmp_path_factory.mktemp("tiny-sdxl-inpainting"), family="sdxl-inpainting")
    return load_pipeline(PipelineSettings(model=str(folder), device="cpu"))


@pytest.mark.parametrize("strength", [0.6, 1.0])
def test_an_sdxl_inpainting_model_equals_its_inpaint_pipeline_alone_and_sharing_steps(
    sdxl_inpainting_loaded: LoadedPipeline, strength: float
) -> None:
    """A folder saved as ``StableDiffusionXLInpaintPipeline`` with a 9-channel UNet: its own pipeline
    (six size ids, no aesthetic score), two images; then guided and unguided requests in shared steps."""
    loaded = sdxl_inpainting_loaded
    assert type(loaded.family).__name__ == "StableDiffusionXLInpainting"
    rules = loaded.describe().rules
    assert rules.needs_mask and rules.family == "sdxl"
    wanted = ask(
        rules, init_image=picture(), mask=square_mask(), strength=strength, negative_prompt="dark", num_images=2
    )
    ours = StepEngine(loaded).generate([wanted])[0]
    for got, expected in zip(ours, pipeline_image_from_picture(loaded, wanted), strict=True):
        assert_same_image(got.image, expected)
    if strength == 1.0:
        together = [
            ask(rules, init_image=picture(seed=1), mask=square_mask(), strength=0.8, scheduler="Euler a"),
            ask(rules, init_image=picture(seed=2), mask=square_mask(), guidance_scale=1.0, seed=9),
        ]
        late = ask(rules, init_image=picture(seed=3), mask=square_mask(), strength=0.5, seed=11, steps=4)
        each_equals_itself_alone(loaded, together, late=late)


def test_an_sdxl_inpainting_folder_that_wants_an_aesthetic_score_stops_start_up(tmp_path: Path) -> None:
    """A refiner-style folder (``requires_aesthetics_score``: five ids, a negative one of its own) is not served."""
    folder = build_tiny_pipeline(tmp_path / "model", family="sdxl-inpainting")
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "requires_aesthetics_score": True}))
    with pytest.raises(ModelLoadError, match="requires an aesthetic score"):
        load_pipeline(PipelineSettings(model=str(folder), device="cpu"))


@pytest.fixture(scope="module")
def flux_fill_loaded(tmp_path_factory: pytest.TempPathFactory) -> LoadedPipeline:
    folder = build_tiny_pipeline(tmp_path_factory.mktemp("tiny-flux-fill"), family="flux-fill")
    return load_pipeline(PipelineSettings(model=str(folder), device="cpu"))


@pytest.mark.parametrize("strength", [0.6, 1.0])
def test_flux_fill_equals_its_fill_pipeline_alone_and_sharing_steps(
    flux_fill_loaded: LoadedPipeline, strength: float
) -> None:
    """``FluxFillPipeline`` (FLUX.1-Fill's 384-channel transformer: packed latents, the masked picture's
    packed latents, the mask folded 8x8 and packed), two images, the distilled guidance per row."""
    loaded = flux_fill_loaded
    rules = loaded.describe().rules
    assert rules.needs_mask and rules.guidance == "distilled"
    wanted = ask(rules, init_image=picture(), mask=square_mask(), strength=strength, num_images=2, guidance_scale=30)
    ours = StepEngine(loaded).generate([wanted])[0]
    for got, expected in zip(ours, pipeline_image_from_picture(loaded, wanted), strict=True):
        assert_same_image(got.image, expected)
    if strength == 1.0:
        together = [
            ask(rules, init_image=picture(seed=1), mask=square_mask(), strength=1.0, guidance_scale=30),
            ask(rules, init_image=picture(seed=2), mask=square_mask(), guidance_scale=3.5, seed=9),
        ]
        late = ask(rules, init_image=picture(seed=3), mask=square_mask(), strength=0.5, seed=11, steps=4)
        each_equals_itself_alone(loaded, together, late=late)


@pytest.mark.parametrize("model", ["sd", "sdxl", "flux-fill"])
def test_an_inpainting_model_asks_for_both_pictures_and_warms_up_with_them(
    inpainting_loaded: LoadedPipeline,
    sdxl_inpainting_loaded: LoadedPipeline,
    flux_fill_loaded: LoadedPipeline,
    model: str,
) -> None:
    loaded = {"sd": inpainting_loaded, "sdxl": sdxl_inpainting_loaded, "flux-fill": flux_fill_loaded}[model]
    assert StepEngine(loaded).warmup() > 0  # its warm-up request brings a picture and a mask
    rules = loaded.describe().rules
    with pytest.raises(InvalidRequestError, match=r"^init_image: is required: this is an inpainting model"):
        ask(rules)
    with pytest.raises(InvalidRequestError, match=r"^mask: is required"):
        ask(rules, init_image=picture())


def test_pictures_share_steps_with_text_to_image_and_each_equals_itself_alone(tiny_loaded: LoadedPipeline) -> None:
    """Text-to-image, image-to-image and inpainting (different strengths, so different start
    steps) step together; an image-to-image request joins two steps in."""
    wanted = [
        ask(scheduler="Euler a", steps=8),
        ask(init_image=picture(seed=1), strength=0.5, scheduler="DPM++ 2M", seed=3, steps=8),
        ask(init_image=picture(seed=2), mask=square_mask(), strength=0.75, scheduler="Euler", seed=4, steps=8),
    ]
    late = ask(init_image=picture(seed=3), strength=0.8, scheduler="DDIM", seed=5, steps=5, prompt="a blue square")
    each_equals_itself_alone(tiny_loaded, wanted, late=late)


def test_nine_channel_inputs_stay_with_their_rows_guided_or_not(
    inpainting_loaded: LoadedPipeline,
) -> None:
    """Guided and unguided inpainting requests in one denoiser batch: each row keeps its own extra channels."""
    rules = inpainting_loaded.describe().rules
    wanted = [
        ask(rules, init_image=picture(seed=1), mask=square_mask(), strength=0.9, guidance_scale=7.5),
        ask(rules, init_image=picture(seed=2), mask=square_mask(), strength=0.7, guidance_scale=1.0, seed=9),
    ]
    late = ask(rules, init_image=picture(seed=3), mask=square_mask(), strength=1.0, seed=11, steps=4)
    each_equals_itself_alone(inpainting_loaded, wanted, late=late)


def test_a_picture_of_another_size_is_resized_to_the_request_and_so_is_its_mask() -> None:
    request = ask(init_image=picture((100, 50)), mask=square_mask((30, 30)), width=64, height=96)
    assert request.init_image is not None and request.mask is not None
    assert Image.open(io.BytesIO(request.init_image.png)).size == (64, 96)
    mask = Image.open(io.BytesIO(request.mask.png))
    assert (mask.size, mask.mode) == ((64, 96), "L")


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"init_image": b"hello, I am text named cat.png"}, r"^init_image: must be a PNG, JPEG or WebP image"),
        ({"init_image": decompression_bomb_png()}, r"^init_image: must be at most 16777216 pixels"),
        ({"init_image": picture(), "mask": b"GIF89a..."}, r"^mask: must be a PNG, JPEG or WebP image"),
        ({"init_image": b"\x89PNG\r\n\x1a\n" + b"\0" * 40}, r"^init_image: could not be read as a PNG, JPEG or WebP"),
        ({"mask": square_mask()}, r"^mask: needs an init_image"),
        ({"init_image": picture(), "strength": 0}, r"^strength: must be a number greater than 0 and at most 1, got 0"),
        ({"init_image": picture(), "strength": 1.5}, r"^strength: must be a number greater than 0 and at most 1"),
        ({"strength": float("nan")}, r"^strength: must be a number greater than 0 and at most 1"),
        (
            {"init_image": picture(), "strength": 0.1},
            r"^strength: must be at least 0.166667 at 6 steps \(int\(steps x strength\) steps run\)",
        ),
        ({"init_image": "/etc/passwd"}, r"^init_image: must be an image file \(PNG, JPEG or WebP\), got str"),
    ],
)
def test_a_bad_picture_or_strength_is_refused_naming_the_field(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidRequestError, match=message):
        ask(**fields)


def test_the_byte_and_pixel_limits_come_from_the_deployment() -> None:
    limits = RequestLimits(max_upload_bytes=1000, max_upload_pixels=32 * 32)
    with pytest.raises(InvalidRequestError, match=r"^init_image: must be at most 1000 bytes, got \d+"):
        check_inputs({"prompt": "x", "width": 64, "height": 64, "init_image": picture()}, limits=limits)
    small = png_bytes(Image.new("RGB", (40, 40)))
    with pytest.raises(InvalidRequestError, match=r"^init_image: must be at most 1024 pixels, got 40x40"):
        check_inputs({"prompt": "x", "width": 64, "height": 64, "init_image": small}, limits=limits)


@pytest.mark.parametrize("strength", [0.6, 1.0])
def test_sd3_and_flux_image_to_image_equal_their_img2img_pipelines(
    sd3_loaded: LoadedPipeline, flux_loaded: LoadedPipeline, strength: float
) -> None:
    """``StableDiffusion3Img2ImgPipeline`` and ``FluxImg2ImgPipeline``: the flow schedule cut their way
    (from step int(steps - steps x strength)), the picture's latents shifted and scaled, ``scale_noise``."""
    for loaded, images in ((sd3_loaded, 1), (flux_loaded, 2)):  # SD3's pipeline fails on a list of generators
        wanted = ask(
            loaded.describe().rules, init_image=picture(), strength=strength, scheduler="Euler", num_images=images
        )
        ours = StepEngine(loaded).generate([wanted])[0]
        for got, expected in zip(ours, pipeline_image_from_picture(loaded, wanted), strict=True):
            assert_same_image(got.image, expected)


def test_sd3_images_of_one_request_are_each_their_own_seeds_picture(sd3_loaded: LoadedPipeline) -> None:
    """Image n of an SD3 request from a picture is the image of seed + n alone (each image samples the
    picture's latents with its own generator, as the SD pipelines do)."""
    rules = sd3_loaded.describe().rules
    two = StepEngine(sd3_loaded).generate(
        [ask(rules, init_image=picture(), strength=0.7, scheduler="Euler", num_images=2)]
    )
    second = ask(rules, init_image=picture(), strength=0.7, scheduler="Euler", seed=8)
    assert_same_image(two[0][1].image, pipeline_image_from_picture(sd3_loaded, second)[0])


def test_sd3_pictures_share_steps_with_text_to_image(sd3_loaded: LoadedPipeline) -> None:
    rules = sd3_loaded.describe().rules
    wanted = [
        ask(rules, scheduler="Euler"),
        ask(rules, init_image=picture(seed=1), strength=0.5, scheduler="Euler", seed=3),
    ]
    late = ask(rules, init_image=picture(seed=2), strength=0.8, scheduler="Euler", seed=4, prompt="a blue square")
    each_equals_itself_alone(sd3_loaded, wanted, late=late)


def test_a_dpm_solver_on_flow_sigmas_mixes_in_noise_as_flow_matching_does(sd3_loaded: LoadedPipeline) -> None:
    """No scale_noise on DPM-Solver: its add_noise on flow sigmas is the same (1 - sigma) x + sigma noise."""
    family = sd3_loaded.family
    scheduler = family.make_scheduler("DPM++ 2M", sd3_loaded.pipeline.scheduler.config)
    request = ask(family.rules, init_image=picture(), strength=0.5, scheduler="DPM++ 2M")
    family.set_timesteps(scheduler, request, sd3_loaded.device)
    timesteps = cut_flow_schedule(scheduler, request.steps, request.strength)
    latents = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    mixed = flow_start(
        scheduler, latents, [torch.Generator().manual_seed(1)], timesteps, device=sd3_loaded.device, dtype=torch.float32
    )
    sigma = scheduler.sigmas[scheduler.begin_index]
    noise = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(mixed, (1 - sigma) * latents + sigma * noise, atol=1e-6)


@pytest.mark.parametrize("strength", [0.6, 1.0])
def test_sd3_and_flux_inpainting_equal_their_inpaint_pipelines(
    sd3_loaded: LoadedPipeline, flux_loaded: LoadedPipeline, strength: float
) -> None:
    """``StableDiffusion3InpaintPipeline`` and ``FluxInpaintPipeline`` with a regular transformer: the
    first generator's sample of the picture for every image, each image's noise, and the picture's
    latents noised to the next timestep put back outside the mask after every step (packed, for FLUX.1)."""
    for loaded in (sd3_loaded, flux_loaded):
        rules = loaded.describe().rules
        assert rules.inpainting
        wanted = ask(
            rules, init_image=picture(), mask=square_mask(), strength=strength, scheduler="Euler", num_images=2
        )
        ours = StepEngine(loaded).generate([wanted])[0]
        expected = pipeline_image_from_picture(loaded, wanted)
        for got, oracle in zip(ours, expected, strict=True):
            assert_same_image(got.image, oracle)


def test_a_family_without_mask_inputs_refuses_a_mask_by_name() -> None:
    """An SD3 fill transformer (33 channels) has mask inputs we do not build: its masks are refused."""
    rules = InputRules(samplers=("Euler",), family="sd3", inpainting=False)
    assert rules.image_inputs
    with pytest.raises(InvalidRequestError, match=r"^mask: inpainting is not supported by this model's family yet"):
        check_inputs(
            {"prompt": "x", "width": 64, "height": 64, "init_image": picture(), "mask": square_mask()}, rules=rules
        )


def test_flow_pictures_and_masks_share_steps_with_text_to_image(
    sd3_loaded: LoadedPipeline, flux_loaded: LoadedPipeline
) -> None:
    for loaded in (sd3_loaded, flux_loaded):
        rules = loaded.describe().rules
        wanted = [
            ask(rules, scheduler="Euler"),
            ask(rules, init_image=picture(seed=1), mask=square_mask(), strength=0.7, scheduler="Euler", seed=3),
        ]
        late = ask(
            rules, init_image=picture(seed=2), mask=square_mask(), scheduler="Euler", seed=4, prompt="a blue one"
        )
        each_equals_itself_alone(loaded, wanted, late=late)


def test_the_pictures_cross_to_a_worker_once_and_do_not_ride_back_with_each_image(tiny_loaded: LoadedPipeline) -> None:
    """Down: the one Submit message carries the pictures, checked on arrival. Up: a Finished message of
    two images carries neither picture; the app's own request gives its results their inputs back."""
    request = ask(init_image=picture(), mask=square_mask(), strength=0.4, num_images=2)
    arrived = decode(encode(Submit.of(Request(request))))
    assert arrived.inputs == request
    assert isinstance(arrived.inputs.init_image, InputImage) and arrived.inputs.mode == "inpaint"
    assert "png=" not in repr(arrived.inputs)  # logs never carry the bytes
    (outcome,) = StepEngine(tiny_loaded).run([Request(arrived.inputs)])
    finished = decode(encode(Finished.of("r1", outcome)))
    assert request.init_image is not None and request.mask is not None
    assert all(data.inputs.init_image is None and data.inputs.mask is None for data in finished.results)
    results = finished.outcome(request).results
    assert [result.request for result in results] == [request, request]
    assert read_png_parameters(encode_png(results[0])).denoising_strength == 0.4


def test_a_picture_the_engine_cannot_encode_fails_only_its_request(tiny_loaded: LoadedPipeline) -> None:
    """A request whose start fails (here: a picture that does not decode, which only a hand-made
    request can carry) ends with an error; the text-to-image request beside it is served."""
    broken = InputImage(png=b"not a picture", width=64, height=64)
    bad = GenerationRequest(prompt="x", steps=3, width=64, height=64, init_image=broken)
    good = GenerationRequest(prompt="y", steps=3, width=64, height=64)
    outcomes = StepEngine(tiny_loaded).run([Request(bad), Request(good)])
    assert outcomes[0].error is not None and not outcomes[0].results
    assert outcomes[1].error is None and len(outcomes[1].results) == 1


def test_a_request_from_a_picture_counts_only_the_steps_it_runs(tiny_loaded: LoadedPipeline) -> None:
    """Progress, the wait estimate and steps left count int(steps x strength) steps, as the engine runs them."""
    wanted = ask(init_image=picture(), strength=0.5, steps=6)
    assert wanted.denoising_steps == 3 and ask().denoising_steps == 6
    reported: list[tuple[int, int]] = []
    job = Request(wanted, on_step=lambda step, total: reported.append((step, total)))
    assert job.steps_left == 3
    StepEngine(tiny_loaded).run([job])
    assert reported == [(1, 3), (2, 3), (3, 3)] and job.steps_left == 0


def test_pictures_admitted_together_share_one_vae_encode_per_size(
    tiny_loaded: LoadedPipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Image-to-image and inpainting requests admitted together: their pictures (and the inpainting
    one's masked picture) go through the VAE encoder in one call per size; each still equals diffusers."""
    vae = tiny_loaded.pipeline.vae
    batches: list[tuple[int, int, int]] = []
    real_encode = vae.encode

    def counted(pixels: Any, *args: Any, **kwargs: Any) -> Any:
        batches.append((pixels.shape[0], pixels.shape[2], pixels.shape[3]))
        return real_encode(pixels, *args, **kwargs)

    monkeypatch.setattr(vae, "encode", counted)
    wanted = [
        ask(init_image=picture(seed=1), strength=0.5),
        ask(init_image=picture(seed=2), mask=square_mask(), strength=0.7, seed=8),
        ask(init_image=picture((64, 96), seed=3), strength=0.6, width=64, height=96, seed=9),
        ask(prompt="no picture", seed=10),
    ]
    results = StepEngine(tiny_loaded).generate(wanted)
    assert sorted(batches) == [(1, 96, 64), (3, 64, 64)]
    monkeypatch.undo()
    for request, images in zip(wanted[:3], results[:3], strict=True):
        assert_same_image(images[0].image, pipeline_image_from_picture(tiny_loaded, request)[0], tolerance=2)


def test_the_cli_starts_from_a_picture_and_refuses_a_bad_one(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "start.png").write_bytes(picture())
    (tmp_path / "notes.png").write_text("not a picture")
    common = ["a red circle", "--model", str(tiny_model_dir), "--steps", "4", "--seed", "3"]
    common += ["--init-image", str(tmp_path / "start.png"), "--strength", "0.5"]
    assert cli_main([*common, "--out", str(tmp_path / "out")]) == 0
    (written,) = (tmp_path / "out").glob("*.png")
    assert read_png_parameters(written.read_bytes()).denoising_strength == 0.5
    assert cli_main([*common, "--mask", str(tmp_path / "notes.png"), "--out", str(tmp_path / "bad")]) == 2
    assert "error: mask: must be a PNG, JPEG or WebP image" in capsys.readouterr().err


@pytest.mark.parametrize(
    "fields",
    [{"strength": 0.6}, {"strength": 1.0}, {"mask": square_mask(), "strength": 0.6}, {"mask": square_mask()}],
    ids=["img2img", "img2img-whole", "inpaint", "inpaint-default-strength"],
)
def test_sdxl_from_a_picture_equals_its_img2img_and_inpaint_pipelines(
    sdxl_loaded: LoadedPipeline, fields: dict[str, Any]
) -> None:
    """SDXL's own StableDiffusionXLImg2ImgPipeline / StableDiffusionXLInpaintPipeline (size ids from the
    request's size, no aesthetic score: a base model's)."""
    rules = sdxl_loaded.describe().rules
    wanted = ask(rules, init_image=picture(), negative_prompt="dark", num_images=2, scheduler="Euler a", **fields)
    ours = StepEngine(sdxl_loaded).generate([wanted])[0]
    for got, expected in zip(ours, pipeline_image_from_picture(sdxl_loaded, wanted), strict=True):
        assert_same_image(got.image, expected)


def test_sdxl_pictures_share_steps_with_text_to_image(sdxl_loaded: LoadedPipeline) -> None:
    rules = sdxl_loaded.describe().rules
    wanted = [
        ask(rules, scheduler="Euler"),
        ask(rules, init_image=picture(seed=1), strength=0.5, scheduler="DPM++ 2M", seed=3, negative_prompt="dark"),
    ]
    late = ask(rules, init_image=picture(seed=2), mask=square_mask(), strength=0.8, scheduler="Euler a", seed=4)
    each_equals_itself_alone(sdxl_loaded, wanted, late=late)
