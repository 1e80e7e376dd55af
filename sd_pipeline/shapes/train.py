"""Train the tiny shapes pipeline: an SD pipeline small enough to train on two CPU cores.

The same diffusers classes users serve (``AutoencoderKL`` with latents 1/8 of the image side,
``UNet2DConditionModel``, a CLIP text encoder and tokenizer, a DPM-Solver scheduler), trained
the way diffusers' training examples train them, on pictures ``drawing`` draws:

1. the autoencoder: reconstruction (MSE) plus a small KL term; its latents' scale is then
   measured and saved as ``scaling_factor``;
2. the UNet and the text encoder together: noise added with ``DDPMScheduler.add_noise`` at a
   random timestep, the UNet predicts it (MSE); 10 % of captions are dropped to "" so that
   classifier-free guidance works.

Fixed seeds; a progress bar and a loss log (``train_log.csv`` in the output folder).
"""

from __future__ import annotations

import csv
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from sd_pipeline.shapes.drawing import examples
from sd_pipeline.tiny import TINY_VAE, random_pipeline

SHAPES_UNET: dict[str, Any] = {
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (48, 96),
    "layers_per_block": 1,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": 64,
    "attention_head_dim": 8,
    "norm_num_groups": 16,
}
SHAPES_VAE: dict[str, Any] = {  # the tiny VAE's four blocks (64x64 pictures, 8x8 latents), narrower at the top
    **TINY_VAE,
    "block_out_channels": (16, 32, 32, 32),
    "norm_num_groups": 8,
    "sample_size": 64,
}
SHAPES_TEXT: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "layer_norm_eps": 1e-5,
}
CAPTION_DROPOUT = 0.1


@dataclass(frozen=True)
class TrainingPlan:
    """How long and on what the pipeline trains; the defaults are the committed model's."""

    seed: int = 0
    pictures: int = 4096
    vae_steps: int = 1000
    vae_batch: int = 16
    unet_steps: int = 2500
    unet_batch: int = 64


def train_pipeline(folder: Path, plan: TrainingPlan) -> dict[str, Any]:
    """Train the pipeline and ``save_pretrained`` it into ``folder``; returns what the model card reports."""
    from diffusers import DDPMScheduler

    seed = plan.seed
    torch.manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    pipeline = random_pipeline(unet=SHAPES_UNET, vae=SHAPES_VAE, text=SHAPES_TEXT, seed=seed)
    drawn = examples(plan.pictures, seed)
    images = torch.from_numpy(np.stack([np.asarray(picture) for picture, *_ in drawn])).permute(0, 3, 1, 2)
    images = images.float() / 127.5 - 1.0
    captions = [text for _, text, *_ in drawn]
    log_rows: list[dict[str, Any]] = []
    started = time.perf_counter()
    generator = torch.Generator().manual_seed(seed)

    vae = pipeline.vae
    vae.train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    for step in (bar := tqdm(range(plan.vae_steps), desc="autoencoder")):
        x = images[torch.randint(len(images), (plan.vae_batch,), generator=generator)]
        posterior = vae.encode(x).latent_dist
        reconstruction = vae.decode(posterior.sample(generator)).sample
        loss = F.mse_loss(reconstruction, x) + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        _log(log_rows, bar, "autoencoder", step, loss, started)
    vae.eval()
    with torch.no_grad():
        latents = torch.cat([vae.encode(chunk).latent_dist.mean for chunk in images.split(256)])  # type: ignore[no-untyped-call]
    scaling_factor = float(1.0 / latents.std())
    vae.register_to_config(scaling_factor=scaling_factor)
    latents = latents * scaling_factor

    tokenizer, text_encoder, unet = pipeline.tokenizer, pipeline.text_encoder, pipeline.unet
    tokens = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt")
    empty = tokenizer([""], padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt")
    noise_scheduler = DDPMScheduler.from_config(pipeline.scheduler.config)
    text_encoder.train()
    unet.train()
    parameters = [*unet.parameters(), *text_encoder.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=1e-3, weight_decay=1e-2)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=plan.unet_steps, eta_min=1e-5)
    batch = plan.unet_batch
    for step in (bar := tqdm(range(plan.unet_steps), desc="unet + text encoder")):
        loss = noise_prediction_loss(
            pipeline, noise_scheduler, latents, tokens.input_ids, empty.input_ids[0], batch, generator
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        schedule.step()
        _log(log_rows, bar, "unet", step, loss, started)
    text_encoder.eval()
    unet.eval()

    pipeline.save_pretrained(folder, safe_serialization=True)
    with (folder / "train_log.csv").open("w", newline="") as log:
        writer = csv.DictWriter(log, fieldnames=["stage", "step", "loss", "seconds"])
        writer.writeheader()
        writer.writerows(log_rows)
    return {
        "seconds": round(time.perf_counter() - started, 1),
        "plan": asdict(plan),
        "scaling_factor": scaling_factor,
        "threads": torch.get_num_threads(),
        "final_losses": {stage: _last_mean(log_rows, stage) for stage in ("autoencoder", "unet")},
    }


def noise_prediction_loss(
    pipeline: Any,
    noise_scheduler: Any,
    latents: torch.Tensor,
    token_ids: torch.Tensor,
    empty_ids: torch.Tensor,
    batch: int,
    generator: torch.Generator,
) -> torch.Tensor:
    """One batch of the model's objective, as diffusers' training examples compute it: ``batch``
    latents and their captions (``CAPTION_DROPOUT`` of them replaced by the empty caption), noise
    added at random timesteps, the UNet's prediction of that noise against it (MSE)."""
    chosen = torch.randint(len(latents), (batch,), generator=generator)
    ids = token_ids[chosen].clone()
    ids[torch.rand(batch, generator=generator) < CAPTION_DROPOUT] = empty_ids
    clean = latents[chosen]
    noise = torch.randn(clean.shape, generator=generator)
    timesteps = torch.randint(noise_scheduler.config.num_train_timesteps, (batch,), generator=generator)
    noisy = noise_scheduler.add_noise(clean, noise, timesteps)
    prediction = pipeline.unet(noisy, timesteps, encoder_hidden_states=pipeline.text_encoder(ids)[0]).sample
    return F.mse_loss(prediction, noise)


def _log(rows: list[dict[str, Any]], bar: Any, stage: str, step: int, loss: torch.Tensor, started: float) -> None:
    value = float(loss.detach())
    bar.set_postfix(loss=f"{value:.4f}")
    if step % 50 == 0:
        rows.append(
            {"stage": stage, "step": step, "loss": round(value, 5), "seconds": round(time.perf_counter() - started, 1)}
        )


def _last_mean(rows: list[dict[str, Any]], stage: str) -> float:
    losses = [row["loss"] for row in rows if row["stage"] == stage][-10:]
    return float(sum(losses) / max(len(losses), 1))
