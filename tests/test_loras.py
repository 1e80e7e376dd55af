"""LoRA adapters chosen per request: equal to diffusers' ``load_lora_weights`` + ``set_adapters``,
alone and while requests with other adapters, other weights and none share each denoiser call."""

from __future__ import annotations

import hashlib
import re
import shutil
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from harness.images import assert_same_image, max_difference, pipeline_image_with_loras
from sd_pipeline.__main__ import main as cli
from sd_pipeline.contract.errors import InvalidRequestError, OutOfMemoryError
from sd_pipeline.contract.facts import FactCollector
from sd_pipeline.contract.lifecycle import Request
from sd_pipeline.contract.loras import LoraChoice, PromptAdapters, parse_prompt
from sd_pipeline.contract.request import GenerationRequest, check_inputs
from sd_pipeline.contract.settings import PipelineSettings
from sd_pipeline.loras.folder import LoraFolder, family_of
from sd_pipeline.loras.random import write_random_lora
from sd_pipeline.model import loras as loras_module
from sd_pipeline.model.engine import StepEngine
from sd_pipeline.model.loading import LoadedPipeline, load_pipeline
from sd_pipeline.model.loras import LoraAdapters
from sd_pipeline.png import format_parameters, parameters_of, parse_parameters, read_png_parameters
from sd_pipeline.shapes import DEMO_LORA_DIR, SHAPES_MODEL_DIR
from sd_pipeline.shapes.lora import ring_rates
from webapp.settings import SettingsError, load_settings

CROSS = "up_blocks.1.attentions.0.transformer_blocks.0"  # a cross-attention block SD and SDXL both have
BATCHED_TOLERANCE = 2  # levels of 255: rows of one batch are not bit-identical to a batch of one on the CPU


def ask(**fields: Any) -> GenerationRequest:
    defaults: dict[str, Any] = {"prompt": "a red circle", "steps": 4, "width": 64, "height": 64, "seed": 7}
    return GenerationRequest(**{**defaults, **fields})


@pytest.fixture(scope="module")
def served(tiny_model_dir: Path, tiny_lora_dir: Path) -> Iterator[StepEngine]:
    loaded = load_pipeline(PipelineSettings(model=str(tiny_model_dir), device="cpu"))
    adapters = LoraAdapters(loaded.pipeline, LoraFolder(tiny_lora_dir), cache_bytes=64 * 2**20)
    yield StepEngine(loaded, max_batch_images=8, loras=adapters)


def test_a_request_with_adapters_alone_equals_diffusers(served: StepEngine, lora_oracle: LoadedPipeline) -> None:
    for prompt in ("<lora:style:0.8> a red circle", "a red circle <lora:style:0.6> <lora:subject:-1.5>"):
        wanted = ask(prompt=prompt)
        ours = served.generate([wanted])[0][0].image
        assert_same_image(ours, pipeline_image_with_loras(lora_oracle, wanted))
    plain = served.generate([ask()])[0][0].image
    assert_same_image(plain, pipeline_image_with_loras(lora_oracle, ask()))
    assert max_difference(ours, plain) > 10  # the adapters change the picture: the comparison can fail


def test_different_adapters_and_weights_share_each_step_and_equal_diffusers(
    served: StepEngine, lora_oracle: LoadedPipeline
) -> None:
    wanted = [
        ask(prompt="a red circle <lora:style:1>", seed=1),
        ask(prompt="a red circle <lora:subject:0.7>", seed=2, guidance_scale=1.0),
        ask(prompt="<lora:style:0.3> a red circle", seed=3, num_images=2),
        ask(prompt="a red circle", seed=4),
        ask(prompt="a blue square <lora:subject:1> <lora:style:-0.5>", seed=5),
    ]
    jobs = [Request(request) for request in wanted]
    outcomes: dict[int, Any] = {}
    for job in jobs:
        served.submit(job, lambda outcome, job=job: outcomes.__setitem__(id(job), outcome))
    served.run_until_idle()
    for job, request in zip(jobs, wanted, strict=True):
        outcome = outcomes[id(job)]
        assert outcome.error is None, outcome.error
        assert outcome.results[0].timings.batch_images == 6  # every request stepped with every other
        assert_same_image(
            outcome.results[0].image, pipeline_image_with_loras(lora_oracle, request), tolerance=BATCHED_TOLERANCE
        )


