"""Live previews made by the engine: when, how big, from what, for whom; the final image unchanged."""

from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from harness.images import assert_same_image
from sd_pipeline.contract.errors import ModelLoadError
from sd_pipeline.contract.jobs import Preview
from sd_pipeline.contract.lifecycle import Request
from sd_pipeline.contract.models import ModelDefaults
from sd_pipeline.contract.request import check_inputs
from sd_pipeline.contract.settings import PipelineSettings
from sd_pipeline.model.engine import StepEngine
from sd_pipeline.model.families.base import SD15_LATENT_RGB
from sd_pipeline.model.loading import LoadedPipeline, load_pipeline
from sd_pipeline.model.previews import DecoderPreview, LinearPreview, load_previewer
from sd_pipeline.shapes import SHAPES_MODEL_DIR
from sd_pipeline.shapes.adherence import read_picture

WIDE: dict[str, Any] = {"width": 96, "height": 64, "steps": 12, "seed": 5}


def previewing(tiny_loaded: LoadedPipeline, *, interval: float = 0.0, previewer: Any = None) -> StepEngine:
    chosen = previewer or LinearPreview(torch.tensor(SD15_LATENT_RGB), torch.zeros(3))
    return StepEngine(tiny_loaded, previewer=chosen, preview_interval=interval)


def test_a_preview_each_step_but_the_last_at_the_final_size_small_on_the_wire(tiny_loaded: LoadedPipeline) -> None:
    seen: list[Preview] = []
    job = Request(check_inputs({"prompt": "a wide one", **WIDE}), on_preview=seen.append)
    (outcome,) = previewing(tiny_loaded).run([job])
    assert outcome.error is None
    assert [preview.step for preview in seen] == list(range(1, 12))  # the final image replaces the 12th
    assert {preview.total for preview in seen} == {12}
    final = outcome.results[0].image
    for preview in seen:
        assert preview.picture().size == final.size == (96, 64)
        with Image.open(io.BytesIO(preview.image)) as sent:
            assert sent.size == (12, 8)  # approx: the latents' size, never the latents themselves
        assert len(preview.image) < 4096
    assert seen[0].image != seen[-1].image  # the picture changes as it forms


def test_no_preview_when_the_final_image_is_due_within_an_interval(tiny_loaded: LoadedPipeline) -> None:
    seen: list[Preview] = []
    job = Request(check_inputs({"prompt": "slow previews", **WIDE}), on_preview=seen.append)
    (outcome,) = previewing(tiny_loaded, interval=3600.0).run([job])
    assert outcome.error is None and outcome.results
    assert seen == []  # 12 steps end well within an hour: a preview would be replaced before it is seen


def test_the_first_preview_waits_for_a_step_to_time_the_rest(tiny_loaded: LoadedPipeline) -> None:
    seen: list[Preview] = []
    job = Request(check_inputs({"prompt": "timed previews", **WIDE}), on_preview=seen.append)
    previewing(tiny_loaded, interval=1e-9).run([job])
    # Before the first step nothing tells when the final image is due; after it, each step is previewed.
    assert [preview.step for preview in seen] == list(range(2, 12))


def test_only_the_requests_that_ask_get_previews_and_no_image_changes(
    tiny_loaded: LoadedPipeline, engine: StepEngine
) -> None:
    seen: list[Preview] = []
    asking = Request(check_inputs({"prompt": "show me", **WIDE}), on_preview=seen.append)
    silent = Request(check_inputs({"prompt": "not me", **{**WIDE, "seed": 6}}))
    with_previews = previewing(tiny_loaded).run([asking, silent])
    assert len(seen) == 11 and silent.on_preview is None
    without = engine.run([Request(asking.inputs), Request(silent.inputs)])  # previews off
    for on, off in zip(with_previews, without, strict=True):
        assert_same_image(on.results[0].image, off.results[0].image)


def test_a_cancelled_request_gets_no_more_previews(tiny_loaded: LoadedPipeline) -> None:
    seen: list[Preview] = []
    job = Request(check_inputs({"prompt": "stop me", **{**WIDE, "steps": 40}}))

    def on_preview(preview: Preview) -> None:
        seen.append(preview)
        if len(seen) == 3:
            job.cancel()

    job.on_preview = on_preview
    (outcome,) = previewing(tiny_loaded).run([job])
    assert outcome.error is not None and [preview.step for preview in seen] == [1, 2, 3]


@pytest.mark.parametrize("scheduler", ["Euler a", "DDIM", "UniPC"])
def test_the_preview_is_made_from_the_predicted_clean_latents(tiny_loaded: LoadedPipeline, scheduler: str) -> None:
    """With the model's own VAE as the decoder the last preview already shows the final picture."""
    vae = tiny_loaded.pipeline.vae
    full = DecoderPreview(vae, latent_scale=float(vae.config.scaling_factor))
    seen: list[Preview] = []
    request = check_inputs({"prompt": "converging", **{**WIDE, "steps": 20, "scheduler": scheduler}})
    (outcome,) = previewing(tiny_loaded, previewer=full).run([Request(request, on_preview=seen.append)])
    final = torch.tensor(list(outcome.results[0].image.resize((96, 64)).getdata()), dtype=torch.float32)
    first, last = (torch.tensor(list(p.picture().getdata()), dtype=torch.float32) for p in (seen[0], seen[-1]))
    assert (last - final).abs().mean() < (first - final).abs().mean()
    assert (last - final).abs().mean() < 12  # 19 of 20 steps: nearly the final image (JPEG-encoded)


