"""The demo LoRA adapter: teaches the tiny shapes model a shape it was never shown (a ring).

``python -m sd_pipeline.shapes train-lora DIR`` loads the committed shapes model, freezes it,
adds LoRA layers (PEFT) to the UNet's attention and the text encoder's, trains only those on
pictures of rings of the four colours, half of its pictures being the shapes it already draws (so
that they stay as they were), with the model's own objective (noise prediction at random
timesteps, 10 % of captions dropped), and writes ``DIR/ring.safetensors`` (diffusers / PEFT keys).
Served with ``LORA_DIR=DIR``, ``a red ring <lora:ring>`` draws a ring; without the tag the model
does not know the word. About four minutes on two CPU cores.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from peft import LoraConfig, inject_adapter_in_model
from safetensors.torch import save_file
from tqdm import tqdm

from sd_pipeline.loras.random import CLIP_TARGETS, DENOISER_TARGETS, lora_tensors
from sd_pipeline.shapes import SHAPES_MODEL_DIR
from sd_pipeline.shapes.drawing import COLOURS, RING, caption, draw, examples
from sd_pipeline.shapes.train import noise_prediction_loss

NAME = RING


@dataclass(frozen=True)
class LoraPlan:
    """How the demo adapter trains; the defaults are the committed adapter's."""

    seed: int = 0
    pictures: int = 768
    steps: int = 1200
    batch: int = 32
    rank: int = 16
    learning_rate: float = 2e-3
    kept_share: float = 0.5  # pictures of the shapes it already draws, so that the adapter does not unlearn them