def test_the_text_encoder_part_of_an_adapter_changes_only_its_requests_prompts(served: StepEngine) -> None:
    adapters = served.loras
    assert adapters is not None
    served.generate([ask(prompt="<lora:style> a red circle")])
    encoder = served.loaded.pipeline.text_encoder
    family = served.loaded.family
    device = served.loaded.device
    plain = family.encode(["a red circle"], [""], device)[0][0]["encoder_hidden_states"]
    chosen = GenerationRequest(prompt="<lora:style:1> x").loras
    with adapters.rows([chosen, ()], device):  # the prompt's row with the adapter, the negative's without
        (styled,), (negative,) = family.encode(["a red circle"], [""], device)
    styled = styled["encoder_hidden_states"]
    plain_negative = family.encode(["a red circle"], [""], device)[1][0]["encoder_hidden_states"]
    assert (negative["encoder_hidden_states"] - plain_negative).abs().max() == 0
    assert any("style" in getattr(module, "lora_A", {}) for module in encoder.modules())
    assert (styled - plain).abs().max() > 1e-3
    assert (family.encode(["a red circle"], [""], device)[0][0]["encoder_hidden_states"] - plain).abs().max() == 0


def test_tags_are_read_as_automatic1111_writes_them_and_stripped_from_the_encoded_text() -> None:
    parsed = parse_prompt("a cat <lora:style:0.8>, <lora:subject> sitting <LORA:my lora.v2:-1.5>")
    assert parsed.text == "a cat ,  sitting"
    assert parsed.loras == (LoraChoice("style", 0.8), LoraChoice("subject", 1.0), LoraChoice("my lora.v2", -1.5))
    assert parse_prompt("no tags here") == PromptAdapters("no tags here")


@pytest.mark.parametrize(
    ("prompt", "negative", "says"),
    [
        ("a <lora:nope:1>", "", "'nope', which is not available (available: a0, a1"),
        ("a <lora:styl>", "", "did you mean style"),
        ("a <lora:../etc/passwd:1>", "", "plain name, without"),
        ("a <lora:sub\\dir>", "", "plain name, without"),
        ("a <lora:style:5>", "", "weight of 'style' must be from -4 to 4, got 5"),
        ("a <lora:style:nan>", "", "must be from -4 to 4"),
        ("a <lora:style:heavy>", "", "must be a number from -4 to 4"),
        ("a <lora:style:1:0.5>", "", "more than one weight"),
        ("a <lora::1>", "", "without a name"),
        ("a <lora:style:1", "", "not closed"),
        ("a <lora:style> <lora:style:0.5>", "", "twice"),
        ("a <lora:xl_style>", "", "is for sdxl models; the served model is sd"),
        ("a cat", "<lora:style>", "go in the prompt"),
        (" ".join(f"<lora:a{index}>" for index in range(9)), "", "at most 8 per prompt"),
    ],
)
def test_each_bad_tag_is_refused_naming_the_field(prompt: str, negative: str, says: str) -> None:
    available = {"style": "sd", "subject": "", "xl_style": "sdxl", **{f"a{index}": "" for index in range(9)}}
    with pytest.raises(InvalidRequestError, match=re.escape(says)) as raised:
        check_inputs({"prompt": prompt, "negative_prompt": negative}, adapters=lambda: available)
    assert raised.value.field == ("negative_prompt" if negative else "prompt")


def test_the_folder_lists_adapters_with_their_family_and_automatic1111_hash(
    tiny_lora_dir: Path, tmp_path: Path
) -> None:
    folder = LoraFolder(tiny_lora_dir)
    assert folder.available() == {"style": "sd", "subject": ""}  # kohya's lora_te_ says SD; subject's names do not
    digest = hashlib.sha256((tiny_lora_dir / "style.safetensors").read_bytes()[8 + header_length(tiny_lora_dir) :])
    assert folder.hash_of("style") == digest.hexdigest()[:12]
    (tmp_path / "broken.safetensors").write_bytes(b"not a safetensors file")
    assert LoraFolder(tmp_path).available() == {"broken": ""}  # listed; loading it says why it fails
    with pytest.raises(InvalidRequestError, match="'missing', which is not available"):
        folder.path_of("missing")


