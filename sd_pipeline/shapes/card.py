"""The model card written beside a trained shapes pipeline (README.md in its folder)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sd_pipeline.contract.models import DEFAULTS_FILE
from sd_pipeline.shapes.drawing import COLOURS, SHAPES

CARD = """# tiny-shapes: a Stable Diffusion pipeline trained on two CPU cores

What it draws: one **{colours}** **{shapes}** on a white background, 64x64
(it was trained on nothing else; other prompts give one of these). Prompts like
"a red circle", "a blue square on a white background" or "green triangle".

Guidance 1 to 5 works with every sampler (the app's default, DPM++ 2M Karras, also at 7.5); at
7.5, DPM++ 2M, Euler a and UniPC overshoot this small model's colours (a red circle may come out
green). `adherence.md` has the measured figures (`python -m sd_pipeline.shapes check {folder} --save`).
So the model recommends guidance 4 and 20 steps in `model_defaults.json`: the app's page and API
take them as their defaults (every sampler drew the colour asked for in all 48 pictures there).

The classes users serve with any SD 1.x model: `AutoencoderKL` (latents 1/8 of the image
side, 4 channels), `UNet2DConditionModel` with cross-attention, a CLIP text encoder with a
character-level CLIP tokenizer, and `DPMSolverMultistepScheduler`; every sampler the app
offers works. Weights are random at first and trained here, so the folder loads offline.

## How it was trained

    python -m sd_pipeline.shapes train {folder}

Seed {seed}; {pictures} pictures drawn by `sd_pipeline/shapes/drawing.py` (every colour with
every shape, random size 26-46 px and position); captions in three phrasings.

1. Autoencoder: {vae_steps} steps of batch {vae_batch}, MSE reconstruction + 1e-6 KL, AdamW
   1e-3. Final loss {vae_loss:.4f}; latent scaling factor {scaling_factor:.4f}.
2. UNet and text encoder together: {unet_steps} steps of batch {unet_batch}, noise from
   `DDPMScheduler.add_noise`, epsilon prediction (MSE), 10 % of captions dropped for
   classifier-free guidance, AdamW 1e-3 with cosine decay. Final loss {unet_loss:.4f}.

Training took {minutes:.1f} minutes on {threads} CPU threads. The loss log is `train_log.csv`.

## Training report

```json
{report}
```
"""


def write_model_card(folder: Path, report: dict[str, Any]) -> Path:
    """Write README.md (the model card) and training.json into ``folder``."""
    plan = report["plan"]
    text = CARD.format(
        colours=", ".join(COLOURS),
        shapes=", ".join(SHAPES),
        folder=folder.name,
        seed=plan["seed"],
        pictures=plan["pictures"],
        vae_steps=plan["vae_steps"],
        vae_batch=plan["vae_batch"],
        unet_steps=plan["unet_steps"],
        unet_batch=plan["unet_batch"],
        vae_loss=report["final_losses"]["autoencoder"],
        unet_loss=report["final_losses"]["unet"],
        scaling_factor=report["scaling_factor"],
        minutes=report["seconds"] / 60,
        threads=report["threads"],
        report=json.dumps(report, indent=2),
    )
    (folder / "training.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    path = folder / "README.md"
    path.write_text(text, encoding="utf-8")
    return path


# Every sampler draws the colour asked for at these settings (adherence.md); the example is the page's
# placeholder; live previews decode with the VAE (full): a linear map reads the colour of 4 of 8
# pictures half-way, the VAE 8 of 8 (tests/test_previews.py: half_way_colours).
RECOMMENDED = {"steps": 20, "guidance_scale": 4.0, "example_prompt": "a green triangle", "preview": "full"}


def write_recommended_defaults(folder: Path) -> None:
    """``model_defaults.json``: the settings the app offers first for this model."""
    (folder / DEFAULTS_FILE).write_text(json.dumps(RECOMMENDED, indent=2) + "\n", encoding="utf-8")
