"""Build tiny pipelines of every served family with random weights, for offline tests and demos.

Usage: ``python -m sd_pipeline.tiny DIR [--family FAMILY]`` (sd, sd2, sd-inpainting, sdxl,
sdxl-inpainting, sd3, sd3-no-t5, flux, flux-schnell, flux-fill) writes a pipeline folder that the normal
loader accepts (``--model DIR``). The images are noise: it exists to exercise the product, not to
draw pictures.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

TOKEN_LIMIT = 77


def _byte_alphabet() -> list[str]:
    """The 256 printable characters CLIP's byte-level BPE uses for raw bytes."""
    printable = list(range(ord("!"), ord("~") + 1))
    printable += list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    alphabet = [chr(code) for code in printable]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            alphabet.append(chr(256 + extra))
            extra += 1
    return alphabet


def write_tokenizer_files(folder: Path) -> None:
    """Write a character-level CLIP vocabulary (no merges) into ``folder``."""
    alphabet = _byte_alphabet()
    tokens = alphabet + [char + "</w>" for char in alphabet] + ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    vocab = {token: index for index, token in enumerate(tokens)}
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")


# Stable Diffusion 1.x's scheduler_config.json (less its class): every sampler the app derives from
# it gets SD's settings, e.g. DDIM without clipping latents to [-1, 1].
SD_SCHEDULER_CONFIG: dict[str, Any] = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}
TINY_UNET: dict[str, Any] = {
    "block_out_channels": (32, 64),
    "layers_per_block": 1,
    "sample_size": 32,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
    "cross_attention_dim": 32,
    "norm_num_groups": 32,
}
# Compute-heavy: a few hundred ms per 64x64, 10-step image on two CPU cores, so that the model's
# compute dominates a served request (bench.threads, bench.serving --kind heavy).
HEAVY_UNET: dict[str, Any] = {**TINY_UNET, "block_out_channels": (256, 512)}
# Nearly free: no attention, one block (about 1 ms a call on one core), for the simulated accelerator
# (SD_SIMULATED_GPU), where the modelled time is slept and the real modules should cost little.
MICRO_UNET: dict[str, Any] = {
    **TINY_UNET,
    "block_out_channels": (8,),
    "down_block_types": ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",),
    "mid_block_type": None,
    "norm_num_groups": 8,
}
TINY_VAE: dict[str, Any] = {  # four blocks: latents are 1/8 of the image per side, as in real SD
    "block_out_channels": (32, 32, 32, 32),
    "layers_per_block": 1,
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "latent_channels": 4,
    "norm_num_groups": 32,
}
MICRO_VAE: dict[str, Any] = {"block_out_channels": (8, 8, 8, 8), "norm_num_groups": 8}  # over TINY_VAE
TINY_TEXT: dict[str, Any] = {
    "hidden_size": 32,
    "intermediate_size": 37,
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "layer_norm_eps": 1e-5,
}


def _tokenizer() -> Any:
    """A character-level CLIP tokenizer, built offline."""
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory(prefix="tokenizer-") as tokenizer_dir:
        write_tokenizer_files(Path(tokenizer_dir))
        return CLIPTokenizer(
            vocab=str(Path(tokenizer_dir) / "vocab.json"),
            merges=str(Path(tokenizer_dir) / "merges.txt"),
            model_max_length=TOKEN_LIMIT,
        )


def _text_config(tokenizer: Any, text: dict[str, Any]) -> Any:
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        **{
            "bos_token_id": len(tokenizer) - 2,
            "eos_token_id": len(tokenizer) - 1,
            "pad_token_id": len(tokenizer) - 1,
            "vocab_size": len(tokenizer),
            "max_position_embeddings": TOKEN_LIMIT,
            **text,
        }
    )