def test_previewers_by_setting(tiny_loaded: LoadedPipeline, tmp_path: Path) -> None:
    assert load_previewer(PipelineSettings(preview="off"), tiny_loaded) is None
    shapes_loaded = dataclasses.replace(tiny_loaded, source=str(SHAPES_MODEL_DIR))
    shapes = load_previewer(PipelineSettings(preview="approx"), shapes_loaded)
    fitted = json.loads((SHAPES_MODEL_DIR / "latent_rgb.json").read_text())
    assert isinstance(shapes, LinearPreview)
    assert torch.allclose(shapes.factors, torch.tensor(fitted["factors"]))
    sd15 = load_previewer(PipelineSettings(preview="approx"), dataclasses.replace(tiny_loaded, source="some/hub-id"))
    assert isinstance(sd15, LinearPreview) and torch.allclose(sd15.factors, torch.tensor(SD15_LATENT_RGB))
    with pytest.raises(ModelLoadError, match="SD_PREVIEW=taesd needs SD_PREVIEW_DECODER"):
        load_previewer(PipelineSettings(preview="taesd"), tiny_loaded)


def test_the_model_chooses_its_preview_when_the_setting_is_auto(tiny_loaded: LoadedPipeline) -> None:
    assert isinstance(load_previewer(PipelineSettings(preview="auto"), tiny_loaded), LinearPreview)  # no advice
    advised = dataclasses.replace(tiny_loaded, defaults=ModelDefaults(preview="full"))
    assert isinstance(load_previewer(PipelineSettings(preview="auto"), advised), DecoderPreview)
    assert isinstance(load_previewer(PipelineSettings(preview="approx"), advised), LinearPreview)  # a setting wins
    assert load_previewer(PipelineSettings(preview="off"), advised) is None


def half_way_colours(preview: str) -> list[tuple[str, str]]:
    """The demo model at its own defaults, eight asks: the colour each live preview shows at step 10
    of 20 under SD_PREVIEW=``preview``, beside the colour asked for."""
    settings = PipelineSettings(model=str(SHAPES_MODEL_DIR), device="cpu", preview=preview)
    loaded = load_pipeline(settings)
    engine = StepEngine(loaded, previewer=load_previewer(settings, loaded), preview_interval=0.0)
    asks = [(colour, shape) for colour in ("red", "green", "blue", "yellow") for shape in ("circle", "square")]
    seen: list[list[Preview]] = [[] for _ in asks]
    fields = {"steps": 20, "guidance_scale": 4.0, "width": 64, "height": 64}
    jobs = [
        Request(check_inputs({"prompt": f"a {colour} {shape}", "seed": 100 + n, **fields}), on_preview=seen[n].append)
        for n, (colour, shape) in enumerate(asks)
    ]
    engine.run(jobs)
    half_way = [next(p for p in previews if p.step == 10).picture() for previews in seen]
    return [(read_picture(picture).colour, ask[0]) for picture, ask in zip(half_way, asks, strict=True)]


def test_the_demo_models_previews_show_the_asked_colour_half_way() -> None:
    """What the page shows for the model we ship, at its own defaults (SD_PREVIEW=auto, which follows
    its recommendation, full): the colour asked for, readable half-way, and read more often than
    the linear map (approx) reads it on the same pictures."""
    chosen, linear = half_way_colours("auto"), half_way_colours("approx")
    right = sum(shown == asked for shown, asked in chosen)
    assert right >= 7, chosen
    assert right > sum(shown == asked for shown, asked in linear), (chosen, linear)


def test_a_tiny_decoder_previews_every_due_image_in_one_call(tiny_loaded: LoadedPipeline, tmp_path: Path) -> None:
    from diffusers import AutoencoderTiny

    AutoencoderTiny(  # random weights: the Hub is out of reach; the shapes and the batching are what count
        encoder_block_out_channels=(16, 16, 16, 16), decoder_block_out_channels=(16, 16, 16, 16)
    ).save_pretrained(tmp_path / "taesd")
    previewer = load_previewer(PipelineSettings(preview="taesd", preview_decoder=str(tmp_path / "taesd")), tiny_loaded)
    assert isinstance(previewer, DecoderPreview)
    calls: list[int] = []
    real_decode = previewer.decoder.decode

    def counting(latents: torch.Tensor, **kwargs: Any) -> Any:
        calls.append(latents.shape[0])
        return real_decode(latents, **kwargs)

    previewer.decoder.decode = counting
    seen: list[Preview] = []
    jobs = [Request(check_inputs({"prompt": f"p{n}", **{**WIDE, "seed": n}}), on_preview=seen.append) for n in (1, 2)]
    outcomes = previewing(tiny_loaded, previewer=previewer).run(jobs)
    assert all(outcome.error is None for outcome in outcomes)
    assert calls and set(calls) == {2}  # both requests' previews in one decoder call per step
    assert len(seen) == 22 and {preview.picture().size for preview in seen} == {(96, 64)}