def train_lora(folder: Path, plan: LoraPlan, model_dir: Path = SHAPES_MODEL_DIR) -> dict[str, Any]:
    """Train the adapter on ``model_dir``'s pipeline and write it into ``folder``; returns its report."""
    import random

    from diffusers import DDPMScheduler, StableDiffusionPipeline

    torch.manual_seed(plan.seed)
    rng = random.Random(plan.seed)
    pipeline = StableDiffusionPipeline.from_pretrained(str(model_dir), safety_checker=None)
    vae, tokenizer, text_encoder, unet = pipeline.vae, pipeline.tokenizer, pipeline.text_encoder, pipeline.unet
    for module in (vae, text_encoder, unet):
        module.requires_grad_(False)
    for targets, module in ((DENOISER_TARGETS, unet), (CLIP_TARGETS, text_encoder)):  # alpha = rank: scale 1
        config = LoraConfig(r=plan.rank, lora_alpha=plan.rank, init_lora_weights="gaussian", target_modules=targets)
        inject_adapter_in_model(config, module)
    colours = [list(COLOURS)[index % len(COLOURS)] for index in range(plan.pictures)]
    pictures = [draw(colour, RING, rng) for colour in colours]
    captions = [caption(colour, RING, rng) for colour in colours]
    kept = examples(int(plan.pictures * plan.kept_share / (1 - plan.kept_share)), plan.seed + 1)  # what it knew
    pictures += [picture for picture, *_ in kept]
    captions += [text for _, text, *_ in kept]
    images = torch.from_numpy(np.stack([np.asarray(picture) for picture in pictures])).permute(0, 3, 1, 2)
    with torch.no_grad():
        latents = vae.encode(images.float() / 127.5 - 1.0).latent_dist.mean * vae.config.scaling_factor
    tokens = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt")
    empty = tokenizer([""], padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt")
    noise_scheduler = DDPMScheduler.from_config(pipeline.scheduler.config)
    trained = [
        parameter for module in (unet, text_encoder) for parameter in module.parameters() if parameter.requires_grad
    ]
    optimizer = torch.optim.AdamW(trained, lr=plan.learning_rate, weight_decay=0.0)
    generator = torch.Generator().manual_seed(plan.seed)
    started, losses = time.perf_counter(), []
    unet.train()
    text_encoder.train()
    for _ in (bar := tqdm(range(plan.steps), desc="LoRA")):
        loss = noise_prediction_loss(
            pipeline, noise_scheduler, latents, tokens.input_ids, empty.input_ids[0], plan.batch, generator
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        optimizer.step()
        losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
    folder.mkdir(parents=True, exist_ok=True)
    tensors = lora_tensors(unet, "unet", "peft") | lora_tensors(text_encoder, "text_encoder", "peft")
    save_file(tensors, str(folder / f"{NAME}.safetensors"), metadata={"ss_base_model_version": "sd_v1"})
    return {
        "seconds": round(time.perf_counter() - started, 1),
        "plan": asdict(plan),
        "final_loss": round(sum(losses[-20:]) / 20, 5),
        "threads": torch.get_num_threads(),
    }


@dataclass(frozen=True)
class RingRates:
    """How often 16 seeds draw a ring, asked "a COLOUR ring" with and without the adapter."""

    sampler: str
    with_adapter: float
    without: float
    colour_with_adapter: float  # the asked colour, with the adapter

    def row(self) -> str:
        return f"| {self.sampler} | {self.with_adapter:.0%} | {self.without:.0%} | {self.colour_with_adapter:.0%} |"


def ring_rates(lora_dir: Path, *, sampler: str, seeds: int = 16, model_dir: Path = SHAPES_MODEL_DIR) -> RingRates:
    """Draw "a COLOUR ring" (colours in turn) for ``seeds`` seeds with and without ``<lora:ring>``, as the
    app serves it (guidance 4, 20 steps, 64x64), and measure the pictures."""
    from sd_pipeline.contract.request import GenerationRequest
    from sd_pipeline.contract.settings import PipelineSettings
    from sd_pipeline.loras.folder import LoraFolder
    from sd_pipeline.model.engine import StepEngine
    from sd_pipeline.model.loading import load_pipeline
    from sd_pipeline.model.loras import LoraAdapters
    from sd_pipeline.shapes.drawing import read_picture, shows_ring

    loaded = load_pipeline(PipelineSettings(model=str(model_dir), device="cpu"))
    adapters = LoraAdapters(loaded.pipeline, LoraFolder(lora_dir), cache_bytes=2**30)
    engine = StepEngine(loaded, max_batch_images=seeds, loras=adapters)
    colours = [list(COLOURS)[seed % len(COLOURS)] for seed in range(seeds)]
    drawn = {}
    for tag in (f" <lora:{NAME}>", ""):
        asks = [
            GenerationRequest(
                prompt=f"a {colour} ring{tag}",
                seed=seed,
                steps=20,
                guidance_scale=4.0,
                width=64,
                height=64,
                scheduler=sampler,
            )
            for seed, colour in enumerate(colours)
        ]
        drawn[tag] = [images[0].image for images in engine.generate(asks)]
    with_adapter = drawn[f" <lora:{NAME}>"]
    return RingRates(
        sampler=sampler,
        with_adapter=sum(shows_ring(picture) for picture in with_adapter) / seeds,
        without=sum(shows_ring(picture) for picture in drawn[""]) / seeds,
        colour_with_adapter=sum(
            read_picture(picture).colour == colour for picture, colour in zip(with_adapter, colours, strict=True)
        )
        / seeds,
    )


def write_lora_card(folder: Path, report: dict[str, Any], rates: list[RingRates]) -> None:
    """``folder/README.md``: what the adapter teaches, how it was trained and what it draws."""
    plan = report["plan"]
    trained = (
        f"- Trained by `python -m sd_pipeline.shapes train-lora ./models/loras` on {report['threads']} CPU threads"
        f" in {report['seconds']:.0f} s: rank {plan['rank']} LoRA (PEFT) on the UNet's attention projections and"
        f" the text encoder's, the model frozen; {plan['steps']} steps of {plan['batch']} pictures, AdamW at"
        f" {plan['learning_rate']:g}; {plan['pictures']} pictures of rings plus as many of the shapes it already"
        f" draws (so they stay as they were), 10 % of captions dropped; final loss {report['final_loss']:.4f};"
        f" seed {plan['seed']}."
    )
    lines = [
        f"# `{NAME}`: a LoRA adapter for the tiny shapes model",
        "",
        "Teaches `models/tiny-shapes` a shape it was never shown: **a ring** (a circle with a hole), in its",
        "four colours. Without the adapter the model does not know the word. Serve it with",
        "`--lora-dir ./models/loras` (`LORA_DIR`) and name it in the prompt: `a red ring <lora:ring>`.",
        "",
        f"- File: `{NAME}.safetensors`, diffusers / PEFT keys (`unet.<module>.lora_A.weight`,",
        "  `text_encoder.<module>.lora_A.weight`), alpha = rank (scale 1); kohya's `ss_base_model_version`",
        "  metadata says `sd_v1`.",
        trained,
        "",
        "## What it draws",
        "",
        'Asked "a COLOUR ring" (the four colours in turn), seeds 0 to 15, guidance 4, 20 steps, 64x64,',
        "served by the step engine; a ring is a foreground around a hole of background at its centre",
        "(`sd_pipeline.shapes.drawing.shows_ring`):",
        "",
        "| sampler | rings with `<lora:ring>` | rings without | asked colour, with |",
        "|---|---|---|---|",
        *(rate.row() for rate in rates),
        "",
    ]
    (folder / "README.md").write_text("\n".join(lines), encoding="utf-8")