def random_pipeline(
    *,
    unet: dict[str, Any],
    vae: dict[str, Any],
    text: dict[str, Any],
    seed: int = 0,
    scheduler: dict[str, Any] = SD_SCHEDULER_CONFIG,
) -> Any:
    """An SD pipeline (a ``StableDiffusionPipeline``) with random weights, built from component configs."""
    import torch
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = _tokenizer()
    return StableDiffusionPipeline(
        unet=UNet2DConditionModel(**unet),
        vae=AutoencoderKL(**vae),
        text_encoder=CLIPTextModel(_text_config(tokenizer, text)),
        tokenizer=tokenizer,
        scheduler=DPMSolverMultistepScheduler.from_config(scheduler),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def random_inpainting_pipeline(*, seed: int = 0) -> Any:
    """A ``StableDiffusionInpaintPipeline`` whose UNet reads 9 channels (latents, mask, masked-image
    latents), as stable-diffusion-inpainting's does."""
    from diffusers import StableDiffusionInpaintPipeline

    pipeline = random_pipeline(unet={**TINY_UNET, "in_channels": 9}, vae=TINY_VAE, text=TINY_TEXT, seed=seed)
    return StableDiffusionInpaintPipeline(**pipeline.components)


def random_sdxl_inpainting_pipeline(*, seed: int = 0) -> Any:
    """A ``StableDiffusionXLInpaintPipeline`` whose UNet reads 9 channels, as SDXL's inpainting model's does."""
    from diffusers import StableDiffusionXLInpaintPipeline, UNet2DConditionModel

    pipeline = random_sdxl_pipeline(seed=seed)
    components = {**pipeline.components, "unet": UNet2DConditionModel(**{**TINY_SDXL_UNET, "in_channels": 9})}
    return StableDiffusionXLInpaintPipeline(**components, requires_aesthetics_score=False, add_watermarker=False)


# SD 2.1's shape where it differs from 1.x: v-prediction (scheduler), attention upcast and linear
# projections (UNet), 768 px native size (96 x 8).
SD2_SCHEDULER_CONFIG: dict[str, Any] = {**SD_SCHEDULER_CONFIG, "prediction_type": "v_prediction"}
SD2_UNET: dict[str, Any] = {**TINY_UNET, "upcast_attention": True, "use_linear_projection": True, "sample_size": 96}


# SDXL's shape in small: two text encoders (the second with a projection whose output is the pooled
# text), their hidden states side by side as cross-attention context (32 + 32), and the UNet's
# "text_time" added embedding of 6 size ids x 8 plus the 32-wide pooled text (diffusers' SDXL tests).
TINY_SDXL_UNET: dict[str, Any] = {
    **TINY_UNET,
    "attention_head_dim": (2, 4),
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 8,
    "transformer_layers_per_block": (1, 2),
    "projection_class_embeddings_input_dim": 6 * 8 + 32,
    "cross_attention_dim": 64,
}
TINY_SDXL_TEXT: dict[str, Any] = {**TINY_TEXT, "projection_dim": 32}
# SDXL 1.0 base's scheduler_config.json (less its class).
SDXL_SCHEDULER_CONFIG: dict[str, Any] = {
    **SD_SCHEDULER_CONFIG,
    "timestep_spacing": "leading",
    "interpolation_type": "linear",
}


TINY_SDXL_VAE: dict[str, Any] = {**TINY_VAE, "sample_size": 128, "force_upcast": True}


def random_sdxl_pipeline(
    *,
    seed: int = 0,
    unet: dict[str, Any] = TINY_SDXL_UNET,
    vae: dict[str, Any] = TINY_SDXL_VAE,
    text: dict[str, Any] = TINY_SDXL_TEXT,
    text_2: dict[str, Any] = TINY_SDXL_TEXT,
) -> Any:
    """An SDXL pipeline (a ``StableDiffusionXLPipeline``) with random weights (tiny unless given configs)."""
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    tokenizer = _tokenizer()
    return StableDiffusionXLPipeline(
        unet=UNet2DConditionModel(**unet),
        vae=AutoencoderKL(**vae),
        text_encoder=CLIPTextModel(_text_config(tokenizer, text)),
        text_encoder_2=CLIPTextModelWithProjection(_text_config(tokenizer, text_2)),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        scheduler=EulerDiscreteScheduler.from_config(SDXL_SCHEDULER_CONFIG),
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )


def save_random_pipeline(
    folder: str | Path, *, unet: dict[str, Any], vae: dict[str, Any], text: dict[str, Any], seed: int = 0
) -> Path:
    """Build an SD pipeline with random weights from component configs and ``save_pretrained`` it."""
    folder = Path(folder)
    random_pipeline(unet=unet, vae=vae, text=text, seed=seed).save_pretrained(folder)
    return folder


# SD kinds: their UNet and VAE configs.
KINDS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "tiny": (TINY_UNET, TINY_VAE),
    "heavy": (HEAVY_UNET, TINY_VAE),
    "micro": (MICRO_UNET, {**TINY_VAE, **MICRO_VAE}),
}


