"""Random LoRA adapters for a pipeline folder, in the file formats people share, for offline tests.

``write_random_lora(model_dir, path)`` injects a LoRA with random weights (PEFT) into the
denoiser's attention projections and, optionally, the CLIP text encoders, and writes it as
``kohya`` (AUTOMATIC1111's ``lora_unet_...`` / ``lora_te_...`` keys with ``alpha``; SD 1.x / 2.x)
or ``peft`` (diffusers' ``unet.<module>.lora_A.weight`` keys; every family). The adapters draw
nothing in particular: they exist to check that the served image equals diffusers' with them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from diffusers import DiffusionPipeline
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora.layer import LoraLayer
from safetensors.torch import save_file

Format = Literal["kohya", "peft"]
DENOISER_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
CLIP_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")  # CLIP encoders (T5's text_encoder_3 / Flux's _2 differ)


def _weight(module: torch.nn.Module) -> torch.Tensor:
    weight = module.weight
    assert isinstance(weight, torch.Tensor)
    return weight.detach().clone().contiguous()


def lora_tensors(model: torch.nn.Module, key: str, file_format: Format) -> dict[str, torch.Tensor]:
    """Every LoRA layer (PEFT's adapter "default") of ``model`` as a file's tensors, under ``key``
    (a kohya prefix or a diffusers component name)."""
    tensors: dict[str, torch.Tensor] = {}
    for name, layer in model.named_modules():
        if not isinstance(layer, LoraLayer):
            continue
        down = _weight(layer.lora_A["default"])
        up = _weight(layer.lora_B["default"])
        if file_format == "kohya":
            stem = key + name.replace(".", "_")
            tensors |= {f"{stem}.lora_down.weight": down, f"{stem}.lora_up.weight": up}
            tensors[f"{stem}.alpha"] = torch.tensor(float(layer.lora_alpha["default"]))
        else:
            tensors |= {f"{key}.{name}.lora_A.weight": down, f"{key}.{name}.lora_B.weight": up}
    return tensors


def write_random_lora(
    model_dir: str | Path,
    path: str | Path,
    *,
    seed: int = 0,
    file_format: Format = "kohya",
    rank: int = 4,
    alpha: int = 8,
    text_encoder: bool = True,
    extra_targets: tuple[str, ...] = (),
) -> Path:
    """Write a random adapter for the pipeline in ``model_dir`` to ``path`` (a ``.safetensors`` file).
    ``peft`` files carry no alpha: diffusers then scales by 1 (alpha = rank)."""
    torch.manual_seed(seed)
    pipeline = DiffusionPipeline.from_pretrained(str(model_dir))
    denoiser_name = "unet" if getattr(pipeline, "unet", None) is not None else "transformer"
    denoiser = getattr(pipeline, denoiser_name)
    targets = DENOISER_TARGETS + list(extra_targets)
    alpha = alpha if file_format == "kohya" else rank
    inject_adapter_in_model(
        LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights=False), denoiser
    )
    tensors = lora_tensors(denoiser, "lora_unet_" if file_format == "kohya" else denoiser_name, file_format)
    encoders = [
        name
        for name in TEXT_ENCODERS
        if text_encoder and type(getattr(pipeline, name, None)).__name__.startswith("CLIPTextModel")
    ]
    for index, name in enumerate(encoders):
        encoder = getattr(pipeline, name)
        inject_adapter_in_model(
            LoraConfig(r=rank, lora_alpha=max(alpha // 2, 1), target_modules=CLIP_TARGETS, init_lora_weights=False),
            encoder,
        )
        prefix = ("lora_te_text_model_" if index == 0 else "lora_te2_text_model_") if file_format == "kohya" else name
        tensors |= lora_tensors(encoder, prefix, file_format)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return path