@pytest.mark.parametrize(
    ("header", "family"),
    [
        ({"__metadata__": {"ss_base_model_version": "sdxl_base_v1-0"}, "x.lora_down.weight": {}}, "sdxl"),
        ({"__metadata__": {"ss_base_model_version": "sd_v1"}, "x.lora_down.weight": {}}, "sd"),
        ({"lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": {}}, "sdxl"),
        (
            {"unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight": {"shape": [8, 2048]}},
            "sdxl",
        ),
        (
            {
                "lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight": {
                    "shape": [8, 768]
                }
            },
            "sd",
        ),
        (
            {"unet.up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.lora.down.weight": {"shape": [8, 1024]}},
            "sd",
        ),
        ({"transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight": {}}, "flux"),
        ({"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": {}}, "flux"),
        ({"transformer.joint_blocks.0.x_block.attn.qkv.lora_down.weight": {}}, "sd3"),
        ({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": {}}, ""),  # SD3 or FLUX.1: loading decides
        ({"something.else": {}}, ""),
    ],
)
def test_an_adapters_family_is_read_from_its_header_only_where_it_is_certain(
    header: dict[str, Any], family: str
) -> None:
    assert family_of(header) == family


def header_length(tiny_lora_dir: Path) -> int:
    return int.from_bytes((tiny_lora_dir / "style.safetensors").read_bytes()[:8], "little")


def test_an_adapters_image_carries_lora_hashes_as_automatic1111_writes_them(
    served: StepEngine, tiny_lora_dir: Path
) -> None:
    result = served.generate([ask(prompt="a cat, <lora:style:0.5> <lora:subject>")])[0][0]
    folder = LoraFolder(tiny_lora_dir)
    expected = f"style: {folder.hash_of('style')}, subject: {folder.hash_of('subject')}"
    assert result.lora_hashes == expected
    text = format_parameters(parameters_of(result))
    assert f'Lora hashes: "{expected}"' in text.splitlines()[-1]
    read = parse_parameters(text)
    assert (read.prompt, read.lora_hashes, read.model) == (
        "a cat, <lora:style:0.5> <lora:subject>",
        expected,
        result.model,
    )
    assert served.generate([ask()])[0][0].lora_hashes == ""


class SlowFolder(LoraFolder):
    """A folder whose file reads wait until the test lets them go."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.release = threading.Event()

    def hash_of(self, name: str) -> str:
        assert self.release.wait(timeout=60)
        return super().hash_of(name)


def test_running_requests_keep_stepping_while_an_adapters_file_is_read(
    tiny_model_dir: Path, tiny_lora_dir: Path
) -> None:
    loaded = load_pipeline(PipelineSettings(model=str(tiny_model_dir), device="cpu"))
    folder = SlowFolder(tiny_lora_dir)
    adapters = LoraAdapters(loaded.pipeline, folder, cache_bytes=64 * 2**20)
    engine = StepEngine(loaded, loras=adapters)
    outcomes: dict[str, Any] = {}
    running, reading = Request(ask(steps=6)), Request(ask(prompt="a red circle <lora:subject>"))
    engine.submit(running, lambda outcome: outcomes.__setitem__("running", outcome))
    engine.submit(reading, lambda outcome: outcomes.__setitem__("reading", outcome))
    while "running" not in outcomes:
        engine.step()  # the read never returns meanwhile: the step loop does not wait for it
    assert outcomes["running"].error is None and "reading" not in outcomes and not engine.idle
    folder.release.set()
    engine.run_until_idle()
    assert outcomes["reading"].error is None
    assert outcomes["reading"].results[0].lora_hashes.startswith("subject: ")
    adapters.close()


def test_the_cache_keeps_adapters_in_use_and_unloads_the_least_recently_used_past_its_size(
    tiny_model_dir: Path, tiny_lora_dir: Path, lora_oracle: LoadedPipeline
) -> None:
    loaded = load_pipeline(PipelineSettings(model=str(tiny_model_dir), device="cpu"))
    facts = FactCollector()
    adapters = LoraAdapters(loaded.pipeline, LoraFolder(tiny_lora_dir), cache_bytes=1, observer=facts)
    engine = StepEngine(loaded, loras=adapters)
    both = ask(prompt="a red circle <lora:style:0.5> <lora:subject:0.5>")
    engine.generate([both])  # both in use at once: kept although past the cache size
    assert adapters.loaded() == ["style", "subject"]
    engine.generate([ask(prompt="a red circle <lora:subject>")])  # loaded: a cache hit, style evicted
    assert adapters.loaded() == ["subject"]
    again = ask(prompt="a red circle <lora:style:0.7>")
    assert_same_image(engine.generate([again])[0][0].image, pipeline_image_with_loras(lora_oracle, again))
    assert adapters.loaded() == ["style"]
    assert not any("subject" in layer.lora_A for layer in adapters._lora_layers())  # unloaded from the model
    names = [name for name, _ in facts.take()]
    assert names.count("lora_load") == 3 and names.count("lora_cache_hit") == 1


@pytest.mark.parametrize("family", ["sdxl", "sd3", "flux"])
def test_each_familys_adapters_equal_diffusers_in_one_shared_step(
    family: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """diffusers/PEFT files for the denoiser and the CLIP encoders; two adapters, two weights and none together."""
    model_dir = Path(request.getfixturevalue(f"tiny_{family}_dir"))
    write_random_lora(model_dir, tmp_path / "one.safetensors", seed=1, file_format="peft")
    write_random_lora(model_dir, tmp_path / "two.safetensors", seed=2, file_format="peft", text_encoder=False)
    loaded = load_pipeline(PipelineSettings(model=str(model_dir), device="cpu"))
    oracle = load_pipeline(PipelineSettings(model=str(model_dir), device="cpu"))
    for name in ("one", "two"):
        oracle.pipeline.load_lora_weights(str(tmp_path / f"{name}.safetensors"), adapter_name=name)
    engine = StepEngine(loaded, loras=LoraAdapters(loaded.pipeline, LoraFolder(tmp_path), cache_bytes=2**30))
    sampler = loaded.family.rules.default_sampler
    wanted = [
        ask(prompt="a red circle <lora:one:0.8>", seed=1, scheduler=sampler, guidance_scale=4.0),
        ask(prompt="a red circle <lora:two:1.3> <lora:one:-0.5>", seed=2, scheduler=sampler, guidance_scale=1.0),
        ask(prompt="a red circle", seed=3, scheduler=sampler, guidance_scale=4.0),
    ]
    results = engine.generate(wanted)
    for request_, images in zip(wanted, results, strict=True):
        assert images[0].timings.batch_images == 3
        expected = pipeline_image_with_loras(oracle, request_)
        assert_same_image(images[0].image, expected, tolerance=BATCHED_TOLERANCE)
    plain = pipeline_image_with_loras(oracle, replace(wanted[0], prompt="a red circle"))
    assert max_difference(results[0][0].image, plain) > 10  # the adapter changes the picture


def test_rows_with_one_adapter_each_take_the_batched_path_and_equal_diffusers(
    served: StepEngine, lora_oracle: LoadedPipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []
    batched = loras_module._gathered_deltas
    monkeypatch.setattr(loras_module, "_gathered_deltas", lambda *a: calls.append(1) or batched(*a))
    wanted = [
        ask(prompt="a red circle <lora:style:1>", seed=1),
        ask(prompt="a red circle <lora:subject:0.7>", seed=2),
        ask(prompt="a red circle", seed=3),
        ask(prompt="a red circle <lora:style:-0.3>", seed=4, guidance_scale=1.0),
    ]
    for request, images in zip(wanted, served.generate(wanted), strict=True):
        expected = pipeline_image_with_loras(lora_oracle, request)
        assert_same_image(images[0].image, expected, tolerance=BATCHED_TOLERANCE)
    assert calls  # the UNet's linear LoRA layers went the batched way (its convolution the per-adapter way)


def test_the_demo_adapter_teaches_the_shapes_model_a_ring() -> None:
    """The committed adapter: "a COLOUR ring" draws a ring in >= 80 % of 16 seeds with <lora:ring>, <= 10 % without."""
    rates = ring_rates(DEMO_LORA_DIR, sampler="DPM++ 2M Karras")
    assert rates.with_adapter >= 0.8, rates
    assert rates.without <= 0.1, rates


def test_the_command_line_serves_adapters_from_a_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    common = ["--model", str(SHAPES_MODEL_DIR), "--lora-dir", str(DEMO_LORA_DIR), "--seed", "3", "--steps", "4"]
    assert cli(["a blue ring <lora:ring:0.9>", *common, "--out", str(tmp_path)]) == 0
    (png,) = tmp_path.glob("*.png")
    parameters = read_png_parameters(png.read_bytes())
    assert parameters.prompt == "a blue ring <lora:ring:0.9>" and parameters.lora_hashes.startswith("ring: ")
    assert cli(["a blue ring <lora:rng>", *common, "--out", str(tmp_path)]) == 2
    assert "prompt: names LoRA 'rng', which is not available; did you mean ring?" in capsys.readouterr().err


def test_a_truncated_file_ends_only_its_request_and_the_engine_keeps_serving(
    tiny_model_dir: Path, tiny_lora_dir: Path, lora_oracle: LoadedPipeline, tmp_path: Path
) -> None:
    shutil.copy(tiny_lora_dir / "style.safetensors", tmp_path)
    (tmp_path / "stub.safetensors").write_bytes(b"\x01\x02\x03")  # shorter than a safetensors header
    loaded = load_pipeline(PipelineSettings(model=str(tiny_model_dir), device="cpu"))
    engine = StepEngine(loaded, loras=LoraAdapters(loaded.pipeline, LoraFolder(tmp_path), cache_bytes=2**30))
    outcomes: dict[str, Any] = {}
    good = ask(prompt="a red circle <lora:style:0.6>")
    for key, request in (("stub", ask(prompt="a red circle <lora:stub>")), ("good", good)):
        engine.submit(Request(request), lambda outcome, key=key: outcomes.__setitem__(key, outcome))
    engine.run_until_idle()
    error = outcomes["stub"].error
    assert isinstance(error, InvalidRequestError) and error.field == "prompt"
    assert "'stub' cannot be used with this model: its file is not a readable .safetensors file" in str(error)
    assert_same_image(outcomes["good"].results[0].image, pipeline_image_with_loras(lora_oracle, good))


@pytest.mark.parametrize("setting", ["LORA_DIR", "LORA_S3"])
def test_a_lora_folder_or_store_with_a_compiled_unet_stops_start_up_naming_the_settings(
    setting: str, tmp_path: Path
) -> None:
    value = str(tmp_path) if setting == "LORA_DIR" else "s3://adapters/loras"
    with pytest.raises(SettingsError, match="LORA_DIR and LORA_S3 cannot be combined with SD_COMPILE yet"):
        load_settings([], env={setting: value, "SD_COMPILE": "true"})
    assert load_settings([], env={"LORA_DIR": str(tmp_path)}).pipeline().lora_dir == str(tmp_path.resolve())


def test_the_adapter_folder_is_listed_only_for_a_prompt_that_names_one() -> None:
    def listing() -> dict[str, str]:
        raise AssertionError("listed for a prompt without tags")

    assert check_inputs({"prompt": "a plain prompt"}, adapters=listing).loras == ()


def test_an_adapter_out_of_memory_loading_unloads_unused_ones_and_tries_again_else_ends_only_its_request(
    tiny_model_dir: Path, tiny_lora_dir: Path, lora_oracle: LoadedPipeline
) -> None:
    loaded = load_pipeline(PipelineSettings(model=str(tiny_model_dir), device="cpu"))
    adapters = LoraAdapters(loaded.pipeline, LoraFolder(tiny_lora_dir), cache_bytes=2**30)
    engine = StepEngine(loaded, loras=adapters)
    engine.generate([ask(prompt="a red circle <lora:style>")])  # style stays loaded, unused
    real_load = loaded.pipeline.load_lora_weights
    out_of_memory = [True]  # the next load fails once

    def tight_load(*args: Any, **kwargs: Any) -> Any:
        if out_of_memory and out_of_memory.pop():
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB")
        return real_load(*args, **kwargs)

    loaded.pipeline.load_lora_weights = tight_load
    wanted = ask(prompt="a blue square <lora:subject:0.7>")
    served = engine.generate([wanted])[0][0]
    assert adapters.loaded() == ["subject"]  # style was unloaded to make room, then subject loaded
    assert_same_image(served.image, pipeline_image_with_loras(lora_oracle, wanted))

    out_of_memory[:] = [True, True]  # the load and its retry both fail
    failing, plain = ask(prompt="a red circle <lora:style>"), ask(prompt="a green triangle", seed=3)
    outcomes = engine.run([Request(failing), Request(plain)])
    assert isinstance(outcomes[0].error, OutOfMemoryError) and "loading LoRA 'style'" in str(outcomes[0].error)
    assert outcomes[1].error is None
    assert_same_image(outcomes[1].results[0].image, pipeline_image_with_loras(lora_oracle, plain))
    assert adapters.loaded() == []  # subject (unused) went in the retry's eviction too