# SD3's shape in small: two CLIP encoders with projections (pooled 32 + 32 = 64, hidden 32 + 32 = 64,
# padded to T5's width, the joint attention width), a T5 encoder (SD3 also runs without it), 16-channel
# latents in 2x2 patches, the VAE's scaling and shift factors and the flow-matching scheduler's shift.
TINY_SD3_TRANSFORMER: dict[str, Any] = {
    "sample_size": 32,
    "patch_size": 2,
    "in_channels": 16,
    "out_channels": 16,
    "num_layers": 2,
    "attention_head_dim": 8,
    "num_attention_heads": 4,
    "joint_attention_dim": 64,
    "caption_projection_dim": 32,
    "pooled_projection_dim": 64,
    "pos_embed_max_size": 96,
}
TINY_SD3_VAE: dict[str, Any] = {
    **TINY_VAE,
    "latent_channels": 16,
    "scaling_factor": 1.5305,
    "shift_factor": 0.0609,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
}


def random_sd3_pipeline(*, seed: int = 0, t5: bool = True) -> Any:
    """An SD3 pipeline (a ``StableDiffusion3Pipeline``, with or without T5) with random weights."""
    import torch
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextModelWithProjection, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    tokenizer = _tokenizer()
    t5_tokenizer = _t5_tokenizer() if t5 else None
    t5_config = T5Config(vocab_size=len(t5_tokenizer), **{**TINY_T5, "d_model": 64}) if t5_tokenizer else None
    return StableDiffusion3Pipeline(
        transformer=SD3Transformer2DModel(**TINY_SD3_TRANSFORMER),
        vae=AutoencoderKL(**TINY_SD3_VAE),
        text_encoder=CLIPTextModelWithProjection(_text_config(tokenizer, TINY_SDXL_TEXT)),
        text_encoder_2=CLIPTextModelWithProjection(_text_config(tokenizer, TINY_SDXL_TEXT)),
        text_encoder_3=T5EncoderModel(t5_config) if t5_config else None,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        tokenizer_3=t5_tokenizer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
    )


# FLUX.1's shape in small: CLIP's pooled output (32) and T5's states (32 wide, its 512 tokens) as
# text, 16-channel latents packed 2x2 into 64-wide tokens, rotary axes summing to the head width,
# the dev scheduler's dynamic shift; "flux" has dev's guidance embedding, "flux-schnell" none.
TINY_FLUX_TRANSFORMER: dict[str, Any] = {
    "patch_size": 1,
    "in_channels": 64,
    "num_layers": 1,
    "num_single_layers": 1,
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "joint_attention_dim": 32,
    "pooled_projection_dim": 32,
    "axes_dims_rope": (4, 4, 8),
}
TINY_T5: dict[str, Any] = {"d_model": 32, "d_ff": 37, "d_kv": 8, "num_heads": 4, "num_layers": 2}
FLUX_SCHEDULER_CONFIG: dict[str, Any] = {
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}


def _t5_tokenizer() -> Any:
    """A character-level T5 tokenizer (SentencePiece-style unigram over printable characters), built offline."""
    import string

    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -1.0)]
    pieces += [(char, -1.0) for char in string.printable if not char.isspace()]
    backend = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return T5TokenizerFast(
        tokenizer_object=backend, eos_token="</s>", unk_token="<unk>", pad_token="<pad>", extra_ids=0
    )


def random_flux_pipeline(*, seed: int = 0, guidance_embeds: bool = True) -> Any:
    """A FLUX.1 pipeline (a ``FluxPipeline``; dev with ``guidance_embeds``, else schnell) with random weights."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    tokenizer, t5_tokenizer = _tokenizer(), _t5_tokenizer()
    t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tokenizer), **TINY_T5))
    return FluxPipeline(
        transformer=FluxTransformer2DModel(**TINY_FLUX_TRANSFORMER, guidance_embeds=guidance_embeds),
        vae=AutoencoderKL(**TINY_SD3_VAE),
        text_encoder=CLIPTextModel(_text_config(tokenizer, TINY_TEXT)),
        text_encoder_2=t5,
        tokenizer=tokenizer,
        tokenizer_2=t5_tokenizer,
        scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER_CONFIG),
    )


def random_flux_fill_pipeline(*, seed: int = 0) -> Any:
    """A ``FluxFillPipeline`` (FLUX.1-Fill-dev's shape): its transformer reads the packed latents (64),
    the masked picture's packed latents (64) and the mask folded 8x8 and packed (256): 384 channels."""
    from diffusers import FluxFillPipeline, FluxTransformer2DModel

    parts = ("scheduler", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
    flux = random_flux_pipeline(seed=seed).components
    components = {name: flux[name] for name in parts}
    packed = TINY_FLUX_TRANSFORMER["in_channels"]
    factor = 2 ** (len(TINY_SD3_VAE["block_out_channels"]) - 1)
    fill = {**TINY_FLUX_TRANSFORMER, "in_channels": 2 * packed + 4 * factor * factor, "out_channels": packed}
    components["transformer"] = FluxTransformer2DModel(**fill, guidance_embeds=True)
    return FluxFillPipeline(**components)


FAMILIES = (
    "sd",
    "sd2",
    "sd-inpainting",
    "sdxl",
    "sdxl-inpainting",
    "sd3",
    "sd3-no-t5",
    "flux",
    "flux-schnell",
    "flux-fill",
)


def build_tiny_pipeline(folder: str | Path, *, seed: int = 0, kind: str = "tiny", family: str = "sd") -> Path:
    """Create a small random pipeline and ``save_pretrained`` it into ``folder``: ``family`` sd (1.x),
    sd2 (v-prediction, 768 native), sd-inpainting (a 9-channel inpainting UNet), sdxl, sdxl-inpainting, sd3 (with T5),
    sd3-no-t5, flux (FLUX.1-dev), flux-schnell or flux-fill (FLUX.1-Fill);
    for sd, ``kind`` tiny, heavy (compute dominates) or micro."""
    folder = Path(folder)
    if family == "sdxl":
        random_sdxl_pipeline(seed=seed).save_pretrained(folder)
        return folder
    if family == "sdxl-inpainting":
        random_sdxl_inpainting_pipeline(seed=seed).save_pretrained(folder)
        return folder
    if family.startswith("sd3"):
        random_sd3_pipeline(seed=seed, t5=family == "sd3").save_pretrained(folder)
        return folder
    if family == "flux-fill":
        random_flux_fill_pipeline(seed=seed).save_pretrained(folder)
        return folder
    if family.startswith("flux"):
        random_flux_pipeline(seed=seed, guidance_embeds=family == "flux").save_pretrained(folder)
        return folder
    if family == "sd-inpainting":
        random_inpainting_pipeline(seed=seed).save_pretrained(folder)
        return folder
    if family == "sd2":
        pipeline = random_pipeline(
            unet=SD2_UNET, vae=TINY_VAE, text=TINY_TEXT, seed=seed, scheduler=SD2_SCHEDULER_CONFIG
        )
        pipeline.save_pretrained(folder)
        return folder
    unet, vae = KINDS[kind]
    return save_random_pipeline(folder, unet=unet, vae=vae, text=TINY_TEXT, seed=seed)


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point: ``python -m sd_pipeline.tiny DIR``."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, help="where to write the pipeline")
    parser.add_argument("--seed", type=int, default=0, help="seed for the random weights")
    parser.add_argument("--family", choices=FAMILIES, default="sd", help="the model family (pipeline class)")
    parser.add_argument(
        "--kind", choices=sorted(KINDS), default="tiny", help="sd only: heavy: compute dominates; micro: nearly free"
    )
    args = parser.parse_args(argv)
    path = build_tiny_pipeline(args.folder, seed=args.seed, kind=args.kind, family=args.family)
    print(f"tiny pipeline written to {path}; run: python app.py --model {path}")


if __name__ == "__main__":
    main()
